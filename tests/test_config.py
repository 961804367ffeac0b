"""Typed configs: YAML + dotted overrides, validation errors that name the key, shipped configs load."""

import json
import re
import sys
import warnings
from pathlib import Path

import pytest

from ekipl.config import TrainConfig, load_config, resolve_deepspeed_config_path
from ekipl.config_loader import ConfigError, parse_overrides, to_dict
from ekipl.preflight import validate_startup

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, TrainConfig) and cfg.run.max_steps > 0


def test_defaults_follow_the_benchmark():
    cfg = load_config(None)
    assert (cfg.group.size, cfg.group.select, cfg.group.eps) == (8, "topg", 1e-4)
    assert (cfg.loss.kl, cfg.loss.agg, cfg.loss.beta) == ("k3", "seq-mean-token-mean", 0.04)
    assert (cfg.rollout.top_p, cfg.rollout.top_k, cfg.rollout.max_new_tokens) == (0.9, 50, 512)
    assert (cfg.eval.temperature, cfg.eval.max_new_tokens) == (0.1, 768)
    assert cfg.optim.ppo_epochs == 1


def test_overrides_parse_yaml_values_in_both_spellings(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim: {lr: 0.5}\nloss: {beta: 0.0}\n")
    cfg = load_config(path, ["--optim.lr=1e-5", "--group.size", "4", "--experts.experts=[{name: o, kind: oracle, k: 3}]"])
    assert cfg.optim.lr == 1e-5 and cfg.group.size == 4 and cfg.loss.beta == 0.0
    assert cfg.loss.agg == "seq-mean-token-mean"  # trainer default kept beside the file's loss keys
    assert cfg.experts.experts[0].k == 3 and cfg.experts.expert_id("o") == 1
    assert to_dict(cfg)["optim"]["lr"] == 1e-5


@pytest.mark.parametrize(
    "override, message",
    [
        ("--optim.lrr=1", "unknown config key 'optim.lrr'"),
        ("--group.size=eight", "'group.size' must be an integer"),
        ("--run.max_steps=0", "run.max_steps=0"),
        ("--loss.agg=mean", "loss.agg='mean' is invalid"),
        ("--rollout.engine=vllm", "rollout.engine"),
        ("--experts.experts=[{name: x, kind: psychic}]", "kind='psychic'"),
        ("--model=3", "'model' must be a mapping"),
    ],
)
def test_bad_values_name_their_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(None, [override])


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="has no value"):
        parse_overrides(["--optim.lr"])
    with pytest.raises(ConfigError, match="unexpected argument"):
        parse_overrides(["optim.lr=1"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent.yaml")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_the_saved_resolved_config_loads_back_to_the_same_config(path):
    import yaml

    from ekipl.config_loader import from_dict

    cfg = load_config(path)
    assert from_dict(TrainConfig, yaml.safe_load(yaml.safe_dump(to_dict(cfg), sort_keys=False))) == cfg


# -- issue 11.10: values that passed silently or failed late are rejected at load, naming the key ------------

@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"rollout.max_new_tokens": 0}, "rollout.max_new_tokens=0 is invalid: expected >= 1"),
        ({"run.log_every": 0}, "run.log_every=0 is invalid: expected >= 1"),
        ({"run.save_every": -1}, "run.save_every=-1"),
        ({"run.stop_at_step": -1}, "run.stop_at_step=-1"),
        ({"run.eval_every": -2}, "run.eval_every=-2"),
        ({"data.prompts_per_step": 0}, "data.prompts_per_step=0"),
        ({"data.task": "clevr-mth", "data.train_path": "x.json"}, "data.task='clevr-mth'.*synthetic"),
        ({"data.task": "clevr-math"}, "data.train_path is required for data.task='clevr-math'"),
        ({"data.train_path": "x.json"}, "data.train_path"),
        ({"data.max_pixels": 0}, "data.max_pixels=0"),
        ({"data.max_prompt_len": 0}, "data.max_prompt_len=0"),
        ({"data.synthetic_train": 0}, "data.synthetic_train=0"),
        ({"data.eval_limit": -1}, "data.eval_limit=-1"),
        ({"optim.grad_clip": -1.0}, "optim.grad_clip=-1.0"),
        ({"optim.warmup_steps": -1}, "optim.warmup_steps=-1"),
        ({"optim.lr": float("nan")}, "optim.lr=nan"),
        ({"optim.lr": -1e-6}, "optim.lr=-1e-06"),
        ({"optim.lr": float("inf")}, "optim.lr=inf"),
        ({"optim.lr": 0.0}, "optim.lr=0.0"),
        ({"optim.weight_decay": float("inf")}, "optim.weight_decay=inf"),
        ({"optim.betas": [0.9, 1.0]}, r"optim.betas=\(0.9, 1.0\)"),
        ({"optim.betas": [-0.1, 0.999]}, "optim.betas="),
        ({"optim.min_lr_ratio": 1.5}, "optim.min_lr_ratio=1.5"),
        ({"rollout.top_p": 1.5}, "rollout.top_p=1.5"),
        ({"rollout.top_p": 0.0}, "rollout.top_p=0.0"),
        ({"rollout.top_k": -1}, "rollout.top_k=-1"),
        ({"rollout.temperature": 0.0}, "rollout.temperature=0.0"),
        ({"rollout.temperature": float("nan")}, "rollout.temperature=nan"),
        ({"rollout.bucket_mb": 0}, "rollout.bucket_mb=0"),
        ({"rollout.mem_fraction_static": 1.5}, "rollout.mem_fraction_static=1.5"),
        ({"model.dtype": "fp16"}, "model.dtype='fp16'"),
        ({"model.use_liger": "maybe"}, "model.use_liger='maybe'"),
        ({"eval.n": 0}, "eval.n=0"),
        ({"eval.k_values": [4]}, r"eval.k_values=\[4\].*eval.n=1"),
        ({"eval.top_p": 2.0}, "eval.top_p=2.0"),
        ({"eval.temperature": -0.1}, "eval.temperature=-0.1"),
        ({"eval.max_new_tokens": 0}, "eval.max_new_tokens=0"),
        ({"rewards": []}, r"rewards=\[\]"),
        ({"experts.experts": [{"name": "o", "kind": "oracle"}], "experts.prefix_ratio": 0.5,
          "experts.prefix_samples": 9},
         "experts.prefix_samples=9.*rollout.n_policy=8"),
    ],
)
def test_edge_values_are_rejected_at_load_naming_the_key_once(overrides, message):
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(None, overrides)
    key = re.match(r"[\w.]+", message).group()  # the message leads with the key, and names it once
    assert str(caught.value).startswith(key) and str(caught.value).count(key) == 1, str(caught.value)


