"""A misbehaving-on-request OpenAI-compatible server on 127.0.0.1, for the HTTP client and llm judge tests.

`with FakeServer(respond) as server:` serves POSTs on a free loopback port; `respond(handler, body)`
writes the answer (with `send` or by hand), `server.seen` records (path, Authorization header, body)
of every request. Every loop that writes slowly stops once the server closes, so nothing outlives
a test.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def chat_payload(content: str) -> dict:
    return {"id": "fake", "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}


def send(handler: BaseHTTPRequestHandler, status: int = 200, payload=None, *, body: bytes | None = None,
         headers: dict | None = None) -> None:  # fmt: skip
    """One complete answer: `payload` as JSON, or `body` as given."""
    data = body if body is not None else json.dumps(payload).encode()
    handler.send_response(status)
    for name, value in {"Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})}.items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(data)


def drip(handler: BaseHTTPRequestHandler, data: bytes, every_s: float, stop: threading.Event) -> None:
    """Write `data` one byte every `every_s` seconds until it is written, the client leaves or the server stops."""
    for byte in data:
        if stop.wait(every_s):
            return
        try:
            handler.wfile.write(bytes([byte]))
        except OSError:
            return


class FakeServer:
    def __init__(self, respond: Callable[[BaseHTTPRequestHandler, dict | bytes], None]):
        self.respond = respond
        self.seen: list[tuple[str, str | None, dict | bytes]] = []
        self.stopping = threading.Event()
        self._lock = threading.Lock()

    def __enter__(self) -> FakeServer:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real API servers do

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = raw
                with fake._lock:
                    fake.seen.append((self.path, self.headers.get("Authorization"), body))
                try:
                    fake.respond(self, body)
                except OSError:  # the client gave up (deadline, size cap): nothing more to say
                    self.close_connection = True

            def log_message(self, *args):
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._httpd.fake = self  # so that `respond` reaches the server as handler.server.fake
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        self.origin = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
