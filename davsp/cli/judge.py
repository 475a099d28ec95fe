"""`davsp judge`: judge a responses file, compare two judged files, or measure the refusal judge.

davsp judge --input responses.jsonl --out judged.jsonl [--judge refusal|llm|harmbench|llamaguard ...]
davsp judge --input responses.jsonl --out graded.jsonl --judge llm --prompt mmvet-grader|llava-bench-review ...
davsp judge --compare a.jsonl b.jsonl [--on safe|verdict]
davsp judge --evaluate-labelled labelled.csv [...] --label-column final_label --response-column completion
            [--judge harmbench --judge-model ...]

`refusal` (default, offline) gives refusal rates; `llm` (safety prompts), `harmbench` and
`llamaguard` are harm judges, whose share of safe answers to harmful queries is the paper's RSR.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import DavspError
from ..judges import get_judge, judge_file, judge_names
from ..judges.agreement import compare_files, format_agreement
from ..judges.prompts import DEFAULT_PROMPT, prompt_names

# option (argparse dest) -> judge parameter, and the judges that take it
_OPTIONS = {
    "judge_url": "url",
    "judge_model": "model",
    "prompt": "prompt",
    "api_key_env": "api_key_env",
    "concurrency": "concurrency",
    "timeout": "timeout_s",
    "max_retries": "max_retries",
    "cache_dir": "cache_dir",
    "device": "device",
    "dtype": "dtype",
}
_MODEL_JUDGES = ("harmbench", "llamaguard")  # a model of the user's, in-process or behind --judge-url
_TAKES = {
    "llm": {"judge_url", "judge_model", "prompt", "api_key_env", "concurrency", "timeout", "max_retries", "cache_dir",
            "no_cache"},
    **{name: {"judge_url", "judge_model", "api_key_env", "timeout", "max_retries", "device", "dtype"}
       for name in _MODEL_JUDGES},
}


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "judge",
        help="judge responses (refusal or LLM judge), compare judges, or measure the refusal judge",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = p.add_argument_group("what to do (pick one)")
    mode.add_argument("--input", help="responses JSONL (rows with id and response)")
    mode.add_argument(
        "--compare", nargs=2, metavar=("A", "B"), help="two judged JSONL files: Cohen's kappa + confusion table"
    )
    mode.add_argument(
        "--evaluate-labelled",
        nargs="+",
        metavar="CSV",
        help="CSV files of human-labelled responses (refusal classes, or harmful yes/no): accuracy, kappa and the "
        "confusion table of the refusal judge and its baselines, or of --judge",
    )

    judging = p.add_argument_group("judging (--input)")
    judging.add_argument("--out", help="judged JSONL to write (resumes if it exists; never the input)")
    judging.add_argument(
        "--judge", default="refusal", help=f"judge name: {', '.join(judge_names())} (default: refusal)"
    )
    judging.add_argument("--batch-size", type=int, default=64, help="rows per appended batch (default: 64)")
    judging.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    llm = p.add_argument_group("model judges (--judge llm, harmbench, llamaguard)")
    llm.add_argument("--judge-url", help="OpenAI-compatible base URL, e.g. https://api.openai.com/v1 (llm: required; "
                     "harmbench, llamaguard: a server hosting the judge model; without it the model runs in-process)")
    llm.add_argument("--judge-model", help="model name at that endpoint, e.g. deepseek-chat; in-process: a local "
                     "folder or hub id, e.g. cais/HarmBench-Llama-2-13b-cls, meta-llama/Llama-Guard-3-11B-Vision")
    llm.add_argument("--device", help="in-process harmbench / llamaguard: torch device (default: cuda if available)")
    llm.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"),
                     help="in-process harmbench / llamaguard: weights dtype (default: auto, the checkpoint's)")
    llm.add_argument(
        "--prompt",
        help=f"judge prompt: {', '.join(prompt_names())} (default: {DEFAULT_PROMPT}, which judges FigStep rows "
        "with davsp-figstep and the others with davsp, by each row's benchmark)",
    )
    llm.add_argument(
        "--api-key-env", help="environment variable holding the API key (default: OPENAI_API_KEY; '' for none)"
    )
    llm.add_argument("--concurrency", type=int, help="parallel requests (default: 8)")
    llm.add_argument(
        "--timeout", type=float, help="deadline in seconds for one attempt, the whole reply included (default: 60)"
    )
    llm.add_argument("--max-retries", type=int, help="retries on errors, 429 and 5xx (default: 5)")
    llm.add_argument("--cache-dir", help="reply cache folder (default: ~/.cache/davsp/llm_judge, or $DAVSP_CACHE_DIR)")
    llm.add_argument("--no-cache", action="store_true", help="do not read or write the reply cache")

    compare = p.add_argument_group("agreement (--compare)")
    compare.add_argument("--on", default="safe", choices=("safe", "verdict"), help="field to compare (default: safe)")

    evaluate = p.add_argument_group("measurement (--evaluate-labelled)")
    evaluate.add_argument("--label-column", default="final_label", help="gold label column (default: final_label)")
    evaluate.add_argument("--response-column", default="completion", help="response text column (default: completion)")
    evaluate.add_argument("--question-column", help="the request each response answers (harmbench, llamaguard, llm "
                          "prompts that need it)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    modes = [m for m in ("input", "compare", "evaluate_labelled") if getattr(args, m)]
    if len(modes) != 1:
        raise DavspError("davsp judge: give exactly one of --input, --compare or --evaluate-labelled")
    return {"input": _run_judge, "compare": _run_compare, "evaluate_labelled": _run_evaluate}[modes[0]](args)


def _judge_options(args: argparse.Namespace) -> dict:
    """The options given for the chosen judge; an option it does not take is a one-line error."""
    given = [dest for dest in _OPTIONS if getattr(args, dest, None) is not None]
    given += ["no_cache"] if getattr(args, "no_cache", False) else []
    wrong = [dest for dest in given if dest not in _TAKES.get(args.judge, set())]
    if wrong:
        flags = ", ".join("--" + dest.replace("_", "-") for dest in wrong)
        takers = [name for name, takes in _TAKES.items() if all(dest in takes for dest in wrong)]
        raise DavspError(f"{flags} only apply to --judge {' or '.join(takers) or 'llm'} (got --judge {args.judge})")
    options = {_OPTIONS[dest]: getattr(args, dest) for dest in given if dest in _OPTIONS}
    if "no_cache" in given:
        options["cache_dir"] = None
    if args.judge == "llm" and ("url" not in options or "model" not in options):
        raise DavspError("--judge llm needs --judge-url (e.g. https://api.openai.com/v1) and --judge-model")
    if args.judge in _MODEL_JUDGES and "model" not in options:
        raise DavspError(f"--judge {args.judge} needs --judge-model (a local folder or hub id to run in-process, "
                         "or the model name the --judge-url server serves)")
    return options


def _run_judge(args: argparse.Namespace) -> int:
    if not args.out:
        raise DavspError("--input needs --out (the judged JSONL to write)")
    if args.batch_size < 1:
        raise DavspError(f"--batch-size {args.batch_size}: must be at least 1")
    judge = get_judge(args.judge, **_judge_options(args))
    summary = judge_file(args.input, judge, args.out, batch_size=args.batch_size, progress=not args.no_progress)
    print(
        f"judged {summary['total']} responses with '{args.judge}' -> {summary['out']} "
        f"({summary['resumed']} kept from an earlier run, {summary['judged_now']} judged now)"
    )
    for outcome, count in summary["counts"].items():
        print(f"  {outcome:<16}{count:>7}")
    if "llm_requests" in summary:
        print(
            f"  requests {summary['llm_requests']}, cache hits {summary['llm_cache_hits']}, retries {summary['llm_retries']}"
        )
    if summary["errors"]:
        print(
            f"warning: {summary['errors']} responses could not be judged (verdict 'error' and safe null, or a null "
            "score; the reason is in judge_error); rerunning the same command retries them",
            file=sys.stderr,
        )
    return 0


def _run_compare(args: argparse.Namespace) -> int:
    a, b = args.compare
    print(format_agreement(compare_files(a, b, on=args.on), a, b))
    return 0


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def format_evaluation(report: dict) -> str:
    """The measurement as Markdown: per detector, accuracy and kappa, the confusion table, per-class scores."""
    harm = report["label_kind"] != "refusal classes"
    name_of = (lambda label: {"True": "harmful", "False": "not harmful"}[str(label)]) if harm else str
    gold = ", ".join(f"{name_of(k)} {v}" for k, v in report["gold_counts"].items())
    lines = [f"{report['n']} labelled responses, labels: {report['label_kind']} ({gold})", ""]
    for name, result in report["detectors"].items():
        errors = f"; {result['errors']} not judged (error), left out" if result["errors"] else ""
        lines += [f"**{name}**: accuracy {_fmt(result['accuracy'])}, Cohen's kappa {_fmt(result['kappa'])} "
                  f"(n={result['n']}{errors})", ""]
        labels = list(result["per_class"])
        counts = {(str(g), str(p)): n for g, p, n in result["confusion"]}
        lines += ["| gold \\ predicted | " + " | ".join(map(name_of, labels)) + " |", "|---" * (len(labels) + 1) + "|"]
        lines += [f"| {name_of(g)} | " + " | ".join(str(counts.get((g, p), 0)) for p in labels) + " |" for g in labels]
        lines += ["", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        rows = {name_of(k): v for k, v in result["per_class"].items()}
        if "safe" in result:
            rows["safe (= full_refusal)"] = result["safe"]
        for label, s in rows.items():
            lines.append(
                f"| {label} | {_fmt(s['precision'])} | {_fmt(s['recall'])} | {_fmt(s['f1'])} | {s['support']} |"
            )
        lines.append("")
    return "\n".join(lines)


def _run_evaluate(args: argparse.Namespace) -> int:
    from ..judges.measure import evaluate_labelled

    judge = get_judge(args.judge, **_judge_options(args)) if args.judge != "refusal" else None
    report = evaluate_labelled(args.evaluate_labelled, args.label_column, args.response_column,
                               question_column=args.question_column, judge=judge)
    print(format_evaluation(report))
    return 0
