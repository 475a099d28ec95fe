"""Batched greedy generation under a defense: none, prefix, vsp (frame only) or davsp (frame + prefix).

Records are sorted by prompt length and batched with left padding; the output JSONL is appended one
batch at a time, so a killed run loses at most the batch in flight and a rerun skips finished ids.
Each row records what produced it (`generation_provenance`); a rerun into an output written under
other settings is refused (`check_resume_provenance`), never mixed.
"""

from __future__ import annotations

import hashlib
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from .data.records import Record, load_image
from .defenses import SAFETY_PREFIX, defense_parts, with_prefix
from .errors import DavspError
from .fingerprint import check_vsp_fits
from .io import append_jsonl, batched, drop_torn_tail
from .prompt import VisualSafetyPrompt

DEFAULT_MAX_NEW_TOKENS = 1024


def defended_inputs(adapter, records: list[Record], defense: str, vsp: VisualSafetyPrompt | None):
    """(questions, (B, 3, S, S) normalized canvases) as the model sees them under `defense`."""
    use_prefix, use_vsp = defense_parts(defense)
    images = [load_image(r.image, f"record {r.id!r}") for r in records]
    if use_vsp:
        if vsp is None:
            raise DavspError(f"defense {defense!r} needs a VSP file (--vsp)")
        prepared = torch.stack([vsp.prepare(img, adapter) for img in images])
        canvases = vsp.compose(prepared, adapter.normalize)
    else:
        canvases = adapter.normalize(torch.stack([adapter.image_to_canvas(img) for img in images]))
    questions = [with_prefix(r.question, SAFETY_PREFIX if use_prefix else None) for r in records]
    return questions, canvases


def vsp_sha256(vsp: VisualSafetyPrompt) -> str:
    """sha256 of the VSP as davsp writes it to a file (equal to the file's own sha256 for a davsp-written file)."""
    return hashlib.sha256(vsp.to_bytes()).hexdigest()


def generation_provenance(adapter, defense: str, vsp: VisualSafetyPrompt | None, max_new_tokens: int) -> dict:
    """What produces a local generation's rows; written into every row and compared on a resume."""
    return {"model": adapter.model_id, "family": adapter.family, "defense": defense,
            "vsp_sha256": vsp_sha256(vsp) if vsp is not None and defense_parts(defense)[1] else None,
            "prompt_format": adapter.prompt_format, "image_geometry": adapter.image_geometry,
            "max_new_tokens": max_new_tokens, "dtype": adapter.precision.name}


def check_resume_provenance(rows: list[dict], provenance: dict, out: str | Path | None) -> None:
    """Refuse to add rows to an output whose existing rows were produced under other settings: one line
    naming the first field that differs. Rows missing a field (an older davsp) differ too."""
    for row in rows:
        for key, value in provenance.items():
            if row.get(key, "(absent)") != value:
                raise DavspError(f"{out}: row {row.get('id')!r} was produced with {key}={row.get(key, '(absent)')!r}, "
                                 f"this run has {key}={value!r}; choose another --out (or delete the file to start over)")


def decoding_attention(device: torch.device) -> AbstractContextManager:
    """Attention kernels for decoding: on CUDA, every SDPA backend except cuDNN's.

    cuDNN builds an execution plan for each new sequence length, and a growing KV cache meets a new
    length at every step: on an H200 (LLaVA-1.5-13B, bf16, 8 queries x 64 tokens) a batch's first
    generation took 7.5 s with cuDNN and 2.4 s without (`docs/performance.md`, "GPU").
    """
    if device.type != "cuda":
        return nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


@torch.no_grad()
def generate_batch(
    adapter, questions: list[str], canvases: torch.Tensor, max_new_tokens: int, static_cache: bool = False
) -> tuple[list[str], list[int]]:
    batch = adapter.batch(questions, canvases)
    # a static cache has fixed shapes, so on a GPU transformers compiles the decoding step (torch.compile)
    cache = {"cache_implementation": "static"} if static_cache else {}
    prompt_width = batch.model_inputs["input_ids"].shape[1]
    tokenizer = adapter.tokenizer
    with decoding_attention(adapter.device):
        output = adapter.model.generate(
            **batch.model_inputs, max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            **cache,
        )
    new_tokens = output[:, prompt_width:]
    eos = tokenizer.eos_token_id
    lengths = [int((row != eos).cumprod(0).sum()) for row in new_tokens]  # tokens up to the first EOS
    return adapter.decode(new_tokens), lengths


def generate_responses(
    adapter,
    records: list[Record],
    *,
    defense: str,
    vsp: VisualSafetyPrompt | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 8,
    out: str | Path | None = None,
    progress: bool = True,
    static_cache: bool = False,
) -> list[dict]:
    """Responses for `records`; with `out`, append to that JSONL and skip ids it already holds.

    `static_cache` preallocates the KV cache for prompt + `max_new_tokens`; on a GPU transformers then
    compiles the decoding step. The answers are the same either way (tested on the CPU).
    """
    defense_parts(defense)
    if vsp is not None:
        check_vsp_fits(vsp, adapter)
    provenance = generation_provenance(adapter, defense, vsp, max_new_tokens)
    existing = drop_torn_tail(out) if out is not None else []
    check_resume_provenance(existing, provenance, out)
    done = {row["id"]: row for row in existing}
    todo = [r for r in records if r.id not in done]
    todo.sort(key=lambda r: len(r.question))  # similar lengths share a batch: less padding
    rows: list[dict] = []
    bar = tqdm(total=len(todo), desc=f"generate ({defense})", disable=not progress)
    for chunk in batched(todo, batch_size):
        started = time.perf_counter()
        questions, canvases = defended_inputs(adapter, chunk, defense, vsp)
        responses, lengths = generate_batch(adapter, questions, canvases, max_new_tokens, static_cache)
        seconds = (time.perf_counter() - started) / len(chunk)
        batch_rows = [  # a record's extra fields first: they never overwrite a generated field
            {**r.extra, "id": r.id, "benchmark": r.benchmark, "category": r.category, "question": r.question,
             "answer": r.answer, "image": str(r.image), "response": text, "new_tokens": n,
             "seconds": round(seconds, 4), **provenance}
            for r, text, n in zip(chunk, responses, lengths)
        ]
        if out is not None:
            append_jsonl(out, batch_rows)
        rows.extend(batch_rows)
        bar.update(len(chunk))
    bar.close()
    by_id = {**done, **{row["id"]: row for row in rows}}
    return [by_id[r.id] for r in records]
