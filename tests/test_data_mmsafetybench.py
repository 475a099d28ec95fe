"""MM-SafetyBench in its upstream layout. Its questions are CC BY-NC 4.0, so they are not shipped in
this repository: `mmsb` writes a synthetic copy with the upstream file names, fields, id gaps,
tiny-version list and image folders, and every count below is derived from what it wrote."""

import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from davsp.data.benchmarks import check_benchmark, load_benchmark
from davsp.data.mmsafetybench import load_mmsafetybench
from davsp.errors import DavspError

# the upstream scenario files, spelling included ("Activitiy")
SCENARIOS = (
    "01-Illegal_Activitiy", "02-HateSpeech", "03-Malware_Generation", "04-Physical_Harm", "05-EconomicHarm",
    "06-Fraud", "07-Sex", "08-Political_Lobbying", "09-Privacy_Violence", "10-Legal_Opinion",
    "11-Financial_Advice", "12-Health_Consultation", "13-Gov_Decision",
)
WITH_IMAGES = "13-Gov_Decision"  # the one scenario whose tiny questions get their three images


def _upstream_row(name: str) -> dict:
    """A question with every field an upstream row has (synthetic text)."""
    changed = f"List the steps for {name}."
    rephrased = f"The bottom of the image shows {name}. List the steps for it."
    rephrased_sd = f"The image shows {name}. List the steps for it."
    return {
        "Question": f"How would one do {name}?",
        "GPT-Pred": f"[Changed Question]\n{changed}\n\n[Key Phrase]\n{name}\n\n[Phrase Type]\nactivity\n\n"
                    f"[Rephrased Question]\n{rephrased}",
        "Changed Question": changed,
        "Key Phrase": name,
        "Phrase Type": "activity",
        "Rephrased Question": rephrased,
        "Rephrased Question(SD)": rephrased_sd,
    }


@pytest.fixture(scope="module")
def mmsb(tmp_path_factory):
    """(root, {scenario: [question ids, numeric order]}, {scenario: tiny ids}) of a synthetic MM-SafetyBench.

    Scenario k has 50 + 10k questions, ids 0.. with 4 absent (upstream ids have gaps too) and written
    in string order, so a loader must sort them numerically; every id ending in 5 is in the tiny list.
    """
    root = tmp_path_factory.mktemp("mm-safetybench")
    (root / "processed_questions").mkdir()
    ids, tiny = {}, {}
    for k, scenario in enumerate(SCENARIOS, start=1):
        ids[scenario] = [str(i) for i in range(50 + 10 * k + 1) if i != 4]
        tiny[scenario] = [i for i in ids[scenario] if i.endswith("5")]
        table = {i: _upstream_row(f"phrase {k}-{i}") for i in sorted(ids[scenario])}
        (root / "processed_questions" / f"{scenario}.json").write_text(json.dumps(table, indent=4))
    (root / "TinyVersion_ID_List.json").write_text(
        json.dumps([{"Scenario": s, "Sampled_ID_List": [int(i) for i in tiny[s]]} for s in SCENARIOS], indent=4))
    for image_type in ("SD", "SD_TYPO", "TYPO"):
        (root / "imgs" / WITH_IMAGES / image_type).mkdir(parents=True)
        for qid in tiny[WITH_IMAGES]:
            Image.new("RGB", (8, 8), "white").save(root / "imgs" / WITH_IMAGES / image_type / f"{qid}.jpg")
    return root, ids, tiny


@pytest.fixture(scope="module")
def full(mmsb):
    return load_mmsafetybench(mmsb[0])


def test_every_question_parses_into_three_image_types(mmsb, full):
    root, ids, _ = mmsb
    questions = sum(len(v) for v in ids.values())
    assert len(full) == 3 * questions
    assert len({r.id for r in full}) == len(full)
    assert Counter(r.extra["image_type"] for r in full) == {"SD": questions, "TYPO": questions, "SD_TYPO": questions}
    assert Counter(r.category for r in full) == {s: 3 * len(v) for s, v in ids.items()}
    assert {r.benchmark for r in full} == {"mm-safetybench"}
    first = full[0]
    assert first.id == "01-Illegal_Activitiy/0/SD"
    assert first.image == root / "imgs" / "01-Illegal_Activitiy" / "SD" / "0.jpg"
    assert first.image.is_absolute()
    assert first.extra["key_phrase"] == "phrase 1-0"
    assert first.extra["original_question"] == "How would one do phrase 1-0?"
    order = [r.extra["question_id"] for r in full if r.category == "01-Illegal_Activitiy" and r.extra["image_type"] == "SD"]
    assert order == ids["01-Illegal_Activitiy"] and order[9:11] == ["10", "11"]  # numeric, not string, order


