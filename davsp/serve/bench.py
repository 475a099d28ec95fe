"""`davsp bench serve`: what the gateway adds to a request, and how much it carries, against an instant upstream.

Two child processes (so the measuring client does not share their interpreter): an upstream that answers
every chat request at once, echoing the request's last text and the size of its image, and a gateway in
front of it. The client then measures, per request with one `image_px` image:
- overhead: the same request sent straight to the upstream and through the gateway, in pairs, one at a time;
  overhead = gateway latency - direct latency of the pair (decode, frame, PNG, relay);
- throughput at each concurrency: requests/s through the gateway, and requests lost: any that did not come
  back 200 with its own text and a framed image of the canvas size (a wrong echo is a mixed-up response).
Everything is bounded: `overhead_pairs` and `requests` per level, and `time_limit_s` for the whole run
(requests not sent by then are reported as not sent, not as lost).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import multiprocessing
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DavspError

ECHO_MODEL = "davsp-bench-echo"


def echo_upstream_app():
    """An OpenAI-compatible upstream that answers at once: "<last text> | <W>x<H>" of the last image."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from .protocol import completion

    async def chat(request: Request):
        body = await request.json()
        content = body["messages"][-1]["content"]
        text = next(p["text"] for p in content if p["type"] == "text")
        url = next(p["image_url"]["url"] for p in content if p["type"] == "image_url")
        size = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size
        return JSONResponse(completion(body["model"], f"{text} | {size[0]}x{size[1]}", "stop", 1, 1))

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [{"id": ECHO_MODEL, "object": "model"}]})

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/v1/models", models)])


def _child(kind: str, settings: dict, urls) -> None:
    """A child process: serve the echo upstream or a gateway, report the URL, serve until terminated."""
    import logging

    from .app import build_app
    from .config import ServeConfig
    from .server import ServerThread

    logging.getLogger("davsp.serve").setLevel(logging.ERROR)
    app = build_app(ServeConfig(**settings)) if kind == "gateway" else echo_upstream_app()
    with ServerThread(app) as server:
        urls.put(server.url)
        while True:
            time.sleep(3600)


def bench_image(image_px: int, seed: int = 0) -> bytes:
    """A photo-like JPEG (smooth colour fields and noise): what clients typically upload."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, image_px)
    fields = np.stack([np.outer(ramp, ramp), np.outer(1 - ramp, ramp), np.outer(ramp, 1 - ramp)], -1) * 200
    pixels = np.clip(fields + rng.normal(0, 12, fields.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def bench_vsp(path: Path, canvas: int, padding: int, seed: int = 0) -> None:
    """A pixel-space, 8-bit frame with random values, recorded as trained for the echo upstream's model."""
    import torch

    from ..prompt import VisualSafetyPrompt

    vsp = VisualSafetyPrompt.blank(canvas, padding, "pixel", [0.48145466, 0.4578275, 0.40821073],
                                   [0.26862954, 0.26130258, 0.27577711], quantize_8bit=True,
                                   metadata={"model": ECHO_MODEL, "family": "llava", "canvas_size": canvas})
    vsp.values = torch.round(torch.rand(vsp.values.shape, generator=torch.Generator().manual_seed(seed)) * 255) / 255
    vsp.save(path)


def _body(model: str, text: str, image_url: str) -> bytes:
    return json.dumps({"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": text}]}]}).encode()


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p99": None}
    return {"p50": round(float(np.percentile(values, 50)), 2), "p99": round(float(np.percentile(values, 99)), 2)}


