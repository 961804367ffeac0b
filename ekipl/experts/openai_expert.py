"""An expert behind any OpenAI-compatible chat-completions endpoint (GPT-4o, Gemini's compatible endpoint,
a vLLM or SGLang server's ``/v1``), through the official ``openai`` client.

The client's own retries are off (``max_retries=0``): this module retries 429, 5xx and connection errors
itself, with exponential backoff and jitter, so that no attempt and no wait ever outlasts the step's
deadline. Each attempt is bounded in total (``request_timeout_s``, cut to the deadline), not only per read:
the reply is streamed and abandoned once its time is up, so a server that drips bytes cannot hold a worker.
The API key is read from the environment variable the config names and is handed to the client only; it is
never logged, never written to a cache, never part of an error message.
"""

from __future__ import annotations

import base64
import json
import mimetypes
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from ekipl.experts.base import (
    ExpertError,
    ExpertReply,
    ExpertRequest,
    ExpertTimeoutError,
    MalformedReplyError,
    seconds_left,
)
from ekipl.experts.config import ExpertConfig

# The first retry waits about BACKOFF_BASE_S, each next one twice as long, up to BACKOFF_CAP_S.
BACKOFF_BASE_S = 0.25
BACKOFF_CAP_S = 8.0
# Sent when the config names no key variable: local servers (vLLM, SGLang) accept any key.
PLACEHOLDER_KEY = "EMPTY"


def image_data_url(path: str | os.PathLike) -> str:
    """An image file as a base64 ``data:`` URL, its MIME type guessed from the file name."""
    mime = mimetypes.guess_type(str(path))[0] or "image/png"
    return f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def chat_messages(request: ExpertRequest) -> list[dict[str, Any]]:
    """The benchmark's single user turn: the images, then the question with its instruction."""
    content: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": image_data_url(path)}} for path in request.record.images
    ]
    content.append({"type": "text", "text": request.text})
    return [{"role": "user", "content": content}]


def read_api_key(config: ExpertConfig) -> str:
    if config.api_key_env is None:
        return PLACEHOLDER_KEY
    key = os.environ.get(config.api_key_env)
    if not key:
        raise ValueError(
            f"expert {config.name!r}: the environment variable {config.api_key_env} (api_key_env) is not set; "
            "export it with the endpoint's API key"
        )
    return key


def backoff_delay(attempt: int, rng: random.Random, retry_after_s: Optional[float] = None) -> float:
    """How long to wait before retry ``attempt`` (0-based): half the exponential step plus a random half,
    or the server's ``Retry-After`` when it asks for longer."""
    step = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt)
    delay = step / 2 + rng.uniform(0, step / 2)
    return max(delay, retry_after_s) if retry_after_s is not None else delay


class OpenAIExpert:
    """One chat-completions request per sample; samples of a prompt run concurrently in the pool."""

    shares_prefix = False

    def __init__(self, config: ExpertConfig):
        import openai

        self.config = config
        self._openai = openai
        self._client = openai.OpenAI(
            api_key=read_api_key(config),
            base_url=config.base_url,
            max_retries=0,
            timeout=config.request_timeout_s,
        )
        self._rng = random.Random()

    def answer(self, request: ExpertRequest, sample_indices: Sequence[int], deadline: float) -> list[ExpertReply]:
        messages = chat_messages(request)
        return [self._answer_one(messages, index, deadline) for index in sample_indices]

    def close(self) -> None:
        self._client.close()

    def _redacted(self, message: str) -> str:
        """A server's error message, cut short, with the API key blanked should the server echo it."""
        key = self._client.api_key
        message = str(message)[:300]
        return message.replace(key, "<redacted>") if key and key != PLACEHOLDER_KEY else message

    def _answer_one(self, messages: list[dict[str, Any]], sample_index: int, deadline: float) -> ExpertReply:
        openai = self._openai
        started = time.monotonic()
        attempt = 0
        while True:
            timeout = min(self.config.request_timeout_s, seconds_left(deadline))
            try:
                body = self._post(messages, timeout)
            except (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError) as error:
                delay = backoff_delay(attempt, self._rng, _retry_after_s(error))
                if time.monotonic() + delay >= deadline:
                    # An attempt cut by the deadline timed out; one refused or throttled until then failed.
                    give_up = ExpertTimeoutError if isinstance(error, openai.APITimeoutError) else ExpertError
                    raise give_up(
                        f"expert {self.config.name!r}: no answer before the deadline after {attempt + 1} "
                        f"attempt(s); last: {_describe(error)}"
                    ) from None
                time.sleep(delay)
                attempt += 1
                continue
            except openai.APIStatusError as error:
                raise ExpertError(
                    f"expert {self.config.name!r}: {_describe(error)}: {self._redacted(error.message)} (not retried)"
                ) from None
            text, finish_reason = _reply_text(body, self.config.name)
            return ExpertReply(
                sample_index=sample_index,
                text=text,
                finish_reason=finish_reason,
                latency_s=time.monotonic() - started,
            )

    def _post(self, messages: list[dict[str, Any]], timeout: float) -> bytes:
        """One attempt's response body, within ``timeout`` seconds in all.

        The client's timeout bounds each read, not the reply: a server that drips its body a byte at a time
        would hold this expert's worker past every deadline. So the body is streamed, and the attempt is cut
        (as a timeout) once ``timeout`` has passed; a single silent read is still bounded by the client's.
        """
        openai = self._openai
        cut_at = time.monotonic() + timeout
        with self._client.chat.completions.with_streaming_response.create(
            model=self.config.model,
            messages=messages,
            temperature=self.config.sampling.temperature,
            top_p=self.config.sampling.top_p,
            max_tokens=self.config.sampling.max_new_tokens,
            extra_body=self.config.extra_body or None,
            timeout=timeout,
        ) as response:
            request = response.http_response.request
            # The HTTP library's errors (httpx, or httpx2 for later clients) are not wrapped by the client
            # once the headers are in: map them to the client's, so they are retried as before.
            http = sys.modules[type(response.http_response).__module__.partition(".")[0]]
            chunks = []
            try:
                for chunk in response.iter_bytes():
                    chunks.append(chunk)
                    if time.monotonic() >= cut_at:
                        raise openai.APITimeoutError(request=request)
            except http.TimeoutException:
                raise openai.APITimeoutError(request=request) from None
            except http.TransportError:
                raise openai.APIConnectionError(request=request) from None
        return b"".join(chunks)


def _reply_text(body: bytes, expert: str) -> tuple[str, str]:
    try:
        choice = json.loads(body)["choices"][0]
        text = choice["message"]["content"]
        finish_reason = choice.get("finish_reason") or "stop"
    except ValueError as error:  # not JSON (nor UTF-8)
        raise MalformedReplyError(f"expert {expert!r}: unreadable reply ({error})") from None
    except (AttributeError, IndexError, TypeError, KeyError) as error:
        raise MalformedReplyError(f"expert {expert!r}: the reply is not a chat completion ({error!r})") from None
    if not isinstance(text, str) or not text.strip():
        raise MalformedReplyError(f"expert {expert!r}: the reply has no text (finish_reason {finish_reason!r})")
    return text, "length" if finish_reason == "length" else "stop"


def _retry_after_s(error: Exception) -> Optional[float]:
    response = getattr(error, "response", None)
    if response is None:
        return None
    try:
        return float(response.headers.get("retry-after", ""))
    except ValueError:
        return None


def _describe(error: Exception) -> str:
    status = getattr(error, "status_code", None)
    return f"HTTP {status}" if status is not None else type(error).__name__
