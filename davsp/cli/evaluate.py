"""`davsp evaluate` and `davsp report`: metrics from judged responses, and the HTML report
(davsp.evaluate, davsp.report)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..evaluate import agreement_summary, evaluate_files, markdown_table, metric_entries, summary_table
from ..report import build_report


def run_evaluate(args: argparse.Namespace) -> int:
    metrics = evaluate_files(args.judged, args.out, resamples=args.bootstrap, confidence=args.confidence,
                             seed=args.seed, samples=args.samples)
    print(markdown_table(*summary_table(metric_entries(metrics["results"]))), end="")
    for pair in metrics["agreement"]:
        print(f"{' vs '.join(pair['judges'])}: {agreement_summary(pair)}; {len(pair['disagreements'])} disagreements")
    print(f"wrote {args.out}/metrics.json, tables.md, tables.csv, samples.jsonl")
    return 0


def run_report(args: argparse.Namespace) -> int:
    build_report(args.dirs, args.out)
    print(f"wrote {args.out}, {Path(args.out).with_suffix('.md')}, {Path(args.out).with_suffix('.csv')}")
    return 0


def _add_evaluate(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="RSR / refusal rate, over-refusal and utility metrics from judged responses",
        description="Compute, per judge, RSR (harm judge) or the refusal rate (refusal judge) with bootstrap "
                    "intervals (judge errors counted apart, never safe), over-refusal, MME, MM-Vet and LLaVA-Bench "
                    "scores per benchmark and defense. Pass several judges' files of the same responses to see "
                    "their agreement and the responses they disagree on.")
    parser.add_argument("judged", nargs="+", type=Path, metavar="JUDGED.jsonl", help="outputs of `davsp judge`")
    parser.add_argument("--out", type=Path, required=True, help="evaluation directory to write")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals (0: none)")
    parser.add_argument("--confidence", type=float, default=0.95, help="confidence level of the intervals")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and of the sample choice")
    parser.add_argument("--samples", type=int, default=3, help="queries per benchmark kept as sample responses")
    parser.set_defaults(func=run_evaluate)


def _add_report(subparsers) -> None:
    parser = subparsers.add_parser(
        "report", help="self-contained HTML report over training runs and evaluations",
        description="One HTML page (inline images) with the VSP frame, training curves and projection histograms "
                    "of each run, and the metric tables and sample responses of each evaluation; the tables "
                    "also go to report.md and report.csv beside it.")
    parser.add_argument("dirs", nargs="+", type=Path, metavar="DIR",
                        help="training run directories (davsp train) and/or evaluation directories (davsp evaluate)")
    parser.add_argument("--out", type=Path, required=True, help="HTML file to write, e.g. report.html")
    parser.set_defaults(func=run_report)


def add_commands(subparsers) -> None:
    _add_evaluate(subparsers)
    _add_report(subparsers)
