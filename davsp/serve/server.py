"""Running a gateway: in the foreground (`davsp serve`) or on a background thread (tests, benchmarks).

Uvicorn serves the app. On SIGTERM or Ctrl-C it stops accepting connections and gives in-flight
requests `shutdown_grace_s` to finish; then the backend stops (the local model's queue drains first).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import threading

import uvicorn

from ..errors import DavspError
from .app import build_app
from .config import ServeConfig

log = logging.getLogger("davsp.serve")


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP. Without
    # it a response's headers and body, written apart, meet Nagle plus the client's delayed ACK (+40 ms).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise DavspError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --host/--port") from None
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _uvicorn(app, shutdown_grace_s: float, log_level: str) -> uvicorn.Server:
    return uvicorn.Server(uvicorn.Config(
        app, log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=shutdown_grace_s,
        log_level=log_level, server_header=False))


def run_server(config: ServeConfig) -> None:
    """Serve until SIGTERM/SIGINT; DavspError if the gateway cannot start (upstream, VSP check, port)."""
    app = build_app(config)
    sock = bind(config.host, config.port)

    async def main() -> None:
        await app.state.gateway.start()  # fails here, in one line, rather than inside uvicorn's lifespan
        print(f"davsp serve: listening on {url_of(sock)}", file=sys.stderr, flush=True)
        await _uvicorn(app, config.shutdown_grace_s, config.log_level).serve(sockets=[sock])

    try:
        asyncio.run(main())
    finally:
        sock.close()


class ServerThread:
    """`with ServerThread(app) as server:` serves `app` on 127.0.0.1 (a port the OS picks) from a thread;
    `server.url` is its address. Leaving the block stops it the way SIGTERM does (in-flight requests finish).
    `app` is a gateway from build_app, or any ASGI app (a test's upstream)."""

    def __init__(self, app, host: str = "127.0.0.1"):
        self.app = app
        self.gateway = getattr(app.state, "gateway", None) if hasattr(app, "state") else None
        config = self.gateway.config if self.gateway is not None else ServeConfig  # the class: its defaults
        self.sock = bind(host, 0)
        self.url = url_of(self.sock)
        self._server = _uvicorn(app, config.shutdown_grace_s, config.log_level)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="davsp-serve", daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            if self.gateway is not None:
                await self.gateway.start()
            await self._server.serve(sockets=[self.sock])

        try:
            asyncio.run(main())
        except BaseException as exc:  # reported by __enter__ / stop
            self._error = exc

    def __enter__(self) -> "ServerThread":
        self._thread.start()
        while not self._server.started and self._thread.is_alive():
            self._thread.join(0.02)
        if not self._server.started:
            self.sock.close()
            if isinstance(self._error, DavspError):
                raise self._error
            raise DavspError(f"the server did not start ({self._error or 'see the log'})")
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout_s)
        self.sock.close()

    def __exit__(self, *exc) -> None:
        self.stop()
