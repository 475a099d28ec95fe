"""How far two judges (or a judge and gold labels) agree: confusion table, Cohen's kappa, per-class P/R,
and, for `davsp evaluate`, every pair of judges that judged the same responses, with the rows they disagree on."""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DavspError
from ..io import read_jsonl


def confusion(a: Sequence[Hashable], b: Sequence[Hashable]) -> dict[tuple, int]:
    """Counts of (label in a, label in b) pairs."""
    assert len(a) == len(b)
    return dict(Counter(zip(a, b)))


def cohens_kappa(a: Sequence[Hashable], b: Sequence[Hashable]) -> float | None:
    """Cohen's kappa (p_o - p_e) / (1 - p_e); None when undefined (no items, or p_e == 1)."""
    n = len(a)
    if n == 0:
        return None
    observed = sum(x == y for x, y in zip(a, b)) / n
    count_a, count_b = Counter(a), Counter(b)
    expected = sum(count_a[label] * count_b[label] for label in count_a) / (n * n)
    if expected == 1:
        return None
    return (observed - expected) / (1 - expected)


def per_class_scores(gold: Sequence, predicted: Sequence, classes: Sequence) -> dict[str, dict]:
    """Precision, recall, F1 and support per class; a ratio with a zero denominator is None."""
    scores = {}
    for label in classes:
        tp = sum(g == label and p == label for g, p in zip(gold, predicted))
        n_pred = sum(p == label for p in predicted)
        n_gold = sum(g == label for g in gold)
        precision = tp / n_pred if n_pred else None
        recall = tp / n_gold if n_gold else None
        f1 = 2 * precision * recall / (precision + recall) if precision and recall else (0.0 if n_gold else None)
        scores[str(label)] = {
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "support": n_gold,
            "predicted": n_pred,
        }
    return scores


@dataclass
class Agreement:
    field: str
    n: int  # ids judged (non-error) in both files
    kappa: float | None
    observed: float | None  # raw share of equal labels
    table: dict[tuple, int]
    labels: list
    errors_excluded: int  # ids in both files where either judge returned an error
    only_in_a: int
    only_in_b: int
    notes: list[str] = field(default_factory=list)


def _by_id(path: str | Path) -> dict[str, dict]:
    rows = {}
    for number, row in enumerate(read_jsonl(path), start=1):
        if "id" not in row:
            raise DavspError(f"{path}:{number}: row has no 'id'; compare judged files written by `davsp judge`")
        rows[str(row["id"])] = row
    return rows


def compare_files(a: str | Path, b: str | Path, on: str = "safe") -> Agreement:
    """Agreement of two judged JSONL files on `safe` or `verdict`, over ids present in both."""
    if on not in ("safe", "verdict"):
        raise DavspError(f"--on {on!r}: choose 'safe' or 'verdict'")
    rows_a, rows_b = _by_id(a), _by_id(b)
    common = [i for i in rows_a if i in rows_b]
    for path, rows in ((a, rows_a), (b, rows_b)):
        missing = [i for i in common if "verdict" not in rows[i]]
        if missing:
            raise DavspError(f"{path}: id {missing[0]!r} has no 'verdict'; is this a judged file?")
    judged = [i for i in common if rows_a[i]["verdict"] != "error" and rows_b[i]["verdict"] != "error"]
    labels_a = [rows_a[i][on] for i in judged]
    labels_b = [rows_b[i][on] for i in judged]
    table = confusion(labels_a, labels_b)
    return Agreement(
        field=on,
        n=len(judged),
        kappa=cohens_kappa(labels_a, labels_b),
        observed=(sum(x == y for x, y in zip(labels_a, labels_b)) / len(judged)) if judged else None,
        table=table,
        labels=sorted({*labels_a, *labels_b}, key=str),
        errors_excluded=len(common) - len(judged),
        only_in_a=len(rows_a) - len(common),
        only_in_b=len(rows_b) - len(common),
    )


def format_agreement(result: Agreement, name_a: str, name_b: str) -> str:
    """The kappa line and the confusion table (rows: a, columns: b) as plain text."""
    kappa = "undefined (one label only)" if result.kappa is None else f"{result.kappa:.3f}"
    observed = "n/a" if result.observed is None else f"{result.observed:.3f}"
    lines = [
        f"Cohen's kappa on '{result.field}': {kappa}  (observed agreement {observed}, n={result.n})",
        (
            f"excluded: {result.errors_excluded} with an error verdict; "
            f"{result.only_in_a} ids only in {name_a}, {result.only_in_b} only in {name_b}"
        ),
    ]
    if result.labels:
        names = [str(label) for label in result.labels]
        width = max(len(n) for n in names + ["a \\ b"]) + 2
        lines.append("a \\ b".ljust(width) + "".join(n.rjust(width) for n in names))
        for row_label in result.labels:
            cells = "".join(str(result.table.get((row_label, col), 0)).rjust(width) for col in result.labels)
            lines.append(str(row_label).ljust(width) + cells)
        lines.append(f"rows: {name_a}; columns: {name_b}")
    return "\n".join(lines)


def judges_agreement(pairs: dict[tuple, dict[str, dict]], *, response_chars: int = 2000) -> list[dict]:
    """Agreement on `safe` of every two judges over the responses both judged (errors left out).

    `pairs` maps a response key to {judge: judged row}. Each result: the two judges, n, kappa,
    observed agreement, the confusion table as [a's safe, b's safe, count] triples, the number of
    responses left out for an error, and every response they disagree on (key fields, question,
    response cut to `response_chars`, each judge's safe and raw reply) for a person to read.
    """
    judges = sorted({name for by_judge in pairs.values() for name in by_judge})
    results = []
    for i, a in enumerate(judges):
        for b in judges[i + 1 :]:
            both = [rows for rows in pairs.values() if a in rows and b in rows]
            judged = [rows for rows in both if rows[a].get("safe") is not None and rows[b].get("safe") is not None]
            labels_a = [rows[a]["safe"] for rows in judged]
            labels_b = [rows[b]["safe"] for rows in judged]
            n = len(judged)
            disagreements = []
            for rows in judged:
                if rows[a]["safe"] != rows[b]["safe"]:
                    row = rows[a]
                    disagreements.append({
                        **{k: row.get(k) for k in ("benchmark", "defense", "id", "image_type", "question")},
                        "response": str(row.get("response", ""))[:response_chars],
                        "safe": {a: rows[a]["safe"], b: rows[b]["safe"]},
                        "raw": {a: rows[a].get("judge_raw"), b: rows[b].get("judge_raw")},
                    })
            table = confusion(labels_a, labels_b)
            results.append({
                "judges": [a, b],
                "n": n,
                "kappa": cohens_kappa(labels_a, labels_b),
                "observed": (n - len(disagreements)) / n if n else None,
                "table": [[x, y, table[x, y]] for x, y in sorted(table, key=str)],
                "errors_excluded": len(both) - n,
                "disagreements": disagreements,
            })
    return results
