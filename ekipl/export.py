"""HF-format folders of trained policies: the run's own export, and any checkpoint turned into one afterwards.

``python -m ekipl.export --checkpoint runs/tiny_cpu/checkpoints/step_00000010 --out runs/tiny_cpu/hf_step10``
writes what ``Trainer.export`` writes at the end of a run (``save_pretrained`` of the policy and its processor)
from a checkpoint folder. ``--checkpoint`` may also name the run folder: its newest good checkpoint is used.

* The weights: ZeRO stages 1-3 through DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` (the fp32 master
  weights, gathered over every rank's partition); ZeRO-0 from the module state in ``mp_rank_00_model_states.pt``.
  The engine wraps the policy, so keys lose their ``policy.`` prefix. They are saved in the dtype the run trained
  in (``--dtype`` to choose), and refused when not finite.
* The model class, its config, generation config and processor come from the run's base model: ``model.path`` of
  the config saved in the checkpoint (``<run>/tiny_model`` for ``tiny``), or ``--model``.

What loads the folder: ``AutoModelForImageTextToText.from_pretrained`` (stock transformers) and SGLang. The
processor is saved as the stock ``Qwen2_5_VLProcessor`` (image processor ``Qwen2VLImageProcessor`` in
``preprocessor_config.json``, as in Qwen's own checkpoints), which ``AutoProcessor.from_pretrained`` loads
wherever torchvision is installed: transformers' Qwen-VL processor always builds a video processor, and every
video processor needs torchvision (5.12-5.22), for Qwen's published checkpoints alike. Without torchvision (the
CPU set-up), ``ekipl.models.load_processor(folder)`` builds the same processor on the PIL image processor.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ekipl import checkpoint

WRAPPER_PREFIX = "policy."  # learner.PolicyLoss holds the policy as ``self.policy``
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ExportError(RuntimeError):
    """The checkpoint cannot be exported as asked; the message says why and what to pass."""


def save_hf_folder(model, processor, out: Path, *, state_dict: Optional[dict[str, torch.Tensor]] = None) -> Path:
    """``save_pretrained`` of ``model`` (with ``state_dict``'s weights when given) and ``processor`` into ``out``.

    Written beside ``out`` and renamed into place, so that a crash never leaves a half-written folder where a
    loadable one is expected; an existing ``out`` is replaced.
    """
    out = Path(out)
    staging = out.with_name(f".{out.name}.tmp")
    retired = out.with_name(f".{out.name}.old")
    for leftover in (staging, retired):
        shutil.rmtree(leftover, ignore_errors=True)
    model.save_pretrained(staging, state_dict=state_dict)
    processor.save_pretrained(staging)
    if out.exists():
        out.rename(retired)
    staging.rename(out)
    shutil.rmtree(retired, ignore_errors=True)
    return out


def resolve_checkpoint(path: Path) -> Path:
    """``path`` itself when it is a checkpoint; for a run folder (or its ``checkpoints/``), the newest good one."""
    path = Path(path)
    if not path.is_dir():
        raise ExportError(f"--checkpoint {path} is not a folder")
    if (path / checkpoint.STATE_TAG).is_dir():
        why = checkpoint.problem(path)
        if why is not None:
            raise ExportError(f"--checkpoint {path} is not a usable checkpoint: {why}")
        if checkpoint.is_suspect(path):
            warnings.warn(f"{path} is marked suspect: {(path / checkpoint.SUSPECT).read_text().strip()}", stacklevel=2)
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    good = checkpoint.last_good(root)
    if good is None:
        raise ExportError(f"--checkpoint {path}: no checkpoint folder ({root}/step_XXXXXXXX/{checkpoint.STATE_TAG}/) "
                          "that is whole and not suspect; name a checkpoint folder")
    return good


def read_checkpoint_info(state_dir: Path) -> dict[str, Any]:
    """The DeepSpeed config and the trainer's client state saved in ``state_dir``'s model states file."""
    files = sorted(state_dir.glob("*model_states.pt"))
    if not files:
        raise ExportError(f"{state_dir} holds no DeepSpeed model states file (*model_states.pt)")
    # mmap: the ZeRO-0 file holds every weight, and only its small entries are read here
    states = torch.load(files[0], map_location="cpu", mmap=True, weights_only=False)  # our own checkpoint
    return {"ds_config": states.get("ds_config") or {}, "config": states.get("config"), "file": files[0]}


def zero_stage(ds_config: Any) -> int:
    return int(((ds_config or {}) if isinstance(ds_config, dict) else {}).get("zero_optimization", {}).get("stage", 0))


def trained_dtype(ds_config: Any) -> torch.dtype:
    """The dtype the run trained in: what ``Trainer.export`` would have saved."""
    config = ds_config if isinstance(ds_config, dict) else {}
    if config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if config.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def policy_state_dict(ckpt: Path, *, dtype: torch.dtype, info: Optional[dict] = None) -> dict[str, torch.Tensor]:
    """The policy's weights in ``ckpt`` (transformers' names), cast to ``dtype``; tied weights stay shared."""
    state_dir = ckpt / checkpoint.STATE_TAG
    info = info or read_checkpoint_info(state_dir)
    if zero_stage(info["ds_config"]) >= 1:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        raw = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=checkpoint.STATE_TAG, lazy_mode=True)
    else:
        raw = torch.load(info["file"], map_location="cpu", mmap=True, weights_only=False)["module"]
    state, converted = {}, {}
    for name, tensor in raw.items():
        if not name.startswith(WRAPPER_PREFIX):
            raise ExportError(f"{ckpt}: weight {name!r} lacks the engine's {WRAPPER_PREFIX!r} prefix; not an ekipl "
                              "checkpoint?")
        key = id(tensor)
        if key not in converted:  # shared (tied) tensors are converted once and stay one tensor
            value = tensor.contiguous() if hasattr(tensor, "contiguous") else tensor
            if value.is_floating_point():
                if not torch.isfinite(value).all():
                    raise ExportError(f"{ckpt}: weight {name!r} holds NaN/Inf; export an earlier checkpoint")
                value = value.to(dtype)
            converted[key] = value
        state[name[len(WRAPPER_PREFIX):]] = converted[key]
    return state


def base_model_path(ckpt: Path, config: Optional[dict]) -> Path:
    """The run's base model folder: ``model.path`` of the checkpoint's config (or of ``config.resolved.yaml``)."""
    run = ckpt.parent.parent
    if config is None and (run / "config.resolved.yaml").is_file():
        import yaml

        config = yaml.safe_load((run / "config.resolved.yaml").read_text())
    path = ((config or {}).get("model") or {}).get("path")
    if path is None:
        raise ExportError(f"{ckpt}: neither the checkpoint nor {run}/config.resolved.yaml names model.path; "
                          "pass --model <the base model folder>")
    folder = run / "tiny_model" if path == "tiny" else Path(path)
    if not (folder / "config.json").is_file():
        raise ExportError(f"the run's base model {str(folder)!r} (model.path={path!r}) holds no config.json here; "
                          "pass --model <the base model folder>")
    return folder


def export_checkpoint(ckpt: Path, out: Path, *, model_path: Optional[Path] = None, dtype: str = "auto") -> Path:
    """Writes an HF folder to ``out`` from the checkpoint ``ckpt`` (or a run folder's newest good checkpoint)."""
    from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig

    from ekipl.models import load_processor

    ckpt = resolve_checkpoint(Path(ckpt))
    info = read_checkpoint_info(ckpt / checkpoint.STATE_TAG)
    base = Path(model_path) if model_path is not None else base_model_path(ckpt, info["config"])
    torch_dtype = trained_dtype(info["ds_config"]) if dtype == "auto" else DTYPES[dtype]
    state = policy_state_dict(ckpt, dtype=torch_dtype, info=info)
    with torch.device("meta"):  # only the class, config and names: the weights are the checkpoint's
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(str(base)), dtype=torch_dtype)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ExportError(f"{ckpt} does not hold the weights of {base}: missing {missing[:5]}, unexpected "
                          f"{unexpected[:5]}; pass --model <the run's base model folder>")
    if (base / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(base))
    return save_hf_folder(model, load_processor(base), Path(out), state_dict=state)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ekipl.export",
        description="Turn an ekipl checkpoint into an HF-format folder (transformers / SGLang load it).")
    parser.add_argument("--checkpoint", required=True,
                        help="<run>/checkpoints/step_XXXXXXXX, or a run folder (its newest good checkpoint)")
    parser.add_argument("--out", required=True, help="the folder to write")
    parser.add_argument("--model", default=None,
                        help="the run's base model folder (default: model.path of the checkpoint's saved config)")
    parser.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                        help="auto: the dtype the run trained in (bf16/fp16 when DeepSpeed's were enabled, else fp32)")
    parser.add_argument("--force", action="store_true", help="replace --out when it exists")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        print(f"ekipl.export: error: --out {out} exists and is not empty; pass --force to replace it", file=sys.stderr)
        return 2
    try:
        written = export_checkpoint(Path(args.checkpoint), out, model_path=args.model and Path(args.model),
                                    dtype=args.dtype)
    except (ExportError, FileNotFoundError) as exc:
        print(f"ekipl.export: error: {exc}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} to {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