@pytest.mark.parametrize("value, expected",
                         [(True, "on"), (False, "off"), ("on", "on"), ("off", "off"), ("auto", "auto")])
def test_use_liger_accepts_yaml_booleans_and_normalises(value, expected):
    assert load_config(None, {"model.use_liger": value}).model.use_liger == expected


def test_use_liger_on_from_the_command_line_is_a_yaml_boolean_that_is_accepted():
    assert load_config(None, ["--model.use_liger=on"]).model.use_liger == "on"
    assert load_config(None, ["--model.use_liger", "off"]).model.use_liger == "off"


def test_eval_accepts_greedy_and_pass_at_k_up_to_n():
    cfg = load_config(None, {"eval.temperature": 0.0, "eval.n": 4, "eval.k_values": [1, 2, 4]})
    assert cfg.eval.k_values == (1, 2, 4)


# -- validate_startup: the checks that need files, packages or imports -------------------------------------

def _startup(overrides=None):
    validate_startup(load_config(None, overrides or {}))


def test_defaults_and_the_cpu_config_pass_startup_without_warnings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # deepspeed.config resolves against the repository root too
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate_startup(load_config(None))
        validate_startup(load_config(Path(__file__).resolve().parent.parent / "configs" / "tiny_cpu.yaml"))


