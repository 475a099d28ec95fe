import json
from pathlib import Path

import pytest
from PIL import Image

from davsp.data.benchmarks import check_benchmark, load_benchmark
from davsp.errors import DavspError

ITEMS = {
    "v1_0": {"imagename": "v1_0.png", "capability": ["ocr", "math"], "question": "What is x?", "answer": "-1<AND>-5"},
    "v1_1": {"imagename": "v1_1.jpg", "capability": ["rec"], "question": "What animal is this?", "answer": "cat"},
}


def build_mmvet(root: Path, items=ITEMS, images=True) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "mm-vet.json").write_text(json.dumps(items))
    if images:
        for item in items.values():
            Image.new("RGB", (4, 4)).save(root / "images" / item["imagename"])
    return root


def test_items_keep_ids_answers_and_capabilities(tmp_path):
    records = load_benchmark("mm-vet", build_mmvet(tmp_path))
    assert [r.id for r in records] == ["v1_0", "v1_1"]
    first = records[0]
    assert first.image == tmp_path / "images" / "v1_0.png" and first.answer == "-1<AND>-5"
    assert first.extra["capabilities"] == ["ocr", "math"] and first.category == "math+ocr"
    assert first.benchmark == "mm-vet"


def test_missing_image_and_bad_item(tmp_path):
    build_mmvet(tmp_path, images=False)
    missing = check_benchmark("mm-vet", tmp_path).missing
    assert missing == [tmp_path / "images" / "v1_0.png", tmp_path / "images" / "v1_1.jpg"]
    (tmp_path / "mm-vet.json").write_text(json.dumps({"v1_0": dict(ITEMS["v1_0"], capability="ocr")}))
    with pytest.raises(DavspError, match=r"mm-vet\.json: item 'v1_0': 'capability' must be a non-empty list"):
        load_benchmark("mm-vet", tmp_path, check_images=False)
