"""The Triton kernels against the fp64 reference.

Without a GPU the kernels run on CPU tensors in Triton's interpreter: ``backend="triton"`` on a CPU
tensor loads an interpreted copy of the kernel package (see ``ekipl_kernels.triton_backend``), whatever
``TRITON_INTERPRET`` says and whether or not triton was imported earlier in this process. Shapes are
small but adversarial: V = 1001 against 256-wide vocabulary tiles, H = 40 against 32-wide K tiles,
scratch buffers small enough that the rows and vocab schedules both loop over several chunks.

Tests named ``test_cuda_*`` run the same checks on the GPU at realistic shapes in bf16 (and are
skipped elsewhere): ``pytest tests/test_triton_kernels.py -k cuda``. ``benchmarks/gpu_check.sh`` runs the
GPU proof of ``tests/test_triton_gpu.py`` and the timings instead, to fit its time.

Thresholds (DESIGN.md): relative error ``|out - ref| / |ref|`` under 1e-4 with fp32 inputs, 1e-2 with
bf16/fp16 inputs; on the GPU with bf16 inputs log-probs under 2e-3 and gradients under 1e-2. NaN never.
"""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

from ekipl_kernels import LossConfig, fused_linear_grpo_loss, fused_linear_logprobs, grpo_loss
from ekipl_kernels.backends import resolve_backend
from ekipl_kernels.testing import RandomBatch, random_batch

triton = pytest.importorskip("triton")
triton_backend = pytest.importorskip("ekipl_kernels.triton_backend")

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}
SCHEDULES = ("rows", "vocab")

# Every branch of the token loss, each config once per schedule.
CONFIGS = {
    "ppo-default": LossConfig(),
    "clip-higher-dual-k1": LossConfig(eps_low=0.2, eps_high=0.28, dual_clip=3.0, beta=0.05, kl="k1"),
    "k2-entropy-temp": LossConfig(beta=0.1, kl="k2", entropy_coef=0.01, temperature=0.7),
    "is-tis-k3": LossConfig(expert_mode="is", tis_cap=1.5, beta=0.04, kl="k3"),
    "shaped-entropy": LossConfig(expert_mode="shaped", shaping_gamma=0.1, entropy_coef=0.001),
    "seq-mean": LossConfig(agg="seq-mean-token-mean", beta=0.02, temperature=1.3),
    "dr-grpo": LossConfig(agg="seq-mean-token-sum-norm", max_len=32, dual_clip=2.0, eps_high=0.3),
}


# The shared adversarial batch (one-token, fully masked, expert-only and expert-prefix sequences, a padded tail).
Batch = RandomBatch
make_batch = random_batch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    assert out.shape == ref.shape
    assert torch.isfinite(out).all(), "non-finite values in the output"
    denom = ref.norm()
    if denom == 0:
        return float(out.norm())
    return float((out - ref).norm() / denom)


def loss_err(out: torch.Tensor, ref: torch.Tensor, scale: float) -> float:
    """Error of a scalar loss, relative to the size of its terms (the sum itself may cancel to ~0)."""
    out, ref = float(out.detach()), float(ref.detach())
    assert out == out and abs(out) != float("inf")
    return abs(out - ref) / max(abs(ref), scale)


def run_linear(batch: Batch, config: LossConfig, backend: str):
    hidden = batch.hidden.clone().requires_grad_()
    weight = batch.weight.clone().requires_grad_()
    out = fused_linear_grpo_loss(hidden, weight, batch.targets, config=config, backend=backend, **batch.keywords)
    out.loss.backward()
    return out, hidden.grad, weight.grad


def check_linear(batch: Batch, config: LossConfig, tol: float, lp_tol: float = None):
    out, d_hidden, d_weight = run_linear(batch, config, "triton")
    ref, ref_hidden, ref_weight = run_linear(batch, config, "reference")
    lp_tol = tol if lp_tol is None else lp_tol
    assert loss_err(out.loss, ref.loss, 1e-3) < tol
    assert rel_err(out.logprobs, ref.logprobs) < lp_tol
    if config.entropy_coef != 0:
        assert rel_err(out.entropy, ref.entropy) < lp_tol
    else:
        assert out.entropy is None
    assert d_hidden.dtype == batch.hidden.dtype and d_weight.dtype == batch.weight.dtype
    assert rel_err(d_hidden, ref_hidden) < tol
    assert rel_err(d_weight, ref_weight) < tol
    # Masked tokens get exactly no gradient.
    masked = batch.keywords["loss_mask"] == 0
    assert bool((d_hidden[masked] == 0).all())
    # A token sitting on a clip bound may flip either way within rounding: allow one.
    active = float((batch.keywords["loss_mask"] > 0).sum())
    assert abs(out.stats["clip_frac"] - ref.stats["clip_frac"]) <= 1.0 / active + 1e-9
    assert out.stats["ratio_mean"] == pytest.approx(ref.stats["ratio_mean"], rel=1e-3)
    for key in ("tokens_policy", "tokens_expert"):
        assert out.stats[key] == ref.stats[key]
    return out, ref


