"""Supervised fine-tuning: demonstrations, the completion-only loss, determinism, the warm start and the CLI."""

from __future__ import annotations

import json
import pytest
import torch

from ekipl.data import SYNTHETIC_TASK, encode_prompt, load_records
from ekipl.data.answers import extract_answer
from ekipl.data.synthetic import write_synthetic_dataset
from ekipl.experts.retokenize import Retokenizer
from ekipl.models import load_policy, multimodal_token_types
from ekipl.packing import TrainSequence, pack_sequences
from ekipl.rewards import RewardSet
from ekipl.sft import (
    SFTConfig, completion_loss, expert_demonstrations, main, supervised_finetune, warm_start, weak_demonstrations,
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("sft_data"), n_train=240, n_test=8, seed=5)


@pytest.fixture(scope="module")
def records(dataset):
    return load_records(dataset.train, task=SYNTHETIC_TASK, image_root=dataset.image_root).records


def test_weak_demonstrations_have_the_format_and_chance_accuracy(records):
    rewards = RewardSet.for_task(SYNTHETIC_TASK)
    demonstrate = weak_demonstrations(seed=0)
    parts = [rewards.components(text, r.solution) for r in records for text in demonstrate(r, step=0)]
    assert all(p["format"] == 1.0 for p in parts)
    accuracy = sum(p["accuracy"] for p in parts) / len(parts)
    assert accuracy < 0.3  # blind guesses: about 1 in 6 (the oracle's own answers score 1)
    assert demonstrate(records[0], step=3) == weak_demonstrations(seed=0)(records[0], step=3)
    assert len({demonstrate(records[0], step)[0] for step in range(20)}) > 1  # a fresh guess each step


def test_expert_demonstrations_are_the_oracle_with_its_error_rate(records):
    rewards = RewardSet.for_task(SYNTHETIC_TASK)
    demonstrate = expert_demonstrations(seed=1, k=2, error_rate=0.25)
    answers = [(text, r) for r in records for text in demonstrate(r, step=0)]
    assert len(answers) == 2 * len(records)
    wrong = sum(rewards.components(text, r.solution)["accuracy"] == 0.0 for text, r in answers) / len(answers)
    assert 0.15 < wrong < 0.35  # ±3.5 standard deviations of a binomial(480, 0.25)
    assert demonstrate(records[0], step=0) == expert_demonstrations(seed=1, k=2, error_rate=0.25)(records[0], step=0)


def test_the_loss_is_cross_entropy_of_the_completion_tokens_only(tiny_model_dir, processor, records):
    model = load_policy(tiny_model_dir)
    retokenizer = Retokenizer(processor)
    sequences = []
    for record, text in zip(records[:3], ("<think>a</think>\n<answer>1</answer>", "x", "<answer>22</answer>")):
        ids = retokenizer.encode(text)
        prompt = encode_prompt(processor, record, max_pixels=12544, max_prompt_len=4096)
        sequences.append(TrainSequence(prompt, ids, [0] * len(ids), advantage=0.0))
    loss, count = completion_loss(model, sequences, processor.tokenizer.pad_token_id)

    batch = pack_sequences(sequences, processor.tokenizer.pad_token_id, torch.device("cpu")).micro_batch()
    types = multimodal_token_types(batch.input_ids, model.config)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, mm_token_type_ids=types,
                   **batch.mm_inputs).logits
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1])[batch.hidden_index].double(),
                                                 batch.targets, reduction="sum")
    assert count == sum(s.num_tokens for s in sequences)
    assert torch.allclose(loss.double(), expected, rtol=1e-4)


def test_training_lowers_the_loss_and_is_deterministic(tiny_model_dir, processor, records):
    cfg = SFTConfig(steps=6, prompts_per_step=4, lr=3e-3, warmup_steps=1, micro_batch_size=3, seed=2)
    demonstrate = expert_demonstrations(seed=2, k=1, error_rate=0.0)
    first, second = load_policy(tiny_model_dir), load_policy(tiny_model_dir)
    seen = []
    losses = supervised_finetune(first, processor, records, demonstrate, cfg, progress=False,
                                 on_step=lambda step, loss: seen.append(step))
    again = supervised_finetune(second, processor, records, demonstrate, cfg, progress=False)
    assert seen == list(range(1, 7))
    assert losses == again
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert losses[-1] < 0.8 * losses[0]


def test_the_warm_start_teaches_the_format(tiny_model_dir, processor, records):
    from ekipl.data import decode_completion
    from ekipl.rollout.base import SamplingParams
    from ekipl.rollout.hf import HFEngine

    model = load_policy(tiny_model_dir)
    losses = warm_start(model, processor, steps=40, seed=0, prompts=64, progress=False)
    assert losses[-1] < 0.5 * losses[0]
    prompts = [encode_prompt(processor, r, max_pixels=12544, max_prompt_len=4096) for r in records[:8]]
    groups = HFEngine(model, processor).generate(prompts, 4, SamplingParams(1.0, 1.0, 0, 64),
                                                 [[10 * i + j for j in range(4)] for i in range(8)])
    rewards = RewardSet.for_task(SYNTHETIC_TASK)
    texts = [decode_completion(processor.tokenizer, c.token_ids) for group in groups for c in group]
    format_rate = sum(rewards.components(t, "<answer>1</answer>")["format"] for t in texts) / len(texts)
    assert format_rate >= 0.75, texts[:4]
    answers = {extract_answer(t) for t in texts} - {None}
    assert len(answers) >= 3  # sampled answers spread: groups have a reward spread for GRPO


def test_the_cli_trains_evaluates_and_exports(tiny_model_dir, dataset, tmp_path):
    out = tmp_path / "sft"
    evaluation = main(["--model", str(tiny_model_dir), "--data", str(dataset.train), "--eval-data", str(dataset.test),
                       "--out", str(out), "--demos", "expert", "--k", "1", "--steps", "2", "--prompts-per-step", "2",
                       "--eval-every", "1", "--eval-max-new-tokens", "8"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "sft/loss" in r] == [1, 2]
    assert [r["step"] for r in rows if "eval/score" in r] == [0, 1, 2]
    assert set(evaluation) == {"eval/score", "eval/reward_mean", "eval/format_rate"}
    assert (out / "hf_export" / "model.safetensors").is_file() and (out / "hf_export" / "tokenizer.json").is_file()
    load_policy(out / "hf_export")