async def _measure(gateway: str, upstream: str, image_url: str, image_px: int, canvas: int, *, overhead_pairs: int, requests: int,
                   concurrency: tuple[int, ...], deadline: float) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=max(concurrency) + 1)
    async with httpx.AsyncClient(timeout=60.0, limits=limits) as client:
        async def call(base: str, body: bytes, expect: str) -> tuple[bool, float]:
            started = time.perf_counter()
            try:
                response = await client.post(base + "/v1/chat/completions", content=body,
                                             headers={"Content-Type": "application/json"})
                answer = response.json()["choices"][0]["message"]["content"] if response.status_code == 200 else ""
            except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
                answer = ""
            return answer.endswith(expect), (time.perf_counter() - started) * 1000

        for warm in range(3):  # connections, caches and the gateway's first framing out of the timings
            await call(gateway, _body(ECHO_MODEL, f"warm-{warm}", image_url), "")
        direct, through, overhead = [], [], []
        for i in range(overhead_pairs):
            if time.perf_counter() > deadline:
                break
            body = _body(ECHO_MODEL, f"pair-{i}", image_url)
            ok_direct, ms_direct = await call(upstream, body, f"pair-{i} | {image_px}x{image_px}")
            ok_gateway, ms_gateway = await call(gateway, body, f"pair-{i} | {canvas}x{canvas}")
            if ok_direct and ok_gateway:
                direct.append(ms_direct)
                through.append(ms_gateway)
                overhead.append(ms_gateway - ms_direct)
        levels = {}
        for level in concurrency:
            bodies = [_body(ECHO_MODEL, f"c{level}-{i}", image_url) for i in range(requests)]
            gate = asyncio.Semaphore(level)
            sent = 0

            async def one(i: int):
                nonlocal sent
                async with gate:
                    if time.perf_counter() > deadline:
                        return None
                    sent += 1
                    return await call(gateway, bodies[i], f"c{level}-{i} | {canvas}x{canvas}")

            started = time.perf_counter()
            results = [r for r in await asyncio.gather(*(one(i) for i in range(requests))) if r is not None]
            seconds = time.perf_counter() - started
            ok = [ms for good, ms in results if good]
            levels[level] = {"sent": sent, "ok": len(ok), "lost": sent - len(ok), "not_sent": requests - sent,
                             "requests_per_s": round(len(ok) / seconds, 1) if seconds > 0 else None,
                             "latency_ms": _percentiles(ok)}
    return {"overhead_ms": _percentiles(overhead), "gateway_ms": _percentiles(through), "direct_ms": _percentiles(direct),
            "pairs": len(overhead), "throughput": levels}


def bench_serve(*, image_px: int = 336, canvas: int = 336, padding: int = 30, overhead_pairs: int = 100,
                requests: int = 128, concurrency: tuple[int, ...] = (1, 8, 32), time_limit_s: float = 120.0,
                startup_timeout_s: float = 60.0) -> dict:
    """Run the benchmark (module docstring); returns the numbers as a dict."""
    if min(overhead_pairs, requests, image_px, *concurrency) < 1 or not 0 < 2 * padding < canvas:
        raise DavspError("bench serve: counts, image size and concurrency must be >= 1, and 0 < 2*padding < canvas")
    context = multiprocessing.get_context("spawn")
    urls = context.Queue()
    children = []
    with tempfile.TemporaryDirectory(prefix="davsp-bench-serve-") as folder:
        vsp_path = Path(folder) / "vsp.safetensors"
        bench_vsp(vsp_path, canvas, padding)
        try:
            upstream = _start(context, children, urls, "upstream", {}, startup_timeout_s)
            gateway = _start(context, children, urls, "gateway", {
                "upstream": upstream + "/v1", "vsp": str(vsp_path), "max_in_flight": 4 * max(concurrency),
                "upstream_wait_s": startup_timeout_s, "log_level": "error"}, startup_timeout_s)
            image_url = "data:image/jpeg;base64," + base64.b64encode(bench_image(image_px)).decode()
            deadline = time.perf_counter() + time_limit_s
            numbers = asyncio.run(_measure(gateway, upstream, image_url, image_px, canvas, overhead_pairs=overhead_pairs,
                                           requests=requests, concurrency=tuple(concurrency), deadline=deadline))
        finally:
            for child in children:
                child.terminate()
                child.join(10)
    return {"bench": "serve", "image_px": image_px, "canvas": canvas, "padding": padding, **numbers}


def _start(context, children: list, urls, kind: str, settings: dict, timeout_s: float) -> str:
    child = context.Process(target=_child, args=(kind, settings, urls), daemon=True)
    child.start()
    children.append(child)
    try:
        return urls.get(timeout=timeout_s)
    except Exception:
        raise DavspError(f"bench serve: the {kind} did not start within {timeout_s:g}s") from None


def format_bench(report: dict) -> str:
    lines = [f"image {report['image_px']} px -> canvas {report['canvas']} px, {report['pairs']} request pairs",
             f"overhead per request: p50 {report['overhead_ms']['p50']} ms, p99 {report['overhead_ms']['p99']} ms "
             f"(through the gateway p50 {report['gateway_ms']['p50']} ms, direct p50 {report['direct_ms']['p50']} ms)",
             f"{'concurrency':>12}{'sent':>7}{'ok':>7}{'lost':>6}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}"]
    for level, row in report["throughput"].items():
        lines.append(f"{level:>12}{row['sent']:>7}{row['ok']:>7}{row['lost']:>6}{row['requests_per_s']!s:>9}"
                     f"{row['latency_ms']['p50']!s:>9}{row['latency_ms']['p99']!s:>9}")
    return "\n".join(lines)
