"""The GPU proof of the Triton path, in the order ``benchmarks/gpu_check.sh`` runs it (then the timings):

1. the GEMMs run on 16-bit operands with fp32 results (no upcast of the LM head);
2. both schedules against the fp64 reference in bf16 at N = 4096 (varlen), H = 3584, V = 152064, over
   several chunks: log-probs and entropies under 2e-3, gradients under 1e-2, masked rows' dh exactly 0;
3. the race stress: the in-place bf16 logit gradient of one chunk, 200 times, bit for bit equal to itself
   and to the gradient written to a separate buffer;
4. indexing beyond 2^31 elements: ``grpo_loss`` over [16384, 152064] bf16 logits, the last rows against the
   reference;
5. varlen: 8 random N compile nothing new after a warm-up, and the autotuner keeps one entry per (H, V);
6. the loss options (CISPO, SAPO, bias-corrected KL, GSPO's two passes, sequence-level TIS, an LM-head bias)
   through both schedules and over logits, against the fp64 reference, under 1e-2.

Each check is a function of the device and the sizes. On a GPU the tests run them at the sizes above in
bf16; elsewhere the same functions run at interpreter sizes in fp16 (the interpreter's bf16 arithmetic is
wrong), so that the checks themselves are tested where no GPU is; the varlen check needs compiled kernels.
"""

from __future__ import annotations

import contextlib
import random

import pytest
import torch

from ekipl_kernels import KernelOptions, LossConfig, fused_linear_grpo_loss, fused_linear_logprobs, grpo_loss
from ekipl_kernels import reference
from ekipl_kernels.inputs import prepare_token_inputs
from ekipl_kernels.loss_scalars import loss_scalars

triton = pytest.importorskip("triton")
triton_backend = pytest.importorskip("ekipl_kernels.triton_backend")

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float16
LP_TOL, GRAD_TOL = 2e-3, 1e-2
CONFIG = LossConfig(eps_high=0.28, beta=0.04, entropy_coef=0.01, dual_clip=3.0, temperature=0.9)


def kernels():
    """The kernel package that runs on DEVICE, and the context its launches need."""
    package = triton_backend.kernel_package(interpreted=not CUDA)
    return package, (contextlib.nullcontext() if CUDA else triton_backend._library_interpretable())


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    assert torch.isfinite(out).all(), "non-finite values"
    return float((out - ref).norm() / ref.norm())


