"""`davsp evaluate`: the paper's numbers from judged responses, per benchmark and defense.

Judged rows are grouped by (benchmark, defense) and each group goes to `metrics.evaluate_group`
(per judge: RSR from a harm judge, or the refusal rate from the refusal judge, with bootstrap CIs
and breakdowns, and over-refusal; then MME, MM-Vet, LLaVA-Bench; see metrics.py). Every table
names the judge behind it. When several judges judged the same responses (pass each judge's file),
`agreement` holds Cohen's kappa, the confusion table and the responses they disagree on.
An evaluation directory holds `tables.md`, `tables.csv`, `samples.jsonl` and `metrics.json`
(written last, so a directory with `metrics.json` is complete). `davsp report` reads it.
"""

from __future__ import annotations

import csv
import html
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
from .judges import VERDICTS
from .judges.agreement import judges_agreement
from .metrics import MME_GROUP_OF, MME_SUBTASKS, evaluate_group, is_harmful, judge_of, row_key

SCHEMA = "davsp.evaluate/2"  # /2: safety numbers per judge, named by judge kind (RSR or refusal rate)
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


def agreement_of_judges(rows: Sequence[dict]) -> list[dict]:
    """Every two judges' agreement on the harmful responses both judged (see judges_agreement); [] for one judge."""
    pairs: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for row in rows:
        judge = judge_key(row)
        if judge is not None and is_harmful(row):
            pairs[row_key(row)][judge] = row
    return judges_agreement(pairs)


# ---------------------------------------------------------------- loading judged rows


def validate_row(row: dict, where: str) -> None:
    for field in ("id", "benchmark", "defense"):
        if row.get(field) is None:
            raise DavspError(f"{where}: missing '{field}'; is this a `davsp judge` output file?")
    if "verdict" in row and row["verdict"] not in VERDICTS:
        raise DavspError(f"{where}: verdict {row['verdict']!r} is not one of {', '.join(VERDICTS)}")
    if "safe" in row and row["safe"] not in (True, False, None):
        raise DavspError(f"{where}: 'safe' must be true, false or null, got {row['safe']!r}")


def judge_key(row: dict) -> str | None:
    """The judge family of a row that carries a safety decision, else None (a graded or unjudged row)."""
    return judge_of(row) if "safe" in row or "verdict" in row else None


def load_judged(paths: Sequence[str | Path]) -> list[dict]:
    """Rows of judged JSONL files, validated. The same response may come once per judge (one file
    per judge: their agreement is measured); a response seen twice with the same judge (a file
    passed twice) is an error rather than a silently doubled count."""
    rows: list[dict] = []
    seen: dict[tuple, str] = {}
    for path in paths:
        count = 0
        for number, row in enumerate(read_jsonl(path), start=1):
            where = f"{path}:{number}"
            validate_row(row, where)
            try:
                key = (*row_key(row), judge_key(row))
            except DavspError as exc:
                raise DavspError(f"{where}: {exc}") from None
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
        answered_by_all = [q for q in queries if len({r["defense"] for r in by_query[q]}) == len(defenses)] or queries
        pool = [q for q in answered_by_all if is_harmful(by_query[q][0])] or answered_by_all
        chosen = sorted(rng.choice(len(pool), size=min(per_benchmark, len(pool)), replace=False))
        for index in chosen:
            group = by_query[pool[index]]
            for defense in ordered(defenses, tuple(DEFENSES)):
                samples += [sample_fields(r) for r in group if r["defense"] == defense]
    return samples


def sample_fields(row: dict) -> dict:
    keep = ("id", "benchmark", "defense", "category", "image_type", "question", "response", "verdict", "safe", "judge")
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


# metric key -> table title. A refusal judge's share of safe answers is a refusal rate, not the
# paper's RSR (which asks a harm judge whether the answer is harmful): the titles say which.
SAFETY_TITLES = {"rsr": "RSR", "refusal_rate": "Refusal rate on harmful queries", "over_refusal": "Over-refusal"}


def safety_title(metric: str, judge: str, by: str | None = None) -> str:
    """'RSR (%) · judge llm/davsp-auto/deepseek-chat',
    'Refusal rate on harmful queries by topic (%) · judge refusal@1'."""
    return f"{SAFETY_TITLES[metric]}{f' by {by}' if by else ''} (%) · judge {judge}"


def group_entries(benchmark: str, defense: str, res: dict) -> list[dict]:
    cells = []
    for judge, numbers in res.get("judges", {}).items():
        for metric in ("rsr", "refusal_rate"):
            if metric not in numbers:
                continue
            cells.append(rate_entry(safety_title(metric, judge), benchmark, defense, numbers[metric]))
            for field, parts in numbers.get(f"{metric}_by", {}).items():
                table = safety_title(metric, judge, None if field == "image_type" else field)
                cells += [rate_entry(table, f"{benchmark} {key}", defense, r) for key, r in parts.items()]
        if "over_refusal" in numbers:
            cells.append(rate_entry(safety_title("over_refusal", judge), benchmark, defense, numbers["over_refusal"]))
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


def headline_label(cell: dict) -> str | None:
    """A headline cell's row label in the summary table (the judge in brackets), None for other cells."""
    if cell["table"] == "Utility":
        return cell["row"]
    for title in SAFETY_TITLES.values():
        prefix = f"{title} (%) · judge "
        if cell["table"].startswith(prefix):
            name = "Refusal rate" if title.startswith("Refusal rate") else title
            return f"{name} {cell['row']} [{cell['table'][len(prefix):]}]"
    return None


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
    """The headline numbers (RSR and/or refusal rate, over-refusal, utility) as one table, defenses
    side by side, each safety row naming its judge."""
    headline = [c for c in cells if headline_label(c) is not None and " by " not in c["table"]
                and (c["table"] == "Utility" or " " not in c["row"])]
    return pivot(headline, label=headline_label)


