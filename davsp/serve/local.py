"""`davsp serve --model`: answer chat requests with a local Hugging Face model, batched, behind a bounded queue.

A worker thread takes up to `batch_size` waiting requests that ask for the same answer length and
answers them with one greedy, left-padded batch (`generate.generate_batch`, the path `davsp generate`
takes); a request that finds `queue_size` others waiting gets 429. The prompt is the adapter's, so the
model reads exactly what `davsp generate` gives it: one user message with one image and its text. That
is the shape DAVSP's models are trained and evaluated on; conversations need a serving stack upstream.
Generation is greedy (temperature and top_p are not used); a stream carries the finished answer.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import torch
from PIL import Image
from starlette.responses import JSONResponse, StreamingResponse

from ..generate import generate_batch
from .content import Limits, decode_data_url
from .protocol import ApiError, completion, stream_events
from .upstream import STREAM_HEADERS

log = logging.getLogger("davsp.serve")


@dataclass
class _Job:
    question: str
    image: Image.Image
    max_tokens: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class LocalModelBackend:
    def __init__(self, adapter, config, metrics, limits: Limits):
        self.adapter = adapter
        self.name = config.served_model_name or config.model
        self.batch_size = config.batch_size
        self.default_max_tokens = config.default_max_tokens
        self.max_tokens_limit = config.max_tokens_limit
        self.timeout_s = config.request_timeout_s
        self.limits = limits
        self.metrics = metrics
        self._queue: queue.Queue[_Job] = queue.Queue(maxsize=config.queue_size)
        self._stopping = threading.Event()
        self._worker: threading.Thread | None = None

    @classmethod
    def load(cls, config, metrics, limits: Limits) -> "LocalModelBackend":
        from ..adapters import load_adapter
        from ..config import resolve_device_dtype

        device, dtype = resolve_device_dtype(config.device, config.dtype)
        adapter = load_adapter(config.model, device=device, dtype=dtype,
                               prompt_format=None if config.prompt_format == "default" else config.prompt_format,
                               image_geometry=config.image_geometry)
        return cls(adapter, config, metrics, limits)

    def description(self) -> dict:
        """What a gateway in front checks a VSP against (reported in /v1/models under "davsp")."""
        return {"family": self.adapter.family, "canvas_size": self.adapter.canvas_size,
                "prompt_format": self.adapter.prompt_format, "image_geometry": self.adapter.image_geometry}

    def listing(self) -> dict:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": 0, "owned_by": "davsp",
                                            "root": str(self.adapter.model_id), "davsp": self.description()}]}

    async def start(self) -> dict:
        self._worker = threading.Thread(target=self._work, name="davsp-serve-model", daemon=True)
        self._worker.start()
        return self.listing()

    async def stop(self) -> None:
        """After the server has finished its requests: end the worker once the queue is empty."""
        self._stopping.set()
        if self._worker is not None:
            await asyncio.to_thread(self._worker.join)

    async def models(self) -> JSONResponse:
        return JSONResponse(self.listing())

    async def chat(self, request: dict, stream: bool) -> JSONResponse | StreamingResponse:
        question, image = self._single_turn(request)
        max_tokens = self._max_tokens(request)
        loop = asyncio.get_running_loop()
        job = _Job(question, image, max_tokens, loop, loop.create_future())
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise ApiError(429, f"{self._queue.maxsize} requests are already waiting for the model; retry shortly",
                           "queue_full", retry_after_s=1) from None
        self.metrics.queue_depth.set(self._queue.qsize())
        try:
            text, new_tokens, prompt_tokens = await asyncio.wait_for(job.future, self.timeout_s)
        except TimeoutError:
            raise ApiError(504, f"no answer within the {self.timeout_s:g}s deadline", "generation_timeout") from None
        finish = "length" if new_tokens >= max_tokens else "stop"
        if stream:
            include_usage = bool((request.get("stream_options") or {}).get("include_usage"))
            events = stream_events(self.name, text, finish, prompt_tokens, new_tokens, include_usage)
            return StreamingResponse(_iterate(events), media_type="text/event-stream", headers=STREAM_HEADERS)
        return JSONResponse(completion(self.name, text, finish, prompt_tokens, new_tokens))

    def _single_turn(self, request: dict) -> tuple[str, Image.Image]:
        shape = ("the local model backend answers one user message with one image and its text (the prompt davsp "
                 "trains and evaluates on); serve conversations with a serving stack behind --upstream")
        messages = request["messages"]
        content = messages[0].get("content")
        if len(messages) != 1 or messages[0]["role"] != "user" or not isinstance(content, list):
            raise ApiError(400, shape, "unsupported_conversation", param="messages")
        urls = [p["image_url"]["url"] for p in content if p.get("type") == "image_url"]
        if len(urls) != 1:
            raise ApiError(400, shape, "unsupported_conversation", param="messages")
        question = "".join(p["text"] for p in content if p.get("type") == "text")
        return question, decode_data_url(urls[0], self.limits)

    def _max_tokens(self, request: dict) -> int:
        if request.get("n", 1) != 1:
            raise ApiError(400, "the local model backend answers with one choice (n=1)", "invalid_n", param="n")
        value = request.get("max_completion_tokens", request.get("max_tokens"))
        if value is None:
            return self.default_max_tokens
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= self.max_tokens_limit:
            raise ApiError(400, f"max_tokens must be an integer in 1..{self.max_tokens_limit}", "invalid_max_tokens",
                           param="max_tokens")
        return value

    # ---- on the worker thread --------------------------------------------------------------------

    def _work(self) -> None:
        held: collections.deque[_Job] = collections.deque()  # taken from the queue, waiting for a batch of their length
        while not (self._stopping.is_set() and not held and self._queue.empty()):
            batch = self._next_batch(held)
            if batch:
                self._answer(batch)

    def _next_batch(self, held: collections.deque) -> list[_Job]:
        if not held:
            try:
                held.append(self._queue.get(timeout=0.1))
            except queue.Empty:
                return []
        while len(held) < 4 * self.batch_size:  # what is already waiting; never block for more
            try:
                held.append(self._queue.get_nowait())
            except queue.Empty:
                break
        self.metrics.queue_depth.set(self._queue.qsize())
        length = held[0].max_tokens
        batch = [job for job in held if job.max_tokens == length][: self.batch_size]
        for job in batch:
            held.remove(job)
        return batch

    def _answer(self, batch: list[_Job]) -> None:
        self.metrics.batch_size.observe(len(batch))
        try:
            with torch.inference_mode():
                adapter = self.adapter
                canvases = adapter.normalize(torch.stack([adapter.image_to_canvas(job.image) for job in batch]))
                texts, lengths = generate_batch(adapter, [job.question for job in batch], canvases, batch[0].max_tokens)
                prompt_lengths = [len(adapter.prompt_ids(job.question)) for job in batch]
            results = [(_deliver, (text, n, p)) for text, n, p in zip(texts, lengths, prompt_lengths)]
        except Exception as exc:  # one bad batch answers 500 to its requests; the worker keeps serving
            log.exception("generation failed for a batch of %d", len(batch))
            failure = ApiError(500, f"generation failed ({type(exc).__name__})", "generation_failed")
            results = [(_fail, failure)] * len(batch)
        for job, (settle, value) in zip(batch, results):
            job.loop.call_soon_threadsafe(settle, job.future, value)


def _deliver(future: asyncio.Future, value) -> None:
    if not future.done():  # the client may have gone (deadline, disconnect)
        future.set_result(value)


def _fail(future: asyncio.Future, error: Exception) -> None:
    if not future.done():
        future.set_exception(error)


async def _iterate(events: list[bytes]):
    for event in events:
        yield event
