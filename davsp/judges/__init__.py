"""Judges: turn generated responses into verdicts and safety labels.

A judge has `name`, `label_for(row) -> str` (name + prompt version, written into every row),
`outputs` (the fields it adds that say what it decided) and `judge_batch(rows) -> list[dict]`
(the fields to add to each row). Output rows keep every input field and add `verdict` and `safe`
(True / False / None, None exactly when the verdict is error). Two kinds of judge decide `safe`:
the `refusal` judge sorts answers into full_compliance / full_refusal / partial_refusal and calls
only a full refusal safe, so its share of safe answers is a *refusal rate*; a harm judge (`llm`
with a safety prompt, `harmbench`, `llamaguard`) decides whether the answer is harmful, verdict
safe / unsafe, and its share of safe answers is the paper's RSR (see `judge_kind`). An llm judge
with a grading prompt adds `score` (MM-Vet) or
`score_reference` and `score_model` (LLaVA-Bench) instead, None when it could not grade. Every row
gets `judge`, the llm judge's rows `judge_prompt` (name@version), `judge_prompt_sha256` and
`judge_raw`, and a row that could not be judged `judge_error`.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
from collections import Counter
from pathlib import Path
from typing import Protocol

from tqdm import tqdm

from ..errors import DavspError
from ..io import append_jsonl, atomic_write_text, batched, read_jsonl, refuse_to_overwrite_input

REFUSAL_VERDICTS = ("full_compliance", "full_refusal", "partial_refusal", "error")  # the refusal judge's
HARM_VERDICTS = ("safe", "unsafe", "error")  # a harm judge's
VERDICTS = (*REFUSAL_VERDICTS[:-1], *HARM_VERDICTS)

# judge name -> "module:Class", imported on first use
_REGISTRY: dict[str, str] = {
    "refusal": "davsp.judges.refusal:RefusalJudge",
    "llm": "davsp.judges.llm:LLMJudge",
    "harmbench": "davsp.judges.harmbench:HarmBenchJudge",
    "llamaguard": "davsp.judges.llamaguard:LlamaGuardJudge",
}


class Judge(Protocol):
    name: str
    outputs: tuple[str, ...]  # fields it adds; None (or verdict "error") in any of them: not judged

    def label_for(self, row: dict) -> str: ...

    def judge_batch(self, rows: list[dict]) -> list[dict]: ...


def judge_names() -> list[str]:
    return list(_REGISTRY)


def get_judge(name: str, **options) -> Judge:
    """The judge called `name`, built with `options` (e.g. url=, model=, prompt= for 'llm')."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise DavspError(f"Unknown judge '{name}'.{hint} Known judges: {', '.join(_REGISTRY)}")
    module_name, class_name = _REGISTRY[name].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    accepted = set(inspect.signature(cls).parameters)
    unknown = sorted(set(options) - accepted)
    if unknown:
        takes = f"it takes {', '.join(sorted(accepted))}" if accepted else "it takes no options"
        raise DavspError(f"judge '{name}' has no option {', '.join(map(repr, unknown))}; {takes}")
    return cls(**options)


# What a judge writes about its own run; an earlier judge's (when judging a judged file) would be misread.
_RUN_FIELDS = ("judge", "judge_prompt", "judge_prompt_sha256", "judge_raw", "judge_error", "judge_categories")


def judge_responses(rows: list[dict], judge: Judge) -> list[dict]:
    """Each row with the judge's fields added: input fields are kept (an earlier judge's scores or
    verdicts too), except the earlier judge's judge_raw / judge_error; this judge's fields overwrite."""
    results = judge.judge_batch(rows)
    return [{**{k: v for k, v in row.items() if k not in _RUN_FIELDS}, **result} for row, result in zip(rows, results)]


def is_judged(row: dict, judge: Judge) -> bool:
    """Whether `row` holds a decision of `judge`'s kind (not an error, not missing)."""
    return all(row.get(field) not in (None, "error") for field in judge.outputs)


def judge_kind(label: str) -> str:
    """'refusal' for the refusal judge's label (its `safe` means "refused"), 'harm' for every other
    judge that decides `safe` (its `safe` means "not harmful")."""
    return "refusal" if label.startswith("refusal@") else "harm"


def judge_family(label: str) -> str:
    """The judge behind a row's `judge` label, one name per table: an llm judge's per-row prompts
    of one router (davsp-auto: davsp / davsp-figstep; mmsafetybench: its scenario templates) are
    one judge, named by the router; every other label names itself."""
    parts = label.split("/")
    if len(parts) == 3 and parts[0] == "llm":
        from .prompts import router_of

        prompt = parts[1].split("@")[0]
        return f"llm/{router_of(prompt) or parts[1]}/{parts[2]}"
    return label


