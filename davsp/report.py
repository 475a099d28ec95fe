"""`davsp report`: one self-contained HTML page over training runs and evaluations.

For a training run directory (`davsp train`): the VSP frame, loss and projection curves, and
histograms of harmful/benign projections before and after training with the thresholds. For
an evaluation directory (`davsp evaluate`): every table with the defenses side by side, and
sample responses. Images are inline base64 PNGs, so the page can be mailed or archived as is.
The same tables go to report.md and report.csv beside the page.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .errors import DavspError
from .data._files import read_json as read_json_file
from .evaluate import (
    SCHEMA, agreement_markdown, agreement_summary, agreement_table, csv_text, entry, markdown_cell, markdown_table,
    markdown_tables, metric_entries, tables,
)
from .io import atomic_write_text, read_jsonl

RUN_FILES = ("config.json", "metrics.jsonl")
TRAINING_TABLE = "Training runs"
THRESHOLD_NAMES = ("τ_top", "τ_bottom")  # projections.json "thresholds": [top, bottom]
THRESHOLD_STYLES = ("--", "-.")


# ---------------------------------------------------------------- reading directories


def directory_kind(path: Path) -> str:
    """'run' (config.json + metrics.jsonl) or 'evaluation' (metrics.json from `davsp evaluate`)."""
    if (path / "metrics.json").is_file():
        return "evaluation"
    if all((path / name).is_file() for name in RUN_FILES):
        return "run"
    raise DavspError(f"{path}: neither a training run directory (config.json + metrics.jsonl from `davsp train`) "
                     "nor an evaluation directory (metrics.json from `davsp evaluate`)")


def read_json(path: Path) -> dict:
    return read_json_file(path, "report input", dict)


_NUMBER = (int, float)


def _check_steps(path: Path, steps: list[dict]) -> list[dict]:
    """metrics.jsonl rows as `davsp train` writes them; anything else is named, not plotted into a traceback."""
    for number, row in enumerate(steps, start=1):
        problem = None
        if not isinstance(row.get("step"), int) or isinstance(row.get("step"), bool):
            problem = "'step' must be an integer"
        elif not isinstance(row.get("harmful"), bool):
            problem = "'harmful' must be true or false"
        else:
            bad = [k for k in ("loss", "da_loss", "output_loss", "projection")
                   if row.get(k) is not None and (not isinstance(row[k], _NUMBER) or isinstance(row[k], bool))]
            problem = f"{bad[0]!r} must be a number or null" if bad else None
        if problem:
            raise DavspError(f"{path}:{number}: {problem}; is this a metrics.jsonl from `davsp train`?")
    return steps


def _check_projections(path: Path, projections: dict) -> dict:
    def numbers(values) -> bool:
        return isinstance(values, list) and all(isinstance(v, _NUMBER) and not isinstance(v, bool) for v in values)

    phases_ok = all(isinstance(projections.get(p, {}), dict) and all(numbers(v) for v in projections.get(p, {}).values())
                    for p in ("before", "after"))
    thresholds = projections.get("thresholds")
    if not phases_ok or (thresholds is not None and not numbers(thresholds)):
        raise DavspError(f"{path}: projections must be lists of numbers; is this from `davsp train`?")
    return projections


def load_run(path: Path) -> dict:
    """config, per-step metrics (a torn last line from a live run is ignored), projections, frame PNG."""
    projections = path / "projections.json"
    vsp = path / "vsp.png"
    metrics = path / "metrics.jsonl"
    return {
        "config": read_json(path / "config.json"),
        "steps": _check_steps(metrics, list(read_jsonl(metrics, tolerate_torn_tail=True))),
        "projections": _check_projections(projections, read_json(projections)) if projections.is_file() else None,
        "vsp_png": vsp.read_bytes() if vsp.is_file() else None,
    }


def load_evaluation(path: Path) -> dict:
    metrics = read_json(path / "metrics.json")
    if metrics.get("schema") != SCHEMA:
        raise DavspError(f"{path / 'metrics.json'}: not written by `davsp evaluate` "
                         f"(schema {metrics.get('schema')!r}); "
                         f"rerun `davsp evaluate --out {path}`")
    samples = path / "samples.jsonl"
    return {"metrics": metrics, "samples": list(read_jsonl(samples)) if samples.is_file() else []}


# ---------------------------------------------------------------- figures


def png_bytes(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)  # render with Agg, independent of any pyplot backend
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing mean over up to `window` points (shorter at the start)."""
    values = np.asarray(values, dtype=np.float64)
    sums = np.cumsum(np.insert(values, 0, 0.0))
    index = np.arange(1, values.size + 1)
    start = np.maximum(index - window, 0)
    return (sums[index] - sums[start]) / (index - start)


