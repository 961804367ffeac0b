"""The policy model: loading, the processor, and the forward pass to last hidden states.

The learner never asks the model for logits: the fused GRPO loss takes the last hidden states and the LM-head
weight and streams over the vocabulary itself. ``last_hidden_states`` runs the backbone (vision tower + language
model) with explicit position ids, so that the learner and the HF rollout engine place every token at the same
rotary position (Qwen-VL's 3-D "mrope" for image tokens, text positions after them).
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

if TYPE_CHECKING:
    from ekipl.data.prompts import Prompt

# Qwen-VL families whose processor is built here from the PIL image processor (no torchvision, no video).
QWEN_VL_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")

# Processor outputs that ``last_hidden_states`` derives itself from the ids it is given: a prompt's token types
# would not cover its completion.
_DERIVED_INPUTS = ("mm_token_type_ids", "position_ids", "rope_deltas")


def resolve_attn_implementation(requested: str, device: torch.device | str) -> str:
    """``"auto"``: flash-attention 2 when it is installed and the model runs on CUDA, else sdpa."""
    if requested != "auto":
        return requested
    on_cuda = torch.device(device).type == "cuda"
    return "flash_attention_2" if on_cuda and importlib.util.find_spec("flash_attn") else "sdpa"


def apply_liger_kernels(model: nn.Module) -> bool:
    """Patch the model's RMSNorm, SwiGLU and rotary modules with Liger-Kernel's Triton ones; True if applied.

    The LM-head patch stays off: ekipl computes the loss from hidden states, and ``generate`` needs logits.
    """
    model_type = model.config.model_type
    if model_type not in QWEN_VL_MODEL_TYPES:
        return False
    from liger_kernel.transformers import monkey_patch

    patch = getattr(monkey_patch, f"apply_liger_kernel_to_{model_type}")
    patch(fused_linear_cross_entropy=False, model=model)
    return True


def load_policy(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "auto",
    gradient_checkpointing: bool = False,
    use_liger: bool | str = "auto",
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Load an image-text-to-text model (Qwen2-VL, Qwen2.5-VL, ...) from a local folder onto ``device``.

    ``use_liger``: ``"auto"`` patches with Liger-Kernel on CUDA when it is installed; ``True`` demands it.
    """
    from transformers import AutoModelForImageTextToText

    device = torch.device(device)
    model = AutoModelForImageTextToText.from_pretrained(
        str(path), dtype=dtype, attn_implementation=resolve_attn_implementation(attn_implementation, device)
    )
    if use_liger is True or (
        use_liger == "auto" and device.type == "cuda" and importlib.util.find_spec("liger_kernel") is not None
    ):
        if not apply_liger_kernels(model):
            if use_liger is True:
                raise ValueError(
                    f"use_liger=True, but Liger-Kernel has no patch for model type {model.config.model_type!r}; "
                    "pass use_liger='auto' or False"
                )
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model.to(device)


@functools.lru_cache(maxsize=None)
def image_only_qwen_processor_class():
    """The Qwen-VL image-only processor class (built on first use, so that importing ekipl stays light)."""
    from transformers import Qwen2_5_VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class QwenVLImageOnlyProcessor(Qwen2_5_VLProcessor):
        """Qwen2-VL / Qwen2.5-VL processor for images and text only.

        The stock processor demands a video processor, which needs torchvision; this one has none, so it
        builds beside a CPU-only torch. Image handling is the stock one (both families process images alike),
        and it saves as the stock class so that transformers and SGLang load what it writes.
        """

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

        def save_pretrained(self, save_directory, **kwargs):
            written = super().save_pretrained(save_directory, **kwargs)
            # Also the legacy preprocessor_config.json: where AutoProcessor's video processor looks when the
            # nested config has no video entry, as it does for the original Qwen checkpoints.
            self.image_processor.save_pretrained(save_directory)
            config_file = Path(save_directory) / "processor_config.json"
            config = json.loads(config_file.read_text())
            config["processor_class"] = Qwen2_5_VLProcessor.__name__
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            return written

    return QwenVLImageOnlyProcessor


