"""`davsp reproduce`: the paper's Tables 1 and 2 for one model, in one resumable command.

For every benchmark given (MM-SafetyBench, FigStep, VLGuard for safety; MM-Vet, MME, LLaVA-Bench for
utility) and every defense (none, prefix, vsp, davsp) it generates the answers (a local model, or an
OpenAI-compatible endpoint), judges them, evaluates and writes the report:

    OUT/reproduce.json                       what produced the answers (a rerun must match it)
    OUT/responses/{benchmark}.{defense}.jsonl
    OUT/judged/{benchmark}.{defense}.{judge}.jsonl
    OUT/eval/                                `davsp evaluate`'s directory (every table, with CIs)
    OUT/tables.md                            Tables 1 and 2 laid out as in the paper
    OUT/report.html                          `davsp report` over OUT/eval

Every step appends as it goes and skips what is done (generation and judging are themselves
resumable), so an interrupted run continues where it stopped when rerun; the evaluation and the
tables are recomputed from the files each time. Safety benchmarks are judged by the judge given (the
offline refusal judge by default: a refusal rate, not the paper's RSR; an LLM or HarmBench judge for
RSR); MM-Vet and LLaVA-Bench are graded by an LLM grader when one is given (the paper used GPT-4) and
left out of Table 2 otherwise; MME is scored from the answers alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .data.benchmarks import load_benchmark
from .data.records import Record
from .defenses import DEFENSES, defense_parts
from .errors import DavspError
from .evaluate import (
    SCHEMA, entry, evaluate_rows, format_cell, load_judged, markdown_table, pick_samples, rate_entry, write_evaluation,
)
from .io import atomic_write_json, atomic_write_text, package_versions, read_jsonl, sha256_file
from .judges import get_judge, judge_file

SAFETY_BENCHMARKS = ("mm-safetybench", "figstep", "vlguard")
UTILITY_BENCHMARKS = ("mm-vet", "mme", "llava-bench")
GRADER_PROMPTS = {"mm-vet": "mmvet-grader", "llava-bench": "llava-bench-review"}  # MME needs no grader
TINY_BENCHMARKS = ("mm-safetybench", "figstep")  # those with an official tiny version
TINY_LIMIT = 20  # --tiny: the first records of the others
# Table 1's columns: MM-SafetyBench by image type, as in the paper, then the other safety benchmarks whole
MMSB_COLUMNS = (("SD_TYPO", "MM-SafetyBench SD+TYPO"), ("SD", "MM-SafetyBench SD"), ("TYPO", "MM-SafetyBench TYPO"))
BENCHMARK_TITLES = {"figstep": "FigStep", "vlguard": "VLGuard", "mm-vet": "MM-Vet", "mme": "MME",
                    "llava-bench": "LLaVA-Bench"}
SETTINGS_CHECKED = ("model", "vsp_sha256", "max_new_tokens", "split")  # what changes the answers


class LocalModel:
    """Answers from a model loaded here (`load()` gives the adapter, called on first use only)."""

    def __init__(self, name: str, load: Callable, batch_size: int = 8):
        self.name, self._load, self.batch_size, self._adapter = name, load, batch_size, None

    def generate(self, records, *, defense, vsp, max_new_tokens, out, progress) -> list[dict]:
        from .generate import generate_responses

        if self._adapter is None:
            self._adapter = self._load()
        return generate_responses(self._adapter, records, defense=defense, vsp=vsp, max_new_tokens=max_new_tokens,
                                  batch_size=self.batch_size, out=out, progress=progress)


class EndpointModel:
    """Answers from an OpenAI-compatible server (`endpoint.Endpoint`)."""

    def __init__(self, endpoint):
        self.endpoint, self.name = endpoint, f"{endpoint.served_model} @ {endpoint.url}"

    def generate(self, records, *, defense, vsp, max_new_tokens, out, progress) -> list[dict]:
        from .endpoint import generate_via_endpoint

        return generate_via_endpoint(records, self.endpoint, defense=defense, vsp=vsp, max_new_tokens=max_new_tokens,
                                     out=out, progress=progress)


@dataclass
class Reproduction:
    """What to run. `judge` decides the safety benchmarks; `grader` (an llm judge's options: url, model,
    api_key_env) grades MM-Vet and LLaVA-Bench, which are left ungraded without it."""

    out: Path
    benchmarks: dict[str, Path]  # name -> root folder
    model: LocalModel | EndpointModel
    vsp_path: Path | None = None
    defenses: tuple[str, ...] = tuple(DEFENSES)
    judge: str = "refusal"
    judge_options: dict = field(default_factory=dict)
    grader: dict | None = None
    tiny: bool = False
    limit: int | None = None
    split: str | None = None
    max_new_tokens: int = 1024
    bootstrap: int = 1000
    seed: int = 0

    def __post_init__(self):
        self.out = Path(self.out)
        if not self.benchmarks:
            raise DavspError("give at least one benchmark folder (e.g. --mm-safetybench DIR, --figstep DIR)")
        unknown = sorted(set(self.benchmarks) - set(SAFETY_BENCHMARKS + UTILITY_BENCHMARKS))
        if unknown:
            raise DavspError(f"unknown benchmark {unknown[0]!r}; reproduce runs "
                             f"{', '.join(SAFETY_BENCHMARKS + UTILITY_BENCHMARKS)}")
        for defense in self.defenses:
            if defense_parts(defense)[1] and self.vsp_path is None:
                raise DavspError(f"defense {defense!r} frames the image: give --vsp FILE, or leave it out of --defenses")


def run_reproduction(job: Reproduction, *, progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Plan, generate, judge, evaluate, report; returns {"tables": markdown, "metrics": ...}."""
    from .prompt import VisualSafetyPrompt

    vsp = VisualSafetyPrompt.load(job.vsp_path) if job.vsp_path else None
    _check_settings(job)
    records = {name: _records(job, name, root) for name, root in job.benchmarks.items()}
    steps = [(name, defense) for name in records for defense in job.defenses]
    log(format_plan(job, records, steps))

    left = {step: _unanswered(job, records[step[0]], step) for step in steps}
    total_left, answered, started = sum(len(v) for v in left.values()), 0, time.perf_counter()
    for number, (name, defense) in enumerate(steps, start=1):
        if left[name, defense]:
            job.model.generate(records[name], defense=defense, vsp=vsp, max_new_tokens=job.max_new_tokens,
                               out=_responses(job, name, defense), progress=progress)
            answered += len(left[name, defense])
        log(_progress_line(number, len(steps), name, defense, answered, total_left, time.perf_counter() - started))

    judges: dict = {}  # built once: an in-process judge model loads once
    judged_files = [_judge_step(job, judges, name, defense, progress, log) for name, defense in steps]
    rows = load_judged([path for path in judged_files if path is not None])
    settings = {"resamples": job.bootstrap, "confidence": 0.95, "seed": job.seed}
    results = evaluate_rows(rows, **settings)
    inputs = [{"path": str(p), "sha256": sha256_file(p)} for p in judged_files if p is not None]
    metrics = {"schema": SCHEMA, "inputs": inputs, "bootstrap": settings,
               "versions": package_versions(), "results": results, "agreement": []}
    write_evaluation(job.out / "eval", metrics, pick_samples(rows, per_benchmark=3, seed=job.seed))
    from .report import build_report

    build_report([job.out / "eval"], job.out / "report.html")
    text = paper_tables(results, job.defenses, graded=job.grader is not None)
    atomic_write_text(job.out / "tables.md", text)
    log(text)
    log(f"wrote {job.out / 'tables.md'}, {job.out / 'eval'} and {job.out / 'report.html'}")
    return {"tables": text, "metrics": metrics}


