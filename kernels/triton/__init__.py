"""Triton kernels of the fused GRPO loss, and the host code that launches them.

Importing the package decorates every kernel (``entry`` imports every module), compiled or interpreted
according to ``triton.knobs.runtime.interpret`` at that moment; :mod:`ekipl_kernels.triton_backend`
keeps one copy of each kind. The entry points take the ``ekipl::`` op arguments (see ``ops.py``).
"""

from .entry import fused_linear_grpo_loss, fused_linear_logprobs, grpo_loss

__all__ = ["fused_linear_grpo_loss", "grpo_loss", "fused_linear_logprobs"]
