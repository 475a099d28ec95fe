"""Generation through any OpenAI-compatible server (vLLM, SGLang, `davsp serve --model`, ...).

Each record becomes one chat request holding what `davsp generate` feeds the local model: the image
framed exactly as `davsp apply` frames it (the gateway's `Framer`, bit for bit), sent as a lossless
PNG, and the question with the safety prefix for `prefix` and `davsp`. Decoding is greedy
(temperature 0, `max_tokens` = max_new_tokens), as published. The server then answers what the local
path would answer, provided it reads the same prompt (a VSP trained on LLaVA's llava_v1 conversation
meets the model's chat template behind most servers; `davsp serve --model` serves the adapter's
prompt) and the VSP is an 8-bit pixel-space frame (any other pixel-space frame is rounded to 8 bits
by the PNG; a normalized-space VSP is not an image and is refused). The client cannot see what a
server runs: the VSP must have been trained on the served model (its canvas size, its prompt).

`concurrency` requests are in flight at a time; the HTTP client (`openai_client.ChatClient`) retries
429, 5xx, broken connections and missed deadlines with backoff. Rows are appended to `out` as their
answers arrive (fsynced), so a killed run loses at most the requests in flight and a rerun skips the
ids already answered. A request that fails for good stops new submissions; the answers already in
flight are kept and the run ends with one line saying how to continue (rerun the same command).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from .data.records import Record, load_image
from .defenses import defense_parts
from .errors import DavspError
from .generate import DEFAULT_MAX_NEW_TOKENS, check_resume_provenance, vsp_sha256
from .io import append_jsonl, drop_torn_tail
from .openai_client import CallFailed, ChatClient
from .prompt import VisualSafetyPrompt
from .serve.content import Framer, ImageRef

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible server and how to talk to it."""

    url: str  # base URL (".../v1") or the full chat-completions URL
    served_model: str  # the `model` field of each request
    api_key_env: str = ""  # environment variable holding the key; "" for a server without authentication
    concurrency: int = 8  # requests in flight
    timeout_s: float = 600.0  # one attempt, up to the whole answer (1,024 tokens on a busy server take minutes)
    max_retries: int = 5
    backoff_s: float = 1.0

    def __post_init__(self):
        if not self.served_model:
            raise DavspError("--served-model: name the model the endpoint serves (its /v1/models id)")
        if self.concurrency < 1:
            raise DavspError(f"--concurrency {self.concurrency}: must be at least 1")

    def client(self) -> ChatClient:
        return ChatClient(self.url, api_key_env=self.api_key_env, timeout_s=self.timeout_s,
                          max_retries=self.max_retries, backoff_s=self.backoff_s,
                          max_connections=self.concurrency, url_flag="--endpoint")


def chat_request(framer: Framer, record: Record, served_model: str, max_new_tokens: int) -> dict:
    """The chat-completions request for one record under the framer's defense (greedy)."""
    image = load_image(record.image, f"record {record.id!r}")
    image_part = {"type": "image_url", "image_url": {"url": ""}}  # the framer writes the PNG data URL
    request = {
        "model": served_model,
        "messages": [{"role": "user", "content": [image_part, {"type": "text", "text": record.question}]}],
        "max_tokens": max_new_tokens,
        "temperature": 0,
    }
    return framer.defend(request, [ImageRef(image_part, "")], [image])


def generate_via_endpoint(
    records: list[Record],
    endpoint: Endpoint,
    *,
    defense: str,
    vsp: VisualSafetyPrompt | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    out: str | Path | None = None,
    progress: bool = True,
) -> list[dict]:
    """Responses for `records` from the endpoint, in input order; with `out`, appended to that JSONL as
    they arrive (any order) and ids it already holds are skipped, provided they were produced by the same
    served model, defense, VSP and answer length (`generate.check_resume_provenance`)."""
    use_frame = defense_parts(defense)[1]
    if use_frame and vsp is None:
        raise DavspError(f"defense {defense!r} needs a VSP file (--vsp)")
    if use_frame and not vsp.quantize_8bit:
        log.warning("the VSP is not 8-bit exact: the PNG sent rounds its frame to 8 bits, so answers may differ "
                    "from local generation (train with --space pixel --quantize-8bit true)")
    framer = Framer(defense, vsp if use_frame else None)  # refuses a VSP that is not a pixel-space frame
    # the fields of `generate.generation_provenance`; what the server alone knows (family, prompt format,
    # geometry, dtype) is null. The URL is recorded, not compared: the same model may move to another host.
    provenance = {"model": endpoint.served_model, "family": None, "defense": defense,
                  "vsp_sha256": vsp_sha256(vsp) if use_frame else None, "prompt_format": None,
                  "image_geometry": None, "max_new_tokens": max_new_tokens, "dtype": None}
    existing = drop_torn_tail(out) if out is not None else []
    check_resume_provenance(existing, provenance, out)
    done = {row["id"]: row for row in existing}
    todo = [r for r in records if r.id not in done]
    answered: dict[str, dict] = {}
    failures: list[str] = []
    client = endpoint.client()

    def answer(record: Record) -> dict:
        request = chat_request(framer, record, endpoint.served_model, max_new_tokens)
        started = time.perf_counter()
        reply = client.chat(request)
        usage = reply.payload.get("usage") if isinstance(reply.payload.get("usage"), dict) else {}
        return {**record.extra, "id": record.id, "benchmark": record.benchmark, "category": record.category,
                "question": record.question, "answer": record.answer, "image": str(record.image),
                "response": reply.content, "new_tokens": usage.get("completion_tokens"),
                "seconds": round(time.perf_counter() - started, 4), **provenance, "endpoint": endpoint.url}

    queue = iter(todo)
    bar = tqdm(total=len(todo), desc=f"generate ({defense}) via endpoint", disable=not progress)
    try:
        with ThreadPoolExecutor(endpoint.concurrency, thread_name_prefix="davsp-endpoint") as pool:
            # submit as answers come back, never all at once: memory stays bounded and a failure stops the rest
            in_flight = {pool.submit(answer, r): r for r in _take(queue, endpoint.concurrency)}
            while in_flight:
                finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                rows = []
                for future in finished:
                    record = in_flight.pop(future)
                    try:
                        rows.append(future.result())
                    except (CallFailed, DavspError) as exc:  # failed for good after retries; an unreadable image
                        failures.append(f"record {record.id!r}: {exc}")
                if out is not None and rows:
                    append_jsonl(out, rows)
                answered.update((row["id"], row) for row in rows)
                bar.update(len(rows))
                if not failures:
                    in_flight.update({pool.submit(answer, r): r for r in _take(queue, len(finished))})
    finally:
        bar.close()
        client.close()
    if failures:
        left = len(todo) - len(answered)
        raise DavspError(f"{endpoint.url}: {failures[0]}; {len(answered)} answers saved, {left} left: rerun the same "
                         "command to continue" + ("" if out is not None else " (give an output file to keep answers)"))
    by_id = {**done, **answered}
    return [by_id[r.id] for r in records]


def _take(queue, n: int) -> list:
    return [item for _, item in zip(range(n), queue)]
