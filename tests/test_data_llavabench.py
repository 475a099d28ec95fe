import json
from pathlib import Path

import pytest
from PIL import Image

from davsp.data.benchmarks import check_benchmark, load_benchmark
from davsp.errors import DavspError


def _jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def build_llavabench(root: Path, images=True) -> Path:
    """questions / context / answers_gpt4 jsonl + images/, as released on Hugging Face."""
    (root / "images").mkdir(parents=True)
    _jsonl(root / "questions.jsonl", [
        {"question_id": 0, "image": "001.jpg", "text": "What is the name of this place?", "category": "conv"},
        {"question_id": 1, "image": "001.jpg", "text": "Describe the image in detail.", "category": "detail"},
        {"question_id": 2, "image": "002.jpg", "text": "Why is this funny?", "category": "complex"},
    ])
    _jsonl(root / "context.jsonl", [
        {"id": "001", "image": "001.jpg", "caption": "A lake at sunset."},
        {"id": "002", "image": "002.jpg", "caption": ["A meme.", "Two panels."]},
    ])
    _jsonl(root / "answers_gpt4.jsonl", [
        {"question_id": i, "prompt": "", "text": f"reference {i}", "answer_id": f"a{i}", "model_id": "gpt-4"}
        for i in range(3)
    ])
    if images:
        for name in ("001.jpg", "002.jpg"):
            Image.new("RGB", (4, 4)).save(root / "images" / name)
    return root


def test_questions_joined_with_references_and_captions(tmp_path):
    records = load_benchmark("llava-bench", build_llavabench(tmp_path))
    assert [r.id for r in records] == ["0", "1", "2"]
    assert [r.category for r in records] == ["conv", "detail", "complex"]
    assert records[0].answer == "reference 0" and records[0].extra["context"] == "A lake at sunset."
    assert records[2].extra["context"] == "A meme.\nTwo panels."
    assert records[1].image == tmp_path / "images" / "001.jpg"


def test_missing_reference_answer_and_missing_image(tmp_path):
    root = build_llavabench(tmp_path, images=False)
    assert check_benchmark("llava-bench", root).missing == [root / "images" / "001.jpg", root / "images" / "002.jpg"]
    _jsonl(root / "answers_gpt4.jsonl", [{"question_id": 0, "text": "reference 0"}])
    with pytest.raises(DavspError, match=r"questions\.jsonl:2: question_id '1' has no reference answer"):
        load_benchmark("llava-bench", root, check_images=False)
    (root / "context.jsonl").unlink()
    with pytest.raises(DavspError, match=r"context\.jsonl: LLaVA-Bench context not found"):
        load_benchmark("llava-bench", root, check_images=False)
