import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from davsp.data.benchmarks import check_benchmark, load_benchmark
from davsp.data.mmsafetybench import load_mmsafetybench
from davsp.errors import DavspError

ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mm-safetybench"


@pytest.fixture(scope="module")
def full():
    return load_mmsafetybench(ROOT)


def test_all_1680_questions_parse_into_three_image_types(full):
    assert len(full) == 3 * 1680
    assert len({r.id for r in full}) == len(full)
    assert Counter(r.extra["image_type"] for r in full) == {"SD": 1680, "TYPO": 1680, "SD_TYPO": 1680}
    assert len({r.category for r in full}) == 13
    assert {r.benchmark for r in full} == {"mm-safetybench"}
    first = full[0]
    assert first.id == "01-Illegal_Activitiy/0/SD"
    assert first.image == ROOT / "imgs" / "01-Illegal_Activitiy" / "SD" / "0.jpg"
    assert first.image.is_absolute()
    assert first.extra["key_phrase"] == "hack into someone's bank account"


def test_sd_pairs_with_sd_question_and_typo_types_with_rephrased_question(full):
    by_id = {r.id: r for r in full}
    table = json.loads((ROOT / "processed_questions" / "06-Fraud.json").read_text())
    for qid in ("0", "17", "153"):
        assert by_id[f"06-Fraud/{qid}/SD"].question == table[qid]["Rephrased Question(SD)"]
        assert by_id[f"06-Fraud/{qid}/TYPO"].question == table[qid]["Rephrased Question"]
        assert by_id[f"06-Fraud/{qid}/SD_TYPO"].question == table[qid]["Rephrased Question"]
    assert by_id["01-Illegal_Activitiy/0/SD"].question.startswith("The image shows")
    assert by_id["01-Illegal_Activitiy/0/TYPO"].question.startswith("The bottom of the image shows")


def test_tiny_version_is_the_official_168_ids():
    tiny = load_mmsafetybench(ROOT, tiny=True)
    questions = {(r.extra["scenario"], r.extra["question_id"]) for r in tiny}
    assert len(questions) == 168 and len(tiny) == 3 * 168
    assert ("01-Illegal_Activitiy", "5") in questions and ("01-Illegal_Activitiy", "0") not in questions


def test_image_type_filter_and_unknown_type():
    sd = load_mmsafetybench(ROOT, image_types=["SD"])
    assert len(sd) == 1680 and {r.extra["image_type"] for r in sd} == {"SD"}
    with pytest.raises(DavspError, match="SD\\+TYPO.*choose from SD, TYPO, SD_TYPO"):
        load_mmsafetybench(ROOT, image_types=["SD+TYPO"])


def test_splits_keep_all_image_types_of_a_question_together_and_cover_everything():
    parts = {s: load_benchmark("mm-safetybench", ROOT, split=s, check_images=False) for s in ("train", "val", "test")}
    question_sets = {s: {r.id.rsplit("/", 1)[0] for r in recs} for s, recs in parts.items()}
    assert sum(len(q) for q in question_sets.values()) == 1680
    assert not (question_sets["train"] & question_sets["test"]) and not (question_sets["val"] & question_sets["test"])
    for records in parts.values():
        assert all(n == 3 for n in Counter(r.id.rsplit("/", 1)[0] for r in records).values())
    assert 0.45 < len(question_sets["train"]) / 1680 < 0.55 and 0.35 < len(question_sets["test"]) / 1680 < 0.45
    again = load_benchmark("mm-safetybench", ROOT, split="test", check_images=False)
    assert [r.id for r in again] == [r.id for r in parts["test"]]


def test_tiny_test_split_is_the_tiny_part_of_the_full_test_split():
    full_test = {r.id for r in load_benchmark("mm-safetybench", ROOT, split="test", check_images=False)}
    tiny_test = {r.id for r in load_benchmark("mm-safetybench", ROOT, tiny=True, split="test", check_images=False)}
    tiny = {r.id for r in load_mmsafetybench(ROOT, tiny=True)}
    assert tiny_test == tiny & full_test


def test_missing_images_are_listed_and_block_generation():
    report = check_benchmark("mm-safetybench", ROOT, tiny=True)
    assert report.records == report.images == 504 and len(report.missing) == 504
    assert report.counts["image_type"] == {"SD": 168, "TYPO": 168, "SD_TYPO": 168}
    with pytest.raises(DavspError, match=r"504 of 504 images not found.*01-Illegal_Activitiy/SD/5\.jpg"):
        load_benchmark("mm-safetybench", ROOT, tiny=True)


def _write_synthetic(root: Path, table: dict, tiny=None) -> None:
    (root / "processed_questions").mkdir(parents=True)
    (root / "processed_questions" / "01-Test.json").write_text(json.dumps(table))
    if tiny is not None:
        (root / "TinyVersion_ID_List.json").write_text(json.dumps(tiny))


def _question(n: int) -> dict:
    return {
        "Question": f"q{n}?",
        "Key Phrase": f"phrase {n}",
        "Rephrased Question": f"bottom {n}",
        "Rephrased Question(SD)": f"image {n}",
    }


def test_loads_with_images_present(tmp_path):
    _write_synthetic(tmp_path, {"0": _question(0), "1": _question(1)})
    for image_type in ("SD", "TYPO", "SD_TYPO"):
        (tmp_path / "imgs" / "01-Test" / image_type).mkdir(parents=True)
        for qid in ("0", "1"):
            Image.new("RGB", (4, 4)).save(tmp_path / "imgs" / "01-Test" / image_type / f"{qid}.jpg")
    records = load_benchmark("mm-safetybench", tmp_path, limit=4)
    assert [r.id for r in records] == ["01-Test/0/SD", "01-Test/0/TYPO", "01-Test/0/SD_TYPO", "01-Test/1/SD"]


def test_bad_files_name_the_file_and_question(tmp_path):
    broken = dict(_question(0))
    del broken["Rephrased Question(SD)"]
    _write_synthetic(tmp_path, {"0": broken})
    with pytest.raises(DavspError, match=r"01-Test\.json: question '0': missing or empty 'Rephrased Question\(SD\)'"):
        load_mmsafetybench(tmp_path)
    (tmp_path / "processed_questions" / "01-Test.json").write_text("{not json")
    with pytest.raises(DavspError, match=r"01-Test\.json: not valid JSON"):
        load_mmsafetybench(tmp_path)
    with pytest.raises(DavspError, match="processed_questions"):
        load_mmsafetybench(tmp_path / "nowhere")


def test_tiny_list_naming_unknown_ids_is_an_error(tmp_path):
    _write_synthetic(tmp_path, {"0": _question(0)}, tiny=[{"Scenario": "01-Test", "Sampled_ID_List": [0, 7]}])
    with pytest.raises(DavspError, match=r"ids \['7'\] of '01-Test'"):
        load_mmsafetybench(tmp_path, tiny=True)
    (tmp_path / "TinyVersion_ID_List.json").unlink()
    with pytest.raises(DavspError, match="TinyVersion_ID_List.json: MM-SafetyBench tiny-version id list not found"):
        load_mmsafetybench(tmp_path, tiny=True)
