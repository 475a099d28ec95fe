"""LLaVA-Bench (In-the-Wild) (Liu et al., NeurIPS 2023) as released on Hugging Face.

    ROOT/questions.jsonl     {"question_id", "image", "text", "category": conv|detail|complex}
    ROOT/context.jsonl       {"id", "image", "caption"}       (one per image)
    ROOT/answers_gpt4.jsonl  {"question_id", "text", ...}     (the reference answers)
    ROOT/images/<image>
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DavspError
from ._files import read_jsonl_rows, text_field
from .records import Record

BENCHMARK = "llava-bench"


def load_llavabench(root: str | Path) -> list[Record]:
    """Records with id = question_id; answer = the GPT-4 reference answer (the judge's
    "Assistant 1"); category = conv/detail/complex; extra["context"] = the image caption
    the judge sees."""
    root = Path(root).resolve()
    captions = _captions(root / "context.jsonl")
    references = _references(root / "answers_gpt4.jsonl")
    path = root / "questions.jsonl"
    records = []
    for number, row in enumerate(read_jsonl_rows(path, "LLaVA-Bench questions"), start=1):
        where = f"{path}:{number}"
        if "question_id" not in row:
            raise DavspError(f"{where}: missing 'question_id'")
        question_id = str(row["question_id"])
        image = text_field(row, "image", where)
        if question_id not in references:
            raise DavspError(
                f"{where}: question_id {question_id!r} has no reference answer in {root / 'answers_gpt4.jsonl'}"
            )
        if image not in captions:
            raise DavspError(f"{where}: image {image!r} has no caption in {root / 'context.jsonl'}")
        records.append(
            Record(
                id=question_id,
                image=root / "images" / image,
                question=text_field(row, "text", where),
                answer=references[question_id],
                category=text_field(row, "category", where),
                benchmark=BENCHMARK,
                extra={"context": captions[image]},
            )
        )
    return records


def _captions(path: Path) -> dict[str, str]:
    captions = {}
    for number, row in enumerate(read_jsonl_rows(path, "LLaVA-Bench context"), start=1):
        caption = row.get("caption")
        # a list of lines in some copies, one string in others
        if isinstance(caption, list) and all(isinstance(line, str) for line in caption):
            caption = "\n".join(caption)
        if not isinstance(caption, str):
            raise DavspError(f"{path}:{number}: 'caption' must be a string or a list of strings")
        captions[text_field(row, "image", f"{path}:{number}")] = caption
    return captions


def _references(path: Path) -> dict[str, str]:
    rows = read_jsonl_rows(path, "LLaVA-Bench reference answers")
    return {
        str(row.get("question_id", "")): text_field(row, "text", f"{path}:{number}")
        for number, row in enumerate(rows, start=1)
    }
