"""FusedGRPOTrainer vs TRL's own GRPOTrainer loss: same batch, same weights, same loss and gradients.

A tiny Qwen2 causal LM and a word-level tokenizer are built offline. Generation is skipped: both
trainers get the same prepared batch (the dict ``_generate_and_score_completions`` returns) and run
their real ``compute_loss``; old and reference log-probs are the policy's own, perturbed, so that
ratios clip on both sides and the KL is not zero.
"""

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from ekipl_kernels import LossConfig, fused_linear_grpo_loss  # noqa: E402
from ekipl_kernels.integrations.trl import FusedGRPOTrainer  # noqa: E402

VOCAB = 96
BATCH, PROMPT_LEN, COMPLETION_LEN = 4, 5, 7


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(VOCAB - 3)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
    )
    path = tmp_path_factory.mktemp("tiny-qwen2")
    Qwen2ForCausalLM(config).save_pretrained(path)
    return str(path)


def length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def make_trainer(cls, model, tokenizer, tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=BATCH, num_generations=2, gradient_accumulation_steps=2,
        max_completion_length=COMPLETION_LEN + 3, report_to="none", use_cpu=True, beta=0.0, bf16=False,
    )
    settings.update(overrides)
    extra = {"loss_backend": "chunked"} if cls is FusedGRPOTrainer else {}
    dataset = Dataset.from_dict({"prompt": ["w1 w2 w3", "w4 w5"] * 4})
    trainer = cls(
        model=model, reward_funcs=length_reward, args=GRPOConfig(**settings), train_dataset=dataset,
        processing_class=tokenizer, **extra,
    )
    # What Trainer's training loop sets before each micro-batch.
    trainer.current_gradient_accumulation_steps = settings["gradient_accumulation_steps"]
    trainer.model.train()
    return trainer


def make_batch(trainer, *, per_token_advantages=False, tool_mask=False, vllm_ratio=False):
    """A prepared GRPO micro-batch: left-padded prompts, right-padded completions, one fully masked."""
    g = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(3, VOCAB, (BATCH, PROMPT_LEN), generator=g)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[0, :2] = 0
    prompt_ids[prompt_mask == 0] = 0
    completion_ids = torch.randint(3, VOCAB, (BATCH, COMPLETION_LEN), generator=g)
    lengths = torch.tensor([COMPLETION_LEN, 3, 0, 5])
    completion_mask = (torch.arange(COMPLETION_LEN) < lengths[:, None]).long()
    completion_ids[completion_mask == 0] = 0
    inputs = {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": torch.randn((BATCH, COMPLETION_LEN) if per_token_advantages else (BATCH,), generator=g),
        # dapo: tokens of the whole generation batch (two micro-batches here), over all processes
        "num_items_in_batch": completion_mask.sum() * 2 + 3,
    }
    if tool_mask:
        inputs["tool_mask"] = (torch.rand(BATCH, COMPLETION_LEN, generator=g) > 0.3).long()
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1),
            COMPLETION_LEN,
        )
    inputs["old_per_token_logps"] = logps + 0.3 * torch.randn(logps.shape, generator=g)
    inputs["ref_per_token_logps"] = logps + 0.5 * torch.randn(logps.shape, generator=g)
    if vllm_ratio:  # "sequence": TRL's sequence_* modes, one [B, 1] weight per completion
        ratio = torch.rand(BATCH, 1 if vllm_ratio == "sequence" else COMPLETION_LEN, generator=g) * 2.0
        ratio[ratio > 1.8] = 0.0  # TRL's *_mask modes zero the ratios outside the bounds
        inputs["importance_sampling_ratio"] = ratio
    return inputs


def loss_and_grads(trainer, inputs):
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


