"""HF exports: ``python -m ekipl.export`` turns a DeepSpeed checkpoint (ZeRO-0 module states, ZeRO-3 partitions)
into a folder that stock transformers loads, and the README's snippet answers a prompt from it."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from ekipl import checkpoint
from ekipl.export import ExportError, export_checkpoint, main
from fakes.learner_setup import ds_config, join_process_group

REPO = Path(__file__).resolve().parents[1]
SNIPPET_MARK = "<!-- snippet: load-export (tests/test_export.py runs it) -->"

def readme_snippet() -> str:
    """The snippet as README.md has it (after SNIPPET_MARK)."""
    text = (REPO / "README.md").read_text()
    assert SNIPPET_MARK in text, f"README.md lost its snippet marker {SNIPPET_MARK!r}"
    found = re.search(r"```python\n(.*?)```", text[text.index(SNIPPET_MARK):], re.S)
    assert found, f"README.md has {SNIPPET_MARK!r} but no ```python block after it"
    return found.group(1)


def sequences(processor) -> list:
    """Two answers to image prompts, one rewarded and one not: an update moves every weight."""
    from ekipl.packing import TrainSequence
    from fakes.prompts import image_prompts

    answers = ("<think>I count them: 3.</think> <answer>3</answer>", "<answer>5</answer>")
    seqs = []
    for prompt, answer, advantage in zip(image_prompts(processor, 2, seed=0), answers, (1.0, -1.0)):
        ids = processor.tokenizer.encode(answer, add_special_tokens=False)
        seqs.append(TrainSequence(prompt, ids, [0] * len(ids), advantage))
    return seqs


def trained_checkpoint(run: Path, tiny_model_dir: Path, processor, *, stage: int, poison: bool = False):
    """A run folder laid out as the trainer leaves it (tiny_model/, checkpoints/step_00000001) after one update;
    returns (checkpoint folder, the policy's weights as Trainer.export would save them)."""
    from ekipl.learner import Learner, OptimConfig
    from ekipl.models import load_policy
    from ekipl_kernels import LossConfig

    shutil.copytree(tiny_model_dir, run / "tiny_model")
    join_process_group()
    learner = Learner(load_policy(run / "tiny_model"), loss=LossConfig(), optim=OptimConfig(lr=1e-2),
                      ds_config=ds_config(stage), max_steps=2, pad_id=processor.tokenizer.pad_token_id)
    seqs = sequences(processor)
    batch = learner.pack(seqs)
    learner.fill_logprobs(batch, old=True)
    learner.update(batch)
    if poison:
        next(learner.model.parameters()).data[0] = float("nan")
    if stage == 3:
        live = {k.removeprefix("policy."): v.clone()
                for k, v in learner.engine._zero3_consolidated_16bit_state_dict().items()}
    else:
        live = {k: v.detach().clone() for k, v in learner.model.state_dict().items()}
    config = {"run": {"output_dir": "elsewhere"}, "model": {"path": "tiny"}}  # as to_dict(cfg) saves it
    path = checkpoint.save(learner.engine, run / "checkpoints", 1, {"step": 1, "sampler": {}, "rng": {},
                                                                    "config": config}, keep_last=2)
    return path, live


def assert_same_weights(folder: Path, live: dict[str, torch.Tensor], dtype=torch.float32):
    from transformers import AutoModelForImageTextToText

    exported = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype).state_dict()
    assert exported.keys() == live.keys()
    for key, value in live.items():
        assert torch.equal(exported[key], value.to(dtype)), key


@pytest.mark.parametrize("stage", [0, 3])
def test_a_checkpoint_exports_to_a_folder_stock_transformers_loads(stage, tmp_path, tiny_model_dir, processor, capsys):
    from transformers import AutoModelForImageTextToText

    ckpt, live = trained_checkpoint(tmp_path / "run", tiny_model_dir, processor, stage=stage)
    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).state_dict()
    assert all(not torch.equal(base[k], live[k]) for k in live if "embed" in k)  # the update moved the weights

    assert main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    assert_same_weights(tmp_path / "hf", live)
    files = sorted(p.name for p in (tmp_path / "hf").iterdir())
    for name in ("config.json", "generation_config.json", "model.safetensors", "processor_config.json",
                 "preprocessor_config.json", "tokenizer.json", "chat_template.jinja"):
        assert name in files
    assert (json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"]
            == json.loads((tiny_model_dir / "generation_config.json").read_text())["eos_token_id"])
    assert not list(tmp_path.glob(".hf.*"))  # no staging folder left behind

    # an existing folder is kept unless --force; a run folder stands for its newest good checkpoint
    assert main(["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "hf"), "--force",
                 "--dtype", "bf16"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    assert_same_weights(tmp_path / "hf", live, dtype=torch.bfloat16)


def test_damaged_poisoned_or_unknown_checkpoints_are_refused(tmp_path, tiny_model_dir, processor, capsys):
    ckpt, _ = trained_checkpoint(tmp_path / "run", tiny_model_dir, processor, stage=0, poison=True)
    with pytest.raises(ExportError, match="holds NaN/Inf; export an earlier checkpoint"):
        export_checkpoint(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    states = ckpt / checkpoint.STATE_TAG / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:1000])  # truncated
    assert main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "out")]) == 2
    assert "is not a usable checkpoint" in capsys.readouterr().err

    empty_run = tmp_path / "empty_run"
    (empty_run / "checkpoints").mkdir(parents=True)
    with pytest.raises(ExportError, match="no checkpoint folder"):
        export_checkpoint(empty_run, tmp_path / "out")


def test_the_readme_snippet_answers_with_the_training_prompt(tmp_path, tiny_model_dir, processor, capsys,
                                                             monkeypatch):
    """The snippet on an export laid out as runs/tiny_cpu leaves it: it loads, prompts as training does, answers."""
    from ekipl.data.prompts import encode_prompt, prompt_text
    from ekipl.data.records import load_records
    from ekipl.data.synthetic import write_synthetic_dataset
    from ekipl.export import save_hf_folder
    from ekipl.models import load_policy

    run = tmp_path / "runs" / "tiny_cpu"
    write_synthetic_dataset(run / "data", n_train=1, n_test=2, seed=0)
    save_hf_folder(load_policy(tiny_model_dir), processor, run / "hf_export")  # what Trainer.export writes
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(readme_snippet(), "README.md snippet", "exec"), namespace)  # noqa: S102 - our own snippet

    # it generated and printed an answer (the untrained tiny model's may be anything, even blank lines)
    assert namespace["output"].shape[1] > namespace["inputs"]["input_ids"].shape[1]
    assert capsys.readouterr().out == namespace["answer"].split("<|im_end|>")[0] + "\n"
    record = list(load_records(run / "data" / "test.jsonl", task="synthetic", image_root=run / "data"))[0]
    assert namespace["question"] == prompt_text(record)
    trained_prompt = encode_prompt(processor, record, max_pixels=12544, max_prompt_len=4096)
    assert namespace["inputs"]["input_ids"][0].tolist() == trained_prompt.input_ids
    assert torch.equal(namespace["inputs"]["pixel_values"], trained_prompt.mm_inputs["pixel_values"])
    assert os.path.isdir(namespace["export"])
