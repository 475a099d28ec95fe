"""`davsp evaluate`: the paper's numbers from judged responses, per benchmark and defense.

Judged rows are grouped by (benchmark, defense) and each group goes to `metrics.evaluate_group`
(RSR with bootstrap CIs and breakdowns, over-refusal, MME, MM-Vet, LLaVA-Bench; see metrics.py).
An evaluation directory holds `tables.md`, `tables.csv`, `samples.jsonl` and `metrics.json`
(written last, so a directory with `metrics.json` is complete). `davsp report` reads it.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from tqdm import tqdm

from .defenses import DEFENSES
from .errors import DavspError
from .io import (
    atomic_write_json, atomic_write_text, package_versions, read_jsonl, refuse_to_overwrite_input, sha256_file,
)
from .metrics import MME_GROUP_OF, MME_SUBTASKS, VERDICTS, evaluate_group, is_harmful

SCHEMA = "davsp.evaluate/1"
BENCHMARK_ORDER = ("mm-safetybench", "figstep", "vlguard", "toy", "mm-vet", "mme", "llava-bench")


def ordered(names: Iterable[str], preferred: Sequence[str]) -> list[str]:
    """Known names in their canonical order, then the rest alphabetically."""
    names = set(names)
    return [n for n in preferred if n in names] + sorted(names - set(preferred))


def evaluate_rows(rows: Sequence[dict], *, resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict:
    """{benchmark: {defense: evaluate_group(...)}} over judged rows of any benchmarks and defenses."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        groups[row["benchmark"], row["defense"]].append(row)
    results: dict[str, dict] = {}
    for benchmark in ordered({b for b, _ in groups}, BENCHMARK_ORDER):
        defenses = ordered({d for b, d in groups if b == benchmark}, tuple(DEFENSES))
        results[benchmark] = {}
        for defense in tqdm(defenses, desc=f"evaluate {benchmark}", disable=None, leave=False):
            results[benchmark][defense] = evaluate_group(
                benchmark, groups[benchmark, defense], resamples=resamples, confidence=confidence, seed=seed)
    return results


# ---------------------------------------------------------------- loading judged rows


def row_key(row: dict) -> tuple:
    """What makes a judged row unique: MM-SafetyBench shows one question id under three image types."""
    return row["benchmark"], row["defense"], str(row["id"]), row.get("image_type")


def validate_row(row: dict, where: str) -> None:
    for field in ("id", "benchmark", "defense"):
        if row.get(field) is None:
            raise DavspError(f"{where}: missing '{field}'; is this a `davsp judge` output file?")
    if "verdict" in row and row["verdict"] not in VERDICTS:
        raise DavspError(f"{where}: verdict {row['verdict']!r} is not one of {', '.join(VERDICTS)}")
    if "safe" in row and row["safe"] not in (True, False, None):
        raise DavspError(f"{where}: 'safe' must be true, false or null, got {row['safe']!r}")


def load_judged(paths: Sequence[str | Path]) -> list[dict]:
    """Rows of judged JSONL files, validated; a row seen twice (same file passed twice, or two
    judges' outputs of one run) is an error rather than a silently doubled count."""
    rows: list[dict] = []
    seen: dict[tuple, str] = {}
    for path in paths:
        count = 0
        for number, row in enumerate(read_jsonl(path), start=1):
            where = f"{path}:{number}"
            validate_row(row, where)
            key = row_key(row)
            if key in seen:
                raise DavspError(f"{where}: row {row['id']!r} ({row['benchmark']}, defense {row['defense']}) "
                                 f"already read at {seen[key]}; pass each judged file once")
            seen[key] = where
            rows.append(row)
            count += 1
        if count == 0:
            raise DavspError(f"{path}: no judged rows")
    return rows


def pick_samples(rows: Sequence[dict], *, per_benchmark: int = 3, seed: int = 0) -> list[dict]:
    """A few queries per benchmark, with every defense's response to each, for side-by-side reading.

    Queries answered under every defense are preferred, harmful ones first (what the defense is for).
    """
    rng = np.random.default_rng(seed)
    samples = []
    for benchmark in ordered({r["benchmark"] for r in rows}, BENCHMARK_ORDER):
        mine = [r for r in rows if r["benchmark"] == benchmark]
        defenses = {r["defense"] for r in mine}
        by_query: dict[tuple, list[dict]] = defaultdict(list)
        for row in mine:
            by_query[row_key(row)[2:]].append(row)
        queries = sorted(by_query, key=str)
        answered_by_all = [q for q in queries if len(by_query[q]) == len(defenses)] or queries
        pool = [q for q in answered_by_all if is_harmful(by_query[q][0])] or answered_by_all
        chosen = sorted(rng.choice(len(pool), size=min(per_benchmark, len(pool)), replace=False))
        for index in chosen:
            group = by_query[pool[index]]
            for defense in ordered(defenses, tuple(DEFENSES)):
                samples += [sample_fields(r) for r in group if r["defense"] == defense]
    return samples