def load_processor(path: str | Path):
    """The model's processor. Qwen-VL models get an image-only processor on the PIL image processor."""
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path = Path(path)
    if AutoConfig.from_pretrained(str(path)).model_type not in QWEN_VL_MODEL_TYPES:
        return AutoProcessor.from_pretrained(str(path))
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(path))
    return image_only_qwen_processor_class()(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=_read_chat_template(path, tokenizer)
    )


def _read_chat_template(path: Path, tokenizer) -> str | None:
    """The chat template saved beside the processor (``chat_template.jinja`` / ``.json``), else the tokenizer's."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    as_json = path / "chat_template.json"
    if as_json.is_file():
        return json.loads(as_json.read_text())["chat_template"]
    return getattr(tokenizer, "chat_template", None)


def eos_token_ids(generation_config: Any, tokenizer: Any) -> tuple[int, ...]:
    """The ids that end a completion: the generation config's EOS ids, then the tokenizer's EOS."""
    configured = getattr(generation_config, "eos_token_id", None)
    ids = [configured] if isinstance(configured, int) else list(configured or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("the model has no EOS token in its generation config or tokenizer: pass stop_token_ids")
    return tuple(dict.fromkeys(ids))


def multimodal_token_types(input_ids: torch.Tensor, config: Any) -> torch.Tensor:
    """Per-token modality, as Qwen-VL's rope index wants it: 0 text, 1 image placeholder, 2 video placeholder."""
    types = torch.zeros_like(input_ids, dtype=torch.int32)
    types[input_ids == config.image_token_id] = 1
    types[input_ids == config.video_token_id] = 2
    return types


def rope_position_ids(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, mm_inputs: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Position ids for ``input_ids`` (left or right padded, ``attention_mask`` 1 on real tokens).

    Qwen-VL models: ``[3, B, T]`` (temporal, height, width); image placeholders take their grid positions and
    the text after an image resumes past the image's extent. Other models: ``[B, T]`` text positions.
    """
    text_positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    backbone = model.model
    if not hasattr(backbone, "get_rope_index"):
        return text_positions
    grids = {key: mm_inputs[key] for key in ("image_grid_thw", "video_grid_thw") if key in mm_inputs}
    if not grids:
        return text_positions.unsqueeze(0).expand(3, -1, -1)
    position_ids, _ = backbone.get_rope_index(
        input_ids,
        mm_token_type_ids=multimodal_token_types(input_ids, model.config),
        attention_mask=attention_mask,
        **grids,
    )
    return position_ids


def last_hidden_states(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, **mm_inputs: torch.Tensor
) -> torch.Tensor:
    """Run the backbone (no LM head) and return its final hidden states ``[B, T, H]``.

    ``mm_inputs`` are the processor's image tensors (``pixel_values``, ``image_grid_thw``) for the images whose
    placeholders appear in ``input_ids``, in order.
    """
    tensors = {key: value for key, value in mm_inputs.items() if key not in _DERIVED_INPUTS}
    position_ids = rope_position_ids(model, input_ids, attention_mask, tensors)
    outputs = model.model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        **tensors,
    )
    return outputs.last_hidden_state


def lm_head_weight(model: nn.Module) -> torch.Tensor:
    """The LM-head weight ``[V, H]`` (the input embedding itself when the model ties them)."""
    return model.get_output_embeddings().weight


def batch_multimodal_inputs(prompts: Sequence[Prompt], device: torch.device) -> dict[str, torch.Tensor]:
    """Concatenate the prompts' processor tensors (images in prompt order) along their first dimension."""
    keys = dict.fromkeys(key for prompt in prompts for key in prompt.mm_inputs)
    return {key: torch.cat([p.mm_inputs[key] for p in prompts if key in p.mm_inputs]).to(device) for key in keys}
