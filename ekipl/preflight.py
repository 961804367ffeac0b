"""Start-up checks of a training config that need more than its dataclasses: files, packages, user code.

The dataclasses check every value on its own when the config loads; :func:`validate_startup` checks what
the machine must provide (the files the config names, the optional packages it asks for, the ``rewards``
it imports), so that a bad config fails before DeepSpeed starts, with a :class:`ConfigError` naming the
dotted key, never minutes later with a traceback.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

from .config import TrainConfig, read_deepspeed_config
from .config_loader import ConfigError
from .data.tasks import SYNTHETIC_TASK
from .metrics import missing_tracker_message
from .rewards import get_reward


def validate_startup(cfg: TrainConfig) -> None:
    """Raises :class:`ConfigError` naming the key of the first problem found; warns (once) when
    ``group.size`` exceeds the candidates a prompt can have."""
    read_deepspeed_config(cfg.deepspeed.config)
    _check_model(cfg)
    _check_data(cfg)
    _check_rewards(cfg)
    _check_experts(cfg)
    _check_packages(cfg)
    _warn_small_groups(cfg)


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def _check_model(cfg: TrainConfig) -> None:
    path = cfg.model.path
    if path != "tiny" and not (Path(path) / "config.json").is_file():
        raise ConfigError(
            f"model.path={path!r} holds no model (no config.json); give a local folder saved with "
            "save_pretrained, or model.path=tiny for the embedded tiny model"
        )


def _check_data(cfg: TrainConfig) -> None:
    data = cfg.data
    if data.task == SYNTHETIC_TASK:  # generated under run.output_dir; DataConfig rejects paths beside it
        return
    for key in ("train_path", "test_path"):
        path = getattr(data, key)
        if path is not None and not Path(path).is_file():
            raise ConfigError(
                f"data.{key}={path!r} is not a file; give the JSON or JSONL records of data.task={data.task!r}"
            )
    if data.image_root is not None and not Path(data.image_root).is_dir():
        raise ConfigError(
            f"data.image_root={data.image_root!r} is not a folder; give the folder the records' image paths "
            "are relative to"
        )


def _check_rewards(cfg: TrainConfig) -> None:
    for index, name in enumerate(cfg.rewards or ()):
        try:
            get_reward(name)
        except ValueError as exc:  # unknown name, module or attribute missing, not callable
            raise ConfigError(f"rewards[{index}]: {exc}") from exc


def _check_experts(cfg: TrainConfig) -> None:
    for index, expert in enumerate(cfg.experts.experts):
        key = f"experts.experts[{index}]"
        if expert.kind == "cache" and not Path(expert.path).is_file():
            raise ConfigError(
                f"{key}.path={expert.path!r} does not exist; write it with python -m ekipl.experts.generate"
            )
        if expert.kind == "sglang":
            if not Path(expert.model).is_dir():
                raise ConfigError(
                    f"{key}.model={expert.model!r} is not a local folder; give the folder of the served model's "
                    "config and tokenizer"
                )
            if not expert.base_url and not _installed("sglang"):
                raise ConfigError(
                    f"{key}.base_url is unset, so expert {expert.name!r} would launch an in-process SGLang engine, "
                    "but sglang is not installed: pip install 'ekipl[sglang]' (CUDA only), or give the base_url "
                    "of a running server"
                )
        if expert.kind == "openai" and expert.api_key_env is not None and not os.environ.get(expert.api_key_env):
            raise ConfigError(
                f"{key}.api_key_env={expert.api_key_env!r}: that environment variable is not set; export it with "
                f"expert {expert.name!r}'s API key"
            )


def _check_packages(cfg: TrainConfig) -> None:
    tracker_problem = missing_tracker_message(cfg.run.report_to)
    if tracker_problem:
        raise ConfigError(tracker_problem)
    if cfg.rollout.engine == "sglang" and not _installed("sglang"):
        raise ConfigError(
            "rollout.engine='sglang' needs the sglang package: pip install 'ekipl[sglang]' (CUDA only), or use "
            "rollout.engine=hf, or sglang-http with a running server"
        )
    if cfg.model.use_liger == "on" and not _installed("liger_kernel"):
        raise ConfigError(
            "model.use_liger='on' needs Liger-Kernel: pip install liger-kernel, or set model.use_liger=auto"
        )
    if cfg.model.attn_implementation == "flash_attention_2" and not _installed("flash_attn"):
        raise ConfigError(
            "model.attn_implementation='flash_attention_2' needs flash-attn (CUDA only): pip install flash-attn, "
            "or set model.attn_implementation=auto"
        )


def _warn_small_groups(cfg: TrainConfig) -> None:
    if cfg.group.select != "topg":  # "all" takes every candidate; "replace" keeps the policy's count
        return
    expert_answers = sum(expert.k for expert in cfg.experts.experts)
    available = cfg.rollout.n_policy + expert_answers
    if cfg.group.size > available:
        warnings.warn(
            f"group.size={cfg.group.size} exceeds the {available} candidates a prompt can have "
            f"(rollout.n_policy={cfg.rollout.n_policy} + {expert_answers} expert answers): groups will hold at most "
            f"{available}; lower group.size or raise rollout.n_policy",
            stacklevel=3,  # the caller of validate_startup
        )
