"""Expert answers (text) as the token ids the policy would have emitted for them.

The policy's prompt ends with the chat template's generation prompt (``<|im_start|>assistant\\n`` for
Qwen), so the policy's completion is the answer's tokens followed by the template's end of turn up to and
including the EOS token (``<|im_end|>``). The end of turn is read off the template itself, by rendering a
conversation with a marker answer, so any template that closes a turn with the tokenizer's EOS works.

An answer is kept only when it round-trips (``decode(encode(text)) == text``: a normalising tokenizer, or
bytes it cannot represent, would otherwise train the policy on a different text than the one scored) and
holds no token that would end the turn or stand for an image early.
"""

from __future__ import annotations

from typing import Optional

from ekipl.experts.base import MalformedReplyError

_MARKER = "EKIPL-ANSWER-MARKER"


class Retokenizer:
    """Encodes answer texts in the policy's tokenizer, as completions of the policy's prompts.

    ``tokenizer`` is the policy's tokenizer (or its processor, whose ``tokenizer`` is used) with a chat
    template. ``max_tokens`` drops answers whose completion would be longer (the policy's generation cap).
    """

    def __init__(self, tokenizer, *, max_tokens: Optional[int] = None):
        self.tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        self.max_tokens = max_tokens
        self.end_of_turn_ids = self.tokenizer.encode(_end_of_turn_text(self.tokenizer), add_special_tokens=False)
        self._forbidden = set(self.end_of_turn_ids) | _control_token_ids(self.tokenizer)

    def encode(self, text: str) -> list[int]:
        """The completion ids of ``text``: its tokens then the end of turn; raises MalformedReplyError
        (naming the reason) for an answer that is empty, does not round-trip, holds a control token or is
        longer than ``max_tokens``."""
        if not text.strip():
            raise MalformedReplyError("the answer is empty")
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        decoded = self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if decoded != text:
            raise MalformedReplyError(f"the answer does not round-trip through the policy's tokenizer: {text[:80]!r}")
        control = self._forbidden.intersection(ids)
        if control:
            names = self.tokenizer.convert_ids_to_tokens(sorted(control))
            raise MalformedReplyError(f"the answer holds end-of-turn or image token(s) {names}")
        ids = ids + self.end_of_turn_ids
        if self.max_tokens is not None and len(ids) > self.max_tokens:
            raise MalformedReplyError(f"the answer has {len(ids)} tokens, over the policy's cap of {self.max_tokens}")
        return ids


def _end_of_turn_text(tokenizer) -> str:
    """What the chat template writes after an assistant answer, cut right after the EOS token."""
    if tokenizer.eos_token is None:
        raise ValueError("the policy's tokenizer has no EOS token: cannot tell where an answer's turn ends")
    user = [{"role": "user", "content": "question"}]
    prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(
        user + [{"role": "assistant", "content": _MARKER}], tokenize=False, add_generation_prompt=False
    )
    if not full.startswith(prompt + _MARKER):
        raise ValueError(
            "the policy's chat template does not render an assistant answer verbatim after its generation prompt; "
            f"prompt {prompt[-60:]!r}, conversation {full[-120:]!r}"
        )
    closing = full[len(prompt) + len(_MARKER):]
    end = closing.find(tokenizer.eos_token)
    if end < 0:
        raise ValueError(
            f"the chat template closes an assistant turn with {closing!r}, without the EOS token "
            f"{tokenizer.eos_token!r} at which the policy stops"
        )
    return closing[: end + len(tokenizer.eos_token)]


def _control_token_ids(tokenizer) -> set[int]:
    """EOS, padding and the vision placeholders: tokens an answer's text must never produce."""
    ids = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    for token in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|endoftext|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return {token_id for token_id in ids if token_id is not None}
