"""`davsp data check | export | render-figstep`: look at, convert and regenerate benchmark data."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..io import atomic_write_text
from .common import count
from ..data.benchmarks import BENCHMARKS, BenchmarkCheck, check_benchmark, load_benchmark
from ..data.figstep import FIGSTEP_FONT, render_figstep
from ..data.records import Record

_RECORD_KEYS = ("id", "image", "question", "answer", "category", "benchmark")


def add_commands(subparsers) -> None:
    data = subparsers.add_parser("data", help="check, export and render benchmark data")
    verbs = data.add_subparsers(dest="data_command", metavar="{check,export,render-figstep}", required=True)

    check = verbs.add_parser("check", help="count a benchmark's records and list missing images (exit 1 if any)")
    _add_selection(check)
    check.set_defaults(func=run_check)

    export = verbs.add_parser("export", help="write a benchmark as davsp JSONL records (images relative to the file)")
    _add_selection(export)
    export.add_argument("--out", required=True, type=Path, help="output .jsonl file")
    export.set_defaults(func=run_export)

    render = verbs.add_parser("render-figstep", help="regenerate the FigStep typographic images from a SafeBench CSV")
    render.add_argument("--csv", required=True, type=Path, help="safebench.csv or SafeBench-Tiny.csv")
    render.add_argument("--out", required=True, type=Path, help="folder for query_ForbidQI_{cat}_{task}_6.png")
    render.add_argument("--font", type=Path, default=FIGSTEP_FONT, help="FreeMonoBold.ttf (default: %(default)s)")
    render.set_defaults(func=run_render_figstep)


def _add_selection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help=f"benchmark: {', '.join(BENCHMARKS)}")
    parser.add_argument("root", type=Path, help="the benchmark folder, in its upstream layout")
    parser.add_argument("--tiny", action="store_true", help="official tiny version (mm-safetybench, figstep)")
    parser.add_argument("--split", help="train/val/test (seeded by question id); vlguard: train/test files")
    parser.add_argument("--image-types", nargs="+", help="mm-safetybench: any of SD TYPO SD_TYPO")
    parser.add_argument("--subset", nargs="+", help="vlguard: unsafes safe_unsafes safe_safes; mme: subtask names")
    parser.add_argument("--limit", type=count(1), help="keep the first N records")


def _selection(args) -> dict:
    return {
        "tiny": args.tiny,
        "split": args.split,
        "image_types": args.image_types,
        "subset": args.subset,
        "limit": args.limit,
    }


def run_check(args) -> int:
    report = check_benchmark(args.name, args.root, **_selection(args))
    print(format_check(report))
    return 1 if report.missing else 0


def format_check(report: BenchmarkCheck) -> str:
    lines = [
        f"{report.benchmark} at {report.root}: {report.records} records, "
        f"{report.images} images, {len(report.missing)} missing"
    ]
    for field_name, counts in report.counts.items():
        lines.append(f"by {field_name}:")
        width = max(len(value) for value in counts)
        lines += [f"  {value:<{width}}  {count}" for value, count in counts.items()]
    if report.missing:
        lines.append(f"missing images ({len(report.missing)}):")
        lines += [f"  {path}" for path in report.missing]
    return "\n".join(lines)


def run_export(args) -> int:
    records = load_benchmark(args.name, args.root, **_selection(args))
    write_records_jsonl(records, args.out)
    print(f"wrote {len(records)} {args.name} records to {args.out}")
    return 0


def write_records_jsonl(records: list[Record], out: str | Path) -> None:
    """The davsp record format (see records.py): extra fields sit beside the known ones, and
    image paths are relative to the file's folder so the file and its images move together."""
    out = Path(out)
    base = out.resolve().parent
    lines = []
    for record in records:
        assert not set(record.extra) & set(_RECORD_KEYS), f"extra field shadows a record field in {record.id}"
        row = {
            "id": record.id,
            "image": os.path.relpath(record.image, base) if record.image is not None else None,
            "question": record.question,
            "answer": record.answer,
            "category": record.category,
            "benchmark": record.benchmark,
            **record.extra,
        }
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    atomic_write_text(out, "".join(lines))


def run_render_figstep(args) -> int:
    written = render_figstep(args.csv, args.out, font_path=args.font)
    print(f"wrote {len(written)} FigStep images to {args.out}")
    return 0