# ---------------------------------------------------------------- plan and progress


def _records(job: Reproduction, name: str, root: Path) -> list[Record]:
    tiny = job.tiny and name in TINY_BENCHMARKS
    limit = job.limit or (TINY_LIMIT if job.tiny and not tiny else None)
    split = job.split if name != "vlguard" else (job.split or "test")  # VLGuard's own files: train or test
    return load_benchmark(name, root, tiny=tiny, split=split, limit=limit)


def _responses(job: Reproduction, name: str, defense: str) -> Path:
    return job.out / "responses" / f"{name}.{defense}.jsonl"


def _ids(path: Path) -> set[str]:
    return {str(row.get("id")) for row in read_jsonl(path, tolerate_torn_tail=True)} if path.exists() else set()


def _unanswered(job: Reproduction, records: list[Record], step: tuple[str, str]) -> list[str]:
    done = _ids(_responses(job, *step))
    return [r.id for r in records if r.id not in done]


def format_plan(job: Reproduction, records: dict[str, list[Record]], steps: list[tuple[str, str]]) -> str:
    queries = sum(len(records[name]) for name, _ in steps)
    lines = [f"davsp reproduce: {job.model.name}, {len(records)} benchmark(s) x {len(job.defenses)} defense(s) = "
             f"{queries} queries; answers/judged so far per defense:"]
    header = ["benchmark", "records", *job.defenses]
    body = []
    for name, items in records.items():
        cells = []
        for defense in job.defenses:
            answered = len(_ids(_responses(job, name, defense)) & {r.id for r in items})
            judged = _judged_count(job, name, defense)
            cells.append(f"{answered}/{len(items)}" + ("" if judged is None else f", judged {judged}"))
        body.append([name, str(len(items)), *cells])
    lines.append(markdown_table(header, body).rstrip())
    return "\n".join(lines)