CASES = {
    "grpo": dict(loss_type="grpo", beta=0.04, use_bias_correction_kl=False, epsilon_high=0.28, temperature=0.7),
    "bnpo": dict(loss_type="bnpo", beta=0.04, use_bias_correction_kl=False, entropy_coef=0.01),
    "dr_grpo": dict(loss_type="dr_grpo", epsilon=0.1, temperature=1.3),
    "dapo": dict(loss_type="dapo", beta=0.02, use_bias_correction_kl=False, epsilon_high=0.28, steps_per_generation=4),
    "dapo-delta": dict(loss_type="dapo", delta=1.4),
    "grpo-eval": dict(loss_type="grpo", temperature=0.9),
    # GRPOConfig's default: the model runs under bf16 autocast; both heads then see bf16 hidden states.
    "dapo-bf16": dict(loss_type="dapo", bf16=True),
    "bnpo-fp32head-bf16": dict(loss_type="bnpo", bf16=True, cast_lm_head_to_fp32=True),
    # TRL's default use_bias_correction_kl=True: the KL weighted by the differentiable ratio.
    "grpo-kl-corrected": dict(loss_type="grpo", beta=0.04),
    # CISPO's weight capped at epsilon_high (low here, so that the batch truncates some).
    "cispo": dict(loss_type="cispo", epsilon_high=1.1, beta=0.04, steps_per_generation=4),
    "sapo": dict(loss_type="sapo", beta=0.04, sapo_temperature_pos=0.8, sapo_temperature_neg=1.3),
    # GSPO: one clipped ratio per completion (TRL's recommended clip range), KL corrected by it.
    "gspo": dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4, beta=0.04),
    "gspo-token-advantages": dict(loss_type="dr_grpo", importance_sampling_level="sequence", epsilon=0.01),
    "gspo-sapo": dict(loss_type="sapo", importance_sampling_level="sequence"),
    # vLLM's correction at sequence level (vllm_importance_sampling_mode="sequence_truncate"/"sequence_mask").
    "dapo-sequence-is": dict(loss_type="dapo", beta=0.04, vllm_importance_sampling_mode="sequence_truncate"),
    "gspo-sequence-is": dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4,
                             vllm_importance_sampling_mode="sequence_mask"),
}
BATCH_FEATURES = {
    "dapo": dict(vllm_ratio=True),
    "grpo": dict(per_token_advantages=True, tool_mask=True),
    "dr_grpo": dict(vllm_ratio=True, tool_mask=True),
    "cispo": dict(vllm_ratio=True),
    "sapo": dict(per_token_advantages=True, tool_mask=True),
    "gspo": dict(vllm_ratio=True, tool_mask=True),
    "gspo-token-advantages": dict(per_token_advantages=True),
    "dapo-sequence-is": dict(vllm_ratio="sequence", per_token_advantages=True),
    "gspo-sequence-is": dict(vllm_ratio="sequence", tool_mask=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_trainer_matches_trl_loss_and_gradients(case, model_path, tokenizer, tmp_path):
    stock = make_trainer(GRPOTrainer, model_path, tokenizer, tmp_path, **CASES[case])
    fused = make_trainer(FusedGRPOTrainer, model_path, tokenizer, tmp_path, **CASES[case])
    features = BATCH_FEATURES.get(case, {})
    if features.get("vllm_ratio"):  # as if generated by vLLM: both trainers apply the importance weights
        for trainer in (stock, fused):
            trainer.use_vllm, trainer.vllm_importance_sampling_correction = True, True
    if case.endswith("-eval"):
        stock.model.eval()
        fused.model.eval()
    inputs = make_batch(stock, **features)

    stock_loss, stock_grads = loss_and_grads(stock, inputs)
    fused_loss, fused_grads = loss_and_grads(fused, inputs)

    tolerance = 2e-2 if case.endswith("-bf16") else 1e-4
    assert torch.isfinite(fused_loss) and stock_loss.abs() > 1e-6
    torch.testing.assert_close(fused_loss, stock_loss.float(), rtol=tolerance, atol=1e-7)
    assert stock_grads.keys() == fused_grads.keys() and "lm_head.weight" in fused_grads
    for name, grad in stock_grads.items():
        err = (fused_grads[name] - grad).norm() / grad.norm().clamp(min=1e-12)
        assert err < tolerance, f"{case}: gradient of {name} differs, relative error {err:.2e}"
    mode = "eval" if case.endswith("-eval") else "train"
    clip_metrics = {"cispo": {"cispo_clip_ratio"}, "sapo": set(), "gspo-sapo": set()}.get(
        case, {"clip_ratio/region_mean"})
    for name in clip_metrics:  # the batch exercises clipping (SAPO has none)
        assert fused._metrics[mode][name][-1] > 0
    # TRL's loss metrics, under its names and definitions (a bf16 ratio may cross a clip bound: one token's worth)
    stock_metrics, fused_metrics = dict(stock._metrics[mode]), dict(fused._metrics[mode])
    assert fused_metrics.keys() == stock_metrics.keys() >= {"entropy", *clip_metrics}
    for name, values in stock_metrics.items():
        bound = 0.34 if case.endswith("-bf16") and name.startswith("clip_ratio/") else tolerance
        assert fused_metrics[name] == pytest.approx(values, rel=tolerance, abs=bound), name


def test_origin_and_expert_mode_reach_the_fused_loss(model_path, tokenizer, tmp_path):
    """Expert tokens (inputs["origin"]) under expert_mode="shaped" give the loss of the packed batch."""
    trainer = make_trainer(FusedGRPOTrainer, model_path, tokenizer, tmp_path, loss_type="bnpo")
    trainer.fused_loss_config = LossConfig(**{**trainer.fused_loss_config.__dict__, "expert_mode": "shaped"})
    inputs = make_batch(trainer)
    inputs["origin"] = torch.tensor([0, 1, 0, 2])
    loss = trainer.compute_loss(trainer.model, inputs)

    keep = inputs["completion_mask"].bool()
    model = trainer.model
    with torch.no_grad():
        hidden = model.model(
            input_ids=torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            attention_mask=torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1),
        ).last_hidden_state[:, -COMPLETION_LEN - 1 : -1][keep]
    expected = fused_linear_grpo_loss(
        hidden, model.lm_head.weight.detach(), inputs["completion_ids"][keep],
        advantages=inputs["advantages"][:, None].expand(keep.shape)[keep],
        cu_seqlens=torch.nn.functional.pad(keep.sum(-1).cumsum(0), (1, 0)),
        origin=inputs["origin"][:, None].expand(keep.shape)[keep],
        old_logprobs=inputs["old_per_token_logps"][keep], normalizer=keep.sum() * 2,
        config=trainer.fused_loss_config, backend="reference",
    )
    torch.testing.assert_close(loss.detach(), expected.loss, rtol=1e-5, atol=1e-7)
    shaped_off = LossConfig(**{**trainer.fused_loss_config.__dict__, "expert_mode": "ratio"})
    trainer.fused_loss_config = shaped_off
    assert not torch.allclose(trainer.compute_loss(trainer.model, inputs).detach(), loss.detach())


UNSUPPORTED = [
    (dict(loss_type="vespo"), "loss_type='vespo'"),
    (dict(top_entropy_quantile=0.2), "top_entropy_quantile=0.2"),
    (dict(off_policy_mask_threshold=0.5), "off_policy_mask_threshold=0.5"),
    (dict(delta=1.1, epsilon=0.2), "delta=1.1"),
    (dict(loss_type="dapo", entropy_coef=0.01), "entropy_coef=0.01"),
    (dict(loss_type="bnpo", use_adaptive_entropy=True), "use_adaptive_entropy=True"),
]


@pytest.mark.parametrize("overrides,named", UNSUPPORTED, ids=[n for _, n in UNSUPPORTED])
def test_unsupported_settings_raise_at_construction(overrides, named, model_path, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="cannot reproduce") as info:
        make_trainer(FusedGRPOTrainer, model_path, tokenizer, tmp_path, **overrides)
    assert named in str(info.value)


def test_lm_head_bias_is_trained_like_trl(model_path, tokenizer, tmp_path):
    """A biased LM head (TRL's logits include the bias): same loss and gradients, the bias's included."""
    def biased_model():
        torch.manual_seed(3)
        model = Qwen2ForCausalLM.from_pretrained(model_path)
        head = torch.nn.Linear(model.config.hidden_size, VOCAB, bias=True)
        head.weight.data.copy_(model.lm_head.weight.data)
        head.bias.data.normal_(0.0, 0.5)
        model.lm_head = head
        return model

    stock = make_trainer(GRPOTrainer, biased_model(), tokenizer, tmp_path, loss_type="dapo", beta=0.04)
    fused = make_trainer(FusedGRPOTrainer, biased_model(), tokenizer, tmp_path, loss_type="dapo", beta=0.04)
    inputs = make_batch(stock, vllm_ratio=False)
    stock_loss, stock_grads = loss_and_grads(stock, inputs)
    fused_loss, fused_grads = loss_and_grads(fused, inputs)
    torch.testing.assert_close(fused_loss, stock_loss.float(), rtol=1e-4, atol=1e-7)
    assert stock_grads.keys() == fused_grads.keys() and "lm_head.bias" in fused_grads
    for name, grad in stock_grads.items():
        err = (fused_grads[name] - grad).norm() / grad.norm().clamp(min=1e-12)
        assert err < 1e-4, f"gradient of {name} differs, relative error {err:.2e}"


def test_logit_softcapping_model_is_refused(model_path, tokenizer, tmp_path):
    model = Qwen2ForCausalLM.from_pretrained(model_path)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0"):
        make_trainer(FusedGRPOTrainer, model, tokenizer, tmp_path)


def test_fused_trainer_trains_end_to_end(model_path, tokenizer, tmp_path):
    """One real step: generation, rewards, the fused loss, the optimizer; the weights move."""
    trainer = make_trainer(FusedGRPOTrainer, model_path, tokenizer, tmp_path, loss_type="dapo", max_steps=1,
                           max_completion_length=6, learning_rate=1e-2, logging_steps=1)
    before = trainer.model.lm_head.weight.detach().clone()
    trainer.train()
    assert not torch.equal(before, trainer.model.lm_head.weight.detach())
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logged)
