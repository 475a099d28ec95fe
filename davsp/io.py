"""Small file helpers: atomic writes, JSONL, hashes, run manifests.

Every output is written to a temporary file in the same folder and renamed into place, so a
killed process never leaves a half-written file and an input is never overwritten by accident.
"""

from __future__ import annotations

import functools
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

@functools.cache
def _umask() -> int:
    """The process umask, read once on first write (reading it means setting it, so never at import)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    if path.is_dir():
        raise DavspError(f"{path}: is a directory; give a file path")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give outputs the usual permissions
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        _name_the_file(exc, path)
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


def parse_json(text: str, where: str) -> Any:
    """json.loads with one-line errors for bad syntax and for nesting too deep to parse."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DavspError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise DavspError(f"{where}: JSON nested too deeply to read") from None


def read_text_utf8(path: str | Path) -> str:
    """A text file's content; a file that is not UTF-8 gets one line naming the byte offset."""
    path = Path(path)
    if path.is_dir():
        raise DavspError(f"{path}: is a directory, expected a file")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DavspError(f"{path}: not UTF-8 text (invalid byte at offset {exc.start}); save it as UTF-8") from None


def append_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """Append whole lines and fsync, so a killed run loses at most the rows in flight."""
    path = Path(path)
    if path.is_dir():
        raise DavspError(f"{path}: is a directory; give a .jsonl file path")
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:  # a torn last line is dropped by the next run's `drop_torn_tail`
        _name_the_file(exc, path)
        raise


def _name_the_file(exc: BaseException, path: Path) -> None:
    """A failed write's OSError names no file (a full disk: errno ENOSPC only); give it the output's path."""
    if isinstance(exc, OSError) and exc.errno is not None and exc.filename is None:
        exc.filename = str(path)  # only a real OS error: setting it on OSError("message") would replace the message


def read_jsonl(path: str | Path, *, tolerate_torn_tail: bool = False) -> Iterator[dict]:
    """Yield one dict per non-empty line; errors name the file and line.

    With `tolerate_torn_tail`, an unparsable *last* line (a write cut by a kill) is ignored.
    """
    path = Path(path)
    if not path.is_file():
        raise DavspError(f"{path}: file not found")
    lines = read_text_utf8(path).splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = parse_json(line, f"{path}:{number}")
        except DavspError:
            if tolerate_torn_tail and number == len(lines):
                return
            raise
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
    text = read_text_utf8(path)
    if text and (not text.endswith("\n") or len([l for l in text.splitlines() if l.strip()]) != len(rows)):
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return rows


def read_safetensors_artifact(path: str | Path, header_key: str, names: tuple[str, ...],
                              what: str) -> tuple[dict, dict]:
    """(header, tensors) of a davsp .safetensors artifact; one-line errors for a missing, foreign or corrupt
    file, a malformed header, missing tensors and non-finite values."""
    from safetensors import safe_open
    import torch

    path = Path(path)
    if not path.is_file():
        raise DavspError(f"{path}: {what} file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(header_key)
            missing = [n for n in names if n not in f.keys()]
            if raw is None or missing:
                detail = f"no {header_key} header" if raw is None else f"missing tensors {', '.join(missing)}"
                raise DavspError(f"{path}: not a davsp {what} file ({detail})")
            tensors = {n: f.get_tensor(n) for n in names}
    except DavspError:
        raise
    except Exception as exc:  # safetensors raises its own error types for corrupt or truncated files
        raise DavspError(f"{path}: cannot read {what} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        raise DavspError(f"{path}: malformed {header_key} header (not JSON)") from None
    if not isinstance(header, dict):
        raise DavspError(f"{path}: malformed {header_key} header (not an object)")
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise DavspError(f"{path}: {name} holds non-finite values; the file is corrupt or its run diverged")
    return header, tensors


def batched(items: list, size: int) -> Iterator[list]:
    """Consecutive slices of `items` of length `size` (the last may be shorter)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


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
