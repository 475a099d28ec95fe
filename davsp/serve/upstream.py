"""Relaying defended requests to an OpenAI-compatible server (vLLM, SGLang, TGI, LMDeploy, `transformers serve`).

Answers come back as the upstream wrote them: JSON bodies byte for byte, SSE streams chunk by chunk as
they arrive. The upstream's own 4xx answers reach the client with their status; its 5xx answers,
unreachable or garbled answers become 502 and a missed deadline 504. A stream that fails after its
first bytes can no longer change its status: it ends with an SSE `error` event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from pathlib import PurePosixPath

from starlette.responses import Response, StreamingResponse

from ..errors import DavspError
from ..openai_client import ChatRelay, UpstreamFailed
from ..prompt import VisualSafetyPrompt
from .protocol import ApiError, error_body, sse

log = logging.getLogger("davsp.serve")

STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def request_json(request: dict) -> bytes:
    """`json.dumps(request, ensure_ascii=False)` as UTF-8, with the image data URLs spliced in afterwards.

    The gateway wrote every image URL (a PNG data URL: base64, nothing to escape), and the encoder's
    scan of one canvas-sized string costs more than the rest of the request (docs/deployment.md, "Overhead").
    """
    parts = [part["image_url"] for message in request["messages"] if isinstance(message.get("content"), list)
             for part in message["content"] if part.get("type") == "image_url"]
    urls = [part["url"] for part in parts]
    marker = f"davsp-image-{secrets.token_hex(16)}-"
    for i, part in enumerate(parts):
        part["url"] = f"{marker}{i}"
    try:
        text = json.dumps(request, ensure_ascii=False)
    finally:
        for part, url in zip(parts, urls):
            part["url"] = url
    for i, url in enumerate(urls):
        written_here = url.startswith("data:image/png;base64,") and url.isascii() and '"' not in url and "\\" not in url
        text = text.replace(f'"{marker}{i}"', f'"{url}"' if written_here else json.dumps(url, ensure_ascii=False), 1)
    return text.encode("utf-8")


class UpstreamBackend:
    def __init__(self, config, metrics):
        self.relay = ChatRelay(config.upstream, api_key_env=config.upstream_api_key_env,
                               timeout_s=config.request_timeout_s, max_reply_bytes=config.max_reply_bytes,
                               max_connections=config.max_in_flight, url_flag="--upstream")
        self.wait_s = config.upstream_wait_s
        self.metrics = metrics

    async def start(self) -> dict:
        """The upstream's /v1/models, waiting up to `upstream_wait_s` for it to come up."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.wait_s
        while True:
            try:
                return await self.relay.models()
            except UpstreamFailed as exc:
                if loop.time() >= give_up:
                    raise DavspError(f"--upstream {self.relay.models_url}: no model list within {self.wait_s:g}s "
                                     f"({exc}); start the upstream first or raise upstream_wait_s") from None
                log.info("waiting for the upstream: %s", exc)
                await asyncio.sleep(min(1.0, max(0.0, give_up - loop.time())))

    async def stop(self) -> None:
        await self.relay.aclose()

    async def models(self) -> Response:
        try:
            return Response(json.dumps(await self.relay.models()), media_type="application/json")
        except UpstreamFailed as exc:
            raise self._failure(exc) from None

    async def chat(self, request: dict, stream: bool) -> Response:
        body = request_json(request)
        try:
            answer = await self.relay.post(body, stream=stream)
            if answer.status >= 300 or (stream and not answer.content_type.startswith("text/event-stream")):
                raise await self._refusal(answer, stream)
            if stream:
                return StreamingResponse(self._relay_stream(answer), media_type="text/event-stream",
                                         headers=STREAM_HEADERS)
            data = await answer.read()
        except UpstreamFailed as exc:
            raise self._failure(exc) from None
        if not _is_json_object(data):
            self.metrics.upstream_errors.labels("garbage").inc()
            raise ApiError(502, f"upstream answered with {len(data)} bytes that are not a JSON object", "upstream_garbage")
        return Response(data, media_type="application/json")

    async def _refusal(self, answer, stream: bool) -> ApiError:
        """The ApiError for an upstream answer that is not the success asked for (body read, capped)."""
        data = await answer.read()
        status = answer.status
        if 400 <= status < 500 and _is_json_object(data):  # the upstream's judgement of the request: relayed
            detail = json.loads(data).get("error")
            message = detail.get("message") if isinstance(detail, dict) else detail
            retry = int(answer.retry_after) if status == 429 and (answer.retry_after or "").isdigit() else None
            return ApiError(status, f"upstream: {str(message or 'HTTP ' + str(status))[:500]}", "upstream_refused",
                            retry_after_s=retry)
        reason = "status" if status >= 300 else "garbage"
        self.metrics.upstream_errors.labels(reason).inc()
        if status >= 300:
            return ApiError(502, f"upstream answered HTTP {status}", "upstream_error")
        return ApiError(502, f"upstream answered a stream request with {answer.content_type or 'no content type'}, "
                        "not text/event-stream", "upstream_garbage")

    async def _relay_stream(self, answer):
        try:
            async for chunk in answer.chunks():
                yield chunk
        except UpstreamFailed as exc:
            error = self._failure(exc)
            yield sse(error_body(error.status, error.message, error.code))
        finally:
            await answer.aclose()

    def _failure(self, exc: UpstreamFailed) -> ApiError:
        self.metrics.upstream_errors.labels("timeout" if exc.timed_out else "unreachable").inc()
        if exc.timed_out:
            return ApiError(504, f"upstream: {exc}", "upstream_timeout")
        return ApiError(502, f"upstream: {exc}", "upstream_unavailable")


