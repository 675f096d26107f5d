"""A crafted OpenAI-compatible server on 127.0.0.1 for the annotator tests.

``POST /v1/chat/completions`` answers according to a MODE word the test puts into the problem text
(``MODE=valid`` or any other word, ``malformed``, ``slow``, ``trickle``, ``429x2``, ``500``, ``html``, ``echo``): so one batch can
mix behaviours. The server records every request (headers and JSON body), counts requests per prompt,
and tracks the most requests it was serving at once.
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

SLOW_S = 1.5
"""How long a ``slow`` reply takes (tests use a shorter client timeout)."""


def valid_reply(user_text: str) -> str:
    """Key segment 2 of a correct response, error segment 1 of an incorrect one."""
    if "This response is CORRECT" in user_text:
        return json.dumps({"key": [2], "error": [], "label": "key step"})
    return json.dumps({"key": [], "error": [1], "label": "arithmetic"})


class CraftedServer:
    def __init__(self):
        self.requests: list[dict] = []
        self.per_prompt: dict[str, int] = {}
        self.in_flight: dict[str, int] = {}
        self.max_in_flight: dict[str, int] = {}
        """Most requests of each MODE served at once (per mode: a slow reply of an earlier test may still run)."""
        self.delay_s = 0.0
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda *a: None  # a client that timed out and hung up is expected here
        self.port = self.httpd.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def count(self) -> int:
        with self.lock:
            return len(self.requests)

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
            self.per_prompt.clear()
            self.max_in_flight.clear()
            self.delay_s = 0.0

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def _leave(self):
                """The request stops counting as in flight just before its reply is written: once the client
                has the reply it may send the next request, which must not overlap this one in the count."""
                mode = getattr(self, "_mode", None)
                if mode is not None:
                    with server.lock:
                        server.in_flight[mode] -= 1
                    self._mode = None

            def _send(self, status: int, body: bytes, headers: dict | None = None, ctype="application/json"):
                self._leave()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path == "/v1/models":
                    self._send(200, json.dumps({"object": "list", "data": [{"id": "crafted"}]}).encode())
                else:
                    self._send(404, b'{"error": "not found"}')

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path != "/v1/chat/completions":
                    self._send(404, b'{"error": "not found"}')
                    return
                body = json.loads(raw)
                user = body["messages"][-1]["content"]
                digest = hashlib.sha256(raw).hexdigest()
                m = re.search(r"MODE=(\w+)", user)
                mode = m.group(1) if m else "valid"
                with server.lock:
                    server.requests.append({"headers": dict(self.headers), "body": body})
                    n = server.per_prompt[digest] = server.per_prompt.get(digest, 0) + 1
                    server.in_flight[mode] = server.in_flight.get(mode, 0) + 1
                    server.max_in_flight[mode] = max(server.max_in_flight.get(mode, 0), server.in_flight[mode])
                self._mode = mode
                try:
                    time.sleep(server.delay_s)
                    self._respond(mode, user, n)
                finally:
                    self._leave()

            def _respond(self, mode: str, user: str, n: int):
                if mode == "slow":
                    time.sleep(SLOW_S)
                if mode == "trickle":  # headers at once, then the body one byte every 0.1 s
                    body = _completion(valid_reply(user)).encode()
                    self._leave()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.flush()
                    try:
                        for b in body:
                            self.wfile.write(bytes([b]))
                            self.wfile.flush()
                            time.sleep(0.1)
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                    return
                if mode == "429x2" and n <= 2:
                    self._send(429, b'{"error": "rate limited"}', {"Retry-After": "0"})
                    return
                if mode == "500":
                    # a careless server echoing the credentials: the client must not log them
                    echo = self.headers.get("Authorization", "")
                    self._send(500, json.dumps({"error": f"internal error for {echo}"}).encode())
                    return
                if mode == "html":
                    self._send(200, b"<html>maintenance</html>", ctype="text/html")
                    return
                if mode == "echo":  # a reply quoting the request's credentials
                    text = f"you sent {self.headers.get('Authorization', '')}"
                else:
                    text = "sure! the key step is {oops, segment two" if mode == "malformed" else valid_reply(user)
                self._send(200, _completion(text).encode())

        return Handler


def _completion(text: str) -> str:
    return json.dumps({"id": "x", "object": "chat.completion", "model": "crafted",
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": text}}]})


@pytest.fixture(scope="module")
def crafted_server():
    server = CraftedServer()
    yield server
    server.close()


@pytest.fixture
def server(crafted_server):
    crafted_server.reset()
    return crafted_server


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory) -> str:
    """Like the ``tiny_random_model`` fixture, with 2048 positions: the annotator prompt (problem,
    numbered segments, instructions) is ~500-750 tokens for this near character-level tokenizer."""
    from tests.conftest import build_random_model

    return build_random_model(tmp_path_factory.mktemp("tiny_chat"), max_position_embeddings=2048)