def sample_fields(row: dict) -> dict:
    keep = ("id", "benchmark", "defense", "category", "image_type", "question", "response", "verdict", "safe")
    return {k: row.get(k) for k in keep if k in row}


# ---------------------------------------------------------------- tables


def entry(table: str, row: str, column: str, value: float | None, *, ci=None, n=None, errors=None) -> dict:
    """One cell of a results table; `column` is the defense (or run) it belongs to."""
    return {"table": table, "row": row, "column": column, "value": value,
            "ci_low": ci[0] if ci else None, "ci_high": ci[1] if ci else None, "n": n, "errors": errors}


def rate_entry(table: str, row: str, defense: str, r: dict) -> dict:
    """A rate as a percentage cell."""
    percent = (lambda x: None if x is None else 100.0 * x)
    ci = [percent(x) for x in r["ci"]] if r["ci"] else None
    return entry(table, row, defense, percent(r["value"]), ci=ci, n=r["n"], errors=r["errors"])


def metric_entries(results: dict) -> list[dict]:
    """Flatten `evaluate_rows` output (or metrics.json's "results") into table cells."""
    cells: list[dict] = []
    # metrics.json stores keys sorted; tables show benchmarks and defenses in their usual order.
    for benchmark in ordered(results, BENCHMARK_ORDER):
        for defense in ordered(results[benchmark], tuple(DEFENSES)):
            cells += group_entries(benchmark, defense, results[benchmark][defense])
    return cells


def group_entries(benchmark: str, defense: str, res: dict) -> list[dict]:
    cells = []
    if "rsr" in res:
        cells.append(rate_entry("RSR (%)", benchmark, defense, res["rsr"]))
        for field, parts in res.get("rsr_by", {}).items():
            table = "RSR (%)" if field == "image_type" else f"RSR by {field} (%)"
            cells += [rate_entry(table, f"{benchmark} {key}", defense, r) for key, r in parts.items()]
    if "over_refusal" in res:
        cells.append(rate_entry("Over-refusal (%)", benchmark, defense, res["over_refusal"]))
    if "mme" in res:
        mme = res["mme"]
        cells += [entry("Utility", f"MME {group}", defense, mme[group]) for group in (*MME_SUBTASKS, "total")]
        for name in ordered(mme["subtasks"], tuple(MME_GROUP_OF)):
            subtask = mme["subtasks"][name]
            cells.append(entry("MME subtasks (acc + acc+)", name, defense, subtask["score"], n=subtask["questions"]))
    if "mm_vet" in res:
        total = res["mm_vet"]["total"]
        cells.append(entry("Utility", "MM-Vet total", defense, total["score"], n=total["n"], errors=total["errors"]))
        cells += [entry("MM-Vet by capability", cap, defense, s["score"], n=s["n"], errors=s["errors"])
                  for cap, s in res["mm_vet"]["by_capability"].items()]
    if "llava_bench" in res:
        overall = res["llava_bench"]["overall"]
        cells.append(entry("Utility", "LLaVA-Bench relative", defense, overall["relative"],
                           n=overall["n"], errors=overall["errors"]))
        cells += [entry("LLaVA-Bench relative by category", cat, defense, s["relative"], n=s["n"], errors=s["errors"])
                  for cat, s in res["llava_bench"]["by_category"].items()]
    return cells


# Headline tables and how their rows are labelled when merged into one summary table.
HEADLINE_TABLES = {"RSR (%)": "RSR ", "Over-refusal (%)": "Over-refusal ", "Utility": ""}


def format_number(value: float | int | None) -> str:
    """One decimal as in the paper's tables; small values (losses) keep 3 significant digits."""
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.1f}" if abs(value) >= 1 or value == 0 else f"{value:.3g}"


def format_cell(cell: dict | None) -> str:
    """'98.7 [97.9, 99.3] (2 err)'; '-' where the metric has no value, '' where there is no cell."""
    if cell is None:
        return ""
    text = format_number(cell["value"])
    if cell["ci_low"] is not None:
        text += f" [{format_number(cell['ci_low'])}, {format_number(cell['ci_high'])}]"
    if cell["errors"]:
        text += f" ({cell['errors']} err)"
    return text


