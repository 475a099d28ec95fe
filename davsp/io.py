"""Small file helpers: atomic writes, JSONL, hashes, run manifests.

Every output is written to a temporary file in the same folder and renamed into place, so a
killed process never leaves a half-written file and an input is never overwritten by accident.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import DavspError

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give outputs the usual permissions
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def refuse_to_overwrite_input(out: str | Path, *inputs: str | Path) -> None:
    """Raise if `out` is one of the inputs (a common slip on the command line)."""
    out_resolved = Path(out).resolve()
    for item in inputs:
        if item is not None and Path(item).resolve() == out_resolved:
            raise DavspError(f"{out}: output path is also an input; choose another --out")


def append_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """Append whole lines and fsync, so a killed run loses at most the rows in flight."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | Path, *, tolerate_torn_tail: bool = False) -> Iterator[dict]:
    """Yield one dict per non-empty line; errors name the file and line.

    With `tolerate_torn_tail`, an unparsable *last* line (a write cut by a kill) is ignored.
    """
    path = Path(path)
    if not path.is_file():
        raise DavspError(f"{path}: file not found")
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if tolerate_torn_tail and number == len(lines):
                return
            raise DavspError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DavspError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        yield row


def drop_torn_tail(path: str | Path) -> list[dict]:
    """Rows of a JSONL output a killed run may have cut mid-line; the torn last line is removed from
    the file (atomically) so that appending goes on from a clean line."""
    path = Path(path)
    if not path.exists():
        return []
    rows = list(read_jsonl(path, tolerate_torn_tail=True))
    text = path.read_text(encoding="utf-8")
    if text and (not text.endswith("\n") or len([l for l in text.splitlines() if l.strip()]) != len(rows)):
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return rows


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in ("davsp", "torch", "transformers", "tokenizers", "safetensors", "pillow", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
