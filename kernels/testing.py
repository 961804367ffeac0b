"""Random packed batches for the tests and benchmarks of every backend (one generator, so that a new input
feature reaches every harness at once).

The default batch is small but adversarial: sequences of one token, a fully masked one, an expert-only one,
one that switches from expert to policy mid-way (LUFFY's prefix), padding at a tail; old, reference and
behaviour log-probs near the true ones, so ratios cross both clip bounds and the KL is not zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class RandomBatch:
    hidden: torch.Tensor  # [N, H]
    weight: torch.Tensor  # [V, H]
    targets: torch.Tensor  # [N]
    keywords: dict  # the per-token keywords of fused_linear_grpo_loss (advantages, cu_seqlens, ...)
    bias: Optional[torch.Tensor] = None  # [V], the LM head's bias (with_bias=True)

    def logits(self) -> torch.Tensor:
        logits = self.hidden.double() @ self.weight.double().T
        return (logits if self.bias is None else logits + self.bias.double()).to(self.hidden.dtype)


def random_batch(*, lengths=(1, 9, 1, 12, 17, 8), vocab=1001, hidden_size=40, dtype=torch.float32, device="cpu",
                 logit_scale=1.0, seed=0, per_token_advantages=False, adversarial=True, with_bias=False) -> RandomBatch:
    """``adversarial=False``: every token unmasked and a policy token (for benchmarks and plain checks).
    ``with_bias``: an LM-head bias ~ N(0, 1) too (``RandomBatch.bias``; the log-probs near which old, reference and
    behaviour log-probs are drawn include it)."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    # Logits of spread ~logit_scale: hidden ~ N(0, 1), weight rows ~ N(0, 1/H).
    hidden = (torch.randn(n, hidden_size, generator=gen) * logit_scale).to(dtype).to(device)
    weight = (torch.randn(vocab, hidden_size, generator=gen) / hidden_size**0.5).to(dtype).to(device)
    targets = torch.randint(0, vocab, (n,), generator=gen).to(device)
    origin = torch.zeros(n, dtype=torch.long)
    mask = torch.ones(n)
    if adversarial:
        assert len(lengths) >= 6, "the adversarial layout needs six sequences"
        seq = lambda s: slice(int(cu[s]), int(cu[s + 1]))  # noqa: E731
        mask[seq(1)] = 0.0  # fully masked sequence
        origin[seq(3)] = 2  # expert-only sequence
        origin[int(cu[4]): int(cu[4]) + 6] = 1  # expert prefix, then the policy continues
        mask[int(cu[5]) + 5: int(cu[6])] = 0.0  # padding at the tail
    bias = (torch.randn(vocab, generator=gen)).to(dtype).to(device) if with_bias else None
    logits = hidden.double() @ weight.double().T + (0.0 if bias is None else bias.double())
    lp = torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1).cpu()
    old = (lp + 0.4 * torch.randn(n, generator=gen)).float()
    ref = (lp + 0.3 * torch.randn(n, generator=gen)).float()
    behavior = (lp + 0.5 * torch.randn(n, generator=gen)).float()
    advantages = torch.randn(n if per_token_advantages else len(lengths), generator=gen)
    to = lambda t: t.to(device)  # noqa: E731
    keywords = dict(
        advantages=to(advantages), cu_seqlens=to(cu), origin=to(origin), old_logprobs=to(old), ref_logprobs=to(ref),
        behavior_logprobs=to(behavior), loss_mask=to(mask),
    )
    return RandomBatch(hidden, weight, targets, keywords, bias)
