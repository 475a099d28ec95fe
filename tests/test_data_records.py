import json

import pytest
from PIL import Image

from davsp.data.records import load_records
from davsp.errors import DavspError


@pytest.fixture
def folder(tmp_path):
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "a.png")
    return tmp_path


def test_jsonl_records(folder):
    (folder / "r.jsonl").write_text(
        json.dumps({"id": 7, "image": "a.png", "question": "q?", "answer": "x", "category": "c", "scenario": "s"}) + "\n")
    (record,) = load_records(folder / "r.jsonl")
    assert record.id == "7" and record.image == folder / "a.png" and record.answer == "x"
    assert record.category == "c" and record.extra == {"scenario": "s"}


def test_original_davsp_json(folder):
    (folder / "r.json").write_text(json.dumps({"12": {"image_path": "a.png", "question": "q?", "answer": "ok"}}))
    (record,) = load_records(folder / "r.json")
    assert (record.id, record.question, record.answer, record.image) == ("12", "q?", "ok", folder / "a.png")


@pytest.mark.parametrize("row, message", [
    ({"id": "a", "image": "a.png"}, "missing or empty 'question'"),
    ({"id": "a", "question": "q"}, "missing 'image'"),
    ({"id": "a", "image": "nope.png", "question": "q"}, "image not found"),
])
def test_bad_records_name_file_line_and_id(folder, row, message):
    (folder / "r.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(DavspError, match=message) as error:
        load_records(folder / "r.jsonl")
    assert "r.jsonl:1 (id 'a')" in str(error.value)


def test_duplicate_ids(folder):
    row = json.dumps({"id": "a", "image": "a.png", "question": "q"})
    (folder / "r.jsonl").write_text(row + "\n" + row + "\n")
    with pytest.raises(DavspError, match="duplicate id 'a'"):
        load_records(folder / "r.jsonl")