def varlen_batch(n: int, h: int, v: int, seed: int, logit_scale: float = 2.0):
    """Sequences of random lengths (one of a single token, one empty of unmasked tokens), one in four from an
    expert, masked tails; hidden states whose logits spread about ``logit_scale``."""
    rng = random.Random(seed)
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    cuts = sorted(rng.sample(range(2, n - 1), k=max(1, n // 300)))
    bounds = [0, 1, *cuts, n]
    cu = torch.tensor(bounds, device=DEVICE)
    hidden = (torch.randn(n, h, generator=gen, device=DEVICE) * logit_scale).to(DTYPE)
    weight = (torch.randn(v, h, generator=gen, device=DEVICE) / h**0.5).to(DTYPE)
    targets = torch.randint(0, v, (n,), generator=gen, device=DEVICE)
    origin = torch.zeros(n, dtype=torch.long, device=DEVICE)
    mask = torch.ones(n, device=DEVICE)
    for s, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        if s % 4 == 3:
            origin[start:end] = 1
        mask[end - (end - start) // 10: end] = 0.0
    mask[bounds[1]: bounds[2]] = 0.0  # a fully masked sequence
    lp = -torch.rand(n, generator=gen, device=DEVICE) * 8
    keywords = dict(advantages=torch.randn(len(bounds) - 1, generator=gen, device=DEVICE), cu_seqlens=cu,
                    origin=origin, loss_mask=mask, old_logprobs=lp + 0.3 * torch.randn(n, generator=gen, device=DEVICE),
                    ref_logprobs=lp - 0.2, advantage_level="sequence")
    return hidden, weight, targets, keywords


# ----------------------------------------------------------------------------------------------------------
# The checks


def check_gemm_path() -> str:
    package, _ = kernels()
    if not CUDA:
        return "cpu"
    path = package.gemm.cuda_path(DEVICE)
    assert path in ("direct", "mm+add"), f"GEMM path {path!r}: the LM head would be upcast to fp32 (slow path)"
    return path


def check_schedules_against_fp64(n: int, h: int, v: int, chunk_mb: dict) -> dict:
    hidden, weight, targets, keywords = varlen_batch(n, h, v, seed=1)
    ref_h, ref_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = fused_linear_grpo_loss(ref_h, ref_w, targets, config=CONFIG, backend="reference", **keywords)
    ref.loss.backward()
    masked = keywords["loss_mask"] == 0
    errors = {}
    for schedule in ("rows", "vocab"):
        options = KernelOptions(backend="triton", schedule=schedule, chunk_mb=chunk_mb[schedule])
        out_h, out_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = fused_linear_grpo_loss(out_h, out_w, targets, config=CONFIG, options=options, **keywords)
        out.loss.backward()
        errors[schedule] = err = {
            "logprobs": rel_err(out.logprobs, ref.logprobs), "entropy": rel_err(out.entropy, ref.entropy),
            "d_hidden": rel_err(out_h.grad, ref_h.grad), "d_weight": rel_err(out_w.grad, ref_w.grad),
        }
        assert err["logprobs"] < LP_TOL and err["entropy"] < LP_TOL, (schedule, err)
        assert err["d_hidden"] < GRAD_TOL and err["d_weight"] < GRAD_TOL, (schedule, err)
        assert not out_h.grad[masked].any(), f"{schedule}: masked rows got a hidden-state gradient"
    return errors


def check_race_stress(rows: int, v: int, repeats: int) -> None:
    """One chunk's bf16 gradient written over its own fp32 logits, ``repeats`` times, by both kernels."""
    package, launching = kernels()
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    logits = torch.randn(rows, v, generator=gen, device=DEVICE) * 4
    targets = torch.randint(0, v, (rows,), generator=gen, device=DEVICE)
    keywords = dict(advantages=torch.randn(rows, generator=gen, device=DEVICE), cu_seqlens=torch.tensor(
        [0, rows], device=DEVICE), old_logprobs=-torch.rand(rows, generator=gen, device=DEVICE) * 8,
        ref_logprobs=-torch.rand(rows, generator=gen, device=DEVICE) * 8, advantage_level="token")
    tok = prepare_token_inputs(rows, DEVICE, config=CONFIG, **keywords)
    args = package.token_loss.token_args(tok.advantages, tok.agg_weight, tok.is_expert, tok.old_logprobs,
                                         tok.ref_logprobs, None, loss_scalars(CONFIG))
    buffer, in_place = package.linear_loss._scratch(rows, v, DTYPE, DEVICE)
    inv_tau = 1 / CONFIG.temperature
    with launching:
        separate = torch.empty(rows, v, dtype=DTYPE, device=DEVICE)
        package.logits_loss.logits_loss(logits.clone(), targets, args, inv_tau, grad=separate)
        z = logits * inv_tau
        lse = torch.logsumexp(z, dim=1)
        stats = {"lse": lse, "entropy": lse - (torch.softmax(z, dim=1) * z).sum(1),
                 "coef_lp": torch.randn(rows, generator=gen, device=DEVICE),
                 "coef_ent": 0.01 * torch.randn(rows, generator=gen, device=DEVICE)}
        separate_slice = torch.empty(rows, v, dtype=DTYPE, device=DEVICE)
        package.logit_grad.logit_grad(logits.clone(), separate_slice, targets, 0, stats, inv_tau)
        for attempt in range(repeats):
            buffer.copy_(logits)
            package.logits_loss.logits_loss(buffer, targets, args, inv_tau, grad=in_place)
            assert torch.equal(in_place, separate), f"logits_loss: in-place gradient differs at attempt {attempt}"
            buffer.copy_(logits)
            package.logit_grad.logit_grad(buffer, in_place, targets, 0, stats, inv_tau)
            assert torch.equal(in_place, separate_slice), f"logit_grad: in-place gradient differs at attempt {attempt}"
    assert separate.abs().sum() > 0 and separate_slice.abs().sum() > 0


def check_indexing_beyond_int32(n: int, v: int, tail: int) -> dict:
    gen = torch.Generator(device=DEVICE).manual_seed(4)
    logits = (torch.randn(n, v, generator=gen, device=DEVICE) * 3).to(DTYPE).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=gen, device=DEVICE)
    mask = (torch.rand(n, generator=gen, device=DEVICE) > 0.1).float()
    keywords = dict(advantages=torch.randn(n, generator=gen, device=DEVICE), loss_mask=mask,
                    old_logprobs=-torch.rand(n, generator=gen, device=DEVICE) * 12, advantage_level="token",
                    ref_logprobs=-torch.rand(n, generator=gen, device=DEVICE) * 12)
    out = grpo_loss(logits, targets, cu_seqlens=torch.tensor([0, n], device=DEVICE), config=CONFIG,
                    backend="triton", **keywords)
    out.loss.backward()
    last = slice(n - tail, n)
    tail_logits = logits.detach()[last].clone().requires_grad_()
    # The tail alone, its tokens weighted as in the whole batch (token-mean over every unmasked token).
    ref = reference.grpo_loss(tail_logits, targets[last], cu_seqlens=torch.tensor([0, tail], device=DEVICE),
                              normalizer=mask.sum(), config=CONFIG, **{k: val[last] if torch.is_tensor(val) else val
                                                                       for k, val in keywords.items()})
    ref.loss.backward()
    err = {"logprobs": rel_err(out.logprobs[last], ref.logprobs), "entropy": rel_err(out.entropy[last], ref.entropy),
           "d_logits": rel_err(logits.grad[last], tail_logits.grad)}
    assert err["logprobs"] < LP_TOL and err["entropy"] < LP_TOL and err["d_logits"] < GRAD_TOL, err
    return err


def _compiled_variants(package) -> dict:
    """Compiled variants per jit kernel of the package, and entries per autotuner (triton >= 3.4 layouts)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    counts = {}
    for module_name in ("linear_stats", "logits_loss", "logit_grad", "token_finish"):
        module = getattr(package, module_name)
        for name, obj in vars(module).items():
            if isinstance(obj, Autotuner):
                counts[f"{module_name}.{name} (autotune keys)"] = len(obj.cache)
            elif isinstance(obj, JITFunction) and name.startswith("_"):
                caches = getattr(obj, "device_caches", {})
                counts[f"{module_name}.{name}"] = sum(len(entry[0]) for entry in caches.values())
    return counts


def check_varlen_compiles_nothing_new(h: int, v: int, ns: list[int]) -> dict:
    package, _ = kernels()

    def step(n: int, seed: int) -> None:
        hidden, weight, targets, keywords = varlen_batch(n, h, v, seed=seed)
        for schedule in ("rows", "vocab"):
            fused_linear_grpo_loss(hidden.clone().requires_grad_(), weight.clone().requires_grad_(), targets,
                                   config=CONFIG, options=KernelOptions(backend="triton", schedule=schedule),
                                   **keywords).loss.backward()
        for path in ("fused", "cublas"):
            fused_linear_logprobs(hidden, weight, targets, options=KernelOptions(backend="triton", logprobs_path=path))

    for n in (ns[0] - ns[0] % 16, ns[0] - ns[0] % 16 + 3):  # both cases Triton specialises an int on: N % 16
        step(n, seed=n)
    warm = _compiled_variants(package)
    for n in ns:
        step(n, seed=n)
    after = _compiled_variants(package)
    assert after == warm, f"new compilations for varlen N: {warm} -> {after}"
    assert all(count == 1 for name, count in after.items() if "autotune" in name), after
    return after


OPTION_CONFIGS = {  # issue 15's loss options, each against the reference on the card
    "cispo": LossConfig(policy_loss="cispo", cispo_cap=1.5, beta=0.04),
    "sapo": LossConfig(policy_loss="sapo", beta=0.04, entropy_coef=0.01),
    "kl-bias-corrected": LossConfig(beta=0.1, kl_bias_correction=True, eps_high=0.28),
    "gspo": LossConfig(ratio_level="sequence", eps_low=3e-4, eps_high=4e-4, beta=0.04, entropy_coef=0.01),
    "gspo-sapo-shaped": LossConfig(ratio_level="sequence", policy_loss="sapo", expert_mode="shaped"),
    "tis-sequence-is": LossConfig(tis_cap=1.5, tis_level="sequence", expert_mode="is", is_cap=3.0),
}


def check_loss_options(lengths: tuple, h: int, v: int) -> dict:
    """Every option of OPTION_CONFIGS, and an LM-head bias, through both Triton schedules and ``grpo_loss`` over
    logits: loss, log-probs and every gradient against the fp64 reference (relative errors returned). The public
    functions run the Triton backend compiled on a GPU, interpreted on CPU tensors."""
    from ekipl_kernels.testing import random_batch

    errors = {}
    cases = [(name, config, False) for name, config in OPTION_CONFIGS.items()] + [("bias", CONFIG, True)]
    for name, config, with_bias in cases:
        batch = random_batch(lengths=lengths, vocab=v, hidden_size=h, dtype=DTYPE, device=DEVICE, logit_scale=2.0,
                             seed=len(errors), with_bias=with_bias, expert_fraction=0.2)
        inputs = [t for t in (batch.hidden, batch.weight, batch.bias) if t is not None]

        def run(tensors, **how):
            tensors = [t.detach().clone().requires_grad_() for t in tensors]
            bias = tensors[2] if len(tensors) == 3 else None
            out = fused_linear_grpo_loss(tensors[0], tensors[1], batch.targets, bias=bias, config=config,
                                         **batch.keywords, **how)
            return out, torch.autograd.grad(out.loss, tensors)

        ref, ref_grads = run([t.double() for t in inputs], backend="reference")
        for schedule in ("rows", "vocab"):
            out, grads = run(inputs, options=KernelOptions(backend="triton", schedule=schedule))
            errors[f"{name}/{schedule}"] = max(rel_err(out.loss, ref.loss), rel_err(out.logprobs, ref.logprobs),
                                               *(rel_err(g, r) for g, r in zip(grads, ref_grads)))
        logits = batch.logits().detach()
        ref_logits = logits.double().requires_grad_()
        ref_out = grpo_loss(ref_logits, batch.targets, config=config, backend="reference", **batch.keywords)
        got_logits = logits.clone().requires_grad_()
        got = grpo_loss(got_logits, batch.targets, config=config, backend="triton", **batch.keywords)
        errors[f"{name}/logits"] = max(
            rel_err(got.loss, ref_out.loss),
            rel_err(torch.autograd.grad(got.loss, got_logits)[0], torch.autograd.grad(ref_out.loss, ref_logits)[0]))
    bad = {key: err for key, err in errors.items() if not err < GRAD_TOL}
    assert not bad, f"relative errors over {GRAD_TOL}: {bad}"
    return errors


# ----------------------------------------------------------------------------------------------------------
# The tests, in gpu_check order

SIZES = {
    # N, H, V of the schedules check, its chunk sizes (MiB: 4 rows chunks, 5 vocab slices on the GPU)
    "schedules": (4096, 3584, 152064, {"rows": 600, "vocab": 300}) if CUDA else (96, 40, 1001, {"rows": 0.1,
                                                                                                "vocab": 0.1}),
    "race": (1024, 152064, 200) if CUDA else (16, 1001, 2),
    "indexing": (16384, 152064, 64) if CUDA else (40, 1001, 8),
    # sequence lengths, H, V of the loss-options check (the schedules check's H and V: nothing new to autotune)
    "options": ((1, 150, 1, 200, 148, 100), 3584, 152064) if CUDA else ((1, 9, 1, 12, 17, 8), 40, 1001),
}


def test_1_gemm_path_is_direct():
    print(f"GEMM path: {check_gemm_path()}")


def test_2_both_schedules_match_fp64():
    n, h, v, chunk_mb = SIZES["schedules"]
    print(check_schedules_against_fp64(n, h, v, chunk_mb))


def test_3_in_place_gradient_race_stress():
    check_race_stress(*SIZES["race"])


def test_4_indexing_beyond_2_31_elements():
    n, v, tail = SIZES["indexing"]
    if CUDA:
        assert n * v > 2**31
    print(check_indexing_beyond_int32(n, v, tail))


@pytest.mark.skipif(not CUDA, reason="counts compiled kernels: needs a CUDA GPU")
def test_5_varlen_compiles_nothing_new():
    rng = random.Random(5)
    print(check_varlen_compiles_nothing_new(3584, 152064, [rng.randrange(1024, 8192) for _ in range(8)]))


def test_6_loss_options_match_fp64():
    print(check_loss_options(*SIZES["options"]))
