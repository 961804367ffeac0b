"""Random packed batches for the tests and benchmarks of every backend (one generator, so that a new input
feature reaches every harness at once).

The default batch is small but adversarial: sequences of one token, a fully masked one, an expert-only one,
one that switches from expert to policy mid-way (LUFFY's prefix), padding at a tail; old, reference and
behaviour log-probs near the true ones, so ratios cross both clip bounds and the KL is not zero. Keywords add
expert and masked tokens at random positions, poison the masked tokens, hide logits behind -inf, drop the old
log-probs; ``adversarial=False`` gives the plain batch of the benchmarks.
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
    absent: Optional[torch.Tensor] = None  # [N, V] bool, the logits that logits() sets to -inf (minus_inf_fraction)

    def logits(self) -> torch.Tensor:
        logits = self.hidden.double() @ self.weight.double().T
        logits = logits if self.bias is None else logits + self.bias.double()
        return (logits if self.absent is None else logits.masked_fill(self.absent, float("-inf"))).to(self.hidden.dtype)


def random_batch(*, lengths=(1, 9, 1, 12, 17, 8), vocab=1001, hidden_size=40, dtype=torch.float32, device="cpu",
                 logit_scale=1.0, seed=0, per_token_advantages=False, adversarial=True, with_bias=False, with_old=True,
                 expert_fraction=0.0, masked_fraction=0.0, masked_garbage=False,
                 minus_inf_fraction=0.0) -> RandomBatch:
    """``adversarial=False``: every token unmasked and a policy token (for benchmarks and plain checks).
    ``with_bias``: an LM-head bias ~ N(0, 1) too (``RandomBatch.bias``; the log-probs near which old, reference and
    behaviour log-probs are drawn include it). ``with_old=False``: no old log-probs (``old_logprobs=None``).
    ``expert_fraction``, ``masked_fraction``: each token is an expert's (origin 1 or 2), masked, with that
    probability; the adversarial layout is laid over them unchanged.
    ``masked_garbage``: NaN or inf in every per-token input of the masked tokens (old, reference and behaviour
    log-probs, per-token advantages, the advantage of a sequence without an unmasked token) and NaN or inf in
    their hidden rows, by turns; the same call without it gives the clean batch.
    ``minus_inf_fraction``: that fraction of the logits, never a target's, is -inf in ``RandomBatch.logits()``.
    Keywords at their defaults draw nothing, so a batch stays the same when keywords are added."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    # Logits of spread ~logit_scale: hidden ~ N(0, 1), weight rows ~ N(0, 1/H).
    hidden = (torch.randn(n, hidden_size, generator=gen) * logit_scale).to(dtype).to(device)
    weight = (torch.randn(vocab, hidden_size, generator=gen) / hidden_size**0.5).to(dtype).to(device)
    targets = torch.randint(0, vocab, (n,), generator=gen).to(device)
    origin = torch.zeros(n, dtype=torch.long)
    mask = torch.ones(n)
    bias = (torch.randn(vocab, generator=gen)).to(dtype).to(device) if with_bias else None
    lp = _true_logprobs(hidden, weight, bias, targets)
    old = (lp + 0.4 * torch.randn(n, generator=gen)).float()
    ref = (lp + 0.3 * torch.randn(n, generator=gen)).float()
    behavior = (lp + 0.5 * torch.randn(n, generator=gen)).float()
    advantages = torch.randn(n if per_token_advantages else len(lengths), generator=gen)
    if expert_fraction:
        origin = torch.randint(1, 3, (n,), generator=gen) * (torch.rand(n, generator=gen) < expert_fraction)
    if masked_fraction:
        mask[torch.rand(n, generator=gen) < masked_fraction] = 0.0
    if adversarial:
        assert len(lengths) >= 6, "the adversarial layout needs six sequences"
        seq = lambda s: slice(int(cu[s]), int(cu[s + 1]))  # noqa: E731
        mask[seq(1)] = 0.0  # fully masked sequence
        origin[seq(3)] = 2  # expert-only sequence
        origin[int(cu[4]): int(cu[4]) + 6] = 1  # expert prefix, then the policy continues
        origin[int(cu[4]) + 6: int(cu[5])] = 0  # (whatever expert_fraction drew)
        mask[int(cu[5]) + 5: int(cu[6])] = 0.0  # padding at the tail
    absent = None
    if minus_inf_fraction:
        absent = torch.rand(n, vocab, generator=gen) < minus_inf_fraction
        absent[torch.arange(n), targets.cpu()] = False  # a masked vocabulary never hides the target
        absent = absent.to(device)
    if masked_garbage:
        masked = mask == 0
        rows = masked.nonzero().squeeze(1)
        hidden = hidden.clone()
        hidden[rows[0::2].to(device)] = float("nan")
        hidden[rows[1::2].to(device)] = float("inf")
        old, behavior = old.masked_fill(masked, float("nan")), behavior.masked_fill(masked, float("nan"))
        ref = ref.masked_fill(masked, float("inf"))
        if per_token_advantages:
            advantages = advantages.masked_fill(masked, float("nan"))
        else:
            unmasked = torch.zeros(len(lengths)).index_add_(0, torch.repeat_interleave(torch.tensor(lengths)), mask)
            advantages = advantages.masked_fill(unmasked == 0, float("nan"))
    to = lambda t: t.to(device)  # noqa: E731
    keywords = dict(
        advantages=to(advantages), cu_seqlens=to(cu), origin=to(origin), old_logprobs=to(old) if with_old else None,
        ref_logprobs=to(ref), behavior_logprobs=to(behavior), loss_mask=to(mask),
    )
    return RandomBatch(hidden, weight, targets, keywords, bias, absent)


def _true_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   targets: torch.Tensor) -> torch.Tensor:
    """The targets' log-probs in fp64 on the CPU, computed on the inputs' device a bounded block of rows at a time
    (2**26 logits: a benchmark's batch too)."""
    step = max(1, 2**26 // weight.shape[0])
    w = weight.double()
    out = [torch.zeros(0, dtype=torch.float64)]
    for start in range(0, hidden.shape[0], step):
        logits = hidden[start:start + step].double() @ w.T + (0.0 if bias is None else bias.double())
        out.append(torch.log_softmax(logits, -1).gather(1, targets[start:start + step, None]).squeeze(1).cpu())
    return torch.cat(out)