@pytest.fixture
def small_chunks(monkeypatch):
    """Scratch small enough that both schedules loop over several chunks of rows or columns."""
    monkeypatch.setenv("EKIPL_TRITON_CHUNK_MB", "0.05")


def use_schedule(monkeypatch, schedule: str) -> None:
    monkeypatch.setenv("EKIPL_TRITON_SCHEDULE", schedule)


# ----------------------------------------------------------------------------------------------------------
# Interpreter (CPU tensors)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_linear_loss_matches_reference(name, schedule, small_chunks, monkeypatch):
    use_schedule(monkeypatch, schedule)
    batch = make_batch(seed=list(CONFIGS).index(name), per_token_advantages=name == "seq-mean")
    check_linear(batch, CONFIGS[name], TOLERANCE[torch.float32])


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_loss_low_precision_inputs(dtype, schedule, small_chunks, monkeypatch):
    use_schedule(monkeypatch, schedule)
    config = LossConfig(eps_high=0.28, dual_clip=3.0, beta=0.04, entropy_coef=0.01, temperature=0.8, tis_cap=2.0)
    # bf16/fp16 inputs: the reference runs in fp64 on the very same (rounded) inputs.
    check_linear(make_batch(dtype=dtype, seed=3), config, TOLERANCE[dtype], lp_tol=1e-4)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_large_logits_and_temperature(schedule, small_chunks, monkeypatch):
    use_schedule(monkeypatch, schedule)
    config = LossConfig(temperature=0.6, entropy_coef=0.01, beta=0.04, kl="k2")
    out, _ = check_linear(make_batch(logit_scale=50.0, seed=4), config, TOLERANCE[torch.float32])
    assert float(out.logprobs.max()) <= 0.0  # no exp(0) from padded columns


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_fully_masked_batch_gives_zero_loss_and_gradients(schedule, monkeypatch):
    use_schedule(monkeypatch, schedule)
    batch = make_batch(seed=5)
    batch.keywords["loss_mask"] = torch.zeros_like(batch.keywords["loss_mask"])
    out, d_hidden, d_weight = run_linear(batch, LossConfig(beta=0.04, entropy_coef=0.01), "triton")
    assert float(out.loss.detach()) == 0.0
    assert bool((d_hidden == 0).all()) and bool((d_weight == 0).all())
    assert torch.isfinite(out.logprobs).all() and torch.isfinite(out.entropy).all()


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_frozen_head_and_no_grad(schedule, monkeypatch):
    use_schedule(monkeypatch, schedule)
    batch = make_batch(seed=6)
    config = LossConfig(beta=0.04)
    hidden = batch.hidden.clone().requires_grad_()
    out = fused_linear_grpo_loss(hidden, batch.weight, batch.targets, config=config, backend="triton", **batch.keywords)
    out.loss.backward()
    ref_hidden = batch.hidden.clone().requires_grad_()
    ref = fused_linear_grpo_loss(ref_hidden, batch.weight, batch.targets, config=config, backend="reference",
                                 **batch.keywords)
    ref.loss.backward()
    assert rel_err(hidden.grad, ref_hidden.grad) < TOLERANCE[torch.float32]
    with torch.no_grad():
        plain = fused_linear_grpo_loss(batch.hidden, batch.weight, batch.targets, config=config, backend="triton",
                                       **batch.keywords)
    assert loss_err(plain.loss, ref.loss, 1e-3) < TOLERANCE[torch.float32]


def logits_loss_and_grad(logits, batch, config, backend):
    """``grpo_loss`` over a fresh leaf copy of ``logits`` with ``backend``: its output and the logits gradient."""
    leaf = logits.clone().requires_grad_()
    out = grpo_loss(leaf, batch.targets, config=config, backend=backend, **batch.keywords)
    out.loss.backward()
    return out, leaf.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["is-tis-k3", "shaped-entropy", "k2-entropy-temp"])
