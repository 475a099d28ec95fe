"""Reading benchmark metadata files with errors that name the file, the entry and the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import DavspError
from ..io import parse_json, read_jsonl, read_text_utf8


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DavspError(f"{path}: {what} not found; check the benchmark root folder")
    return path


def read_text(path: Path, what: str) -> str:
    require_file(path, what)
    return read_text_utf8(path)


def read_json(path: Path, what: str, expect: type) -> Any:
    """Parse a JSON file that must hold a `expect` (dict or list) at the top level."""
    data = parse_json(read_text(path, what), str(path))
    if not isinstance(data, expect):
        raise DavspError(f"{path}: expected a JSON {expect.__name__} at the top level, got {type(data).__name__}")
    return data


def read_jsonl_rows(path: Path, what: str) -> list[dict]:
    require_file(path, what)
    return list(read_jsonl(path))


def text_field(row: dict, key: str, where: str) -> str:
    """A required, non-empty string field."""
    value = row.get(key) if isinstance(row, dict) else None
    if not isinstance(value, str) or not value.strip():
        raise DavspError(f"{where}: missing or empty {key!r}")
    return value


def choose(value, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    """Normalise an option given as None (all), one name or several names; keeps `allowed` order."""
    if value is None:
        return allowed
    chosen = (value,) if isinstance(value, str) else tuple(value)
    unknown = [v for v in chosen if v not in allowed]
    if unknown or not chosen:
        given = ", ".join(map(repr, unknown)) or "(none given)"
        raise DavspError(f"unknown {what} {given}; choose from {', '.join(allowed)}")
    return tuple(a for a in allowed if a in chosen)
