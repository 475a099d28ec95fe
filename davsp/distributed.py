"""Data-parallel generation and vector extraction under `torchrun` (one process and one device per rank).

    torchrun --nproc-per-node 4 -m davsp generate --model M --data test.jsonl --defense davsp --vsp V --out r.jsonl
    torchrun --nproc-per-node 4 -m davsp vector --model M --harmful h.jsonl --benign b.jsonl --out v.safetensors

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; `setup` joins the process group (gloo on the CPU, nccl
on GPUs) and gives rank r the device cuda:LOCAL_RANK. Several nodes join through torchrun's usual
rendezvous (docs/performance.md has a Slurm example).

Generation. The records not yet answered are sorted by prompt length and cut into batches exactly as
one process cuts them (`generate.generate_responses`); batch i goes to rank i mod WORLD_SIZE, which
answers it into its own shard, OUT.shards/rank-R.jsonl, appended and fsynced per batch. When every rank
is done, rank 0 writes OUT (atomically, input order) and removes the shards. Each batch holds the same
records as in a single process, so the merged file equals the single-process output. A killed job loses
at most the batches in flight: at the next start rank 0 first folds every shard into OUT (any world
size), and only what is still missing is shared out again.

Vector extraction. Each class's batches (cut as one process cuts them) go to the ranks in contiguous
blocks; each rank sums its states in float64 (each batch summed in float32, as in one process), the
sums are all-reduced and every rank builds the same vector. The float32 class means equal the
single-process ones: adding a few float32-valued sums in float64 in another order changes at most bits
far below float32's precision (the tests compare them bit for bit). The states kept for the separation
score are the first records' in input order, gathered from the ranks that hold them.

VSP training is not spread over ranks: a published step is a batch of 2, so ranks would each get one
sample and the step would gain at most 2x however many GPUs (docs/performance.md).
"""

from __future__ import annotations

import atexit
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from .data.records import Record
from .errors import DavspError
from .generate import DEFAULT_MAX_NEW_TOKENS, check_resume_provenance, generate_responses, generation_provenance
from .io import atomic_write_text, batched, drop_torn_tail, read_jsonl
from .vector import class_state_sums, vector_from_sums


def launched() -> bool:
    """Whether this process is one rank of a multi-process torchrun job."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def setup(device: str) -> str:
    """Join torchrun's process group (once) and return this rank's device, given the --device setting."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        raise DavspError("--device auto shards one model over several GPUs; under torchrun each rank takes one "
                         "device: use --device cuda (rank r gets cuda:LOCAL_RANK) or cpu")
    gpu = device.startswith("cuda") or (device == "auto-device" and torch.cuda.is_available())
    if gpu and local_rank >= torch.cuda.device_count():
        raise DavspError(f"LOCAL_RANK {local_rank} but torch sees {torch.cuda.device_count()} GPUs: start at most "
                         "one process per GPU (--nproc-per-node)")
    if not dist.is_initialized():
        if gpu:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if gpu else "gloo")
        atexit.register(dist.destroy_process_group)
    return f"cuda:{local_rank}" if gpu else "cpu"


def barrier() -> None:
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


# ---------------------------------------------------------------- generation


def shard_folder(out: str | Path) -> Path:
    return Path(f"{out}.shards")


def generate_sharded(adapter, records: list[Record], *, defense: str, out: str | Path, batch_size: int = 8,
                     progress: bool = True, **options) -> list[dict]:
    """`generate_responses` over the ranks (see the module docstring); every rank returns the whole
    output in input order. `options` go to generate_responses (vsp, max_new_tokens, static_cache)."""
    out = Path(out)
    shards = shard_folder(out)
    if is_main():
        _fold_shards(out, shards, records)
    barrier()
    existing = list(read_jsonl(out)) if out.exists() else []
    check_resume_provenance(existing, generation_provenance(
        adapter, defense, options.get("vsp"), options.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)), out)
    done = {row["id"] for row in existing}
    todo = sorted((r for r in records if r.id not in done), key=lambda r: len(r.question))  # as one process sorts
    mine = [r for i, chunk in enumerate(batched(todo, batch_size)) if i % world_size() == rank() for r in chunk]
    generate_responses(adapter, mine, defense=defense, out=shards / f"rank-{rank():05d}.jsonl", batch_size=batch_size,
                       progress=progress and is_main(), **options)
    barrier()
    if is_main():
        _fold_shards(out, shards, records)
    barrier()
    by_id = {row["id"]: row for row in read_jsonl(out)}
    return [by_id[r.id] for r in records]


def _fold_shards(out: Path, shards: Path, records: list[Record]) -> None:
    """Rank 0: OUT rewritten with every shard's rows added (each id once, this input's records first, in
    input order), then the shards removed. Run at the start (a killed job's shards) and at the end."""
    rows = {row["id"]: row for row in drop_torn_tail(out)}
    files = sorted(shards.glob("rank-*.jsonl")) if shards.is_dir() else []
    for path in files:
        for row in read_jsonl(path, tolerate_torn_tail=True):  # a rank killed mid-write leaves a torn last line
            rows.setdefault(row["id"], row)
    if files:
        ordered = [rows.pop(r.id) for r in records if r.id in rows] + list(rows.values())
        atomic_write_text(out, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in ordered))
        for path in files:
            path.unlink()
    if shards.is_dir() and not any(shards.iterdir()):
        shards.rmdir()


# ---------------------------------------------------------------- vector extraction


def extract_vector_sharded(adapter, harmful: list[Record], benign: list[Record], *, use_prefix: bool = True,
                           batch_size: int = 8, stats_samples: int = 256, data_hashes: dict | None = None):
    """`vector.extract_harmfulness_vector` over the ranks; every rank returns the same vector."""
    from .defenses import SAFETY_PREFIX

    if len(harmful) < 2 or len(benign) < 2:
        raise DavspError(f"need at least 2 harmful and 2 benign records (got {len(harmful)} and {len(benign)})")
    prefix = SAFETY_PREFIX if use_prefix else None
    layers = list(range(1, adapter.num_layers + 1))
    classes = []
    for label, records in (("harmful", harmful), ("benign", benign)):
        chunks = list(batched(records, batch_size))
        first, last = _block(len(chunks), rank(), world_size())
        mine = [r for chunk in chunks[first:last] for r in chunk]
        start = first * batch_size  # input position of this rank's first record
        total, kept = class_state_sums(adapter, mine, prefix, batch_size, layers, max(0, stats_samples - start), label)
        total = _all_reduce_sum(total)
        pieces = [None] * world_size()
        dist.all_gather_object(pieces, kept)  # only ranks holding the first `stats_samples` records send states
        classes.append((total, len(records), torch.cat(pieces)[:stats_samples]))
    return vector_from_sums(adapter, *classes, use_prefix=use_prefix, data_hashes=data_hashes)


def _block(n: int, r: int, world: int) -> tuple[int, int]:
    """[first, last) of n items for rank r of `world`: contiguous, sizes differing by at most one."""
    return r * n // world, (r + 1) * n // world


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.get_backend() == "nccl":  # nccl reduces GPU tensors only
        on_gpu = tensor.cuda()
        dist.all_reduce(on_gpu)
        return on_gpu.cpu()
    dist.all_reduce(tensor)
    return tensor
