"""Build a tiny Qwen2.5-VL that loads like any real checkpoint, warm-started to write the benchmark's format.

The model exists so that everything in ekipl (rollouts, the learner, the fused loss, training end to end)
runs on a laptop CPU and in CI without downloading weights: about 0.7M parameters, a byte-level
BPE tokenizer trained offline on the task's own text (with Qwen's chat and vision special tokens, and the
reasoning tags as single tokens), the PIL Qwen2-VL image processor sized for small images, and a
Qwen-style chat template. Everything is saved with ``save_pretrained``.

From random weights a policy almost never writes ``<think>...</think><answer>...</answer>``, so plain
GRPO sees groups of equal rewards and learns nothing. The embedded default is therefore warm-started: a
short SFT on weak demonstrations (:func:`ekipl.sft.warm_start`: the oracle's reasoning with every count
guessed at random) teaches the format and nothing about the answer, leaving all of the accuracy to RL.
``warm_start_steps=0`` keeps the random weights.

    python -m ekipl.tools.tiny_model OUT_DIR [--seed 0] [--warm-start-steps 60]
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch

# Qwen's chat and vision tokens, then the reasoning tags: single tokens make the format easy to learn.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
)
TOKENIZER_VOCAB_SIZE = 1024
# The gain the final RMSNorm starts at, which sets the scale of the logits. The count of objects is linearly
# readable from the last hidden state of the random model, but through a gain of 1 supervised training did not
# learn it in 200 steps; at 4 it did in about 150 (two seeds). The initial logits stay near uniform (std ~1).
FINAL_NORM_GAIN = 4.0
WARM_START_STEPS = 60  # SFT steps of 16 prompts on weak demonstrations: enough for the format
IMAGE_SIDE = 112  # images are resized to at most IMAGE_SIDE x IMAGE_SIDE: 16 image tokens each
PATCH_SIZE = 14
MERGE_SIZE = 2

# Qwen2-VL's template without the default system prompt: Reason-RFT puts the instruction in the user turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2's pre-tokenizer split: contractions, letter runs, single digits, punctuation runs, whitespace.
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def benchmark_corpus() -> list[str]:
    """Text in the shape of Reason-RFT's prompts and answers (counting, geometry, TRANCE edits)."""
    colors = ("yellow", "gray", "cyan", "blue", "brown", "green", "red", "purple")
    shapes = ("cube", "sphere", "cylinder")
    materials = ("glass", "metal", "rubber")
    sizes = ("small", "medium", "large")
    positions = ("front", "behind", "left", "right", "front_left", "front_right", "behind_left", "behind_right")
    lines = []
    for color, shape, size in itertools.product(colors, shapes, sizes):
        lines.append(
            f"How many {size} {color} {shape}s are there? Output the thinking process in <think> </think> "
            "and final answer (number) in <answer> </answer> tags."
        )
        lines.append(f"Subtract all {color} {shape}s. How many objects are left?")
    for count in range(12):
        lines.append(
            f"<think>I count the objects one by one: there are {count} of them.</think> <answer>{count}</answer>"
        )
    for letter, value in zip("ABCD", ("12", "3.5", "60", "24")):
        lines.append(
            f"Find the angle. Choices: A. 30 B. 45 C. 60 D. 90 Answer with the option's letter (A, B, C or D). "
            f"<think>The triangle is equilateral.</think> <answer>{letter}</answer> "
            f"Give a float number or int number. <answer>{value}</answer>"
        )
    for attr, values in (
        ("size", sizes),
        ("color", colors),
        ("material", materials),
        ("shape", shapes),
        ("position", positions),
    ):
        lines.append(" ".join(f"change_{attr}({obj}, '{value}')" for obj, value in enumerate(values)))
    return lines


def training_corpus() -> list[str]:
    """The text the tokenizer learns from: the benchmark's shapes plus the synthetic task's own text."""
    try:
        from ekipl.data.synthetic import tokenizer_corpus
    except ImportError:  # the synthetic task is optional for the tokenizer; the benchmark text suffices
        return benchmark_corpus()
    return benchmark_corpus() + list(tokenizer_corpus())