def pivot(cells: Sequence[dict], *, label=lambda c: c["row"]) -> tuple[list[str], list[list[str]]]:
    """Rows x columns (defenses side by side) of formatted cells: (header, body)."""
    columns = ordered({c["column"] for c in cells}, tuple(DEFENSES))
    grid: dict[str, dict[str, dict]] = {}
    for cell in cells:
        grid.setdefault(label(cell), {})[cell["column"]] = cell
    body = [[row] + [format_cell(by_column.get(col)) for col in columns] for row, by_column in grid.items()]
    return ["", *columns], body


def tables(cells: Sequence[dict]) -> dict[str, tuple[list[str], list[list[str]]]]:
    """{table title: (header, body)} in the order the tables first appear."""
    titles = list(dict.fromkeys(c["table"] for c in cells))
    return {t: pivot([c for c in cells if c["table"] == t]) for t in titles}


def summary_table(cells: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    """The headline numbers (RSR, over-refusal, utility) as one table, defenses side by side."""
    headline = [c for c in cells if c["table"] in HEADLINE_TABLES]
    return pivot(headline, label=lambda c: HEADLINE_TABLES[c["table"]] + c["row"])


def markdown_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    escape = (lambda s: str(s).replace("|", "\\|"))
    lines = ["| " + " | ".join(map(escape, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(escape, row)) + " |" for row in body]
    return "\n".join(lines) + "\n"


def markdown_tables(cells: Sequence[dict]) -> str:
    return "\n".join(f"### {title}\n\n{markdown_table(*table)}" for title, table in tables(cells).items())


CSV_FIELDS = ("table", "row", "column", "value", "ci_low", "ci_high", "n", "errors")


def csv_text(cells: Sequence[dict], *, extra: dict[str, str] | None = None) -> str:
    """Long format, one number per line, so spreadsheets and pandas read it without parsing cells."""
    extra = extra or {}
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=[*extra, *CSV_FIELDS], lineterminator="\n")
    writer.writeheader()
    for cell in cells:
        writer.writerow({**extra, **{k: "" if cell[k] is None else cell[k] for k in CSV_FIELDS}})
    return out.getvalue()


# ---------------------------------------------------------------- CLI


def write_evaluation(out: Path, metrics: dict, samples: Sequence[dict]) -> None:
    """Write the evaluation directory; metrics.json last, so its presence means complete."""
    if out.exists() and not out.is_dir():
        raise DavspError(f"{out}: exists and is not a directory; choose another --out")
    cells = metric_entries(metrics["results"])
    atomic_write_text(out / "tables.md", markdown_tables(cells))
    atomic_write_text(out / "tables.csv", csv_text(cells))
    atomic_write_text(out / "samples.jsonl", "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    atomic_write_json(out / "metrics.json", metrics)


def run_evaluate(args: argparse.Namespace) -> int:
    if args.bootstrap < 0:
        raise DavspError(f"--bootstrap {args.bootstrap}: must be 0 (no interval) or a positive number of resamples")
    if not 0.0 < args.confidence < 1.0:
        raise DavspError(f"--confidence {args.confidence}: must be between 0 and 1, e.g. 0.95")
    if args.samples < 0:
        raise DavspError(f"--samples {args.samples}: must be 0 or more")
    refuse_to_overwrite_input(args.out, *args.judged)
    rows = load_judged(args.judged)
    settings = {"resamples": args.bootstrap, "confidence": args.confidence, "seed": args.seed}
    results = evaluate_rows(rows, **settings)
    metrics = {
        "schema": SCHEMA,
        "inputs": [{"path": str(p), "sha256": sha256_file(p)} for p in args.judged],
        "bootstrap": settings,
        "versions": package_versions(),
        "results": results,
    }
    write_evaluation(args.out, metrics, pick_samples(rows, per_benchmark=args.samples, seed=args.seed))
    print(markdown_table(*summary_table(metric_entries(results))), end="")
    print(f"wrote {args.out}/metrics.json, tables.md, tables.csv, samples.jsonl")
    return 0


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="RSR, over-refusal and utility metrics from judged responses",
        description="Compute RSR (judge errors counted apart, never safe) with bootstrap intervals, "
                    "over-refusal, MME, MM-Vet and LLaVA-Bench scores per benchmark and defense.")
    parser.add_argument("judged", nargs="+", type=Path, metavar="JUDGED.jsonl", help="outputs of `davsp judge`")
    parser.add_argument("--out", type=Path, required=True, help="evaluation directory to write")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals (0: none)")
    parser.add_argument("--confidence", type=float, default=0.95, help="confidence level of the intervals")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and of the sample choice")
    parser.add_argument("--samples", type=int, default=3, help="queries per benchmark kept as sample responses")
    parser.set_defaults(func=run_evaluate)
