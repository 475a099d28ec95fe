"""MME (Fu et al., 2023) in the official release layout (MME_Benchmark_release_version).

    ROOT/{subtask}/                       14 subtask folders; two layouts occur:
        images/{name}.jpg + questions_answers_YN/{name}.txt   (artwork, celebrity, landmark, posters, scene)
        {name}.png|jpg + {name}.txt side by side              (the others)

Each .txt holds one "question<TAB>Yes|No" line per question: two per image, one with the
answer Yes and one with No, which is what acc+ (both right) is computed over.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from ..errors import DavspError
from ._files import choose, read_text
from .records import Record

BENCHMARK = "mme"
PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
SUBTASKS = PERCEPTION + COGNITION
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")


def load_mme(root: str | Path, *, subset=None) -> list[Record]:
    """Records with id `{subtask}/{image file}/{line index}`; category = subtask.

    answer = "Yes" or "No"; extra: subtask, image_id (the image file name, as in MME's
    result files), group ("perception" or "cognition").
    """
    base = _subtask_base(Path(root).resolve())
    return [record for subtask in choose(subset, SUBTASKS, "MME subtask") for record in _subtask_records(base, subtask)]


def _subtask_records(base: Path, subtask: str) -> list[Record]:
    folder = base / subtask
    if not folder.is_dir():
        raise DavspError(f"{folder}: MME subtask folder not found; ROOT must hold the 14 official subtask folders")
    if (folder / "images").is_dir() and (folder / "questions_answers_YN").is_dir():
        qa_dir, image_dir = folder / "questions_answers_YN", folder / "images"
    else:
        qa_dir = image_dir = folder
    qa_files = sorted(qa_dir.glob("*.txt"))
    if not qa_files:
        raise DavspError(f"{qa_dir}: no question files (*.txt) for MME subtask {subtask}")
    fallback_suffix = _usual_image_suffix(image_dir)
    records = []
    for qa_file in qa_files:
        image = _image_for(image_dir, qa_file.stem, fallback_suffix)
        for index, (question, answer) in enumerate(_read_pairs(qa_file)):
            records.append(
                Record(
                    id=f"{subtask}/{image.name}/{index}",
                    image=image,
                    question=question,
                    answer=answer,
                    category=subtask,
                    benchmark=BENCHMARK,
                    extra={
                        "subtask": subtask,
                        "image_id": image.name,
                        "group": "perception" if subtask in PERCEPTION else "cognition",
                    },
                )
            )
    return records


def _read_pairs(path: Path) -> list[tuple[str, str]]:
    pairs = []
    for number, line in enumerate(read_text(path, "MME question file").splitlines(), start=1):
        if not line.strip():
            continue
        question, tab, answer = line.rpartition("\t")
        if not tab or not question.strip() or answer.strip() not in ("Yes", "No"):
            raise DavspError(f"{path}:{number}: expected 'question<TAB>Yes' or 'question<TAB>No', got {line!r}")
        pairs.append((question.strip(), answer.strip()))
    if not pairs:
        raise DavspError(f"{path}: no questions")
    return pairs


def _image_for(image_dir: Path, stem: str, fallback_suffix: str) -> Path:
    """The image named like the question file; if absent, the path it would most likely have
    (so a missing image is reported by name, never dropped)."""
    for suffix in IMAGE_SUFFIXES:
        if (image_dir / f"{stem}{suffix}").is_file():
            return image_dir / f"{stem}{suffix}"
    return image_dir / f"{stem}{fallback_suffix}"


def _usual_image_suffix(image_dir: Path) -> str:
    suffixes = Counter(p.suffix for p in image_dir.iterdir() if p.suffix in IMAGE_SUFFIXES)
    return suffixes.most_common(1)[0][0] if suffixes else ".jpg"


def _subtask_base(root: Path) -> Path:
    # the release zip unpacks to MME_Benchmark_release_version/ with (in some copies) MME_Benchmark/ inside
    if not any((root / s).is_dir() for s in SUBTASKS) and (root / "MME_Benchmark").is_dir():
        return root / "MME_Benchmark"
    return root