def markdown_cell(value) -> str:
    """A table cell as plain text: HTML in a benchmark or category name is shown, never rendered."""
    return html.escape(str(value), quote=False).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    escape = markdown_cell
    lines = ["| " + " | ".join(map(escape, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(escape, row)) + " |" for row in body]
    return "\n".join(lines) + "\n"


def markdown_tables(cells: Sequence[dict]) -> str:
    return "\n".join(f"### {markdown_cell(title)}\n\n{markdown_table(*table)}" for title, table in tables(cells).items())


def agreement_summary(pair: dict) -> str:
    """'Cohen's kappa 0.412, observed agreement 0.800 over 50 responses (2 left out: judge error)'."""
    kappa = "undefined (one label only)" if pair["kappa"] is None else f"{pair['kappa']:.3f}"
    observed = "n/a" if pair["observed"] is None else f"{pair['observed']:.3f}"
    return (f"Cohen's kappa {kappa}, observed agreement {observed} over {pair['n']} harmful-query responses "
            f"({pair['errors_excluded']} left out: judge error)")


def agreement_table(pair: dict) -> tuple[list[str], list[list[str]]]:
    """The confusion table on `safe`: rows the first judge, columns the second."""
    a, b = pair["judges"]
    counts = {(x, y): n for x, y, n in pair["table"]}
    labels = [True, False]
    header = [f"{a} \\ {b}", *(f"safe={v}" for v in labels)]
    return header, [[f"safe={x}", *(str(counts.get((x, y), 0)) for y in labels)] for x in labels]


def agreement_markdown(agreement: Sequence[dict], *, listed: int = 100) -> str:
    """Each pair of judges: the kappa line, the confusion table and the responses they disagree on."""
    parts = []
    for pair in agreement:
        a, b = pair["judges"]
        parts.append(f"### Agreement: {markdown_cell(a)} vs {markdown_cell(b)}\n\n{agreement_summary(pair)}\n\n"
                     + markdown_table(*agreement_table(pair)))
        rows = [[str(d.get("benchmark")), str(d.get("defense")), str(d.get("id")), str(d["safe"][a]),
                 str(d["safe"][b]), str(d.get("response", ""))[:300]] for d in pair["disagreements"][:listed]]
        if rows:
            more = len(pair["disagreements"]) - len(rows)
            parts.append(f"Responses they disagree on ({len(pair['disagreements'])}"
                         f"{f'; the first {listed} listed, all in metrics.json' if more > 0 else ''}):\n\n"
                         + markdown_table(["benchmark", "defense", "id", f"safe: {a}", f"safe: {b}", "response"], rows))
    return "\n".join(parts)


CSV_FIELDS = ("table", "row", "column", "value", "ci_low", "ci_high", "n", "errors")


def csv_text(cells: Sequence[dict], *, extra: dict[str, str] | None = None) -> str:
    """Long format, one number per line, so spreadsheets and pandas read it without parsing cells."""
    extra = extra or {}
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=[*extra, *CSV_FIELDS], lineterminator="\n")
    writer.writeheader()
    for cell in cells:
        row = {**extra, **{k: "" if cell[k] is None else cell[k] for k in CSV_FIELDS}}
        writer.writerow({k: spreadsheet_safe(v) for k, v in row.items()})
    return out.getvalue()


def spreadsheet_safe(value):
    """Text a spreadsheet would run as a formula (=, +, -, @, tab, CR first) gets a leading quote; numbers stay."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


# ---------------------------------------------------------------- the evaluation directory


def write_evaluation(out: Path, metrics: dict, samples: Sequence[dict]) -> None:
    """Write the evaluation directory; metrics.json last, so its presence means complete."""
    if out.exists() and not out.is_dir():
        raise DavspError(f"{out}: exists and is not a directory; choose another --out")
    cells = metric_entries(metrics["results"])
    agreement = metrics.get("agreement") or []
    agreement_text = "\n" + agreement_markdown(agreement) if agreement else ""
    atomic_write_text(out / "tables.md", markdown_tables(cells) + agreement_text)
    atomic_write_text(out / "tables.csv", csv_text(cells))
    atomic_write_text(out / "samples.jsonl", "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    atomic_write_json(out / "metrics.json", metrics)


def evaluate_files(judged: Sequence[str | Path], out: str | Path, *, resamples: int = 1000,
                   confidence: float = 0.95, seed: int = 0, samples: int = 3) -> dict:
    """Evaluate judged JSONL files into the directory `out`; returns the metrics written to metrics.json."""
    if resamples < 0:
        raise DavspError(f"--bootstrap {resamples}: must be 0 (no interval) or a positive number of resamples")
    if not 0.0 < confidence < 1.0:
        raise DavspError(f"--confidence {confidence}: must be between 0 and 1, e.g. 0.95")
    if samples < 0:
        raise DavspError(f"--samples {samples}: must be 0 or more")
    out = Path(out)
    refuse_to_overwrite_input(out, *judged)
    rows = load_judged(judged)
    settings = {"resamples": resamples, "confidence": confidence, "seed": seed}
    metrics = {
        "schema": SCHEMA,
        "inputs": [{"path": str(p), "sha256": sha256_file(p)} for p in judged],
        "bootstrap": settings,
        "versions": package_versions(),
        "results": evaluate_rows(rows, **settings),
        "agreement": agreement_of_judges(rows),
    }
    write_evaluation(out, metrics, pick_samples(rows, per_benchmark=samples, seed=seed))
    return metrics
