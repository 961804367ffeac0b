"""The policy model: the tiny offline Qwen2.5-VL, loading, the processor, and the hidden-state forward."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fakes.prompts import chat_prompt, image_prompts, random_image

from ekipl.models import (
    eos_token_ids,
    last_hidden_states,
    lm_head_weight,
    load_policy,
    load_processor,
    resolve_attn_implementation,
)
from ekipl.tools import tiny_model




def padded_batch(prompts, pad_id, *, left: bool):
    longest = max(len(p.input_ids) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        span = slice(longest - len(prompt.input_ids), longest) if left else slice(0, len(prompt.input_ids))
        ids[row, span] = torch.tensor(prompt.input_ids)
        mask[row, span] = 1
    mm = {key: torch.cat([p.mm_inputs[key] for p in prompts]) for key in ("pixel_values", "image_grid_thw")}
    return ids, mask, mm


def test_tiny_model_is_small_tied_and_knows_the_special_tokens(policy, processor, tiny_model_dir):
    n_params = sum(p.numel() for p in policy.parameters())
    assert 200_000 < n_params < 5_000_000
    tokenizer = processor.tokenizer
    assert policy.config.text_config.vocab_size == len(tokenizer)
    for token in tiny_model.SPECIAL_TOKENS:
        assert len(tokenizer(token, add_special_tokens=False).input_ids) == 1, token
    assert policy.config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    # Tied: the LM head is the input embedding itself.
    assert lm_head_weight(policy) is policy.get_input_embeddings().weight
    assert lm_head_weight(policy).shape == (len(tokenizer), policy.config.text_config.hidden_size)
    assert eos_token_ids(policy.generation_config, tokenizer)[0] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    # The task's text tokenizes compactly (merges were learned from it).
    text = "<think>There are 3 objects.</think> <answer>3</answer>"
    assert len(tokenizer(text).input_ids) < len(text) / 2
    assert tokenizer.decode(tokenizer(text).input_ids) == text


def test_build_is_deterministic_in_the_seed_and_the_cli_writes_a_loadable_model(tiny_model_dir, tmp_path):
    tiny_model.main([str(tmp_path / "again"), "--warm-start-steps", "0"])  # seed 0, random weights, like the fixture
    tiny_model.build_tiny_model(tmp_path / "other", seed=1, warm_start_steps=0)
    from safetensors.torch import load_file

    first = load_file(tiny_model_dir / "model.safetensors")
    again = load_file(tmp_path / "again" / "model.safetensors")
    other = load_file(tmp_path / "other" / "model.safetensors")
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
    assert (tmp_path / "again" / "tokenizer.json").read_text() == (tiny_model_dir / "tokenizer.json").read_text()
    assert (
        json.loads((tmp_path / "again" / "processor_config.json").read_text())["processor_class"]
        == "Qwen2_5_VLProcessor"
    )


def test_save_and_load_round_trip(policy, tmp_path):
    from transformers import AutoModelForImageTextToText

    policy.save_pretrained(tmp_path)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    original = policy.state_dict()
    assert reloaded.state_dict().keys() == original.keys()
    assert all(torch.equal(value, original[key]) for key, value in reloaded.state_dict().items())
    assert reloaded.config.tie_word_embeddings


def test_processor_needs_no_torchvision_and_expands_images(processor):
    assert not hasattr(processor, "video_processor")
    image = random_image(np.random.default_rng(0), 100, 130)
    prompt = chat_prompt(processor, "q", "How many red cubes are there?", [image])
    text = processor.tokenizer.decode(prompt.input_ids)
    assert text.startswith("<|im_start|>user\n<|vision_start|><|image_pad|>")
    assert text.endswith("How many red cubes are there?<|im_end|>\n<|im_start|>assistant\n")
    grid = prompt.mm_inputs["image_grid_thw"][0]
    n_pads = prompt.input_ids.count(processor.image_token_id)
    assert n_pads == int(grid.prod()) // 4 > 1  # one placeholder per merged 2x2 patch
    assert grid[1] * 14 <= tiny_model.IMAGE_SIDE and grid[2] * 14 <= tiny_model.IMAGE_SIDE


def test_processor_saves_as_the_stock_class_that_autoprocessor_can_load(processor, tmp_path):
    from transformers.video_processing_utils import BaseVideoProcessor

    processor.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    assert json.loads((tmp_path / "processor_config.json").read_text())["processor_class"] == "Qwen2_5_VLProcessor"
    # AutoProcessor (on a machine with torchvision, as SGLang runs) also builds a video processor: its config
    # must be findable, as it is for the original Qwen checkpoints (the image processor's).
    video_config, _ = BaseVideoProcessor.get_video_processor_dict(str(tmp_path))
    assert video_config["patch_size"] == 14 and video_config["merge_size"] == 2
    # ... and its class follows from the image processor's name, as for Qwen's checkpoints
    assert video_config["image_processor_type"] == "Qwen2VLImageProcessor"
    reloaded = load_processor(tmp_path)
    image = random_image(np.random.default_rng(1), 90, 60)
    prompt, again = (chat_prompt(p, "q", "How many?", [image]) for p in (processor, reloaded))
    assert prompt.input_ids == again.input_ids
    assert torch.equal(prompt.mm_inputs["pixel_values"], again.mm_inputs["pixel_values"])


def test_autoprocessor_loads_a_saved_processor_wherever_torchvision_does(processor, tmp_path):
    """Stock AutoProcessor always builds the Qwen-VL processor's video processor, which needs torchvision in every
    supported transformers (Qwen's own checkpoints alike): with torchvision it loads what ekipl saves and encodes
    alike; without (the CPU set-up) that video processor is the one thing it lacks, and load_processor serves."""
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    processor.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    if not is_torchvision_available():
        with pytest.raises(ImportError, match="Qwen2VLVideoProcessor requires the Torchvision library"):
            AutoProcessor.from_pretrained(tmp_path)
        return
    stock = AutoProcessor.from_pretrained(tmp_path)
    assert type(stock).__name__ == "Qwen2_5_VLProcessor"
    image = random_image(np.random.default_rng(2), 80, 120)
    prompt, again = (chat_prompt(p, "q", "How many?", [image]) for p in (processor, stock))
    assert prompt.input_ids == again.input_ids
    assert torch.allclose(prompt.mm_inputs["pixel_values"], again.mm_inputs["pixel_values"], atol=1e-2)


def test_forward_and_generate_with_an_image(policy, processor):
    prompt = image_prompts(processor, 1, seed=1)[0]
    ids = torch.tensor([prompt.input_ids])
    token_types = (ids == policy.config.image_token_id).int()
    logits = policy(
        input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=token_types, **prompt.mm_inputs
    ).logits
    assert logits.shape == (1, ids.shape[1], len(processor.tokenizer)) and torch.isfinite(logits).all()
    generated = policy.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        mm_token_type_ids=token_types,
        max_new_tokens=6,
        do_sample=False,
        **prompt.mm_inputs,
    )
    assert generated.shape[1] > ids.shape[1] and torch.equal(generated[0, : ids.shape[1]], ids[0])


@pytest.mark.parametrize("left_padding", [True, False])
def test_last_hidden_states_reproduce_the_models_logits(policy, processor, left_padding):
    """Hidden states times the LM head equal the model's own logits, padded batches of different images."""
    prompts = image_prompts(processor, 3, seed=2)
    ids, mask, mm = padded_batch(prompts, processor.tokenizer.pad_token_id, left=left_padding)
    with torch.no_grad():
        hidden = last_hidden_states(policy, ids, mask, **mm)
        for row, prompt in enumerate(prompts):  # each prompt alone, the model placing positions itself
            alone = torch.tensor([prompt.input_ids])
            expected = policy(
                input_ids=alone,
                attention_mask=torch.ones_like(alone),
                mm_token_type_ids=(alone == policy.config.image_token_id).int(),
                **prompt.mm_inputs,
            ).logits[0]
            got = (hidden[row] @ lm_head_weight(policy).T)[mask[row].bool()]
            assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)
    assert hidden.shape == (*ids.shape, policy.config.text_config.hidden_size)