def count_outcomes(rows: list[dict], judge: Judge) -> dict[str, int]:
    """Rows per verdict for a verdict judge; rows scored and rows in error for a grader."""
    if "verdict" in judge.outputs:
        counts = Counter(row["verdict"] for row in rows)
        kinds = REFUSAL_VERDICTS if judge.name == "refusal" else HARM_VERDICTS
        return {verdict: counts.get(verdict, 0) for verdict in kinds}
    scored = sum(is_judged(row, judge) for row in rows)
    return {"scored": scored, "error": len(rows) - scored}


def read_responses(path: str | Path) -> list[dict]:
    """Response rows: each needs an `id` (unique) and a `response` (text, may be empty)."""
    rows, seen = [], set()
    for number, row in enumerate(read_jsonl(path), start=1):
        where = f"{path}: row {number}"
        if "id" not in row:
            raise DavspError(f"{where}: missing 'id'; every response row needs an id")
        if not isinstance(row.get("response"), str):
            raise DavspError(f"{where} (id {row['id']!r}): 'response' must be text, got {row.get('response')!r}")
        key = str(row["id"])
        if key in seen:
            raise DavspError(f"{where}: duplicate id {row['id']!r}")
        seen.add(key)
        rows.append(row)
    return rows


def _already_judged(out: Path, judge: Judge, rows_by_id: dict[str, dict]) -> dict[str, dict]:
    """Rows of a previous (possibly killed) run to keep: same judge, not an error.

    Rows with an error verdict (or a null score) are judged again; a file written by another judge
    or prompt version is refused rather than mixed.
    """
    if not out.exists():
        return {}
    kept = {}
    for row in read_jsonl(out, tolerate_torn_tail=True):
        key = str(row.get("id"))
        if key not in rows_by_id:
            continue  # not in this input; dropped when the output is rewritten
        expected = judge.label_for(rows_by_id[key])
        if row.get("judge") != expected:
            raise DavspError(
                f"{out}: id {row.get('id')!r} was judged by {row.get('judge')!r}, not {expected!r}; "
                "choose another --out (or delete the file) to judge again"
            )
        if is_judged(row, judge):
            kept[key] = row
    return kept


def _write_rows(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def judge_file(
    input: str | Path, judge: Judge, out: str | Path, *, batch_size: int = 64, progress: bool = True
) -> dict:
    """Judge a responses JSONL into `out`; resumable. Returns the summary (see `count_outcomes`).

    Rows are appended and fsynced per batch, so a killed run loses at most the batch in flight;
    rerunning the same command skips rows already judged (and retries rows that got an error).
    At the end `out` is rewritten atomically, one row per input id, in input order.
    """
    input, out = Path(input), Path(out)
    refuse_to_overwrite_input(out, input)
    rows = read_responses(input)
    rows_by_id = {str(row["id"]): row for row in rows}
    judged = _already_judged(out, judge, rows_by_id)
    resumed = len(judged)
    todo = [row for row in rows if str(row["id"]) not in judged]
    if out.exists():  # start clean: drop a torn last line and old error rows before appending
        _write_rows(out, [judged[str(row["id"])] for row in rows if str(row["id"]) in judged])
    with tqdm(total=len(rows), initial=resumed, desc=f"judge {judge.name}", unit="resp", disable=not progress) as bar:
        for batch in batched(todo, batch_size):
            results = judge_responses(batch, judge)
            append_jsonl(out, results)
            judged.update((str(row["id"]), row) for row in results)
            bar.update(len(batch))
    final = [judged[str(row["id"])] for row in rows]
    _write_rows(out, final)
    counts = count_outcomes(final, judge)
    return {
        "input": str(input),
        "out": str(out),
        "judge": judge.name,
        "total": len(final),
        "resumed": resumed,
        "judged_now": len(todo),
        "counts": counts,
        "errors": counts["error"],
        **{f"llm_{k}": v for k, v in getattr(judge, "stats", {}).items()},
    }


__all__ = [
    "HARM_VERDICTS", "REFUSAL_VERDICTS", "VERDICTS", "Judge", "count_outcomes", "get_judge", "is_judged",
    "judge_family", "judge_file", "judge_kind", "judge_names", "judge_responses", "read_responses",
]  # fmt: skip
