"""The portable chunked backend when a batch spans many chunks (the byte budget forced small)."""

import torch

import ekipl_kernels
from ekipl_kernels import LossConfig, chunked


def test_many_small_chunks_match_the_reference(monkeypatch):
    torch.manual_seed(7)
    n, h, v = 29, 16, 1001
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 4 * v * 3)  # three rows per chunk, a ragged last one
    hidden = (torch.randn(n, h) * 2).requires_grad_()
    weight = torch.randn(v, h).requires_grad_()
    targets = torch.randint(0, v, (n,))
    cu = torch.tensor([0, 1, 9, 20, 29])
    kw = dict(advantages=torch.randn(4), cu_seqlens=cu, origin=torch.randint(0, 3, (n,)),
              old_logprobs=torch.randn(n) - 6, ref_logprobs=torch.randn(n) - 6,
              config=LossConfig(beta=0.1, entropy_coef=0.01, temperature=0.7, agg="seq-mean-token-mean"))
    outs = {b: ekipl_kernels.fused_linear_grpo_loss(hidden, weight, targets, backend=b, **kw) for b in ("reference", "chunked")}
    grads = {b: torch.autograd.grad(o.loss, (hidden, weight)) for b, o in outs.items()}
    ref, got = outs["reference"], outs["chunked"]
    assert torch.isfinite(got.loss) and abs(got.loss.item() - ref.loss.item()) <= 1e-4 * abs(ref.loss.item()) + 1e-6
    for r, g in zip(grads["reference"], grads["chunked"]):
        assert (g - r).norm() / r.norm() < 1e-4
    lp = ekipl_kernels.fused_linear_logprobs(hidden, weight, targets, temperature=0.7, backend="chunked")
    assert (lp - ref.logprobs).abs().max() < 1e-4
