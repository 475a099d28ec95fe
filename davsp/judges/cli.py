"""`davsp judge`: judge a responses file, compare two judged files, or measure the refusal judge.

davsp judge --input responses.jsonl --out judged.jsonl [--judge refusal|llm ...]
davsp judge --input responses.jsonl --out graded.jsonl --judge llm --prompt mmvet-grader|llava-bench-review ...
davsp judge --compare a.jsonl b.jsonl [--on safe|verdict]
davsp judge --evaluate-labelled labelled.csv [...] --label-column final_label --response-column completion
"""

from __future__ import annotations

import argparse
import sys

from ..errors import DavspError
from . import get_judge, judge_file, judge_names
from .agreement import compare_files, format_agreement
from .prompts import prompt_names

# llm option (argparse dest) -> LLMJudge parameter
_LLM_OPTIONS = {
    "judge_url": "url",
    "judge_model": "model",
    "prompt": "prompt",
    "api_key_env": "api_key_env",
    "concurrency": "concurrency",
    "timeout": "timeout_s",
    "max_retries": "max_retries",
    "cache_dir": "cache_dir",
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
        help="CSV files of labelled responses (e.g. XSTest completions)",
    )

    judging = p.add_argument_group("judging (--input)")
    judging.add_argument("--out", help="judged JSONL to write (resumes if it exists; never the input)")
    judging.add_argument(
        "--judge", default="refusal", help=f"judge name: {', '.join(judge_names())} (default: refusal)"
    )
    judging.add_argument("--batch-size", type=int, default=64, help="rows per appended batch (default: 64)")
    judging.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    llm = p.add_argument_group("llm judge (--judge llm)")
    llm.add_argument("--judge-url", help="OpenAI-compatible base URL, e.g. https://api.openai.com/v1")
    llm.add_argument("--judge-model", help="model name at that endpoint, e.g. deepseek-chat")
    llm.add_argument("--prompt", help=f"judge prompt: {', '.join(prompt_names())} (default: davsp)")
    llm.add_argument(
        "--api-key-env", help="environment variable holding the API key (default: OPENAI_API_KEY; '' for none)"
    )
    llm.add_argument("--concurrency", type=int, help="parallel requests (default: 8)")
    llm.add_argument("--timeout", type=float, help="seconds per request (default: 60)")
    llm.add_argument("--max-retries", type=int, help="retries on errors, 429 and 5xx (default: 5)")
    llm.add_argument("--cache-dir", help="reply cache folder (default: ~/.cache/davsp/llm_judge, or $DAVSP_CACHE_DIR)")
    llm.add_argument("--no-cache", action="store_true", help="do not read or write the reply cache")

    compare = p.add_argument_group("agreement (--compare)")
    compare.add_argument("--on", default="safe", choices=("safe", "verdict"), help="field to compare (default: safe)")

    evaluate = p.add_argument_group("measurement (--evaluate-labelled)")
    evaluate.add_argument("--label-column", default="final_label", help="gold label column (default: final_label)")
    evaluate.add_argument("--response-column", default="completion", help="response text column (default: completion)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    modes = [m for m in ("input", "compare", "evaluate_labelled") if getattr(args, m)]
    if len(modes) != 1:
        raise DavspError("davsp judge: give exactly one of --input, --compare or --evaluate-labelled")
    return {"input": _run_judge, "compare": _run_compare, "evaluate_labelled": _run_evaluate}[modes[0]](args)


def _llm_options(args: argparse.Namespace) -> dict:
    given = [dest for dest in _LLM_OPTIONS if getattr(args, dest) is not None] + (["no_cache"] if args.no_cache else [])
    if args.judge != "llm":
        if given:
            flags = ", ".join("--" + dest.replace("_", "-") for dest in given)
            raise DavspError(f"{flags} only apply to --judge llm (got --judge {args.judge})")
        return {}
    options = {_LLM_OPTIONS[dest]: getattr(args, dest) for dest in given if dest in _LLM_OPTIONS}
    if args.no_cache:
        options["cache_dir"] = None
    if "url" not in options or "model" not in options:
        raise DavspError("--judge llm needs --judge-url (e.g. https://api.openai.com/v1) and --judge-model")
    return options


def _run_judge(args: argparse.Namespace) -> int:
    if not args.out:
        raise DavspError("--input needs --out (the judged JSONL to write)")
    if args.batch_size < 1:
        raise DavspError(f"--batch-size {args.batch_size}: must be at least 1")
    judge = get_judge(args.judge, **_llm_options(args))
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
    """The measurement as Markdown tables, one per detector."""
    gold = ", ".join(f"{k} {v}" for k, v in report["gold_counts"].items())
    lines = [f"{report['n']} labelled responses ({gold})", ""]
    for name, result in report["detectors"].items():
        lines += [
            f"**{name}**: accuracy {_fmt(result['accuracy'])}",
            "",
            "| class | precision | recall | F1 | support |",
            "|---|---|---|---|---|",
        ]
        rows = {**result["per_class"], "safe (= full_refusal)": result["safe"]}
        for label, s in rows.items():
            lines.append(
                f"| {label} | {_fmt(s['precision'])} | {_fmt(s['recall'])} | {_fmt(s['f1'])} | {s['support']} |"
            )
        lines.append("")
    return "\n".join(lines)


def _run_evaluate(args: argparse.Namespace) -> int:
    from .refusal import evaluate_labelled

    print(format_evaluation(evaluate_labelled(args.evaluate_labelled, args.label_column, args.response_column)))
    return 0
