"""EKIPL training: GRPO whose groups mix the policy's own answers with external experts' answers.

    deepspeed ekipl/train.py --config configs/tiny_cpu.yaml [--section.key=value ...]
    python ekipl/train.py --config configs/tiny_cpu.yaml          # one process, no launcher

One step (``Trainer.step``), top to bottom: sample prompts -> ask the experts (in the background) ->
policy rollout -> rewards -> collect expert answers -> assemble groups -> old/ref log-probs -> update ->
weight sync -> metrics. Everything else here is setup, checkpoints and evaluation.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional, Sequence

if __name__ == "__main__" and sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # run as a script: don't let ekipl/'s modules shadow top-level packages

import torch


from ekipl import checkpoint  # noqa: E402
from ekipl.checkpoint import CheckpointError  # noqa: E402
from ekipl.console import Console  # noqa: E402
from ekipl.config import TrainConfig, load_config, read_deepspeed_config, resume_conflicts  # noqa: E402
from ekipl.config_loader import ConfigError, config_yaml, to_dict  # noqa: E402
from ekipl.config_reference import cli_parser  # noqa: E402
from ekipl.distributed import join_process_group  # noqa: E402
from ekipl.data import (  # noqa: E402
    BadRecordError, Record, check_prompt_lengths, load_records,
)
from ekipl.experts.pool import ExpertPool  # noqa: E402
from ekipl.experience import ExperienceMaker, sample_seed  # noqa: E402
from ekipl.learner import Learner, NonFiniteLossError, all_reduce_sum  # noqa: E402
from ekipl.metrics import MetricsLogger, PhaseTimer, peak_memory_gb, plot_curves  # noqa: E402
from ekipl.preflight import validate_startup  # noqa: E402
from ekipl.rewards import RewardSet  # noqa: E402
from ekipl.rollout.base import SamplingParams  # noqa: E402
from ekipl.run_folder import RunFolderError, RunLock, check_fresh_start  # noqa: E402
from ekipl.sampler import PromptSampler  # noqa: E402
from ekipl.stop_request import StopRequest  # noqa: E402


class RunStopped(RuntimeError):
    """The run ended early on a signal (or the launcher's death), after saving a checkpoint."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        import torch.distributed as dist

        self.cfg = cfg
        validate_startup(cfg)  # files, packages and user code the config names: fail before DeepSpeed starts
        self.device = join_process_group()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.out_dir = Path(cfg.run.output_dir)
        if cfg.data.prompts_per_step % self.world:
            raise ConfigError(
                f"data.prompts_per_step={cfg.data.prompts_per_step} must be a multiple of the number of ranks ({self.world})"
            )
        self.lock = RunLock(self.out_dir)
        self.console = Console(enabled=False, total=cfg.run.max_steps, initial=0, log_every=cfg.run.log_every)  # run() speaks
        self._on_main_checked(self._claim_output_dir)
        self.model_path = self._model_path()
        self.train_records, self.test_records = self._datasets()
        self._build_components()

    # -- setup ------------------------------------------------------------------------------------------
    def _claim_output_dir(self) -> None:
        """Locks the run folder against a second job, refuses to start over an earlier run, saves the config."""
        self.lock.acquire()
        try:
            check_fresh_start(self.out_dir, self.cfg.run.resume)
        except RunFolderError:
            self.lock.release()
            raise
        resolved = config_yaml(self.cfg)
        (self.out_dir / "config.resolved.yaml").write_text(resolved)  # this invocation's; each one is also kept:
        history = self.out_dir / "invocations"
        history.mkdir(exist_ok=True)
        number = len(list(history.glob("*.yaml"))) + 1
        (history / f"{number:03d}-{time.strftime('%Y%m%d-%H%M%S')}.yaml").write_text(resolved)

    def _on_main_checked(self, fn) -> None:
        """Runs the check ``fn`` on rank 0 and stops every rank when it fails (no rank waits forever)."""
        error = None
        if self.is_main:
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - re-raised below, after the other ranks heard of it
                error = exc
        if all_reduce_sum(float(error is not None), self.device) > 0:
            raise error if error is not None else RunFolderError("rank 0 refused to start; see its error")

    def _on_main_first(self, fn):
        """Runs ``fn`` on rank 0, then on the others (for work that writes shared files once)."""
        import torch.distributed as dist

        result = fn() if self.is_main else None
        dist.barrier()
        return result if self.is_main else fn()

    def _model_path(self) -> Path:
        if self.cfg.model.path != "tiny":
            return Path(self.cfg.model.path)  # checked by validate_startup
        from ekipl.tools.tiny_model import build_tiny_model

        tiny = self.out_dir / "tiny_model"

        def build():
            return Path(tiny) if (tiny / "config.json").is_file() else Path(build_tiny_model(tiny, seed=self.cfg.run.seed))

        return self._on_main_first(build)

    def _datasets(self) -> tuple[list[Record], list[Record]]:
        data = self.cfg.data
        if data.task == "synthetic":
            from ekipl.data.synthetic import write_synthetic_dataset

            folder = self.out_dir / "data"

            def write():
                if not (folder / "test.jsonl").is_file():
                    write_synthetic_dataset(folder, n_train=data.synthetic_train, n_test=data.synthetic_test, seed=self.cfg.run.seed)
                return folder

            self._on_main_first(write)
            train_path, test_path, image_root = folder / "train.jsonl", folder / "test.jsonl", folder
        else:
            train_path, test_path, image_root = data.train_path, data.test_path, data.image_root
        load = lambda p: load_records(p, task=data.task, image_root=image_root, skip_bad_rows=data.skip_bad_rows)  # noqa: E731
        train = load(train_path)
        test = load(test_path) if test_path else None
        self.skipped_rows = len(train.skipped) + (len(test.skipped) if test else 0)
        if self.skipped_rows and self.is_main:
            print(f"[ekipl] skipped {self.skipped_rows} bad rows (data.skip_bad_rows=true)", file=sys.stderr)
        return list(train), list(test) if test else []

    def _fitting_prompts(self, records: list[Record]) -> list[Record]:
        """Checks before training that every prompt fits ``data.max_prompt_len`` (skipping or failing on those that don't)."""
        if not records:
            return records
        data = self.cfg.data
        checked = check_prompt_lengths(self.processor, records, max_pixels=data.max_pixels, max_prompt_len=data.max_prompt_len,
                                       skip_bad_rows=data.skip_bad_rows)
        self.skipped_rows += len(checked.skipped)
        return list(checked)

    def _build_components(self) -> None:
        from ekipl.models import load_policy, load_processor
        from ekipl.rollout.hf import HFEngine

        cfg = self.cfg
        dtype = {"auto": torch.bfloat16 if self.device.type == "cuda" else torch.float32, "bf16": torch.bfloat16,
                 "fp32": torch.float32}[cfg.model.dtype]
        self.processor = load_processor(self.model_path)
        self.tokenizer = self.processor.tokenizer
        self.train_records, self.test_records = self._fitting_prompts(self.train_records), self._fitting_prompts(self.test_records)
        torch.manual_seed(cfg.run.seed)
        load = lambda: load_policy(  # noqa: E731
            self.model_path, dtype=dtype, attn_implementation=cfg.model.attn_implementation,
            gradient_checkpointing=cfg.model.gradient_checkpointing,
            use_liger={"auto": "auto", "on": True, "off": False}[cfg.model.use_liger], device=self.device,
        )
        policy = load()
        reference = None
        if cfg.loss.beta > 0:
            reference = load().eval().requires_grad_(False)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.learner = Learner(policy, loss=cfg.loss, kernel_options=cfg.loss_backend, optim=cfg.optim,
                               ds_config=read_deepspeed_config(cfg.deepspeed.config), max_steps=cfg.run.max_steps,
                               pad_id=pad_id, reference=reference, offload_reference=cfg.deepspeed.offload_reference,
                               expert_names=[expert.name for expert in cfg.experts.experts])
        if cfg.rollout.engine == "hf":
            self.engine = HFEngine.from_shared(self.learner.model, self.processor, device=self.device)
        else:
            from ekipl.rollout.sglang import make_sglang_engine

            self.engine = make_sglang_engine(cfg.rollout, model_path=self.model_path, processor=self.processor)
        self.rewards = RewardSet.for_task(cfg.data.task, cfg.rewards)
        self.experts = ExpertPool(cfg.experts, self.processor, seed=cfg.run.seed, max_answer_tokens=cfg.rollout.max_new_tokens)
        self.sampler = PromptSampler(len(self.train_records), cfg.run.seed)
        self.experience = ExperienceMaker(cfg, records=self.train_records, sampler=self.sampler, processor=self.processor,
                                          engine=self.engine, experts=self.experts, rewards=self.rewards, rank=self.rank,
                                          world=self.world, generation_context=self.learner.gathered_weights)
        self.step_index = 0
        self._unjudged_checkpoint: Optional[Path] = None  # saved (or resumed) weights not yet seen to give a finite loss
        self._skipped_eval_ids: set[str] = set()

    # -- one EKIPL step ---------------------------------------------------------------------------------
    def step(self) -> dict[str, float]:
        timer, start = PhaseTimer(), time.perf_counter()
        torch.manual_seed(sample_seed(self.cfg.run.seed, self.step_index, self.rank, "torch"))
        batch = self.experience.make(self.step_index, timer)
        self.engine.release_memory()  # a colocated engine frees the GPU for the learner; update_weights resumes it
        with timer.phase("logprobs"):
            packed = self.learner.pack(batch.sequences)  # once per step: log-probs and the update share it
            self.learner.fill_logprobs(packed)
        with timer.phase("update"):
            update = self.learner.update(packed)
        self._judge_latest_checkpoint(update)
        with timer.phase("sync"):
            sync = self.engine.update_weights(self.learner.named_weights())
        self.step_index += 1
        seconds = time.perf_counter() - start
        stats = self.experience.stats(batch)
        generated = sum(len(c.token_ids) for group in batch.policy for c in group)
        stats.total("tokens_per_s", (generated + sum(s.num_tokens for s in batch.sequences)) / seconds)
        return {
            **stats.reduce(self.device),
            **update,
            **timer.as_metrics(),
            "sync/bytes": float(sync.bytes), "sync/buckets": float(sync.buckets), "sync/seconds": sync.seconds,
            "time/step": seconds,
            "memory/peak_gb": peak_memory_gb(self.device),
            "data/skipped_rows": float(self.skipped_rows + self.experience.skipped_rows + len(self._skipped_eval_ids)),
        }

    # -- checkpoints, evaluation, export ----------------------------------------------------------------
    def client_state(self) -> dict:
        return {"step": self.step_index, "sampler": self.sampler.state_dict(), "rng": checkpoint.rng_state(),
                "experts": self.experts.state_dict(), "config": to_dict(self.cfg)}

    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    def resume(self) -> None:
        """``run.resume``: "auto" (the newest usable checkpoint, if any), "never", or a checkpoint folder."""
        resume = self.cfg.run.resume
        if resume == "never":
            return
        if resume == "auto":
            found = self.learner.load_latest_checkpoint(self.checkpoint_dir)
            if found is None:
                return
            path, state = found
        else:
            path, state = Path(resume), self.learner.load_checkpoint(Path(resume))
        self._check_resumed_config(path, state.get("config"))
        self.step_index = int(state["step"])
        self.sampler.load_state_dict(state["sampler"])
        checkpoint.set_rng_state(state["rng"])
        self.experts.load_state_dict(state.get("experts", {}))
        self._unjudged_checkpoint = path
        if self.is_main:
            print(f"[ekipl] resumed from {path} at step {self.step_index}", file=sys.stderr)

    def _check_resumed_config(self, path: Path, saved: Optional[dict]) -> None:
        """Refuses to continue a run under a config that changes its training (run.allow_config_change overrides)."""
        conflicts = resume_conflicts(saved, to_dict(self.cfg)) if saved is not None else []
        if not conflicts:
            return
        listing = "; ".join(conflicts)
        if not self.cfg.run.allow_config_change:
            raise ConfigError(
                f"{path} was trained with another config ({listing}): continuing would silently change the run. "
                "Use the checkpoint's values (see its run's config.resolved.yaml), start a new run.output_dir, or set "
                "run.allow_config_change=true to continue with the new values"
            )
        if self.is_main:
            print(f"[ekipl] resuming {path} with a changed config (run.allow_config_change=true): {listing}", file=sys.stderr)

    @property
    def healthy(self) -> bool:
        """False while the latest update had a non-finite loss: such weights are never saved or exported."""
        return self.learner.bad_steps == 0

    def save(self) -> Optional[Path]:
        """A checkpoint of the current step, unless the weights are unhealthy (then the last good one stays)."""
        if not self.healthy:
            if self.is_main:
                print(f"[ekipl] step {self.step_index}: no checkpoint saved, the last update had a non-finite loss; "
                      f"{self.last_good_note()}", file=sys.stderr)
            return None
        path = self.learner.save_checkpoint(self.checkpoint_dir, self.step_index, self.client_state(), self.cfg.run.keep_last)
        self._unjudged_checkpoint = path
        self.console.say(f"step {self.step_index}: checkpoint {path}")
        return path

    def _judge_latest_checkpoint(self, update: dict[str, float]) -> None:
        """The first update after a save tells whether the saved weights are usable; mark them when not."""
        if self._unjudged_checkpoint is not None and update.get("skipped_steps", 0.0) > 0:
            checkpoint.mark_suspect(self._unjudged_checkpoint,
                                    f"the update of step {self.step_index + 1}, right after it, had a non-finite loss")
        self._unjudged_checkpoint = None

    def last_good_note(self) -> str:
        good = checkpoint.last_good(self.checkpoint_dir)
        if good is None:
            return "no good checkpoint exists yet"
        return f"the last good checkpoint is {good} (run.resume=auto continues from it)"

    def evaluate(self) -> dict[str, float]:
        import torch.distributed as dist
        from ekipl.eval import evaluate, held_out_rewards

        records = self.test_records[: self.cfg.data.eval_limit or None]
        if not records:
            return {}
        e = self.cfg.eval
        summary = {}
        with self.learner.gathered_weights():
            if self.is_main:
                summary = evaluate(
                    self.engine, records, self.processor, task=self.cfg.data.task,
                    out_dir=self.out_dir / "eval" / f"step_{self.step_index:08d}",
                    sampling=SamplingParams(e.temperature, e.top_p, e.top_k, e.max_new_tokens), n=e.n,
                    k_values=e.k_values, max_pixels=self.cfg.data.max_pixels, max_prompt_len=self.cfg.data.max_prompt_len,
                    seed=self.cfg.run.seed, progress=self.console.interactive, skip_bad_rows=self.cfg.data.skip_bad_rows,
                )
        dist.barrier()
        if not summary:
            return {}
        self._skipped_eval_ids.update(summary["skipped_ids"])
        return {"eval/score": summary["score"], **held_out_rewards(summary["predictions"], records, self.rewards),
                **{f"eval/{k}": v for k, v in summary.items() if k.startswith("pass@")},
                "eval/skipped_rows": float(len(summary["skipped_ids"]))}

    def export(self) -> Path:
        """An HF-format folder (policy and processor) that transformers and SGLang load."""
        return self.learner.export(self.out_dir / "hf_export", self.processor)

    # -- the loop ---------------------------------------------------------------------------------------
    def run(self) -> dict[str, float]:
        """Steps to ``run.max_steps`` (or ``run.stop_at_step``), then the HF export, the curves and a summary.

        Each step's metrics are logged, then its checkpoint saved, then the evaluation run, so a failing
        evaluation never costs trained steps. A signal ends the run after the current step with a
        checkpoint (:class:`RunStopped`); non-finite weights are never saved or exported.
        """
        cfg = self.cfg.run
        end = min(cfg.max_steps, cfg.stop_at_step) if cfg.stop_at_step > 0 else cfg.max_steps
        metrics: dict[str, float] = {}
        stop = StopRequest().install()
        try:
            self.resume()
            if self.step_index >= cfg.max_steps:
                return self._already_complete()
            logger = MetricsLogger(self.out_dir, enabled=self.is_main, report_to=cfg.report_to, project=cfg.project,
                                   run_name=cfg.run_name, config=to_dict(self.cfg))
            logger.truncate_after(self.step_index)
            self.console = Console(enabled=self.is_main, total=cfg.max_steps, initial=self.step_index, log_every=cfg.log_every)
            try:
                if self.step_index == 0 and cfg.eval_at_start and cfg.eval_every >= 0:
                    self.log_evaluation(logger)
                while self.step_index < end and not self._stop_agreed(stop):
                    metrics = self.step()
                    logger.log(self.step_index, metrics)
                    self.console.step(self.step_index, metrics)
                    if cfg.save_every > 0 and self.step_index % cfg.save_every == 0 or self.step_index == end:
                        self.save()
                    last = self.step_index == cfg.max_steps
                    if cfg.eval_every > 0 and self.step_index % cfg.eval_every == 0 or (last and cfg.eval_every >= 0):
                        metrics.update(self.log_evaluation(logger))
            finally:
                self.console.close()
                logger.close()
            if self.step_index < end:
                self._stop_with_checkpoint(stop)
            if not self.healthy:
                raise NonFiniteLossError("the last update had a non-finite loss, so the final weights were neither saved "
                                         "nor exported")
        except NonFiniteLossError as exc:
            raise type(exc)(f"{exc}. Nothing non-finite was saved; {self.last_good_note()}") from exc
        finally:
            stop.uninstall()
            self.experts.close()
            self.lock.release()
        self.console.say(f"exported the HF model to {self.export()}")
        if self.is_main and logger.path.exists():
            plot_curves(logger.path, self.out_dir / "curves.png")
        self.console.summary(steps_done=self.step_index, out_dir=self.out_dir)
        return metrics

    def log_evaluation(self, logger: MetricsLogger) -> dict[str, float]:
        evaluation = self.evaluate()
        logger.log(self.step_index, evaluation)
        self.console.evaluation(self.step_index, evaluation)
        return evaluation

    def _already_complete(self) -> dict[str, float]:
        """A rerun of a finished run: say so, and export if the export is missing (a crash after the last step)."""
        done = f"{self.step_index}/{self.cfg.run.max_steps}"
        if not (self.out_dir / "hf_export" / "config.json").is_file():
            self.export()
        if self.is_main:
            print(f"[ekipl] run already complete ({done} steps) in {self.out_dir}: raise run.max_steps to train further, "
                  "or choose a new run.output_dir for a new run", file=sys.stderr)
        return {}

    def _stop_agreed(self, stop: StopRequest) -> bool:
        """Whether any rank was asked to stop: every rank must leave the loop at the same step."""
        return all_reduce_sum(float(stop.reason is not None), self.device) > 0

    def _stop_with_checkpoint(self, stop: StopRequest) -> None:
        saved = checkpoint.checkpoints(self.checkpoint_dir)
        path = saved[-1] if saved and checkpoint.step_of(saved[-1]) == self.step_index else self.save()
        where = f"checkpoint {path}" if path is not None else f"no new checkpoint ({self.last_good_note()})"
        raise RunStopped(f"stopped at step {self.step_index} ({stop.reason or 'another rank was stopped'}); {where}; "
                         "rerun with run.resume=auto to continue", stop.exit_code)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = cli_parser(description=__doc__.split("\n\n")[0])  # --config, --print-config; --help lists every key
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
        if args.print_config:
            print(config_yaml(cfg), end="")
            return 0
        Trainer(cfg).run()
    except RunStopped as exc:
        print(f"ekipl: {exc}", file=sys.stderr)
        return exc.exit_code
    except (ConfigError, NonFiniteLossError, FileNotFoundError, BadRecordError, RunFolderError, CheckpointError) as exc:
        print(f"ekipl: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
