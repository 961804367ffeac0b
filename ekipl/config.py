"""The trainer's typed configuration: one dataclass per section, defaults from the paper and benchmark.

Load with :func:`load_config` (YAML file + dotted overrides). Every knob is documented once, on its
dataclass; the loss knobs are ``ekipl_kernels.LossConfig``'s, the group knobs ``GroupConfig``'s, the
expert knobs ``ExpertPoolConfig``'s, the optimiser knobs ``OptimConfig``'s. Each value is checked when its
dataclass is built; checks that need files, packages or imports are ``ekipl.preflight.validate_startup``'s.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from ekipl_kernels import KernelOptions, LossConfig

from .config_loader import ConfigError, apply_overrides, from_dict, load_yaml, parse_overrides
from .data.tasks import SYNTHETIC_TASK, TASK_FAMILIES
from .experts.config import ExpertPoolConfig
from .groups import GroupConfig
from .learner import OptimConfig
from .metrics import normalize_report_to


# Reason-RFT's RL setup: k3 KL to the reference, the loss averaged per sequence then over the batch.
# (beta is not published by the paper; 0.04 is the value its open-r1 lineage uses.)
TRAINER_LOSS_DEFAULTS = {"beta": 0.04, "kl": "k3", "agg": "seq-mean-token-mean"}

REPO_ROOT = Path(__file__).resolve().parent.parent


def _require(ok: bool, key: str, value: Any, expected: str) -> None:
    """Raises ``key=value is invalid: expected ...`` unless ``ok`` (from_dict makes it a ConfigError)."""
    if not ok:
        raise ValueError(f"{key}={value!r} is invalid: expected {expected}")


def _check_sampling(section: str, temperature: float, top_p: float, top_k: int, max_new_tokens: int,
                    greedy_ok: bool) -> None:
    # The range tests are written so that NaN fails them.
    if greedy_ok:
        _require(0.0 <= temperature < math.inf, f"{section}.temperature", temperature,
                 "a finite number >= 0 (0: greedy)")
    else:
        _require(0.0 < temperature < math.inf, f"{section}.temperature", temperature, "a finite number > 0")
    _require(0.0 < top_p <= 1.0, f"{section}.top_p", top_p, "a value in (0, 1]")
    _require(top_k >= 0, f"{section}.top_k", top_k, ">= 0 (0 disables top-k)")
    _require(max_new_tokens >= 1, f"{section}.max_new_tokens", max_new_tokens, ">= 1")


@dataclass(frozen=True)
class RunConfig:
    """output_dir: where metrics, checkpoints, the HF export and plots go. seed: everything derives
    from it. max_steps: EKIPL steps. save_every: checkpoint period (0: only at the end). keep_last:
    checkpoints kept. resume: "auto" (latest in output_dir), "never", or a checkpoint folder.
    allow_config_change: on resume, accept a config that differs from the checkpoint's beyond the
    run-length, evaluation and logging keys (otherwise such a change is refused, naming each key).
    stop_at_step: end this invocation after that step with a checkpoint, as a job's time limit would
    (0: run to max_steps); a later run with resume "auto" continues on the same schedule.
    eval_every: held-out evaluation period (0: only at the end; -1: never). eval_at_start: also evaluate
    before the first step (the step-0 point of the curves; skipped when eval_every is -1). log_every:
    period of the console's metrics line (a progress bar's summary on a terminal).
    report_to: where the metrics go besides metrics.jsonl: a list of "tensorboard" (``<output_dir>/tensorboard``),
    "wandb" and "mlflow", or "none" (a bare name is a list of one); W&B and MLflow take their server and key
    from their own environment (WANDB_API_KEY, WANDB_MODE, MLFLOW_TRACKING_URI), and a resumed run goes on
    logging into the same tracker run. project: the W&B project and MLflow experiment. run_name: the run's
    name in W&B and MLflow (default: the output folder's name)."""

    output_dir: str = "runs/ekipl"
    seed: int = 0
    max_steps: int = 100
    save_every: int = 50
    keep_last: int = 2
    resume: str = "auto"
    allow_config_change: bool = False
    stop_at_step: int = 0
    eval_every: int = 0
    eval_at_start: bool = True
    log_every: int = 1
    report_to: tuple[str, ...] | str = ("tensorboard",)
    project: str = "ekipl"
    run_name: Optional[str] = None

    def __post_init__(self) -> None:
        for key in ("max_steps", "keep_last", "log_every"):
            _require(getattr(self, key) >= 1, f"run.{key}", getattr(self, key), ">= 1")
        for key in ("save_every", "stop_at_step"):
            _require(getattr(self, key) >= 0, f"run.{key}", getattr(self, key), ">= 0")
        _require(self.eval_every >= -1, "run.eval_every", self.eval_every, ">= -1 (-1: never, 0: only at the end)")
        object.__setattr__(self, "report_to", normalize_report_to(self.report_to))


@dataclass(frozen=True)
class ModelConfig:
    """path: a local folder with a Qwen2-VL / Qwen2.5-VL (or any image-text-to-text model) and its
    processor; "tiny" builds the embedded tiny model under ``<output_dir>/tiny_model`` on first use.
    dtype: "auto" (bf16 on GPU, fp32 on CPU), "bf16", "fp32". attn_implementation: "auto"
    (flash-attention 2 on CUDA when installed, else sdpa), or any transformers value.
    gradient_checkpointing: trade compute for activation memory. use_liger: "auto" (Liger-Kernel's
    Qwen-VL patches on CUDA when installed), "on", "off" (YAML reads a bare on/off as a boolean: true and
    false are accepted and stored as "on" and "off")."""

    path: str = "tiny"
    dtype: str = "auto"
    attn_implementation: str = "auto"
    gradient_checkpointing: bool = False
    use_liger: str | bool = "auto"

    def __post_init__(self) -> None:
        _require(self.dtype in ("auto", "bf16", "fp32"), "model.dtype", self.dtype, "'auto', 'bf16' or 'fp32'")
        if isinstance(self.use_liger, bool):
            object.__setattr__(self, "use_liger", "on" if self.use_liger else "off")
        _require(self.use_liger in ("auto", "on", "off"), "model.use_liger", self.use_liger, "'auto', 'on' or 'off'")


@dataclass(frozen=True)
class DataConfig:
    """task: a Reason-RFT task family name (clevr-math, super-clevr, geomath, geometry3k, trance,
    trance-left, trance-right) or "synthetic" (the embedded counting task, generated offline).
    train_path / test_path: JSON or JSONL records (train_path is required for a Reason-RFT task);
    image_root: where their image paths are resolved (default: the data file's folder). The synthetic
    task writes its own data under ``run.output_dir`` and takes none of these three.
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

    def __post_init__(self) -> None:
        _require(self.task in TASK_FAMILIES, "data.task", self.task, f"one of {', '.join(sorted(TASK_FAMILIES))}")
        given = [key for key in ("train_path", "test_path", "image_root") if getattr(self, key)]
        if self.task == SYNTHETIC_TASK and given:
            raise ValueError(
                f"data.{given[0]} is not used by data.task='synthetic', which generates its own data: "
                "unset it, or set data.task to the Reason-RFT task of those files"
            )
        if self.task != SYNTHETIC_TASK and not self.train_path:
            raise ValueError(f"data.train_path is required for data.task={self.task!r}: give its JSON or JSONL file")
        for key in ("synthetic_train", "max_pixels", "max_prompt_len", "prompts_per_step"):
            _require(getattr(self, key) >= 1, f"data.{key}", getattr(self, key), ">= 1")
        for key in ("synthetic_test", "eval_limit"):
            _require(getattr(self, key) >= 0, f"data.{key}", getattr(self, key), ">= 0")


@dataclass(frozen=True)
class RolloutConfig:
    """engine: "hf" (transformers generate, shares the learner's module), "sglang" (in-process engine
    colocated with the trainer) or "sglang-http" (a running server at ``url``). url: that server's address.
    n_policy: policy samples per prompt. temperature/top_p/top_k/max_new_tokens: sampling (Reason-RFT: top_p
    0.9, top_k 50, 512 new tokens; top_k 0 disables top-k; temperature > 0). bucket_mb: weight-sync bucket
    size. mem_fraction_static: SGLang's KV-cache share."""

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
        # Greedy rollouts would give every sample of a group the same answer: no signal.
        _check_sampling("rollout", self.temperature, self.top_p, self.top_k, self.max_new_tokens, greedy_ok=False)
        _require(self.bucket_mb >= 1, "rollout.bucket_mb", self.bucket_mb, ">= 1")
        _require(0.0 < self.mem_fraction_static < 1.0, "rollout.mem_fraction_static", self.mem_fraction_static,
                 "a value in (0, 1)")


@dataclass(frozen=True)
class DeepSpeedConfig:
    """config: a DeepSpeed JSON (or YAML) file, as given or relative to the repository root
    (``configs/ds_zero{0,1,2,3}.json``); precision, clipping and batch keys are filled in by the learner.
    offload_reference: keep the frozen reference model in host memory between passes, moved to the
    accelerator for its log-prob pass."""

    config: str = "configs/ds_zero0.json"
    offload_reference: bool = False


@dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation; the defaults are Reason-RFT's protocol.

    temperature: sampling temperature (Reason-RFT: 0.1; 0: greedy). top_p, top_k: nucleus and top-k sampling
    (0.9 and 50; top_k 0 disables top-k). max_new_tokens: answer length bound (768). n: samples per prompt
    (Reason-RFT: one). k_values: pass@k is reported for each k (each k between 1 and n)."""

    temperature: float = 0.1
    top_p: float = 0.9
    top_k: int = 50
    max_new_tokens: int = 768
    n: int = 1
    k_values: tuple[int, ...] = (1,)

    def __post_init__(self) -> None:
        _check_sampling("eval", self.temperature, self.top_p, self.top_k, self.max_new_tokens, greedy_ok=True)
        _require(self.n >= 1, "eval.n", self.n, ">= 1")
        bad = [k for k in self.k_values if not 1 <= k <= self.n]
        _require(not bad, "eval.k_values", list(self.k_values),
                 f"each k between 1 and eval.n={self.n} (pass@k needs k of n samples): raise eval.n or drop {bad}")


@dataclass(frozen=True)
class TrainConfig:
    """The whole training config. ``loss.temperature``, when not given, is ``rollout.temperature``: the
    trainer's log-probs then describe the distribution the answers were sampled from. A different value
    is refused when the loss divides by the sampler's log-probs (``loss.tis_cap`` or ``expert_mode: is``).
    ``loss_backend`` chooses how the fused loss runs (``ekipl_kernels.KernelOptions``: backend, Triton
    schedule, chunk sizes, memory budget), never what it computes; environment variables override it.

    rewards: the reward functions summed into each answer's reward, by registry name (``format``,
    ``accuracy``, ...) or as ``module:function``; unset (null): the task family's (format + accuracy, or
    format + trance)."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    experts: ExpertPoolConfig = field(default_factory=ExpertPoolConfig)
    group: GroupConfig = field(default_factory=GroupConfig)
    loss: LossConfig = field(default_factory=lambda: LossConfig(**TRAINER_LOSS_DEFAULTS))
    loss_backend: KernelOptions = field(default_factory=KernelOptions)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    rewards: Optional[list[str]] = None  # None: the task family's (format + accuracy, or format + trance)

    def __post_init__(self) -> None:
        _require(self.rewards is None or len(self.rewards) > 0, "rewards", self.rewards,
                 "reward names or 'module:function' entries; leave it unset for the task's defaults")
        if self.loss.needs_behavior and self.loss.temperature != self.rollout.temperature:
            raise ValueError(
                f"loss.temperature={self.loss.temperature} differs from rollout.temperature={self.rollout.temperature}, "
                "but the loss uses the sampler's log-probs (loss.tis_cap or loss.expert_mode=is), whose ratio is then "
                "wrong: leave loss.temperature unset (it follows rollout.temperature) or set both alike"
            )
        guided = self.experts.prefix_ratio > 0 and self.experts.experts
        if guided and self.experts.prefix_samples > self.rollout.n_policy:
            raise ValueError(
                f"experts.prefix_samples={self.experts.prefix_samples} is invalid: expected <= "
                f"rollout.n_policy={self.rollout.n_policy} (prefix-guided samples are some of the policy's samples)"
            )


