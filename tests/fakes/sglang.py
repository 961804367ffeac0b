"""Stand-ins for SGLang on a CPU: its ``generate`` format backed by the HF engine, a recording ``Engine``
with ``sglang.Engine``'s method signatures, and a local HTTP server speaking SGLang's endpoints with faults
that a test can inject.

The generate backend does what SGLang does with a request: it loads each request's images, re-expands the
single image placeholder per image into one per image token, samples with the request's ``sampling_seed``
from the whole vocabulary (vision special tokens included, as SGLang does), and reports ``cached_tokens`` from
a prefix cache keyed on (prompt ids, images) that ``flush_cache`` clears.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image

from ekipl.data import Prompt
from ekipl.rollout.base import SamplingParams
from ekipl.rollout.hf import HFEngine


def load_image(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, str) and image.startswith("data:"):
        return Image.open(io.BytesIO(base64.b64decode(image.split(",", 1)[1]))).convert("RGB")
    raise ValueError(f"the stand-in loads PIL images and data URLs only, got {type(image).__name__}")


class HFBackedGenerate:
    """SGLang's ``generate`` (request and response format) on top of :class:`HFEngine`.

    ``forced`` maps a ``sampling_seed`` to ``(step, token)``: that request's sample gets ``token`` at ``step``
    with its log-prob under the model, as if sampled there (how a test makes a vision placeholder appear). The
    HF model cannot decode past a stray placeholder, so the tokens after it are the unforced sample's: filler
    that a client must drop.
    """

    def __init__(self, model, processor):
        self.model = model
        self.processor = processor
        self.image_token_id = model.config.image_token_id
        self.cached_prefixes: set[tuple] = set()
        self.forced: dict[int, tuple[int, int]] = {}

    def flush(self) -> None:
        self.cached_prefixes.clear()

    def _prompt(self, input_ids: list[int], images: list[Image.Image]) -> Prompt:
        mm_inputs = {}
        expanded = list(input_ids)
        if images:
            processed = self.processor.image_processor(images=images, return_tensors="pt")
            mm_inputs = {"pixel_values": processed["pixel_values"], "image_grid_thw": processed["image_grid_thw"]}
            merge = self.processor.image_processor.merge_size**2
            counts = iter(int(grid.prod()) // merge for grid in processed["image_grid_thw"])
            expanded = []
            for token in input_ids:
                expanded.extend([token] * next(counts) if token == self.image_token_id else [token])
        return Prompt(uid="request", input_ids=expanded, images=images, mm_inputs=mm_inputs)

    def _one(self, input_ids: list[int], images: list[Image.Image], params: dict[str, Any]) -> dict[str, Any]:
        prompt = self._prompt(input_ids, images)
        key = (tuple(prompt.input_ids), tuple(hashlib.sha256(image.tobytes()).hexdigest() for image in images))
        cached = len(prompt.input_ids) if key in self.cached_prefixes else 0
        self.cached_prefixes.add(key)
        sampling = SamplingParams(
            temperature=params["temperature"],
            top_p=params["top_p"],
            top_k=max(params["top_k"], 0),
            max_new_tokens=params["max_new_tokens"],
        )
        if sampling.max_new_tokens == 0:
            tokens, logprobs, finish = [], [], {"type": "length", "length": 0}
        else:
            stop_ids = params["stop_token_ids"]
            engine = HFEngine(self.model, self.processor, stop_token_ids=stop_ids, suppress_token_ids=())
            completion = engine.generate([prompt], 1, sampling, [[params["sampling_seed"]]])[0][0]
            tokens, logprobs = list(completion.token_ids), list(completion.logprobs)
            step, token = self.forced.get(params["sampling_seed"], (len(tokens), None))
            if step < len(tokens):
                tokens[step], logprobs[step] = token, self._logprob_of(token, prompt, tokens[:step], sampling, stop_ids)
            finish = (
                {"type": "stop", "matched": tokens[-1]}
                if completion.finish_reason == "stop" and tokens[-1] in stop_ids
                else {"type": "length", "length": sampling.max_new_tokens}
            )
        return {
            "text": "",
            "output_ids": tokens,
            "meta_info": {
                "id": hashlib.md5(repr((key, params)).encode()).hexdigest(),
                "finish_reason": finish,
                "prompt_tokens": len(prompt.input_ids),
                "completion_tokens": len(tokens),
                "cached_tokens": cached,
                "output_token_logprobs": [[lp, token, None] for lp, token in zip(logprobs, tokens)],
            },
        }

    def _logprob_of(self, token: int, prompt: Prompt, head: list[int], sampling: SamplingParams, stop_ids) -> float:
        """The model's log-prob of ``token`` after ``prompt`` + ``head``: the HF engine reports the full-vocabulary
        log-prob of what it samples, so let it sample nothing else."""
        vocab = self.model.get_output_embeddings().weight.shape[0]
        others = [v for v in range(vocab) if v != token]
        engine = HFEngine(self.model, self.processor, stop_token_ids=stop_ids, suppress_token_ids=others)
        resumed = Prompt(prompt.uid, prompt.input_ids + head, prompt.images, prompt.mm_inputs)
        one = SamplingParams(temperature=sampling.temperature, top_p=1.0, top_k=0, max_new_tokens=1)
        (completion,) = engine.generate([resumed], 1, one, [[0]])[0]
        assert completion.token_ids == [token]
        return completion.logprobs[0]

    def generate(self, input_ids, sampling_params, return_logprob=False, image_data=None, **_ignored):
        single = not isinstance(input_ids[0], list)
        batch = [input_ids] if single else input_ids
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(batch)
        images = image_data if image_data is not None else [None] * len(batch)
        outputs = [
            self._one(ids, [load_image(image) for image in (imgs or [])], p)
            for ids, imgs, p in zip(batch, images, params)
        ]
        return outputs[0] if single else outputs


class RecordingEngine:
    """``sglang.Engine``'s methods used by ekipl, with its signatures; every call is recorded in ``calls``."""

    def __init__(self, backend: HFBackedGenerate):
        self.backend = backend
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def generate(
        self,
        prompt=None,
        sampling_params=None,
        input_ids=None,
        image_data=None,
        audio_data=None,
        video_data=None,
        return_logprob=False,
        logprob_start_len=None,
        top_logprobs_num=None,
        token_ids_logprob=None,
        lora_path=None,
        custom_logit_processor=None,
        return_hidden_states=False,
        stream=False,
        bootstrap_host=None,
        bootstrap_port=None,
        bootstrap_room=None,
        data_parallel_rank=None,
        rid=None,
    ):
        self.calls.append(
            (
                "generate",
                dict(
                    input_ids=input_ids,
                    image_data=image_data,
                    sampling_params=sampling_params,
                    return_logprob=return_logprob,
                ),
            )
        )
        return self.backend.generate(input_ids, sampling_params, return_logprob, image_data)

    def update_weights_from_tensor(self, named_tensors, load_format=None, flush_cache=True):
        self.calls.append(
            (
                "update_weights_from_tensor",
                dict(named_tensors=list(named_tensors), load_format=load_format, flush_cache=flush_cache),
            )
        )
        if flush_cache:
            self.backend.flush()
        return True, "Succeeded to update model weights."

    def release_memory_occupation(self, tags=None):
        self.calls.append(("release_memory_occupation", dict(tags=tags)))

    def resume_memory_occupation(self, tags=None):
        self.calls.append(("resume_memory_occupation", dict(tags=tags)))

    def flush_cache(self):
        self.calls.append(("flush_cache", {}))
        self.backend.flush()

    def shutdown(self):
        self.calls.append(("shutdown", {}))

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