def _progress_line(number: int, steps: int, name: str, defense: str, answered: int, total: int, seconds: float) -> str:
    line = f"[{number}/{steps}] {name} x {defense}: {answered}/{total} new answers in {seconds:.0f} s"
    if 0 < answered < total:
        line += f", ETA {_duration((total - answered) * seconds / answered)}"
    return line


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s"


# ---------------------------------------------------------------- judging


def _judge_for(job: Reproduction, judges: dict, name: str):
    """(judge, file tag) for a benchmark, or None: MME needs none, MM-Vet / LLaVA-Bench need a grader."""
    if name in SAFETY_BENCHMARKS:
        key, make = job.judge, lambda: get_judge(job.judge, **job.judge_options)
    elif name in GRADER_PROMPTS and job.grader is not None:
        key, make = name, lambda: get_judge("llm", prompt=GRADER_PROMPTS[name], **job.grader)
    else:
        return None
    if key not in judges:
        judges[key] = make()
    return judges[key], job.judge if name in SAFETY_BENCHMARKS else "grader"


def _judged(job: Reproduction, name: str, defense: str, tag: str) -> Path:
    return job.out / "judged" / f"{name}.{defense}.{tag}.jsonl"


def _judged_count(job: Reproduction, name: str, defense: str) -> int | None:
    if name == "mme" or (name in GRADER_PROMPTS and job.grader is None):
        return None
    tag = job.judge if name in SAFETY_BENCHMARKS else "grader"
    path = _judged(job, name, defense, tag)
    if not path.exists():
        return 0
    return sum(row.get("safe") is not None or row.get("score") is not None or row.get("score_model") is not None
               for row in read_jsonl(path, tolerate_torn_tail=True))


def _judge_step(job: Reproduction, judges: dict, name: str, defense: str, progress: bool, log) -> Path | None:
    """The file this (benchmark, defense) contributes to the evaluation: judged, or the answers (MME)."""
    responses = _responses(job, name, defense)
    chosen = _judge_for(job, judges, name)
    if chosen is None:
        return responses if name == "mme" else None
    judge, tag = chosen
    summary = judge_file(responses, judge, _judged(job, name, defense, tag), progress=progress)
    if summary["errors"]:
        log(f"{name} x {defense}: {summary['errors']} responses could not be judged (counted apart, never safe); "
            "rerun to retry them")
    return Path(summary["out"])


# ---------------------------------------------------------------- settings


