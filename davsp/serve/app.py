"""The gateway application: OpenAI Chat Completions in, defended requests out to a backend.

Routes: POST /v1/chat/completions and GET /v1/models (API key, when keys are configured), GET /metrics
(likewise), GET /healthz (open, for load balancers). Every answer, errors included, is OpenAI-shaped
JSON (or an SSE stream); no request can take the server down: each failure is answered and logged
in one line, never with the request's images or the keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import time
import uuid
from pathlib import Path

import anyio
import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..defenses import defense_parts
from ..errors import DavspError
from ..fingerprint import check_vsp_fits
from ..prompt import VisualSafetyPrompt
from .config import ServeConfig, is_loopback
from .content import Framer, ImageRef, Limits, decode_data_url, decode_image, find_images, parse_body
from .metrics import ServeMetrics
from .protocol import ApiError, error_body
from .upstream import matching_model_ids

log = logging.getLogger("davsp.serve")
access_log = logging.getLogger("davsp.serve.access")

CHAT_PATH = "/v1/chat/completions"
KNOWN_PATHS = frozenset({CHAT_PATH, "/v1/models", "/healthz", "/metrics"})
IMAGE_FETCH_TIMEOUT_S = 30.0


def read_api_keys(path: str | Path) -> tuple[bytes, ...]:
    """Client keys, one per line; blank lines and lines starting with # are skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DavspError(f"--api-key-file {path}: cannot read it ({exc.__class__.__name__})") from None
    keys = tuple(line.strip().encode() for line in lines if line.strip() and not line.strip().startswith("#"))
    if not keys:
        raise DavspError(f"--api-key-file {path}: no keys in it (one key per line)")
    return keys


