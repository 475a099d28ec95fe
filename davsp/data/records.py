"""Query records: one image plus one question, optionally a reference answer and a category.

Two on-disk forms are read:
- JSONL, one object per line: `id`, `image` (path relative to the file), `question`,
  optional `answer`, `category`, `benchmark`;
- the original DAVSP code's JSON: `{id: {"image_path": ..., "question": ..., "answer": ...}}`.

A records file is trusted like a script: its image paths are resolved relative to the file and may
be absolute or point outside its folder (benchmark exports do), so read records only from sources
you trust with your files.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import DavspError
from ..io import parse_json, read_jsonl, read_text_utf8

# Pillow's decompression-bomb limit (about 89 Mpx) stays in force: a bigger image is refused, not decoded
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS


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


def to_rgb_on_white(image: Image.Image) -> Image.Image:
    """RGB, with transparent pixels composited onto white (as the Hugging Face processors do), not black."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image.convert("RGB")


def _open_checked(path: Path, where: str):
    prefix = f"{where}: " if where else ""
    if not Path(path).is_file():
        raise DavspError(f"{prefix}image not found: {path}")
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise DavspError(f"{prefix}image {path} is too large to decode safely ({exc})") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DavspError(f"{prefix}cannot read image {path}: {exc}") from None
    if image.width * image.height > MAX_IMAGE_PIXELS:
        image.close()
        raise DavspError(f"{prefix}image {path} has {image.width}x{image.height} pixels, more than the "
                         f"{MAX_IMAGE_PIXELS:,} davsp decodes; resize it first")
    return image


def load_image(path: Path, where: str = "") -> Image.Image:
    """Open an image as RGB (transparency onto white); errors name the record and the file."""
    with _open_checked(path, where) as img:
        try:
            return to_rgb_on_white(img)
        except (OSError, SyntaxError, ValueError) as exc:  # a truncated or corrupt body
            prefix = f"{where}: " if where else ""
            raise DavspError(f"{prefix}cannot read image {path}: {exc}") from None


def _check_image(path: Path, where: str) -> None:
    """Fail before any model is loaded: the file exists, its header is an image of a sane size."""
    with _open_checked(path, where) as img:
        try:
            img.verify()
        except (OSError, SyntaxError, ValueError) as exc:
            raise DavspError(f"{where}: cannot read image {path}: {exc}") from None


def _optional_text(row: dict, key: str, where: str) -> str | None:
    value = row.get(key)
    if value is not None and not isinstance(value, str):
        raise DavspError(f"{where}: {key!r} must be a string or absent, got {type(value).__name__} {value!r:.40}")
    return value


def _record_id(value, where: str) -> str:
    # an int id is common (the original JSON keys are numbers in spirit); null, bool, float or objects are mistakes
    if isinstance(value, bool) or not isinstance(value, (str, int)) or (isinstance(value, str) and not value.strip()):
        raise DavspError(f"{where}: 'id' must be a non-empty string or an integer, got {value!r:.40}")
    return str(value)


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
        id=_record_id(row["id"], where),
        image=image_path,
        question=row["question"],
        answer=_optional_text(row, "answer", where),
        category=_optional_text(row, "category", where),
        benchmark=_optional_text(row, "benchmark", where),
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
        data = parse_json(read_text_utf8(path), str(path))
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
