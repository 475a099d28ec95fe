"""Cohen's kappa, the confusion table and per-class scores, and `compare_files` on judged JSONL."""

import json

import pytest

from davsp.errors import DavspError
from davsp.judges.agreement import (
    cohens_kappa,
    compare_files,
    confusion,
    format_agreement,
    per_class_scores,
)


def test_kappa_textbook_example():
    # 50 items; a says yes 25 times, b 30 times; they agree on 20 yes and 15 no: p_o 0.7, p_e 0.5
    a = ["yes"] * 20 + ["yes"] * 5 + ["no"] * 10 + ["no"] * 15
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohens_kappa(a, b) == pytest.approx(0.4)
    assert confusion(a, b) == {("yes", "yes"): 20, ("yes", "no"): 5, ("no", "yes"): 10, ("no", "no"): 15}


def test_kappa_edge_cases():
    assert cohens_kappa([], []) is None
    assert cohens_kappa([True, True], [True, True]) is None  # one label only: chance agreement is 1
    assert cohens_kappa([True, False], [False, True]) == pytest.approx(-1.0)


def test_per_class_scores():
    scores = per_class_scores(["a", "a", "b", "b"], ["a", "b", "b", "b"], ["a", "b", "c"])
    assert scores["a"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2, "predicted": 1}
    assert scores["b"]["precision"] == pytest.approx(2 / 3) and scores["b"]["recall"] == 1.0
    assert scores["c"]["precision"] is None and scores["c"]["recall"] is None


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_compare_files_excludes_errors_and_counts_unmatched(tmp_path):
    a = _write(tmp_path / "a.jsonl", [
        {"id": 1, "verdict": "full_refusal", "safe": True},
        {"id": 2, "verdict": "full_compliance", "safe": False},
        {"id": 3, "verdict": "partial_refusal", "safe": False},
        {"id": 4, "verdict": "error", "safe": None},
        {"id": 5, "verdict": "full_refusal", "safe": True},
    ])  # fmt: skip
    b = _write(tmp_path / "b.jsonl", [
        {"id": "1", "verdict": "full_refusal", "safe": True},
        {"id": "2", "verdict": "full_refusal", "safe": True},
        {"id": "3", "verdict": "full_compliance", "safe": False},
        {"id": "4", "verdict": "full_refusal", "safe": True},
        {"id": "9", "verdict": "full_refusal", "safe": True},
    ])  # fmt: skip
    result = compare_files(a, b)
    assert (result.n, result.errors_excluded, result.only_in_a, result.only_in_b) == (3, 1, 1, 1)
    assert result.table == {(True, True): 1, (False, True): 1, (False, False): 1}
    assert result.kappa == pytest.approx(cohens_kappa([True, False, False], [True, True, False]))
    text = format_agreement(result, "a", "b")
    assert "Cohen's kappa on 'safe': 0.400" in text and "1 with an error verdict" in text
    on_verdict = compare_files(a, b, on="verdict")
    assert on_verdict.table[("partial_refusal", "full_compliance")] == 1


def test_compare_files_needs_judged_rows(tmp_path):
    a = _write(tmp_path / "a.jsonl", [{"id": 1, "response": "x"}])
    with pytest.raises(DavspError, match="has no 'verdict'"):
        compare_files(a, a)
    with pytest.raises(DavspError, match="choose 'safe' or 'verdict'"):
        compare_files(a, a, on="judge")