def test_hidden_states_carry_gradients_to_the_vision_tower_and_the_head(policy, processor):
    prompt = image_prompts(processor, 1, seed=3)[0]
    ids = torch.tensor([prompt.input_ids])
    policy.zero_grad()
    hidden = last_hidden_states(policy, ids, torch.ones_like(ids), **prompt.mm_inputs)
    (hidden @ lm_head_weight(policy).T).logsumexp(-1).mean().backward()
    assert policy.model.visual.patch_embed.proj.weight.grad.abs().sum() > 0
    assert lm_head_weight(policy).grad.abs().sum() > 0
    policy.zero_grad()


def test_gradient_checkpointing_switch_keeps_the_forward(tiny_model_dir, policy, processor):
    checkpointed = load_policy(tiny_model_dir, gradient_checkpointing=True).train()
    assert checkpointed.is_gradient_checkpointing
    prompt = image_prompts(processor, 1, seed=4)[0]
    ids = torch.tensor([prompt.input_ids])
    got = last_hidden_states(checkpointed, ids, torch.ones_like(ids), **prompt.mm_inputs)
    got.sum().backward()
    with torch.no_grad():
        expected = last_hidden_states(policy, ids, torch.ones_like(ids), **prompt.mm_inputs)
    assert torch.allclose(got, expected, atol=1e-5)
    assert checkpointed.model.visual.patch_embed.proj.weight.grad is not None


def test_attention_implementation_choice():
    assert resolve_attn_implementation("auto", "cpu") == "sdpa"
    assert resolve_attn_implementation("eager", "cpu") == "eager"