class Gateway:
    """Everything one `davsp serve` process holds: settings, the VSP, keys, metrics and the backend."""

    def __init__(self, config: ServeConfig, backend=None):
        self.config = config
        self.metrics = ServeMetrics()
        self.limits = Limits(config.max_images, config.max_image_pixels, config.image_hosts)
        uses_frame = defense_parts(config.defense)[1]
        self.vsp = VisualSafetyPrompt.load(config.vsp) if config.vsp and uses_frame else None
        self.framer = Framer(config.defense, self.vsp, prefix_text_only=config.prefix_text_only,
                             png_compress_level=config.png_compress_level)
        self.keys = read_api_keys(config.api_key_file) if config.api_key_file else ()
        if not self.keys and not config.loopback_only:
            raise DavspError(f"--host {config.host}: without --api-key-file davsp serve listens on loopback only "
                             "(127.0.0.1, ::1); give an API key file to serve other hosts")
        if not self.keys:
            log.warning("no API keys configured: only loopback clients are answered")
        self.backend = backend or self._make_backend()
        local_adapter = getattr(self.backend, "adapter", None)  # --model: the VSP must fit the model served here
        if self.vsp is not None and local_adapter is not None and not config.allow_model_mismatch:
            check_vsp_fits(self.vsp, local_adapter, f"--vsp {config.vsp}")
        self.model_ids: frozenset[str] | None = None  # requests must name one of these (None: any)
        self.in_flight = 0
        self.started = False
        self._cpu = anyio.CapacityLimiter(os.cpu_count() or 1)  # framing is CPU work: one thread per core
        self._fetcher: httpx.AsyncClient | None = None

    def _make_backend(self):
        if self.config.upstream:
            from .upstream import UpstreamBackend

            return UpstreamBackend(self.config, self.metrics)
        from .local import LocalModelBackend

        return LocalModelBackend.load(self.config, self.metrics, self.limits)

    async def start(self) -> None:
        """Bring the backend up and check the VSP against what it serves (idempotent)."""
        if self.started:
            return
        listing = await self.backend.start()
        if self.vsp is not None:
            self.model_ids = matching_model_ids(self.vsp, listing, self.config.allow_model_mismatch)
            if self.vsp.metadata.get("prompt_format") == "llava_v1" and self.config.upstream:
                log.warning("the VSP was trained on LLaVA's llava_v1 conversation, but OpenAI-compatible servers write "
                            "the model's chat template: the prompt differs from training (train with --prompt-format "
                            "chat_template to deploy behind a server)")
        elif self.config.model:
            self.model_ids = frozenset(m["id"] for m in listing["data"])
        if self.limits.allowed_hosts:
            self._fetcher = httpx.AsyncClient(follow_redirects=False, timeout=IMAGE_FETCH_TIMEOUT_S)
        self.started = True
        log.info("serving %s with defense %s (models: %s)", self.config.upstream or self.config.model,
                 self.config.defense, ", ".join(sorted(self.model_ids)) if self.model_ids else "any")

    async def stop(self) -> None:
        if self.started:
            self.started = False
            await self.backend.stop()
            if self._fetcher is not None:
                await self._fetcher.aclose()

    # ---- routes --------------------------------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        self._authorize(request)
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            raise ApiError(415, f"Content-Type must be application/json, not {media_type or 'missing'!r}",
                           "unsupported_media_type")
        payload = parse_body(await self._read_body(request))
        if self.model_ids is not None and payload["model"] not in self.model_ids:
            raise ApiError(404, f"model {payload['model'][:100]!r} is not served here (this gateway serves "
                           f"{', '.join(sorted(self.model_ids))})", "model_not_found", param="model")
        images = find_images(payload, self.limits)
        request.scope["davsp.images"] = len(images)
        started = time.perf_counter()
        fetched = [await self._fetch(ref.url) if ref.remote else None for ref in images]
        payload = await anyio.to_thread.run_sync(self._defend, payload, images, fetched, limiter=self._cpu)
        if images:
            self.metrics.framing.observe(time.perf_counter() - started)
        if self.framer.use_frame:
            self.metrics.images.inc(len(images))
        return await self.backend.chat(payload, payload.get("stream", False))

    def _defend(self, payload: dict, images: list[ImageRef], fetched: list[bytes | None]) -> dict:
        decoded = [decode_data_url(ref.url, self.limits) if data is None else decode_image(data, self.limits)
                   for ref, data in zip(images, fetched)]
        return self.framer.defend(payload, images, decoded)

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        return await self.backend.models()

    async def metrics_page(self, request: Request) -> Response:
        self._authorize(request)
        body, content_type = self.metrics.render()
        return Response(body, media_type=content_type)

    async def healthz(self, request: Request) -> Response:
        if not self.started:
            return JSONResponse({"status": "starting or stopping"}, 503)
        return JSONResponse({"status": "ok", "defense": self.config.defense, "in_flight": self.in_flight})

    # ---- checks --------------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        if not self.keys:
            client = request.client.host if request.client else ""
            if not is_loopback(client):
                raise ApiError(401, "this gateway has no API keys and answers loopback clients only", "no_keys_configured")
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        given = given.strip().encode()
        matched = False
        for key in self.keys:  # every key compared in constant time, no early exit
            matched |= hmac.compare_digest(given, key)
        if scheme.lower() != "bearer" or not matched:
            raise ApiError(401, "missing or invalid API key (Authorization: Bearer <key>)", "invalid_api_key")

    async def _read_body(self, request: Request) -> bytes:
        limit = self.config.max_body_bytes
        too_big = ApiError(413, f"request body larger than {limit} bytes", "request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    async def _fetch(self, url: str) -> bytes:
        """An allowed host's image: no redirects, a deadline and a size cap."""
        limit = self.config.max_image_bytes
        try:
            async with asyncio.timeout(IMAGE_FETCH_TIMEOUT_S):
                async with self._fetcher.stream("GET", url) as response:
                    if response.status_code != 200:
                        raise ApiError(400, f"image URL answered HTTP {response.status_code}", "image_fetch_failed")
                    chunks, size = [], 0
                    async for chunk in response.aiter_bytes():
                        size += len(chunk)
                        if size > limit:
                            raise ApiError(413, f"image URL body larger than {limit} bytes", "image_too_large")
                        chunks.append(chunk)
                    return b"".join(chunks)
        except TimeoutError:
            raise ApiError(400, f"image URL did not answer within {IMAGE_FETCH_TIMEOUT_S:g}s", "image_fetch_failed") from None
        except httpx.HTTPError as exc:
            raise ApiError(400, f"image URL cannot be fetched ({type(exc).__name__})", "image_fetch_failed") from None


def _answering_errors(handler):
    """Route handler -> one that answers every failure as OpenAI-style JSON."""
    async def answer(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as error:
            request.scope["davsp.error"] = error.code
            return error.response()
        except Exception:  # a bug or an unforeseen input: answered, logged without the request, server goes on
            log.exception("unexpected error answering %s %s", request.method, request.url.path)
            request.scope["davsp.error"] = "internal_error"
            return ApiError(500, "internal error (logged by the gateway)", "internal_error").response()

    return answer


class _Observe:
    """ASGI middleware: request ids, the in-flight limit, metrics and one JSON access-log line per request."""

    def __init__(self, app, gateway: Gateway):
        self.app = app
        self.gateway = gateway

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        gateway, metrics = self.gateway, self.gateway.metrics
        path = scope["path"] if scope["path"] in KNOWN_PATHS else "other"
        is_chat = path == CHAT_PATH and scope["method"] == "POST"
        request_id = uuid.uuid4().hex[:16]
        status = 500
        started = time.perf_counter()

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            if is_chat and gateway.in_flight >= gateway.config.max_in_flight:
                scope["davsp.error"] = "too_many_requests"
                busy = ApiError(429, f"{gateway.config.max_in_flight} requests in flight; retry shortly",
                                "too_many_requests", retry_after_s=1)
                return await busy.response()(scope, receive, send_with_id)
            gateway.in_flight += is_chat
            metrics.in_flight.set(gateway.in_flight)
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                gateway.in_flight -= is_chat
                metrics.in_flight.set(gateway.in_flight)
        finally:
            seconds = time.perf_counter() - started
            metrics.requests.labels(path, str(status)).inc()
            metrics.latency.labels(path).observe(seconds)
            client = scope.get("client") or ("", 0)
            access_log.info(json.dumps({
                "request_id": request_id, "client": client[0], "method": scope["method"], "path": path,
                "status": status, "ms": round(seconds * 1000, 2), "images": scope.get("davsp.images", 0),
                "error": scope.get("davsp.error")}))


async def _not_found(request: Request, exc: HTTPException) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    message = f"{request.method} {request.url.path[:100]}: {exc.detail}"
    return JSONResponse(error_body(exc.status_code, message, code), exc.status_code)


def build_app(config: ServeConfig, *, backend=None) -> Starlette:
    """The ASGI app for `config` (the Gateway is `app.state.gateway`); it starts and stops with its lifespan.
    `backend` replaces the one the config names (tests, benchmarks)."""
    gateway = Gateway(config, backend)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    routes = [
        Route(CHAT_PATH, _answering_errors(gateway.chat), methods=["POST"]),
        Route("/v1/models", _answering_errors(gateway.models), methods=["GET"]),
        Route("/metrics", _answering_errors(gateway.metrics_page), methods=["GET"]),
        Route("/healthz", gateway.healthz, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: _not_found})
    app.state.gateway = gateway
    app.add_middleware(_Observe, gateway=gateway)
    return app
