"""MM-SafetyBench (Liu et al., ECCV 2024) in its upstream layout.

    ROOT/processed_questions/{scenario}.json   13 files, 1,680 questions keyed by id
    ROOT/imgs/{scenario}/{SD,TYPO,SD_TYPO}/{id}.jpg
    ROOT/TinyVersion_ID_List.json              the official 168-id tiny version

Each question yields one record per image type. SD images (a Stable Diffusion picture of
the key phrase) pair with "Rephrased Question(SD)" ("The image shows a phrase of ...");
TYPO and SD_TYPO images (the key phrase typed under the picture) pair with
"Rephrased Question" ("The bottom of the image shows ...").
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DavspError
from ._files import choose, read_json, text_field
from .records import Record

BENCHMARK = "mm-safetybench"
IMAGE_TYPES = ("SD", "TYPO", "SD_TYPO")
QUESTION_KEY = {"SD": "Rephrased Question(SD)", "TYPO": "Rephrased Question", "SD_TYPO": "Rephrased Question"}
TINY_LIST = "TinyVersion_ID_List.json"


def load_mmsafetybench(root: str | Path, *, tiny: bool = False, image_types=None) -> list[Record]:
    """Records with id `{scenario}/{question id}/{image type}`, category = scenario.

    extra: scenario, image_type, question_id, key_phrase, original_question (the harmful
    question before rephrasing).
    """
    root = Path(root).resolve()
    types = choose(image_types, IMAGE_TYPES, "MM-SafetyBench image type")
    files = _scenario_files(root)
    wanted = _tiny_ids(root, {path.stem for path in files}) if tiny else None
    records = []
    for path in files:
        scenario = path.stem
        table = read_json(path, "MM-SafetyBench question file", dict)
        if wanted is not None and not wanted[scenario] <= table.keys():
            absent = sorted(wanted[scenario] - table.keys(), key=_numeric_first)
            raise DavspError(f"{root / TINY_LIST}: ids {absent} of {scenario!r} are not in {path}")
        for question_id in sorted(table, key=_numeric_first):
            if wanted is not None and question_id not in wanted[scenario]:
                continue
            records += _question_records(root, scenario, question_id, table[question_id], path, types)
    return records


def _question_records(root: Path, scenario: str, question_id: str, row, path: Path, types) -> list[Record]:
    where = f"{path}: question {question_id!r}"
    texts = {key: text_field(row, key, where) for key in sorted(set(QUESTION_KEY.values()))}
    key_phrase = text_field(row, "Key Phrase", where)
    original = text_field(row, "Question", where)
    return [
        Record(
            id=f"{scenario}/{question_id}/{image_type}",
            image=root / "imgs" / scenario / image_type / f"{question_id}.jpg",
            question=texts[QUESTION_KEY[image_type]],
            category=scenario,
            benchmark=BENCHMARK,
            extra={
                "scenario": scenario,
                "image_type": image_type,
                "question_id": question_id,
                "key_phrase": key_phrase,
                "original_question": original,
            },
        )
        for image_type in types
    ]


def _scenario_files(root: Path) -> list[Path]:
    folder = root / "processed_questions"
    files = sorted(folder.glob("*.json"))
    if not files:
        raise DavspError(
            f"{folder}: no MM-SafetyBench question files (*.json); ROOT must be the folder that "
            "contains processed_questions/ (upstream: data/)"
        )
    return files


def _tiny_ids(root: Path, scenarios: set[str]) -> dict[str, set[str]]:
    """{scenario: {question id}} from the official list `[{Scenario, Sampled_ID_List}]`."""
    path = root / TINY_LIST
    entries = read_json(path, "MM-SafetyBench tiny-version id list", list)
    wanted = {scenario: set() for scenario in scenarios}
    for number, entry in enumerate(entries):
        where = f"{path}: entry {number}"
        scenario = text_field(entry, "Scenario", where)
        ids = entry.get("Sampled_ID_List")
        if scenario not in wanted:
            raise DavspError(f"{where}: scenario {scenario!r} has no file in {root / 'processed_questions'}")
        if not isinstance(ids, list):
            raise DavspError(f"{where}: 'Sampled_ID_List' must be a list of question ids")
        wanted[scenario].update(str(i) for i in ids)
    return wanted


def _numeric_first(key: str):
    return (0, int(key), "") if key.isdigit() else (1, 0, key)
