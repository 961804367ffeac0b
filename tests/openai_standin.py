"""A local OpenAI-compatible chat-completions server on 127.0.0.1, scripted per prompt, for expert tests.

Each request is matched to a *marker*: the first registered marker that occurs in the text of its user
turn. A marker's script is a list of actions, one per attempt (the last repeats):

* ``"ok"``: a chat completion whose content is the marker's answer;
* ``"429"`` / ``"500"`` / ``"400"``: that HTTP status with an OpenAI-style error body (429 with
  ``Retry-After: 0``);
* ``"malformed"``: status 200 with a body that is not JSON;
* ``"no_choices"``: status 200, valid JSON, no ``choices``;
* ``"sleep:S"``: wait S seconds (cut short when the server stops), then answer as ``"ok"``;
* ``"drip:S"``: status 200 and the full ``Content-Length``, then the ``"ok"`` body one byte every
  :data:`DRIP_INTERVAL_S` seconds, for at most S seconds (or until the server stops), then the connection is
  closed: every read gets a byte well within a per-read timeout, so only a total deadline ends the request;
* ``"length"``: a chat completion whose content is the marker's answer, with ``finish_reason: "length"``.

Requests without a registered marker get ``"ok"`` with :attr:`default_answer`. Every request's headers and
body are kept, and hits are counted per marker.
"""

from __future__ import annotations

import collections
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

DEFAULT_ANSWER = "<think>I count the objects: there are 3.</think>\n<answer>3</answer>"
DRIP_INTERVAL_S = 0.2


class OpenAIStandIn:
    def __init__(self) -> None:
        self.scripts: dict[str, list[str]] = {}
        self.answers: dict[str, str] = {}
        self.default_answer = DEFAULT_ANSWER
        self.hits: collections.Counter[str] = collections.Counter()
        self.requests: list[tuple[dict[str, str], dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_class(self))
        self._server.daemon_threads = True
        self._server.block_on_close = False
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def script(self, marker: str, actions: list[str], answer: str | None = None) -> None:
        self.scripts[marker] = list(actions)
        if answer is not None:
            self.answers[marker] = answer

    def __enter__(self) -> "OpenAIStandIn":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _next_action(self, body: dict[str, Any]) -> tuple[str, str]:
        text = _user_text(body)
        marker = next((m for m in self.scripts if m in text), "")
        with self._lock:
            attempt = self.hits[marker]
            self.hits[marker] += 1
        script = self.scripts.get(marker, ["ok"])
        return marker, script[min(attempt, len(script) - 1)]


def closed_port_url() -> str:
    """A loopback URL on which nothing listens (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def _user_text(body: dict[str, Any]) -> str:
    parts = []
    for message in body.get("messages", []):
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts += [part.get("text", "") for part in content if part.get("type") == "text"]
    return "\n".join(parts)


def _completion(body: dict[str, Any], text: str, finish_reason: str = "stop") -> dict[str, Any]:
    return {
        "id": "chatcmpl-standin",
        "object": "chat.completion",
        "created": 0,
        "model": body.get("model", "standin"),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def _handler_class(standin: OpenAIStandIn):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # keep test output clean
            pass

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(length) or b"{}")
            with standin._lock:
                standin.requests.append((dict(self.headers), body))
            if not self.path.endswith("/chat/completions"):
                return self._send(404, {"error": {"message": f"no route {self.path}"}})
            marker, action = standin._next_action(body)
            if action.startswith("sleep:"):
                standin._stopping.wait(float(action.split(":", 1)[1]))
                action = "ok"
            answer = standin.answers.get(marker, standin.default_answer)
            if action.startswith("drip:"):
                return self._drip(json.dumps(_completion(body, answer)).encode(), float(action.split(":", 1)[1]))
            if action == "ok":
                return self._send(200, _completion(body, answer))
            if action == "length":
                return self._send(200, _completion(body, answer, finish_reason="length"))
            if action == "malformed":
                return self._send(200, b"{not json", content_type="application/json")
            if action == "no_choices":
                return self._send(200, {"id": "x", "object": "chat.completion"})
            status = int(action)
            headers = {"Retry-After": "0"} if status == 429 else {}
            self._send(status, {"error": {"message": f"scripted {status}", "type": "standin"}}, headers=headers)

        def _send(self, status: int, payload: Any, *, content_type: str = "application/json",
                  headers: dict[str, str] | None = None) -> None:
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (its deadline passed)
                pass

        def _drip(self, data: bytes, seconds: float) -> None:
            stop_at = time.monotonic() + seconds
            self.close_connection = True  # the body may end short: the connection cannot be reused
            try:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.flush()
                for byte in data:
                    if time.monotonic() >= stop_at or standin._stopping.wait(DRIP_INTERVAL_S):
                        return
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):  # the client gave up
                pass

    return Handler