def _check_settings(job: Reproduction) -> None:
    """Record what produces the answers; a rerun into the same folder with other settings is refused."""
    settings = {"model": job.model.name, "vsp_sha256": sha256_file(job.vsp_path) if job.vsp_path else None,
                "max_new_tokens": job.max_new_tokens, "split": job.split, "defenses": list(job.defenses),
                "benchmarks": {k: str(v) for k, v in job.benchmarks.items()}, "tiny": job.tiny, "limit": job.limit,
                "judge": job.judge}
    path = job.out / "reproduce.json"
    if path.exists():
        from .data._files import read_json

        earlier = read_json(path, "reproduce settings", dict)
        for key in SETTINGS_CHECKED:
            if earlier.get(key) != settings[key]:
                raise DavspError(f"{path}: the answers there were made with {key} {earlier.get(key)!r}, not "
                                 f"{settings[key]!r}; choose another --out to run with these settings")
    atomic_write_json(path, settings)


# ---------------------------------------------------------------- the paper's tables


def paper_tables(results: dict, defenses, *, graded: bool) -> str:
    """Table 1 (safety: defenses down, benchmarks across) and Table 2 (utility), cells with their 95%
    bootstrap interval and judge-error count where they have them. Table 1 names its judge and what it
    measured: RSR from a harm judge, the refusal rate from the refusal judge."""
    safety = [(name, key, title) for name in SAFETY_BENCHMARKS if name in results
              for key, title in (MMSB_COLUMNS if name == "mm-safetybench" else ((None, BENCHMARK_TITLES[name]),))]
    utility = [name for name in UTILITY_BENCHMARKS if name in results]
    parts = []
    if safety:
        body = [[defense, *(format_cell(_safety_cell(results, name, key, defense)) for name, key, _ in safety)]
                for defense in defenses]
        judges = {judge: numbers["kind"] for name, *_ in safety for group in results[name].values()
                  for judge, numbers in group.get("judges", {}).items()}
        metric = "RSR" if "harm" in judges.values() else "Refusal rate"
        parts.append(f"### Table 1 · {metric} (%) · judge {', '.join(sorted(judges)) or '-'}\n\n" + markdown_table(["defense", *(t for *_, t in safety)], body))
    if utility:
        body = [[defense, *(format_cell(_utility_cell(results, name, defense)) for name in utility)]
                for defense in defenses]
        note = "" if graded or not {"mm-vet", "llava-bench"} & set(utility) else \
            "\n'-': MM-Vet and LLaVA-Bench need a grader (--grader-url, --grader-model).\n"
        titles = [f"{BENCHMARK_TITLES[n]}{' (total)' if n == 'mme' else ''}" for n in utility]
        parts.append("### Table 2 · Utility\n\n" + markdown_table(["defense", *titles], body) + note)
    return "\n".join(parts)


def _safety_cell(results: dict, name: str, key: str | None, defense: str) -> dict | None:
    judges = results[name].get(defense, {}).get("judges", {})
    for numbers in judges.values():  # reproduce judges each benchmark with one judge
        metric = "rsr" if "rsr" in numbers else "refusal_rate"
        value = numbers[metric] if key is None else numbers.get(f"{metric}_by", {}).get("image_type", {}).get(key)
        return rate_entry("", "", defense, value) if value is not None else None
    return None


def _utility_cell(results: dict, name: str, defense: str) -> dict | None:
    group = results[name].get(defense, {})
    if name == "mme" and "mme" in group:
        return entry("", "", defense, group["mme"]["total"])
    if name == "mm-vet" and "mm_vet" in group:
        total = group["mm_vet"]["total"]
        return entry("", "", defense, total["score"], n=total["n"], errors=total["errors"])
    if name == "llava-bench" and "llava_bench" in group:
        overall = group["llava_bench"]["overall"]
        return entry("", "", defense, overall["relative"], n=overall["n"], errors=overall["errors"])
    return None


__all__ = ["EndpointModel", "LocalModel", "Reproduction", "format_plan", "paper_tables", "run_reproduction"]