class FakeSGLangServer:
    """SGLang's HTTP endpoints on 127.0.0.1 (a free port), backed by :class:`HFBackedGenerate`.

    ``faults`` is a queue of faults for the next requests, one each: ``"500"``, ``"400"``, ``"malformed"``
    (200 with a body that is not JSON), ``"drop"`` (close the connection without an answer) or ``("slow", s)``
    (answer after ``s`` seconds). ``requests`` records every (path, body) received, faulty or not.
    """

    def __init__(self, backend: HFBackedGenerate):
        self.backend = backend
        self.faults: list[Any] = []
        self.requests: list[tuple[str, Any]] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "FakeSGLangServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def paths(self) -> list[str]:
        return [path for path, _ in self.requests]

    def _answer(self, path: str, body: Any) -> tuple[int, Any]:
        if path == "/generate":
            return 200, self.backend.generate(**body)
        if path == "/update_weights_from_tensor":
            if body["flush_cache"]:
                self.backend.flush()
            return 200, {"success": True, "message": "Succeeded to update model weights."}
        if path == "/flush_cache":
            self.backend.flush()
            return 200, "Cache flushed.\n"
        if path in ("/release_memory_occupation", "/resume_memory_occupation"):
            return 200, None
        return 404, {"detail": "Not Found"}

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _send(self, status: int, payload: bytes, content_type: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                try:
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                with server._lock:
                    server.requests.append((self.path, body))
                    fault = server.faults.pop(0) if server.faults else None
                if fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if fault == "500":
                    return self._send(500, b'{"error": "Internal Server Error"}')
                if fault == "400":
                    return self._send(400, b'{"error": {"message": "bad request"}}')
                if fault == "malformed":
                    return self._send(200, b'[{"text": "unterminated')
                if isinstance(fault, tuple) and fault[0] == "slow":
                    time.sleep(fault[1])
                status, payload = server._answer(self.path, body)
                if isinstance(payload, str):
                    return self._send(status, payload.encode(), "text/plain")
                return self._send(status, json.dumps(payload).encode())

        return Handler
