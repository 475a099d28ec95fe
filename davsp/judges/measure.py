"""Measure a judge against human labels: `davsp judge --evaluate-labelled`.

Labels come in one of two kinds, told apart by their values:
- refusal classes (full_compliance / full_refusal / partial_refusal, numbered forms such as
  "2_full_refusal" too), as in XSTest's labelled completions: the refusal judges are scored on
  the three classes, and on the binary view the refusal rate uses (safe = full_refusal);
- harmful yes / no (yes, no, harmful, not_harmful, unsafe, safe, true, false, 1, 0): every judge
  is scored on "is the answer harmful?", which is what RSR asks. The refusal judges' call is
  "harmful unless fully refused".

Without a judge, the offline refusal judge and its two GCG baselines are measured; with one
(`harmbench`, `llamaguard`, `llm`), that judge is run on the labelled rows. For each: accuracy,
Cohen's kappa, the confusion table (gold x predicted) and per-class precision / recall. Rows the
judge could not judge (verdict error) are left out of the scores and counted.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from ..errors import DavspError
from .agreement import cohens_kappa, confusion, per_class_scores
from .refusal import CLASSES, DETECTORS, verdict_is_safe

HARMFUL_LABELS = {
    "yes": True, "harmful": True, "unsafe": True, "true": True, "1": True,
    "no": False, "not_harmful": False, "harmless": False, "unharmful": False, "safe": False, "false": False, "0": False,
}  # fmt: skip
REFUSAL, HARM = "refusal classes", "harmful yes/no"


def read_label(value: str) -> tuple[str, str | bool] | None:
    """(kind, label) for a label value, or None when it is neither kind."""
    text = value.strip().lower().replace(" ", "_").replace("-", "_")
    refusal = re.sub(r"^\d+_", "", text)
    if refusal in CLASSES:
        return REFUSAL, refusal
    return (HARM, HARMFUL_LABELS[text]) if text in HARMFUL_LABELS else None


def read_labelled(paths: list[str | Path], label_column: str, response_column: str,
                  question_column: str | None = None) -> tuple[str, list[dict]]:
    """(label kind, rows) from CSV files; each row has id (file:line), response, gold and, with
    `question_column`, question. Every label must be of the same kind as the first."""
    rows, kind = [], None
    for path in map(Path, paths):
        if not path.is_file():
            raise DavspError(f"{path}: file not found")
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            for column in filter(None, (label_column, response_column, question_column)):
                if column not in (reader.fieldnames or []):
                    raise DavspError(f"{path}: no column {column!r}; columns are {', '.join(reader.fieldnames or [])}")
            for number, row in enumerate(reader, start=2):
                where = f"{path}:{number}"
                label = read_label(row[label_column] or "")
                if label is None or (kind is not None and label[0] != kind):
                    expected = kind or f"{REFUSAL} or {HARM}"
                    raise DavspError(
                        f"{where}: label {row[label_column]!r} is not one of the {expected} ({', '.join(CLASSES)}, "
                        "numbered forms like '2_full_refusal' too; or yes/no, harmful/not_harmful, unsafe/safe, 1/0); "
                        "one file's labels are all of one kind"
                    )
                kind = label[0]
                item = {"id": where, "response": row[response_column] or "", "gold": label[1]}
                if question_column:
                    item["question"] = row[question_column] or ""
                rows.append(item)
    if not rows:
        raise DavspError(f"{', '.join(map(str, paths))}: no labelled rows")
    return kind, rows


def score(gold: list, predicted: list, classes: tuple) -> dict:
    """Accuracy, kappa, confusion (as [gold, predicted, count]) and per-class scores; None predictions
    (judge errors) are left out and counted."""
    pairs = [(g, p) for g, p in zip(gold, predicted) if p is not None]
    kept_gold, kept_predicted = [g for g, _ in pairs], [p for _, p in pairs]
    table = confusion(kept_gold, kept_predicted)
    return {
        "n": len(pairs),
        "errors": len(gold) - len(pairs),
        "accuracy": sum(g == p for g, p in pairs) / len(pairs) if pairs else None,
        "kappa": cohens_kappa(kept_gold, kept_predicted),
        "confusion": [[g, p, table[g, p]] for g, p in sorted(table, key=str)],
        "per_class": per_class_scores(kept_gold, kept_predicted, classes),
    }


def _refusal_detector_predictions(kind: str, rows: list[dict]) -> dict[str, list]:
    """Each offline detector's call per row: its class (refusal labels) or "harmful?" (harm labels)."""
    predictions = {}
    for name, detect in DETECTORS.items():
        classes = [detect(row["response"]) for row in rows]
        predictions[name] = classes if kind == REFUSAL else [not verdict_is_safe(c) for c in classes]
    return predictions


def _judge_predictions(kind: str, rows: list[dict], judge, batch_size: int) -> dict[str, list]:
    if kind == REFUSAL and judge.name != "refusal":
        raise DavspError(f"the labels are {REFUSAL}, but --judge {judge.name} decides whether an answer is harmful: "
                         "measure it on harmful yes/no labels")
    predicted = []
    for start in range(0, len(rows), batch_size):
        for result in judge.judge_batch(rows[start : start + batch_size]):
            if result["verdict"] == "error":
                predicted.append(None)
            elif kind == REFUSAL:
                predicted.append(result["verdict"])
            else:
                predicted.append(not result["safe"])
    return {judge.name: predicted}


def evaluate_labelled(paths: list[str | Path], label_column: str = "final_label", response_column: str = "completion",
                      *, question_column: str | None = None, judge=None, batch_size: int = 16) -> dict:
    """Each detector's (or `judge`'s) scores against the gold labels, in the labels' own terms."""
    kind, rows = read_labelled(paths, label_column, response_column, question_column)
    gold = [row["gold"] for row in rows]
    if judge is None or judge.name == "refusal":
        predictions = _refusal_detector_predictions(kind, rows)
    else:
        predictions = _judge_predictions(kind, rows, judge, batch_size)
    classes = CLASSES if kind == REFUSAL else (True, False)
    report = {"n": len(rows), "label_kind": kind, "gold_counts": {str(c): gold.count(c) for c in classes},
              "detectors": {}}
    for name, predicted in predictions.items():
        result = score(gold, predicted, classes)
        if kind == REFUSAL:  # the binary view the refusal rate uses
            result["safe"] = per_class_scores([str(verdict_is_safe(g)) for g in gold],
                                              [str(verdict_is_safe(p)) for p in predicted], ("True",))["True"]
        report["detectors"][name] = result
    return report


__all__ = ["HARM", "HARMFUL_LABELS", "REFUSAL", "evaluate_labelled", "read_label", "read_labelled", "score"]
