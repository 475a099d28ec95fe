"""Query records: one image plus one question, optionally a reference answer and a category.

Two on-disk forms are read:
- JSONL, one object per line: `id`, `image` (path relative to the file), `question`,
  optional `answer`, `category`, `benchmark`;
- the original DAVSP code's JSON: `{id: {"image_path": ..., "question": ..., "answer": ...}}`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import DavspError
from ..io import read_jsonl


@dataclass(frozen=True)
class Record:
    id: str
    image: Path
    question: str
    answer: str | None = None
    category: str | None = None
    benchmark: str | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        row = asdict(self)
        row["image"] = str(self.image)
        return row


def load_image(path: Path, where: str = "") -> Image.Image:
    """Open an image as RGB; errors name the record and the file."""
    prefix = f"{where}: " if where else ""
    if not Path(path).is_file():
        raise DavspError(f"{prefix}image not found: {path}")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise DavspError(f"{prefix}cannot read image {path}: {exc}") from None


def _check_image(path: Path, where: str) -> None:
    """Fail before any model is loaded: the file exists and its header is an image."""
    if not path.is_file():
        raise DavspError(f"{where}: image not found: {path}")
    try:
        with Image.open(path) as img:
            img.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DavspError(f"{where}: cannot read image {path}: {exc}") from None


def _record_from(row: dict, base: Path, where: str, *, check_images: bool) -> Record:
    if not isinstance(row.get("question"), str) or not row["question"].strip():
        raise DavspError(f"{where}: missing or empty 'question'")
    image = row.get("image", row.get("image_path"))
    if not isinstance(image, str) or not image:
        raise DavspError(f"{where}: missing 'image' (a path relative to the records file)")
    image_path = base / image
    if check_images:
        _check_image(image_path, where)
    known = {"id", "image", "image_path", "question", "answer", "category", "benchmark"}
    return Record(
        id=str(row["id"]),
        image=image_path,
        question=row["question"],
        answer=row.get("answer"),
        category=row.get("category"),
        benchmark=row.get("benchmark"),
        extra={k: v for k, v in row.items() if k not in known},
    )


def load_records(path: str | Path, *, check_images: bool = True, allow_empty: bool = False) -> list[Record]:
    """Read records from JSONL or the original `{id: {...}}` JSON; ids must be unique."""
    path = Path(path)
    if not path.is_file():
        raise DavspError(f"{path}: file not found")
    base = path.parent
    records: list[Record] = []
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DavspError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(data, dict):
            raise DavspError(f"{path}: expected an object {{id: {{image_path, question, answer}}}}")
        for key, row in data.items():
            if not isinstance(row, dict):
                raise DavspError(f"{path}: record {key!r} is not an object")
            records.append(_record_from({**row, "id": key}, base, f"{path}: record {key!r}", check_images=check_images))
    else:
        for number, row in enumerate(read_jsonl(path), start=1):
            if "id" not in row:
                row = {**row, "id": str(number)}
            records.append(_record_from(row, base, f"{path}:{number} (id {row['id']!r})", check_images=check_images))
    seen: set[str] = set()
    for record in records:
        if record.id in seen:
            raise DavspError(f"{path}: duplicate id {record.id!r}")
        seen.add(record.id)
    if not records and not allow_empty:
        raise DavspError(f"{path}: no records")
    return records
