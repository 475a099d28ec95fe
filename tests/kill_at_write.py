"""Test-side fault injection: run `davsp ...` in a child process that kill -9s itself at its N-th write.

The child replaces davsp's two write primitives, `io.atomic_write_bytes` (every whole-file output) and
`io.append_jsonl` (training metrics, generated rows), in every davsp module that holds them. At the
N-th call it leaves what a kill in the middle of that write leaves (an atomic write: a stray
temporary file beside an untouched target; an append: half a line), then sends itself SIGKILL: no
handler, no `finally`, no flush, as `kill -9` from outside would. Nothing in the package knows.

Children are forked from a `multiprocessing` fork server that imported davsp and the model classes
once: a fresh interpreter per run would spend seconds importing for every kill point.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import threading
from pathlib import Path

from tqdm import tqdm

import davsp.cli

# imported once by the fork server, so that a child starts warm: the command modules the parser imports
# (matplotlib's are the slow ones) and what loading the tiny LLaVA imports. A name that has moved is
# skipped by the fork server, which only costs time.
PRELOAD = [f"davsp.{name}" for name in (
    "cli", "cli.model", "cli.data", "cli.judge", "cli.evaluate", "cli.demo", "cli.bench", "cli.toy", "cli.serve",
    "cli.reproduce", "generate", "train", "report", "evaluate", "demo", "toy.build")] + [f"transformers.models.{name}" for name in (
    "auto.configuration_auto", "auto.modeling_auto", "auto.processing_auto", "auto.image_processing_auto",
    "auto.tokenization_auto", "llava.modeling_llava", "llava.processing_llava", "clip.image_processing_pil_clip")]
KILLED = -signal.SIGKILL  # a multiprocessing exit code: killed by that signal


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _torn_atomic_write(path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.parent / f".{path.name}.killed.tmp").write_bytes(data[: len(data) // 2])
    _die()


def _torn_append(path, rows) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    with open(path, "ab") as f:
        f.write(text[: len(text) // 2])
    _die()


def _count_writes(kill_at: int | None):
    """Route davsp's writes through a counter that kills at write `kill_at`; returns the count so far."""
    import davsp.io

    originals = {"atomic_write_bytes": davsp.io.atomic_write_bytes, "append_jsonl": davsp.io.append_jsonl}
    torn = {"atomic_write_bytes": _torn_atomic_write, "append_jsonl": _torn_append}
    calls = 0

    def counting(name):
        def write(*args, **kwargs):
            nonlocal calls
            calls += 1
            if calls == kill_at:
                torn[name](*args, **kwargs)
            return originals[name](*args, **kwargs)
        return write

    replacements = {name: counting(name) for name in originals}
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("davsp"):
            for name, original in originals.items():
                if getattr(module, name, None) is original:
                    setattr(module, name, replacements[name])
    return lambda: calls


def _child(argv: list[str], kill_at: int | None, log: str) -> None:
    with open(log, "ab") as f:  # the child's stdout and stderr, for the test to read
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    # tqdm's default lock is a named semaphore that a killed child would leak; a thread lock is enough here
    tqdm.set_lock(threading.RLock())
    writes = _count_writes(kill_at)
    code = davsp.cli.main(argv)
    Path(f"{log}.writes").write_text(str(writes()))
    sys.exit(code)


def run_davsp(argv: list[str], log: Path, kill_at: int | None = None) -> int:
    """`davsp ARGV`'s exit code in a fresh child (KILLED if it reached write `kill_at`); its output is appended
    to `log`, and the number of writes of a run that finished goes to `writes_of(log)`."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    child = context.Process(target=_child, args=(list(argv), kill_at, str(log)))
    child.start()
    child.join()
    return child.exitcode


def writes_of(log: Path) -> int:
    """How many writes the last finished `run_davsp` with this log made."""
    return int(Path(f"{log}.writes").read_text())