def test_resolve_deepspeed_config_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_deepspeed_config_path("configs/ds_zero3.json").is_file()
    own = tmp_path / "configs" / "ds_zero3.json"  # a file of the working directory wins over the repository's
    own.parent.mkdir()
    own.write_text("{}")
    assert resolve_deepspeed_config_path("configs/ds_zero3.json").resolve() == own.resolve()
    with pytest.raises(ConfigError, match="deepspeed.config='nope.json' does not exist"):
        resolve_deepspeed_config_path("nope.json")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"deepspeed.config": "configs/ds_zero9.json"}, "deepspeed.config='configs/ds_zero9.json' does not exist"),
        ({"model.path": "/nonexistent/model"}, "model.path='/nonexistent/model' holds no model"),
        ({"data.task": "clevr-math", "data.train_path": "/nonexistent/train.json"},
         "data.train_path='/nonexistent/train.json' is not a file"),
        ({"rewards": ["nosuchmodule_xyz:fn"]}, r"rewards\[0\].*No module named 'nosuchmodule_xyz'"),
        ({"rewards": ["format", "ekipl.rewards:nope"]}, r"rewards\[1\].*has no attribute 'nope'"),
        ({"rewards": ["ekipl.rewards:REWARDS"]}, r"rewards\[0\].*not callable"),
        ({"rewards": ["bogus"]}, r"rewards\[0\].*unknown reward 'bogus'"),
        ({"experts.experts": [{"name": "c", "kind": "cache", "path": "/nonexistent/answers.jsonl"}]},
         r"experts.experts\[0\].path='/nonexistent/answers.jsonl'"),
        ({"experts.experts": [{"name": "g", "kind": "openai", "model": "m", "base_url": "http://x",
                               "api_key_env": "EKIPL_TEST_UNSET_KEY"}]},
         r"experts.experts\[0\].api_key_env='EKIPL_TEST_UNSET_KEY'"),
    ],
)
def test_validate_startup_names_the_key(overrides, message, monkeypatch):
    monkeypatch.delenv("EKIPL_TEST_UNSET_KEY", raising=False)
    with pytest.raises(ConfigError, match=message):
        _startup(overrides)


def test_a_tracker_without_its_package_says_how_to_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not importable
    with pytest.raises(ConfigError, match=r"run.report_to=\['tensorboard', 'wandb'\].*pip install wandb.*remove 'wandb' "
                                         r"from run.report_to"):
        _startup({"run.report_to": ["tensorboard", "wandb"], "run.project": "proj"})
    with pytest.raises(ConfigError, match=r"run.report_to=\['bogus'\] is invalid"):
        _startup({"run.report_to": ["bogus"]})


def test_missing_optional_packages_name_the_key(monkeypatch):
    for name in ("sglang", "liger_kernel", "flash_attn"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ConfigError, match="rollout.engine='sglang'.*sglang"):
        _startup({"rollout.engine": "sglang"})
    with pytest.raises(ConfigError, match="model.use_liger='on'.*liger"):
        _startup({"model.use_liger": "on"})
    with pytest.raises(ConfigError, match="model.attn_implementation='flash_attention_2'.*flash"):
        _startup({"model.attn_implementation": "flash_attention_2"})


