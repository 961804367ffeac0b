"""What only the fused C++ CPU op (backend "cpu") has: torch.compile over it, its own checks of bad inputs, and
a failed build. Its agreement with the fp64 reference, every backend's, is tests/test_backend_conformance.py.

Uninitialised memory is poisoned with NaN (deterministic mode fills every ``empty`` tensor, the C++ op's
outputs and buffers included), so an element the op forgets to write shows up as NaN.
"""

from __future__ import annotations

import pytest
import torch

from ekipl_kernels import LossConfig, fused_linear_grpo_loss, fused_linear_logprobs
from ekipl_kernels.backends import BackendUnavailable
from ekipl_kernels.loss_scalars import loss_scalars, slot
from ekipl_kernels.op_builder import build_op, load_cpu_op
from ekipl_kernels.testing import random_batch


pytestmark = pytest.mark.usefixtures("poisoned_uninitialized_memory")


@pytest.fixture(scope="module", autouse=True)
def built_op():
    load_cpu_op()


def make_batch(lengths, vocab, width, dtype, *, seed):
    """The shared generator's batch: expert and masked tokens at random positions."""
    return random_batch(lengths=lengths, vocab=vocab, hidden_size=width, dtype=dtype, seed=seed, adversarial=False,
                        expert_fraction=0.4, masked_fraction=0.15)


# ----------------------------------------------------------------------------- torch.compile


def test_torch_compile_over_the_op():
    batch = make_batch([6, 10], vocab=777, width=16, dtype=torch.float32, seed=8)
    config = LossConfig(beta=0.04, entropy_coef=0.01)

    def step(hidden, weight):
        out = fused_linear_grpo_loss(hidden, weight, batch.targets, **batch.keywords, config=config, backend="cpu")
        return out.loss

    results = []
    for fn in (step, torch.compile(step, backend="aot_eager")):
        hidden = batch.hidden.clone().requires_grad_()
        weight = batch.weight.clone().requires_grad_()
        loss = fn(hidden, weight)
        loss.backward()
        results.append((loss.detach(), hidden.grad, weight.grad))
    for eager, compiled in zip(*results):
        assert torch.allclose(eager, compiled, rtol=1e-6, atol=1e-8)

    logprobs = torch.compile(torch.ops.ekipl.fused_linear_logprobs, backend="aot_eager", fullgraph=True)
    lp, _ = logprobs(batch.hidden, batch.weight, batch.targets, 1.0, False)
    assert torch.allclose(lp, fused_linear_logprobs(batch.hidden, batch.weight, batch.targets, backend="cpu"))


# ----------------------------------------------------------------------------- the op's own checks, the build


def test_op_rejects_bad_inputs_with_clear_messages():
    batch = make_batch([4], vocab=50, width=8, dtype=torch.float32, seed=9)
    logprobs = torch.ops.ekipl.fused_linear_logprobs
    with pytest.raises(RuntimeError, match="hidden must be float32, bfloat16, float16 or float64; got Int"):
        logprobs(batch.hidden.int(), batch.weight.int(), batch.targets, 1.0, False)
    with pytest.raises(RuntimeError, match=r"targets\[2\] = 50 is outside \[0, 50\)"):
        logprobs(batch.hidden, batch.weight, torch.tensor([0, 1, 50, 3]), 1.0, False)
    loss_op = torch.ops.ekipl.fused_linear_grpo_loss
    tokens = (torch.ones(4), torch.ones(4), torch.zeros(4, dtype=torch.bool), None, None, None)
    flags = dict(need_entropy=False, grad_hidden=True, grad_weight=True)
    with pytest.raises(RuntimeError, match="ref_logprobs is required when beta > 0"):
        loss_op(batch.hidden, batch.weight, batch.targets, *tokens, scalars=loss_scalars(LossConfig(beta=0.1)), **flags)
    bad = loss_scalars(LossConfig())
    bad[slot("kl_clamp")] = float("nan")
    with pytest.raises(RuntimeError, match="the loss scalars must be finite; got nan for kl_clamp"):
        loss_op(batch.hidden, batch.weight, batch.targets, *tokens, scalars=bad, **flags)


def test_failed_build_quotes_the_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    source = tmp_path / "broken.cpp"
    source.write_text("#error ekipl test: this source does not compile\n")
    with pytest.raises(BackendUnavailable, match="(?s)building the C\\+\\+ op 'ekipl_broken'.*does not compile"):
        build_op("ekipl_broken", [source])