def _is_json_object(data: bytes) -> bool:
    try:
        return isinstance(json.loads(data), dict)
    except (UnicodeDecodeError, ValueError):
        return False


def matching_model_ids(vsp: VisualSafetyPrompt, listing: dict, allow_mismatch: bool) -> frozenset[str] | None:
    """The upstream model ids the VSP was trained for (None: any, when forced); DavspError when none match.

    OpenAI-compatible servers name a model by its hub id or by the path it was loaded from, so names are
    compared by their last component. Family, canvas and prompt format are compared where the upstream
    reports them (`davsp serve --model` does, under "davsp"); other servers do not, so only the name is.
    """
    entries = [m for m in listing.get("data") or [] if isinstance(m, dict) and isinstance(m.get("id"), str)]
    trained = vsp.metadata.get("model")
    problems, matches = [], set()
    for entry in entries:
        names = {_last_part(entry["id"]), _last_part(str(entry.get("root") or ""))}
        if not trained or _last_part(trained) not in names:
            continue
        reported = entry.get("davsp") if isinstance(entry.get("davsp"), dict) else {}
        expected = {"family": vsp.metadata.get("family"), "canvas_size": vsp.canvas_size,
                    "prompt_format": vsp.metadata.get("prompt_format")}
        wrong = [f"{k} {reported[k]!r} (VSP: {v!r})" for k, v in expected.items() if k in reported and reported[k] != v]
        if wrong:
            problems.append(f"{entry['id']}: {', '.join(wrong)}")
        else:
            matches.add(entry["id"])
    if matches:
        return frozenset(matches)
    served = ", ".join(e["id"] for e in entries) or "no models"
    detail = "; ".join(problems) or f"the VSP was trained for {trained or 'an unrecorded model'!s}, the upstream serves {served}"
    if allow_mismatch:
        log.warning("VSP/upstream mismatch allowed by allow_model_mismatch: %s", detail)
        return None
    raise DavspError(f"--vsp does not fit the upstream: {detail}; a frame trained for another model protects nothing "
                     "(pass --allow-model-mismatch true to serve anyway)")


def _last_part(name: str) -> str:
    return PurePosixPath(name.rstrip("/")).name.lower() if name else ""
