"""The Triton backend (see :mod:`.backend_api`): CUDA tensors go through the ``ekipl::`` ops, whose CUDA
kernels this module registers; other tensors run the very same kernels in Triton's interpreter.

``triton.jit`` fixes at decoration time whether a kernel is compiled or interpreted, and so does triton
for its own library (``tl.sum``...) when it is first imported. The ordinary import of the kernel
package ``kernels/triton/`` serves CUDA tensors; CPU tensors get a second copy of it, loaded under
another module name with the interpreter switched on only while it is decorated, and run with triton's
library interpreted too. CPU tests therefore need no ``TRITON_INTERPRET`` and work whenever triton
was imported; GPU runs in the same process are untouched. With ``TRITON_INTERPRET=1`` set before
triton's import, everything is interpreted, whatever the device.

Knobs (:class:`~ekipl_kernels.options.KernelOptions`): ``schedule``, ``chunk_mb`` and ``memory_budget_mb``
become the loss op's schedule and scratch here (``linear_loss.plan``), ``logprobs_path`` and ``chunk_mb``
the log-probs op's path and scratch. The CUDA kernels launch on the device of their first tensor.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch

from . import ops
from .backend_api import FusedResult
from .backends import BackendUnavailable
from .config import LossConfig
from .inputs import TokenInputs
from .loss_scalars import loss_scalars
from .options import LOGPROBS_PATHS, KernelOptions

try:
    import triton
except ImportError as exc:  # the backend reports it through ensure_available
    triton = None
    _IMPORT_ERROR = exc

_PACKAGE_DIR = Path(__file__).with_name("triton")
_INTERPRETED_NAME = f"{__package__}._triton_interpreted"


def ensure_available() -> None:
    if triton is None:
        raise BackendUnavailable(f"triton is not importable ({_IMPORT_ERROR}); pip install triton")


def kernel_package(interpreted: bool) -> ModuleType:
    """The kernel package for CUDA tensors (``interpreted=False``) or other tensors (``True``)."""
    ensure_available()
    main = importlib.import_module(".triton", __package__)
    if main.tuning.INTERPRET or not interpreted:
        return main
    return sys.modules.get(_INTERPRETED_NAME) or _load_interpreted_copy()


def _load_interpreted_copy() -> ModuleType:
    if getattr(triton, "knobs", None) is None:
        raise BackendUnavailable(
            f"triton {triton.__version__} cannot hold compiled and interpreted kernels in one process (needs "
            "triton >= 3.4); for CPU tensors set TRITON_INTERPRET=1 before importing triton"
        )
    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = True
        spec = importlib.util.spec_from_file_location(
            _INTERPRETED_NAME, _PACKAGE_DIR / "__init__.py", submodule_search_locations=[str(_PACKAGE_DIR)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[_INTERPRETED_NAME] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            for name in [key for key in sys.modules if key.split(".")[:2] == _INTERPRETED_NAME.split(".")]:
                del sys.modules[name]
            raise
    return module


@contextlib.contextmanager
def _library_interpretable():
    """Lets Triton's own library functions (``tl.sum``, ``tl.zeros``...) run inside interpreted kernels.

    They are jit functions decorated when triton itself was imported; unless that import was
    interpreted, calling one from Python raises. While interpreted kernels run, such a call interprets
    the function instead. Compiled kernels never call a jit function from Python (the code generator
    inlines them), so they are unaffected.
    """
    from triton.runtime.jit import JITFunction

    if not isinstance(triton.language.standard.sum, JITFunction):
        yield
        return
    compiled_call = JITFunction.__call__
    JITFunction.__call__ = lambda self, *args, **kwargs: _as_interpreted(self)(*args, **kwargs)
    try:
        yield
    finally:
        JITFunction.__call__ = compiled_call


_interpreted_library: dict[int, tuple] = {}  # id -> (jit function, its interpreted twin); jit functions don't hash


def _as_interpreted(jit_function):
    from triton.runtime.interpreter import InterpretedFunction

    entry = _interpreted_library.get(id(jit_function))
    if entry is None or entry[0] is not jit_function:
        entry = _interpreted_library[id(jit_function)] = (jit_function, InterpretedFunction(jit_function.fn))
    return entry[1]


def _for(tensor: torch.Tensor, op_name: str):
    """The op for CUDA tensors (dispatching to the kernels registered below), the interpreted kernels otherwise."""
    if tensor.is_cuda:
        return getattr(torch.ops.ekipl, op_name)
    interpreted = getattr(kernel_package(interpreted=True), op_name)

    def run(*args, **kwargs):
        with _library_interpretable():
            return interpreted(*args, **kwargs)

    return run


def _token_vectors(tok: TokenInputs) -> tuple:
    return tok.advantages, tok.agg_weight, tok.is_expert, tok.old_logprobs, tok.ref_logprobs, tok.behavior_logprobs


def linear_loss(hidden, weight, targets, tok: TokenInputs, config: LossConfig, *, bias, need_entropy, grad_hidden,
                grad_weight, grad_bias, options: KernelOptions) -> FusedResult:
    (n, h), v = hidden.shape, weight.shape[0]
    schedule, scratch = kernel_package(interpreted=False).linear_loss.plan(
        n, h, v, hidden.dtype, grad_hidden, grad_weight, options.schedule, options.scratch_bytes("chunk_mb"),
        options.memory_budget_bytes,
    )
    loss, lp, ent, d_hidden, d_weight, d_bias = _for(hidden, "fused_linear_grpo_loss")(
        hidden.detach(), weight.detach(), targets, *_token_vectors(tok), scalars=loss_scalars(config),
        need_entropy=need_entropy, grad_hidden=grad_hidden, grad_weight=grad_weight,
        schedule=ops.SCHEDULES.index(schedule), scratch_bytes=scratch, bias=None if bias is None else bias.detach(),
        grad_bias=grad_bias,
    )
    return FusedResult(loss, lp, ent if need_entropy else None, d_hidden if grad_hidden else None,
                       d_weight if grad_weight else None, d_bias if grad_bias else None)


def logits_loss(logits, targets, tok: TokenInputs, config: LossConfig, *, need_entropy, grad_logits) -> FusedResult:
    loss, lp, ent, d_logits = _for(logits, "grpo_loss")(
        logits.detach(), targets, *_token_vectors(tok), scalars=loss_scalars(config), need_entropy=need_entropy,
        grad_logits=grad_logits,
    )
    return FusedResult(loss, lp, ent if need_entropy else None, d_logits if grad_logits else None, None)


def linear_logprobs(hidden, weight, targets, temperature: float, return_entropy: bool, options: KernelOptions,
                    bias=None):
    lp, ent = _for(hidden, "fused_linear_logprobs")(
        hidden, weight, targets, temperature, return_entropy, path=LOGPROBS_PATHS.index(options.logprobs_path),
        scratch_bytes=options.scratch_bytes("chunk_mb"), bias=bias,
    )
    return lp, ent if return_entropy else None


def on_device_of_first_tensor(name: str):
    """The compiled ``name`` entry point, run with the device of its first argument as the current CUDA device:
    Triton launches on the current device, and the inputs of a rank may live on another one."""

    def run(first, *args, **kwargs):
        with torch.cuda.device(first.device):
            return getattr(kernel_package(interpreted=False), name)(first, *args, **kwargs)

    return run


def _register_cuda_kernels() -> None:
    """CUDA implementations of the ``ekipl::`` ops (the C++ library registers the CPU ones)."""
    for name in ("fused_linear_grpo_loss", "grpo_loss", "fused_linear_logprobs"):
        torch.library.register_kernel(f"ekipl::{name}", "cuda", on_device_of_first_tensor(name))


if triton is not None:
    _register_cuda_kernels()
