from pathlib import Path

import pytest
from PIL import Image

from davsp.data.benchmarks import check_benchmark, load_benchmark
from davsp.data.mme import COGNITION, PERCEPTION, SUBTASKS
from davsp.errors import DavspError

SPLIT_LAYOUT = {"artwork", "celebrity", "landmark", "posters", "scene"}  # images/ + questions_answers_YN/


def build_mme(root: Path, skip_image: str | None = None) -> Path:
    """One image with a Yes and a No question per subtask, in the release's two folder layouts."""
    for subtask in SUBTASKS:
        folder = root / "MME_Benchmark_release_version" / subtask
        if subtask in SPLIT_LAYOUT:
            image_dir, qa_dir = folder / "images", folder / "questions_answers_YN"
        else:
            image_dir = qa_dir = folder
        image_dir.mkdir(parents=True, exist_ok=True)
        qa_dir.mkdir(parents=True, exist_ok=True)
        stem = "0001"
        suffix = ".png" if subtask == "code_reasoning" else ".jpg"
        if f"{subtask}/{stem}{suffix}" != skip_image:
            Image.new("RGB", (4, 4)).save(image_dir / f"{stem}{suffix}")
        (qa_dir / f"{stem}.txt").write_text(
            f"Is this {subtask}? Please answer yes or no.\tYes\nIs this not {subtask}? Please answer yes or no.\tNo\n\n"
        )
    return root / "MME_Benchmark_release_version"


def test_both_release_layouts_give_two_questions_per_image(tmp_path):
    records = load_benchmark("mme", build_mme(tmp_path))
    assert len(records) == 2 * 14
    by_id = {r.id: r for r in records}
    art = by_id["artwork/0001.jpg/0"]
    assert art.image == tmp_path / "MME_Benchmark_release_version" / "artwork" / "images" / "0001.jpg"
    assert art.answer == "Yes" and by_id["artwork/0001.jpg/1"].answer == "No"
    assert art.question == "Is this artwork? Please answer yes or no."
    code = by_id["code_reasoning/0001.png/1"]
    assert code.image == tmp_path / "MME_Benchmark_release_version" / "code_reasoning" / "0001.png"
    assert code.extra == {"subtask": "code_reasoning", "image_id": "0001.png", "group": "cognition"}
    assert sum(r.extra["group"] == "perception" for r in records) == 2 * len(PERCEPTION) == 20
    assert sum(r.extra["group"] == "cognition" for r in records) == 2 * len(COGNITION) == 8


def test_subtask_selection_and_splits_keep_an_images_questions_together(tmp_path):
    root = build_mme(tmp_path)
    assert {r.category for r in load_benchmark("mme", root, subset=["OCR", "color"])} == {"OCR", "color"}
    with pytest.raises(DavspError, match="unknown MME subtask 'ocr'"):
        load_benchmark("mme", root, subset="ocr")
    seen = []
    for split in ("train", "val", "test"):
        records = load_benchmark("mme", root, split=split)
        assert len(records) == 2 * len({r.image for r in records})  # both questions of an image together
        seen += [r.id for r in records]
    assert len(seen) == len(set(seen)) == 28

def test_missing_image_is_named_with_its_likely_file(tmp_path):
    root = build_mme(tmp_path, skip_image="scene/0001.jpg")
    report = check_benchmark("mme", root)
    assert report.missing == [root / "scene" / "images" / "0001.jpg"]
    assert report.records == 28 and report.images == 14


def test_missing_subtask_folder_and_bad_line(tmp_path):
    root = build_mme(tmp_path)
    (root / "count" / "0001.txt").write_text("How many? Please answer yes or no.\tMaybe\n")
    with pytest.raises(DavspError, match=r"count/0001\.txt:1: expected 'question<TAB>Yes'"):
        load_benchmark("mme", root)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DavspError, match="existence: MME subtask folder not found"):
        load_benchmark("mme", empty)
