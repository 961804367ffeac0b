"""ekipl_kernels: the fused mixed-origin GRPO loss for RL on language models.

Needs only torch (and triton for the CUDA path)::

    from ekipl_kernels import LossConfig, fused_linear_grpo_loss
    out = fused_linear_grpo_loss(hidden, lm_head.weight, targets, advantages=adv, cu_seqlens=cu,
                                 origin=origin, old_logprobs=old, config=LossConfig(beta=0.04),
                                 ref_logprobs=ref)
    out.loss.backward()

How it runs (backend, Triton schedule, scratch sizes, memory budget, debug checks) is
``KernelOptions``'s, passed as ``options=``.
"""

from .api import fused_linear_grpo_loss, fused_linear_logprobs, grpo_loss
from .config import LossConfig, LossOutput, stats_as_floats
from .inputs import normalizer_count
from .options import KernelOptions

__all__ = ["KernelOptions", "LossConfig", "LossOutput", "fused_linear_grpo_loss", "grpo_loss", "fused_linear_logprobs",
           "normalizer_count", "stats_as_floats"]