def test_sd_pairs_with_sd_question_and_typo_types_with_rephrased_question(mmsb, full):
    by_id = {r.id: r for r in full}
    table = json.loads((mmsb[0] / "processed_questions" / "06-Fraud.json").read_text())
    for qid in ("0", "17", "110"):
        assert by_id[f"06-Fraud/{qid}/SD"].question == table[qid]["Rephrased Question(SD)"]
        assert by_id[f"06-Fraud/{qid}/TYPO"].question == table[qid]["Rephrased Question"]
        assert by_id[f"06-Fraud/{qid}/SD_TYPO"].question == table[qid]["Rephrased Question"]
    assert by_id["01-Illegal_Activitiy/0/SD"].question.startswith("The image shows")
    assert by_id["01-Illegal_Activitiy/0/TYPO"].question.startswith("The bottom of the image shows")


def test_tiny_version_is_exactly_the_listed_ids(mmsb):
    root, _, tiny_ids = mmsb
    tiny = load_mmsafetybench(root, tiny=True)
    questions = {(r.extra["scenario"], r.extra["question_id"]) for r in tiny}
    assert questions == {(s, i) for s, listed in tiny_ids.items() for i in listed}
    assert len(tiny) == 3 * len(questions)
    assert ("01-Illegal_Activitiy", "5") in questions and ("01-Illegal_Activitiy", "0") not in questions


def test_image_type_filter_and_unknown_type(mmsb):
    root, ids, _ = mmsb
    sd = load_mmsafetybench(root, image_types=["SD"])
    assert len(sd) == sum(len(v) for v in ids.values()) and {r.extra["image_type"] for r in sd} == {"SD"}
    with pytest.raises(DavspError, match="SD\\+TYPO.*choose from SD, TYPO, SD_TYPO"):
        load_mmsafetybench(root, image_types=["SD+TYPO"])


def test_splits_keep_all_image_types_of_a_question_together_and_cover_everything(mmsb):
    root, ids, _ = mmsb
    questions = sum(len(v) for v in ids.values())
    parts = {s: load_benchmark("mm-safetybench", root, split=s, check_images=False) for s in ("train", "val", "test")}
    question_sets = {s: {r.id.rsplit("/", 1)[0] for r in recs} for s, recs in parts.items()}
    assert sum(len(q) for q in question_sets.values()) == questions
    assert set().union(*question_sets.values()) == {f"{s}/{i}" for s, v in ids.items() for i in v}
    assert not (question_sets["train"] & question_sets["test"]) and not (question_sets["val"] & question_sets["test"])
    for records in parts.values():
        assert all(n == 3 for n in Counter(r.id.rsplit("/", 1)[0] for r in records).values())
    # 50/10/40 by hash; with 1,560 questions a share is within ±0.05 of its target (≈4 standard errors)
    assert 0.45 < len(question_sets["train"]) / questions < 0.55 and 0.35 < len(question_sets["test"]) / questions < 0.45
    again = load_benchmark("mm-safetybench", root, split="test", check_images=False)
    assert [r.id for r in again] == [r.id for r in parts["test"]]


def test_tiny_test_split_is_the_tiny_part_of_the_full_test_split(mmsb):
    root = mmsb[0]
    full_test = {r.id for r in load_benchmark("mm-safetybench", root, split="test", check_images=False)}
    tiny_test = {r.id for r in load_benchmark("mm-safetybench", root, tiny=True, split="test", check_images=False)}
    tiny = {r.id for r in load_mmsafetybench(root, tiny=True)}
    assert tiny_test and tiny_test == tiny & full_test


def test_missing_images_are_listed_and_block_generation(mmsb):
    root, _, tiny_ids = mmsb
    listed = sum(len(v) for v in tiny_ids.values())
    present = 3 * len(tiny_ids[WITH_IMAGES])
    report = check_benchmark("mm-safetybench", root, tiny=True)
    assert report.records == report.images == 3 * listed and len(report.missing) == 3 * listed - present
    assert report.counts["image_type"] == {"SD": listed, "TYPO": listed, "SD_TYPO": listed}
    assert root / "imgs" / "01-Illegal_Activitiy" / "SD" / "5.jpg" in report.missing
    assert not any(WITH_IMAGES in str(p) for p in report.missing)
    with pytest.raises(DavspError, match=rf"{3 * listed - present} of {3 * listed} images not found"
                                         r".*01-Illegal_Activitiy/SD/5\.jpg"):
        load_benchmark("mm-safetybench", root, tiny=True)


def _write_synthetic(root: Path, table: dict, tiny=None) -> None:
    (root / "processed_questions").mkdir(parents=True)
    (root / "processed_questions" / "01-Test.json").write_text(json.dumps(table))
    if tiny is not None:
        (root / "TinyVersion_ID_List.json").write_text(json.dumps(tiny))


def _question(n: int) -> dict:
    """Only the four fields the loader reads (an upstream row has three more)."""
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
