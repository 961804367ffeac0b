"""The trainer's typed configuration: one dataclass per section, defaults from the paper and benchmark.

Load with :func:`load_config` (YAML file + dotted overrides). Every knob is documented once, on its
dataclass; the loss knobs are ``ekipl_kernels.LossConfig``'s, the group knobs ``GroupConfig``'s, the
expert knobs ``ExpertPoolConfig``'s, the optimiser knobs ``OptimConfig``'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from ekipl_kernels import LossConfig

from .config_loader import ConfigError, apply_overrides, from_dict, load_yaml, parse_overrides
from .experts.config import ExpertPoolConfig
from .groups import GroupConfig
from .learner import OptimConfig


# Reason-RFT's RL setup: k3 KL to the reference, the loss averaged per sequence then over the batch.
# (beta is not published by the paper; 0.04 is the value its open-r1 lineage uses.)
TRAINER_LOSS_DEFAULTS = {"beta": 0.04, "kl": "k3", "agg": "seq-mean-token-mean"}


@dataclass(frozen=True)
class RunConfig:
    """output_dir: where metrics, checkpoints, the HF export and plots go. seed: everything derives
    from it. max_steps: EKIPL steps. save_every: checkpoint period (0: only at the end). keep_last:
    checkpoints kept. resume: "auto" (latest in output_dir), "never", or a checkpoint folder.
    stop_at_step: end this invocation after that step with a checkpoint, as a job's time limit would
    (0: run to max_steps); a later run with resume "auto" continues on the same schedule.
    eval_every: held-out evaluation period (0: only at the end; -1: never). log_every: progress-bar
    refresh period. wandb_project: also log to Weights & Biases when set."""

    output_dir: str = "runs/ekipl"
    seed: int = 0
    max_steps: int = 100
    save_every: int = 50
    keep_last: int = 2
    resume: str = "auto"
    stop_at_step: int = 0
    eval_every: int = 0
    log_every: int = 1
    wandb_project: Optional[str] = None

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"run.max_steps={self.max_steps} is invalid: expected >= 1")
        if self.keep_last < 1:
            raise ValueError(f"run.keep_last={self.keep_last} is invalid: expected >= 1")


@dataclass(frozen=True)
class ModelConfig:
    """path: a local folder with a Qwen2-VL / Qwen2.5-VL (or any image-text-to-text model) and its
    processor; "tiny" builds the embedded tiny model under ``<output_dir>/tiny_model`` on first use.
    dtype: "auto" (bf16 on GPU, fp32 on CPU), "bf16", "fp32". attn_implementation: "auto"
    (flash-attention 2 on CUDA when installed, else sdpa), or any transformers value.
    gradient_checkpointing: trade compute for activation memory. use_liger: "auto" (Liger-Kernel's
    Qwen-VL patches on CUDA when installed), "on", "off"."""

    path: str = "tiny"
    dtype: str = "auto"
    attn_implementation: str = "auto"
    gradient_checkpointing: bool = False
    use_liger: str = "auto"


@dataclass(frozen=True)
class DataConfig:
    """task: a Reason-RFT task family name (clevr-math, super-clevr, geomath, geometry3k, trance,
    trance-left, trance-right) or "synthetic" (the embedded counting task, generated offline).
    train_path / test_path: JSON or JSONL records; image_root: where their image paths are resolved.
    synthetic_train / synthetic_test: sizes of the generated synthetic splits. max_pixels: image size
    bound (Reason-RFT: 480000). max_prompt_len: prompts longer than this are an error, never cut.
    skip_bad_rows: skip and count malformed rows instead of failing. prompts_per_step: prompts per
    EKIPL step over all ranks. eval_limit: evaluate on at most this many held-out records (0: all)."""

    task: str = "synthetic"
    train_path: Optional[str] = None
    test_path: Optional[str] = None
    image_root: Optional[str] = None
    synthetic_train: int = 512
    synthetic_test: int = 64
    max_pixels: int = 480000
    max_prompt_len: int = 4096
    skip_bad_rows: bool = False
    prompts_per_step: int = 8
    eval_limit: int = 0


@dataclass(frozen=True)
class RolloutConfig:
    """engine: "hf" (transformers generate, shares the learner's module), "sglang" (in-process engine
    colocated with the trainer) or "sglang-http" (a running server at ``url``). n_policy: policy samples
    per prompt. temperature/top_p/top_k/max_new_tokens: sampling (Reason-RFT: top_p 0.9, top_k 50, 512
    new tokens). bucket_mb: weight-sync bucket size. mem_fraction_static: SGLang's KV-cache share."""

    engine: str = "hf"
    n_policy: int = 8
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 50
    max_new_tokens: int = 512
    url: str = "http://127.0.0.1:30000"
    bucket_mb: int = 512
    mem_fraction_static: float = 0.5

    def __post_init__(self) -> None:
        if self.engine not in ("hf", "sglang", "sglang-http"):
            raise ValueError(f"rollout.engine={self.engine!r} is invalid: expected 'hf', 'sglang' or 'sglang-http'")
        if self.n_policy < 1:
            raise ValueError(f"rollout.n_policy={self.n_policy} is invalid: expected >= 1")


@dataclass(frozen=True)
class DeepSpeedConfig:
    """config: a DeepSpeed JSON (``configs/ds_zero{0,1,2,3}.json``); precision, clipping and batch keys
    are filled in by the learner. offload_reference: keep the frozen reference model on the CPU."""

    config: str = "configs/ds_zero0.json"
    offload_reference: bool = False


@dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation, Reason-RFT's protocol: temperature 0.1, top_p 0.9, top_k 50, 768 new tokens,
    one sample (n), pass@k for each k in k_values."""

    temperature: float = 0.1
    top_p: float = 0.9
    top_k: int = 50
    max_new_tokens: int = 768
    n: int = 1
    k_values: tuple[int, ...] = (1,)


@dataclass(frozen=True)
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    experts: ExpertPoolConfig = field(default_factory=ExpertPoolConfig)
    group: GroupConfig = field(default_factory=GroupConfig)
    loss: LossConfig = field(default_factory=lambda: LossConfig(**TRAINER_LOSS_DEFAULTS))
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    rewards: Optional[list[str]] = None  # None: the task family's (format + accuracy, or format + trance)


def load_config(path: Optional[str | Path], overrides: Sequence[str] | dict[str, Any] = ()) -> TrainConfig:
    """The config from a YAML file (or the defaults) with ``--dotted.key=value`` overrides applied."""
    data = load_yaml(path) if path is not None else {}
    if not isinstance(overrides, dict):
        overrides = parse_overrides(overrides)
    data["loss"] = {**TRAINER_LOSS_DEFAULTS, **(data.get("loss") or {})}
    return from_dict(TrainConfig, apply_overrides(data, overrides))


__all__ = ["ConfigError", "TrainConfig", "load_config"]