def test_group_larger_than_the_candidates_warns_once_at_startup():
    with pytest.warns(UserWarning, match=r"group.size=8.*4 candidates") as record:
        _startup({"rollout.n_policy": 4})
    assert len(record) == 1
    # experts' answers count too: 4 policy + 2 x 2 oracle answers fill a group of 8
    experts = [{"name": "a", "kind": "oracle", "k": 2}, {"name": "b", "kind": "oracle", "k": 2}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _startup({"rollout.n_policy": 4, "experts.experts": experts})
        _startup({"rollout.n_policy": 4, "group.select": "all"})


def test_loss_temperature_follows_the_sampler_unless_given():
    assert load_config(None, {"rollout.temperature": 0.7}).loss.temperature == 0.7
    assert load_config(None, {"rollout.temperature": 0.7, "loss.temperature": 0.9}).loss.temperature == 0.9
    assert load_config(None, {}).loss.temperature == 1.0


@pytest.mark.parametrize("uses_sampler_logprobs", [{"loss.tis_cap": 2.0}, {"loss.expert_mode": "is"}])
def test_a_loss_temperature_unlike_the_samplers_is_refused_when_the_ratio_uses_sampler_logprobs(uses_sampler_logprobs):
    with pytest.raises(ConfigError, match=r"loss.temperature=0.9 differs from rollout.temperature=0.7"):
        load_config(None, {"rollout.temperature": 0.7, "loss.temperature": 0.9, **uses_sampler_logprobs})
    assert load_config(None, {"rollout.temperature": 0.7, **uses_sampler_logprobs}).loss.temperature == 0.7


# -- issue 14.3: list-item overrides, the generated config reference (--help, docs/config.md), --print-config ---

EXPERTS_2 = "--experts.experts=[{name: a, kind: oracle}, {name: b, kind: oracle, k: 2}]"


def test_list_item_overrides_set_one_key_of_one_item():
    cfg = load_config(None, [EXPERTS_2, "--experts.experts.1.k=3", "--experts.experts.0.sampling.top_k", "7"])
    a, b = cfg.experts.experts
    assert (a.name, a.k, a.sampling.top_k, b.name, b.k, b.sampling.top_k) == ("a", 1, 7, "b", 3, 50)
    # lists of scalars: the YAML's list, or the default when the YAML has none
    assert load_config(None, {"eval.n": 4, "eval.k_values": [1, 2], "eval.k_values.1": 4}).eval.k_values == (1, 4)
    assert load_config(None, ["--optim.betas.1=0.99"]).optim.betas == (0.9, 0.99)


def test_list_item_overrides_edit_the_yaml_files_list(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("experts:\n  experts:\n    - {name: a, kind: oracle, k: 2, error_rate: 0.5}\n")
    expert = load_config(path, ["--experts.experts.0.k=4"]).experts.experts[0]
    assert (expert.k, expert.error_rate) == (4, 0.5)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--experts.experts.0.k=3"], r"'experts.experts.0.k': index 0 is out of range, 'experts.experts' has 0 items"),
        ([EXPERTS_2, "--experts.experts.2.k=3"],
         r"'experts.experts.2.k': index 2 is out of range, 'experts.experts' has 2 items \(valid indices 0..1\)"),
        (["--eval.k_values.1=4"], r"'eval.k_values.1': index 1 is out of range, 'eval.k_values' has 1 item"),
        ([EXPERTS_2, "--experts.experts.first.k=3"], r"'experts.experts' is a list; index its items"),
        (["--rewards.0=format"], r"'rewards.0': 'rewards' is not a list \(its default is None\)"),
        ([EXPERTS_2, "--experts.experts.1.k.x=1"], r"'experts.experts.1.k' is not a section or a list"),
        ([EXPERTS_2, "--experts.experts.0.k.x=1"], r"'experts.experts\[0\].k' must be an integer"),
        ([EXPERTS_2, "--experts.experts.0.kk=1"], r"unknown config key 'experts.experts\[0\].kk'"),
    ],
)
def test_bad_list_item_overrides_name_the_key_and_the_length(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_every_resolved_key_is_an_override_that_round_trips():
    """The keys of a saved config (``experts.experts.0.k``, as resume conflicts name them) can be given back."""
    from ekipl.config import _flatten

    cfg = load_config(None, [EXPERTS_2, "--eval.n=2", "--eval.k_values=[1, 2]"])
    flat = _flatten(to_dict(cfg))
    assert "experts.experts.1.sampling.top_k" in flat and "eval.k_values" in flat
    items = "--experts.experts=[{name: x, kind: oracle}, {name: y, kind: oracle}]"  # indices address existing items
    assert load_config(None, [items, *(f"--{key}={json.dumps(value)}" for key, value in flat.items())]) == cfg


def test_every_config_key_has_a_doc():
    from ekipl.config_reference import doc_problems

    problems = doc_problems()
    assert not problems, "document each knob once in its dataclass's docstring ('name: text'):\n" + "\n".join(problems)


def test_the_reference_lists_every_resolved_key():
    from ekipl.config import _flatten
    from ekipl.config_reference import all_entries

    keys = {entry.key for entry in all_entries()}
    cfg = load_config(None, ["--experts.experts=[{name: a, kind: oracle}]"])
    listed = {re.sub(r"\.\d+(?=\.|$)", "[]", key) for key in _flatten(to_dict(cfg))}
    assert listed - {"experts.experts[]"} <= keys, listed - keys
    assert {"experts.experts", "experts.experts[].k", "experts.experts[].sampling.top_k", "rewards"} <= keys


def test_docs_config_md_is_generated_from_the_dataclasses():
    from ekipl.config_reference import REGENERATE, render_markdown

    path = Path(__file__).resolve().parent.parent / "docs" / "config.md"
    assert path.is_file() and path.read_text() == render_markdown(), f"docs/config.md is stale: run {REGENERATE}"


def test_help_shows_each_key_with_type_default_and_doc_wrapped():
    from ekipl.config_reference import cli_parser, config_help

    text = config_help(width=80)
    for expected in ("run (ekipl.config.RunConfig):", "loss (ekipl_kernels.config.LossConfig):",
                     "  optim.lr (float, default: 1.0e-06)\n      AdamW",
                     "  loss.beta (float, default: 0.04)",  # the trainer's default, not LossConfig's
                     "  loss.temperature (float, default: rollout.temperature (1.0))",
                     "  experts.experts[].name (str, required)\n      unique label",
                     "  experts.experts[].k (int, default: 1)\n      answers per prompt.",
                     "  eval.k_values (list[int], default: [1])",
                     "  rewards (list[str] | null, default: null)",
                     "  optim.betas ([float, float], default: [0.9, 0.999])"):
        assert expected in text, expected
    assert max(len(line) for line in text.splitlines() if " " in line.strip()) <= 80
    full = cli_parser("EKIPL training.").format_help()
    assert "--print-config" in full and "--config FILE" in full and full.endswith(config_help())


def test_cli_parser_leaves_overrides_and_takes_deepspeeds_local_rank():
    from ekipl.config_reference import cli_parser

    args, overrides = cli_parser().parse_known_args(
        ["--config", "c.yaml", "--group.size", "4", "--local_rank=1", "--print-config", "--optim.lr=1e-5", "--print"])
    assert (args.config, args.print_config, args.local_rank) == ("c.yaml", True, 1)
    assert overrides == ["--group.size", "4", "--optim.lr=1e-5", "--print"]  # no abbreviation is taken


def test_print_config_yaml_is_the_saved_resolved_config_and_loads_back():
    import yaml

    from ekipl.config_loader import config_yaml, from_dict

    cfg = load_config(None, [EXPERTS_2, "--optim.lr=1e-5"])
    text = config_yaml(cfg)
    assert text == yaml.safe_dump(to_dict(cfg), sort_keys=False)  # as ekipl/train.py saves config.resolved.yaml
    assert from_dict(TrainConfig, yaml.safe_load(text)) == cfg


def test_docstring_parser_reads_the_styles_in_use():
    from dataclasses import dataclass

    from ekipl.config_reference import parse_class_docs

    @dataclass
    class Example:
        """Summary line.

        size: G, the group size. With ``select: all`` it is ignored.
        select: "topg" or "all"; an expert model: never a header mid-sentence.
        lr, beta: shared text. warmup / other_key: shared too;
            continued on an indented line. mode: flowing style (0: off).
        name: see :meth:`Learner.update`.

        A closing note.
        """

        size: int = 8
        select: str = "topg"
        lr: float = 1.0
        beta: float = 0.0
        warmup: int = 0
        other_key: int = 0
        mode: int = 0
        name: str = ""
        model: str = ""

    docs = parse_class_docs(Example)
    assert docs.fields == {
        "size": "G, the group size. With `select: all` it is ignored.",
        "select": '"topg" or "all"; an expert model: never a header mid-sentence.',
        "lr": "shared text.", "beta": "shared text.",
        "warmup": "shared too; continued on an indented line.",
        "other_key": "shared too; continued on an indented line.",
        "mode": "flowing style (0: off).",
        "name": "see `Learner.update`.",
    }
    assert docs.intro == "Summary line. A closing note." and docs.repeated == ()