def build_tokenizer(corpus: list[str], vocab_size: int = TOKENIZER_VOCAB_SIZE):
    """Train a byte-level BPE tokenizer offline and wrap it as a transformers fast tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=4096,
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )


def build_image_processor():
    """The PIL Qwen2-VL image processor (no torchvision), capped at IMAGE_SIDE x IMAGE_SIDE pixels."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    factor = PATCH_SIZE * MERGE_SIZE
    # ``size`` is passed whole: the class mutates its shared default dict when given min/max_pixels.
    return Qwen2VLImageProcessorPil(
        size={"shortest_edge": factor * factor, "longest_edge": IMAGE_SIDE * IMAGE_SIDE},
        patch_size=PATCH_SIZE,
        merge_size=MERGE_SIZE,
        temporal_patch_size=2,
    )


def build_config(tokenizer):
    """A Qwen2.5-VL config of about 0.7M parameters, with ids taken from ``tokenizer``."""
    from transformers import Qwen2_5_VLConfig

    token_id = tokenizer.convert_tokens_to_ids
    # Heads of 64 dims: the smallest size every SGLang attention backend (FlashInfer, FA3, Triton) serves.
    text_hidden, heads = 128, 2
    head_dim = text_hidden // heads
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=text_hidden,
            intermediate_size=384,
            num_hidden_layers=2,
            num_attention_heads=heads,
            num_key_value_heads=1,
            max_position_embeddings=4096,
            rms_norm_eps=1e-6,
            # mrope splits each head's rotary half-dimension into (temporal, height, width) sections.
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16],
            },
            bos_token_id=token_id("<|endoftext|>"),
            eos_token_id=token_id("<|im_end|>"),
            pad_token_id=token_id("<|endoftext|>"),
            tie_word_embeddings=True,
        ),
        vision_config=dict(
            depth=2,
            hidden_size=64,
            intermediate_size=128,
            num_heads=1,
            patch_size=PATCH_SIZE,
            spatial_merge_size=MERGE_SIZE,
            temporal_patch_size=2,
            window_size=IMAGE_SIDE,
            fullatt_block_indexes=[1],
            out_hidden_size=text_hidden,
        ),
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
        tie_word_embeddings=True,
    )


def build_tiny_model(out_dir: str | Path, *, seed: int = 0, warm_start_steps: int = WARM_START_STEPS) -> Path:
    """Write a tiny Qwen2.5-VL, its processor and generation config to ``out_dir``; return the path.

    The weights are random (from ``seed``), then warm-started by ``warm_start_steps`` of SFT on weak
    demonstrations (0: none); both are deterministic in ``seed``."""
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    from ekipl.models import image_only_qwen_processor_class

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(training_corpus())
    tokenizer.chat_template = CHAT_TEMPLATE  # as it loads from the saved folder: the warm start renders chats
    config = build_config(tokenizer)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.model.language_model.norm.weight.fill_(FINAL_NORM_GAIN)
    stop_ids = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    model.generation_config = GenerationConfig(
        eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id, do_sample=True, temperature=1.0
    )
    processor = image_only_qwen_processor_class()(
        image_processor=build_image_processor(), tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
    )
    if warm_start_steps > 0:  # before anything is saved: a folder with a config.json holds a finished model
        from ekipl.sft import warm_start

        warm_start(model, processor, steps=warm_start_steps, seed=seed)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="folder to write the model into (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the warm start (default 0)")
    parser.add_argument("--warm-start-steps", type=int, default=WARM_START_STEPS,
                        help=f"SFT steps of the warm start (default {WARM_START_STEPS}; 0: random weights)")
    args = parser.parse_args(argv)
    path = build_tiny_model(args.out_dir, seed=args.seed, warm_start_steps=args.warm_start_steps)
    print(f"tiny Qwen2.5-VL written to {path}")


if __name__ == "__main__":
    main()