def plot_by_class(ax, steps: Sequence[dict], field: str, linestyle: str = "-") -> None:
    """Raw points and a moving average, harmful and benign steps apart (they interleave at random)."""
    window = max(1, len(steps) // 40)
    for harmful, colour in ((True, "tab:red"), (False, "tab:blue")):
        points = [(s["step"], s[field]) for s in steps if s.get("harmful") is harmful and s.get(field) is not None]
        if not points:
            continue
        x, y = zip(*points)
        label = "harmful" if harmful else "benign"
        ax.plot(x, y, ".", color=colour, alpha=0.25, markersize=3)
        ax.plot(x, moving_average(y, window), color=colour, linestyle=linestyle, label=f"{label} {field}")
    ax.set_xlabel("step")


def curves_png(steps: Sequence[dict], thresholds: Sequence[float] | None) -> bytes:
    """Loss and projection per step; the projection panel marks the two hinge targets."""
    fig = Figure(figsize=(11, 3.6))
    loss_ax, projection_ax = fig.subplots(1, 2)
    for field, linestyle in (("da_loss", "-"), ("output_loss", ":")):
        plot_by_class(loss_ax, steps, field, linestyle)
    loss_ax.set_title("loss (harmful vs benign steps)")
    plot_by_class(projection_ax, steps, "projection")
    for value, name, linestyle in zip(thresholds or (), THRESHOLD_NAMES, THRESHOLD_STYLES):
        projection_ax.axhline(value, color="black", linestyle=linestyle, linewidth=1, label=f"{name} = {value:g}")
    projection_ax.set_title("batch mean projection on the harmfulness vector")
    for ax in (loss_ax, projection_ax):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return png_bytes(fig)


def histograms_png(projections: dict) -> bytes:
    """Harmful and benign projections before and after training, shared bins, thresholds marked."""
    phases = [p for p in ("before", "after") if p in projections]
    everything = [v for p in phases for values in projections[p].values() for v in values]
    bins = np.histogram_bin_edges(everything, bins=40) if everything else 10
    fig = Figure(figsize=(11, 3.6))
    axes = np.atleast_1d(fig.subplots(1, max(1, len(phases)), sharex=True, sharey=True))
    for ax, phase in zip(axes, phases):
        for label, colour in (("harmful", "tab:red"), ("benign", "tab:blue")):
            ax.hist(projections[phase].get(label, []), bins=bins, color=colour, alpha=0.5, label=label)
        for value, name, linestyle in zip(projections.get("thresholds") or (), THRESHOLD_NAMES, THRESHOLD_STYLES):
            ax.axvline(value, color="black", linestyle=linestyle, linewidth=1, label=f"{name} = {value:g}")
        ax.set_title(f"{phase} training (layer {projections.get('layer', '?')})")
        ax.set_xlabel("projection")
        ax.legend(fontsize=8)
    return png_bytes(fig)


# ---------------------------------------------------------------- tables and HTML pieces


def mean_or_none(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def run_entries(name: str, run: dict) -> list[dict]:
    """The run's headline numbers as cells of the 'Training runs' table (one column per run)."""
    steps = run["steps"]
    tail = [s["loss"] for s in steps[-max(1, len(steps) // 10):] if s.get("loss") is not None]
    cells = [entry(TRAINING_TABLE, "steps", name, len(steps)),
             entry(TRAINING_TABLE, "loss, last 10% of steps", name, mean_or_none(tail), n=len(tail))]
    projections = run["projections"] or {}
    if "layer" in projections:
        cells.append(entry(TRAINING_TABLE, "layer", name, projections["layer"]))
    for value, threshold in zip(projections.get("thresholds") or (), THRESHOLD_NAMES):
        cells.append(entry(TRAINING_TABLE, threshold, name, value))
    for phase in ("before", "after"):
        for label in ("harmful", "benign"):
            values = projections.get(phase, {}).get(label, [])
            if values:
                cells.append(entry(TRAINING_TABLE, f"mean {label} projection {phase}", name,
                                   mean_or_none(values), n=len(values)))
    return cells


def img_tag(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def html_table(title: str, header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    return f"<table><caption>{html.escape(title)}</caption><tr>{head}</tr>{rows}</table>"


def html_tables(cells: Sequence[dict]) -> str:
    """All tables of `cells` in a wrapping row, so RSR and utility sit side by side."""
    return '<div class="tables">' + "".join(html_table(t, *tb) for t, tb in tables(cells).items()) + "</div>"


def run_section(name: str, run: dict) -> str:
    parts = [f"<h2>Training run: {html.escape(name)}</h2>"]
    frame = img_tag(run["vsp_png"], f"VSP frame of {name}") if run["vsp_png"] else "<p>No vsp.png in this run.</p>"
    parts.append(frame)
    thresholds = (run["projections"] or {}).get("thresholds")
    if run["steps"]:
        parts.append(img_tag(curves_png(run["steps"], thresholds), f"loss and projection curves of {name}"))
    if run["projections"]:
        parts.append(img_tag(histograms_png(run["projections"]), f"projection histograms of {name}"))
    else:
        parts.append("<p>No projections.json in this run.</p>")
    config = html.escape(json.dumps(run["config"], indent=2, sort_keys=True, ensure_ascii=False))
    parts.append(f"<details><summary>config.json</summary><pre>{config}</pre></details>")
    return "\n".join(parts)


def samples_html(samples: Sequence[dict]) -> str:
    """Each sampled query once, then every defense's response to it (all text HTML-escaped)."""
    queries: dict[tuple, list[dict]] = {}
    for sample in samples:
        key = (sample.get("benchmark"), sample.get("id"), sample.get("image_type"))
        queries.setdefault(key, []).append(sample)
    parts = ["<h3>Sample responses</h3>"] if queries else []
    for (benchmark, query_id, image_type), group in queries.items():
        title = f"{benchmark} {query_id}" + (f" ({image_type})" if image_type else "")
        parts.append(f'<div class="sample"><h4>{html.escape(title)}</h4>'
                     f'<p class="question">{html.escape(str(group[0].get("question", "")))}</p>')
        for sample in group:  # samples.jsonl lists each query's defenses in canonical order
            verdict = f"{sample.get('verdict')}, safe={sample.get('safe')}" + (
                f", judge {sample['judge']}" if sample.get("judge") else "")
            parts.append(f"<p><b>{html.escape(str(sample['defense']))}</b> <i>{html.escape(verdict)}</i></p>"
                         f"<pre>{html.escape(str(sample.get('response', '')))}</pre>")
        parts.append("</div>")
    return "\n".join(parts)


def agreement_html(agreement: Sequence[dict], *, listed: int = 100) -> str:
    """Each pair of judges that judged the same responses: kappa, confusion table, the disagreements."""
    parts = []
    for pair in agreement:
        a, b = pair["judges"]
        parts.append(f"<h3>Agreement: {html.escape(a)} vs {html.escape(b)}</h3>"
                     f"<p>{html.escape(agreement_summary(pair))}</p>" + html_table("safe, by judge", *agreement_table(pair)))
        shown = pair["disagreements"][:listed]
        if shown:
            more = f" (first {listed} shown; all in metrics.json)" if len(shown) < len(pair["disagreements"]) else ""
            parts.append(f"<details><summary>{len(pair['disagreements'])} responses they disagree on{more}</summary>")
            for d in shown:
                title = (f"{d.get('benchmark')} {d.get('id')} ({d.get('defense')}): "
                         f"{a} safe={d['safe'][a]}, {b} safe={d['safe'][b]}")
                parts.append(f'<div class="sample"><h4>{html.escape(title)}</h4>'
                             f'<p class="question">{html.escape(str(d.get("question") or ""))}</p>'
                             f"<pre>{html.escape(str(d.get('response', '')))}</pre></div>")
            parts.append("</details>")
    return "\n".join(parts)


def evaluation_section(name: str, evaluation: dict) -> str:
    metrics = evaluation["metrics"]
    inputs = ", ".join(html.escape(i["path"]) for i in metrics.get("inputs", []))
    return "\n".join([
        f"<h2>Evaluation: {html.escape(name)}</h2>",
        f"<p>Judged inputs: {inputs}. Each safety table names its judge: RSR comes from a harm judge (is the "
        "answer harmful?), the refusal rate from the refusal judge (did the answer refuse?); they are different "
        "numbers. Judge errors are shown as err, never counted safe; "
        f"intervals are {html.escape(str(metrics.get('bootstrap')))} percentile bootstrap.</p>",
        html_tables(metric_entries(metrics["results"])),
        agreement_html(metrics.get("agreement") or []),
        samples_html(evaluation["samples"]),
    ])


STYLE = """body{font-family:sans-serif;margin:2em;max-width:1400px}
.tables{display:flex;flex-wrap:wrap;gap:1.5em;align-items:flex-start}
table{border-collapse:collapse;font-size:13px}caption{font-weight:bold;text-align:left}
td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}td:first-child{text-align:left}
pre{white-space:pre-wrap;background:#f6f6f6;padding:6px;max-height:20em;overflow:auto}
.sample{border-top:1px solid #ddd;margin-top:1em}img{max-width:100%}"""


def page(sections: Sequence[str]) -> str:
    body = "\n".join(sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>davsp report</title>'
            f"<style>{STYLE}</style></head><body><h1>davsp report</h1>\n{body}\n</body></html>\n")


# ---------------------------------------------------------------- building the report


def build_report(dirs: Sequence[str | Path], out: str | Path) -> None:
    """Write `out` (.html) plus report.md/.csv beside it from run and evaluation directories.

    Every directory is read before anything is written, so a bad one leaves old files untouched.
    """
    out = Path(out)
    if out.suffix != ".html":
        raise DavspError(f"--out {out}: must end in .html (report.md and report.csv are written beside it)")
    loaded = []
    for path in map(Path, dirs):
        if not path.is_dir():
            raise DavspError(f"{path}: not a directory; pass training run or evaluation directories")
        kind = directory_kind(path)
        loaded.append((str(path), kind, load_run(path) if kind == "run" else load_evaluation(path)))

    sections, markdown, csv_parts = [], ["# davsp report\n"], []
    training = [c for name, kind, data in loaded if kind == "run" for c in run_entries(name, data)]
    if training:
        header, body = tables(training)[TRAINING_TABLE]
        sections.append(html_table(TRAINING_TABLE, header, body))
        markdown.append(f"## {TRAINING_TABLE}\n\n{markdown_table(header, body)}")
        csv_parts.append(csv_text(training, extra={"source": "training"}))
    for name, kind, data in loaded:
        if kind == "run":
            sections.append(run_section(name, data))
            continue
        try:
            sections.append(evaluation_section(name, data))
            cells = metric_entries(data["metrics"]["results"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DavspError(f"{name}/metrics.json: malformed results ({type(exc).__name__}: {exc}); "
                             f"rerun `davsp evaluate --out {name}`") from None
        agreement = data["metrics"].get("agreement") or []
        markdown.append(f"## Evaluation: {markdown_cell(name)}\n\n" + markdown_tables(cells)
                        + ("\n" + agreement_markdown(agreement) if agreement else ""))
        csv_parts.append(csv_text(cells, extra={"source": name}))

    # One CSV: the header of the first part, then the rows of every part.
    csv_lines = [line for i, part in enumerate(csv_parts) for line in part.splitlines()[(1 if i else 0):]]
    atomic_write_text(out.with_suffix(".md"), "\n".join(markdown))
    atomic_write_text(out.with_suffix(".csv"), "\n".join(csv_lines) + "\n" if csv_lines else "")
    atomic_write_text(out, page(sections))