def test_logits_loss_matches_reference(name, dtype):
    batch = make_batch(seed=7, logit_scale=3.0)
    logits = batch.logits().to(dtype)
    config = CONFIGS[name]
    (out, grad), (ref, ref_grad) = (logits_loss_and_grad(logits, batch, config, b) for b in ("triton", "reference"))
    tol = TOLERANCE[dtype]
    assert loss_err(out.loss, ref.loss, 1e-3) < tol
    assert rel_err(out.logprobs, ref.logprobs) < TOLERANCE[torch.float32]
    assert grad.dtype == dtype
    assert rel_err(grad, ref_grad) < tol
    if config.entropy_coef:
        assert rel_err(out.entropy, ref.entropy) < TOLERANCE[torch.float32]


def branch_batch(seed: int, n: int = 384, vocab: int = 7, spread: float = 1.0):
    """Many tokens over a tiny vocabulary, old/ref/behaviour log-probs ``spread`` nats around the truth."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=gen, dtype=torch.float64) * 2
    targets = torch.randint(0, vocab, (n,), generator=gen)
    lp = torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
    near = lambda: (lp + spread * torch.randn(n, generator=gen)).float()  # noqa: E731
    keywords = dict(
        advantages=torch.randn(n, generator=gen) * 2, cu_seqlens=torch.tensor([0, n]),
        origin=torch.randint(0, 3, (n,), generator=gen), old_logprobs=near(), ref_logprobs=near(),
        behavior_logprobs=near(),
    )
    return logits, targets, keywords


def compare_logits_loss(logits, targets, keywords, config, what: str):
    """Triton vs reference ``grpo_loss`` over fp32 logits; the worst per-token gradient error."""
    results = {}
    for backend in ("triton", "reference"):
        leaf = logits.float().clone().requires_grad_()
        out = grpo_loss(leaf, targets, config=config, backend=backend, **keywords)
        out.loss.backward()
        results[backend] = (out, leaf.grad)
    (out, grad), (ref, ref_grad) = results["triton"], results["reference"]
    assert loss_err(out.loss, ref.loss, 1e-3) < 1e-4, what
    assert torch.isfinite(grad).all(), what
    # Per row: each token's gradient is its own loss derivative times the softmax Jacobian.
    row_err = (grad.double() - ref_grad.double()).norm(dim=1) / ref_grad.double().norm(dim=1).clamp_min(1e-12)
    assert float(row_err.max()) < 1e-4, f"{what}: worst token error {float(row_err.max()):.2e}"
    return out, ref


def test_every_branch_of_the_token_loss():
    """Ratios on both sides of both clip bounds, advantages of both signs, dual clip active, expert and policy
    tokens, for every expert mode and KL estimator, and the is-cap and clamps active on many tokens."""
    logits, targets, keywords = branch_batch(seed=8)
    common = dict(beta=0.1, eps_high=0.28, dual_clip=2.5, tis_cap=1.2, entropy_coef=0.02)
    for expert_mode, kl, extra in (("ratio", "k1", {}), ("is", "k2", {}), ("shaped", "k3", {}),
                                   ("is", "k3", dict(is_cap=1.3, log_ratio_clamp=0.6, kl_clamp=0.4))):
        config = LossConfig(expert_mode=expert_mode, kl=kl, **common, **extra)
        _, ref = compare_logits_loss(logits, targets, keywords, config, f"{expert_mode}/{kl}/{extra}")
        assert 0.05 < ref.stats["clip_frac"] < 0.95, "the batch must exercise both clipped and unclipped tokens"


def test_huge_log_ratios_stay_finite():
    """Old, reference and behaviour log-probs 60 nats away: exp() would overflow without the clamps."""
    logits, targets, keywords = branch_batch(seed=12, n=96)
    far = torch.tensor([60.0, -60.0, 0.0]).repeat(32)
    keywords = {**keywords, "old_logprobs": keywords["old_logprobs"] + far, "ref_logprobs": keywords["ref_logprobs"] - far,
                "behavior_logprobs": keywords["behavior_logprobs"] + far.roll(1)}
    for kl in ("k1", "k2", "k3"):
        for extra in ({}, dict(is_cap=5.0)):
            config = LossConfig(expert_mode="is", beta=0.1, kl=kl, tis_cap=2.0, dual_clip=3.0, **extra)
            compare_logits_loss(logits, targets, keywords, config, f"{kl}/{extra}")


def poisoned_masked_tokens(batch: Batch) -> Batch:
    """NaN and inf in the hidden rows and every per-token input of the masked tokens."""
    masked = batch.keywords["loss_mask"] == 0
    rows = masked.nonzero().squeeze(1)
    hidden = batch.hidden.clone()
    hidden[rows[0::2]] = float("nan")
    hidden[rows[1::2]] = float("inf")
    keywords = dict(batch.keywords)
    for name, value in (("old_logprobs", float("nan")), ("ref_logprobs", float("inf")),
                        ("behavior_logprobs", float("nan")), ("advantages", float("nan"))):
        keywords[name] = keywords[name].masked_fill(masked, value)
    return Batch(hidden, batch.weight, batch.targets, keywords)


@pytest.mark.filterwarnings("ignore:.*(NaN|invalid value):RuntimeWarning")  # numpy, on the NaN rows
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_masked_tokens_reach_neither_loss_nor_gradient_whatever_they_hold(schedule, small_chunks, monkeypatch):
    use_schedule(monkeypatch, schedule)
    clean = make_batch(seed=13, per_token_advantages=True)
    batch = poisoned_masked_tokens(clean)
    config = LossConfig(expert_mode="is", beta=0.1, entropy_coef=0.01, tis_cap=2.0, agg="seq-mean-token-mean")
    out, d_hidden, d_weight = run_linear(batch, config, "triton")
    ref, ref_hidden, ref_weight = run_linear(clean, config, "reference")
    masked = batch.keywords["loss_mask"] == 0
    assert loss_err(out.loss, ref.loss, 1e-3) < 1e-4
    assert rel_err(d_hidden, ref_hidden) < 1e-4 and rel_err(d_weight, ref_weight) < 1e-4
    assert not d_hidden[masked].any()
    assert rel_err(out.logprobs[~masked], ref.logprobs[~masked]) < 1e-4


@pytest.mark.filterwarnings("ignore:.*(NaN|invalid value):RuntimeWarning")  # numpy, on the NaN rows
@pytest.mark.parametrize("entropy_coef", [0.0, 0.05])
def test_logits_loss_with_masked_garbage_rows_and_minus_inf_vocabulary(entropy_coef):
    batch = make_batch(seed=14, logit_scale=3.0, per_token_advantages=True)
    logits = batch.logits()
    absent = torch.rand(logits.shape, generator=torch.Generator().manual_seed(1)) < 0.3
    absent[torch.arange(len(batch.targets)), batch.targets] = False  # a masked vocabulary never hides the target
    logits = logits.masked_fill(absent, float("-inf"))
    masked = batch.keywords["loss_mask"] == 0
    logits[masked] = float("nan")
    poisoned = poisoned_masked_tokens(batch)
    config = LossConfig(beta=0.04, entropy_coef=entropy_coef, expert_mode="is", temperature=0.9)
    (out, grad), (ref, ref_grad) = (logits_loss_and_grad(logits, poisoned, config, b) for b in ("triton", "reference"))
    assert loss_err(out.loss, ref.loss, 1e-3) < 1e-4
    assert rel_err(grad, ref_grad) < 1e-4 and not grad[masked].any() and not grad[absent].any()
    assert rel_err(out.logprobs[~masked], ref.logprobs[~masked]) < 1e-4


def test_strided_targets():
    """Kernels index targets by row: a strided view must give the same results as a contiguous copy."""
    batch = make_batch(seed=15)
    strided = torch.stack([batch.targets, batch.targets.flip(0)], dim=1)[:, 0]
    assert not strided.is_contiguous() and torch.equal(strided, batch.targets)
    config = LossConfig(beta=0.04, entropy_coef=0.01)
    ref, ref_hidden, ref_weight = run_linear(batch, config, "reference")
    out, d_hidden, d_weight = run_linear(Batch(batch.hidden, batch.weight, strided, batch.keywords), config, "triton")
    assert loss_err(out.loss, ref.loss, 1e-3) < 1e-4
    assert rel_err(d_hidden, ref_hidden) < 1e-4 and rel_err(d_weight, ref_weight) < 1e-4
    (logits_out, _), (logits_ref, _) = (
        logits_loss_and_grad(batch.logits(), Batch(batch.hidden, batch.weight, t, batch.keywords), config, b)
        for t, b in ((strided, "triton"), (batch.targets, "reference"))
    )
    assert rel_err(logits_out.logprobs, logits_ref.logprobs) < 1e-4
    lp = fused_linear_logprobs(batch.hidden, batch.weight, strided, backend="triton")
    assert rel_err(lp, ref.logprobs) < 1e-4


def test_fp64_is_refused_by_triton_and_routed_to_chunked():
    batch = make_batch(seed=16)
    hidden, weight = batch.hidden.double(), batch.weight.double()
    with pytest.raises(ValueError, match=r"triton backend takes fp32, bf16 or fp16 inputs; got torch.float64"):
        fused_linear_grpo_loss(hidden, weight, batch.targets, backend="triton", **batch.keywords)
    with pytest.raises(ValueError, match=r"ekipl::grpo_loss on the triton backend .* got torch.float64"):
        grpo_loss(batch.logits().double(), batch.targets, backend="triton", **batch.keywords)
    with pytest.raises(ValueError, match=r"ekipl::fused_linear_logprobs on the triton backend"):
        fused_linear_logprobs(hidden, weight, batch.targets, backend="triton")
    cuda = torch.device("cuda")
    assert resolve_backend(None, cuda, torch.float64) == "chunked"
    assert resolve_backend(None, cuda, torch.bfloat16) == "triton"
    assert resolve_backend("triton", cuda, torch.float64) == "triton"  # asked for: refused with the message above


@pytest.mark.parametrize("vocab", [1001, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_logprobs(dtype, vocab):
    batch = make_batch(dtype=dtype, vocab=vocab, seed=9, logit_scale=4.0)
    lp, ent = fused_linear_logprobs(batch.hidden, batch.weight, batch.targets, temperature=0.7, return_entropy=True,
                                    backend="triton")
    ref_lp, ref_ent = fused_linear_logprobs(batch.hidden, batch.weight, batch.targets, temperature=0.7,
                                            return_entropy=True, backend="reference")
    assert lp.dtype == torch.float32 and lp.shape == (batch.hidden.shape[0],)
    assert rel_err(lp, ref_lp) < TOLERANCE[torch.float32]
    assert rel_err(ent, ref_ent) < TOLERANCE[torch.float32]
    only_lp = fused_linear_logprobs(batch.hidden, batch.weight, batch.targets, temperature=0.7, backend="triton")
    assert torch.equal(only_lp, lp)


def _nan_filled(factory):
    def make(*args, **kwargs):
        out = factory(*args, **kwargs)
        if out.is_floating_point():
            out.fill_(float("nan"))
        return out

    return make


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_every_output_element_is_written(schedule, small_chunks, monkeypatch):
    """Every buffer the backend allocates starts as NaN: any element left unwritten would show."""
    use_schedule(monkeypatch, schedule)
    batch = make_batch(seed=10, dtype=torch.bfloat16)
    config = LossConfig(beta=0.04, entropy_coef=0.01)
    ref, ref_hidden, ref_weight = run_linear(batch, config, "reference")
    monkeypatch.setattr(torch, "empty", _nan_filled(torch.empty))
    monkeypatch.setattr(torch, "empty_like", _nan_filled(torch.empty_like))
    out, d_hidden, d_weight = run_linear(batch, config, "triton")
    logits = batch.logits().requires_grad_()
    out_logits = grpo_loss(logits, batch.targets, config=config, backend="triton", **batch.keywords)
    out_logits.loss.backward()
    lp = fused_linear_logprobs(batch.hidden, batch.weight, batch.targets, backend="triton")
    monkeypatch.undo()
    assert rel_err(out.logprobs, ref.logprobs) < 1e-4 and rel_err(out.entropy, ref.entropy) < 1e-4
    assert rel_err(d_hidden, ref_hidden) < 1e-2 and rel_err(d_weight, ref_weight) < 1e-2
    assert torch.isfinite(out_logits.logprobs).all() and torch.isfinite(logits.grad.float()).all()
    assert rel_err(lp, ref.logprobs) < 1e-4


def test_cuda_implementations_are_registered_for_the_ops():
    for name in ("fused_linear_grpo_loss", "grpo_loss", "fused_linear_logprobs"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ekipl::{name}", "CUDA"), name


def test_interpreted_copy_leaves_triton_settings_alone():
    before = (triton.knobs.runtime.interpret, os.environ.get("TRITON_INTERPRET"))
    interpreted = triton_backend.kernel_package(interpreted=True)
    assert interpreted.tuning.INTERPRET is True
    assert (triton.knobs.runtime.interpret, os.environ.get("TRITON_INTERPRET")) == before
    if not before[0]:  # the ordinary import stays compiled for the GPU
        assert triton_backend.kernel_package(interpreted=False).tuning.INTERPRET is False


def test_bad_schedule_is_named():
    batch = make_batch(seed=11)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EKIPL_TRITON_SCHEDULE", "columns")
        with pytest.raises(ValueError, match="EKIPL_TRITON_SCHEDULE"):
            run_linear(batch, LossConfig(), "triton")


# ----------------------------------------------------------------------------------------------------------
# GPU (bf16, realistic shapes)

GPU_LP_TOL = 2e-3
GPU_GRAD_TOL = 1e-2


def cuda_batch(vocab: int, hidden_size: int, seq_len: int = 256, logit_scale: float = 1.0, seed: int = 0):
    lengths = (1, seq_len, 1, seq_len, seq_len, seq_len - 3)
    return make_batch(vocab=vocab, hidden_size=hidden_size, lengths=lengths, dtype=torch.bfloat16, device="cuda",
                      logit_scale=logit_scale, seed=seed)


@needs_cuda
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_cuda_linear_loss_bf16(schedule, monkeypatch):
    use_schedule(monkeypatch, schedule)
    monkeypatch.setenv("EKIPL_TRITON_CHUNK_MB", "64")  # several chunks at this size
    batch = cuda_batch(vocab=32000 + 1, hidden_size=1024)
    config = LossConfig(eps_high=0.28, beta=0.04, entropy_coef=0.01, dual_clip=3.0, tis_cap=2.0)
    check_linear(batch, config, GPU_GRAD_TOL, lp_tol=GPU_LP_TOL)


@needs_cuda
@pytest.mark.parametrize("name", ["is-tis-k3", "shaped-entropy", "seq-mean"])
def test_cuda_linear_loss_modes(name):
    batch = cuda_batch(vocab=151936, hidden_size=1536, seq_len=128, logit_scale=2.0, seed=1)
    check_linear(batch, replace(CONFIGS[name], temperature=0.9), GPU_GRAD_TOL, lp_tol=GPU_LP_TOL)


@needs_cuda
def test_cuda_logits_loss_bf16():
    batch = cuda_batch(vocab=152064, hidden_size=512, seq_len=128, logit_scale=3.0, seed=2)
    logits = batch.logits()
    config = LossConfig(beta=0.04, entropy_coef=0.01, temperature=0.7)
    (out, grad), (ref, ref_grad) = (logits_loss_and_grad(logits, batch, config, b) for b in ("triton", "reference"))
    assert rel_err(out.logprobs, ref.logprobs) < GPU_LP_TOL
    assert rel_err(out.entropy, ref.entropy) < GPU_LP_TOL
    assert rel_err(grad, ref_grad) < GPU_GRAD_TOL


@needs_cuda
@pytest.mark.parametrize("logit_scale", [1.0, 50.0])
def test_cuda_fused_logprobs_bf16(logit_scale):
    batch = cuda_batch(vocab=131072 + 1, hidden_size=2048, logit_scale=logit_scale, seed=3)
    lp, ent = fused_linear_logprobs(batch.hidden, batch.weight, batch.targets, return_entropy=True)  # default: triton
    ref_lp, ref_ent = fused_linear_logprobs(batch.hidden, batch.weight, batch.targets, return_entropy=True,
                                            backend="reference")
    assert rel_err(lp, ref_lp) < GPU_LP_TOL
    assert rel_err(ent, ref_ent) < GPU_LP_TOL
    assert float(lp.max()) <= 1e-6


@needs_cuda
def test_cuda_op_under_torch_compile():
    batch = cuda_batch(vocab=32000, hidden_size=1024, seq_len=64, seed=4)

    def logprobs(hidden, weight, targets):
        lp, ent = torch.ops.ekipl.fused_linear_logprobs(hidden, weight, targets, 1.0, True)
        return lp.sum() + ent.sum(), lp

    compiled = torch.compile(logprobs, fullgraph=True)
    total, lp = compiled(batch.hidden, batch.weight, batch.targets)
    eager_total, eager_lp = logprobs(batch.hidden, batch.weight, batch.targets)
    assert torch.allclose(lp, eager_lp) and torch.allclose(total, eager_total)