# Keys a resumed run may change freely: how long it runs, how it evaluates, saves and logs. Every other
# key shapes the training itself, so a change is refused unless run.allow_config_change is set.
RESUMABLE_KEYS = ("run.", "eval.", "data.eval_limit", "loss_backend.")
FIXED_RUN_KEYS = ("run.seed",)


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        return {k: v for key, value in data.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    if isinstance(data, (list, tuple)) and any(isinstance(item, dict) for item in data):
        return {k: v for i, item in enumerate(data) for k, v in _flatten(item, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): list(data) if isinstance(data, tuple) else data}


def resume_conflicts(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for each key that differs between a checkpoint's config and this run's and
    that a resumed run may not change (see RESUMABLE_KEYS)."""
    before, after = _flatten(saved), _flatten(current)
    conflicts = []
    for key in sorted(before.keys() | after.keys()):
        free = key.startswith(RESUMABLE_KEYS) and not key.startswith(FIXED_RUN_KEYS)
        if not free and before.get(key, "<unset>") != after.get(key, "<unset>"):
            conflicts.append(f"{key}: {before.get(key, '<unset>')!r} -> {after.get(key, '<unset>')!r}")
    return conflicts


def resolve_deepspeed_config_path(name: str) -> Path:
    """The file ``deepspeed.config`` names: as given (absolute, or relative to the working directory), else
    relative to the repository root, so ``configs/ds_zero3.json`` works from any directory."""
    path = Path(name)
    if not path.is_file() and not path.is_absolute():
        path = REPO_ROOT / name
    if not path.is_file():
        raise ConfigError(
            f"deepspeed.config={name!r} does not exist (looked in the working directory and in {REPO_ROOT}); "
            "use one of configs/ds_zero{0,1,2,3}.json or the path of your own DeepSpeed config"
        )
    return path


def read_deepspeed_config(name: str) -> dict:
    """The DeepSpeed config that ``deepspeed.config`` names (JSON, or YAML by its suffix), as a dict."""
    path = resolve_deepspeed_config_path(name)
    if path.suffix in (".yaml", ".yml"):
        data = load_yaml(path)
    else:
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"deepspeed.config={name!r}: {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"deepspeed.config={name!r}: {path} must hold a mapping of DeepSpeed settings")
    return data


def load_config(path: Optional[str | Path], overrides: Sequence[str] | dict[str, Any] = ()) -> TrainConfig:
    """The config from a YAML file (or the defaults) with ``--dotted.key=value`` overrides applied."""
    data = load_yaml(path) if path is not None else {}
    if not isinstance(overrides, dict):
        overrides = parse_overrides(overrides)
    data["loss"] = {**TRAINER_LOSS_DEFAULTS, **(data.get("loss") or {})}
    data = apply_overrides(data, overrides)
    rollout = data.get("rollout") if isinstance(data.get("rollout"), dict) else {}
    data["loss"].setdefault("temperature", rollout.get("temperature", RolloutConfig.temperature))
    data["loss"] = data.pop("loss")  # built after rollout, so a bad rollout.temperature is reported as such
    return from_dict(TrainConfig, data)


__all__ = ["ConfigError", "TrainConfig", "load_config", "read_deepspeed_config", "resolve_deepspeed_config_path"]
