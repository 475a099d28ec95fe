"""`davsp bench train | generate | serve`: timings (davsp.bench, davsp.serve.bench)."""

from __future__ import annotations

import json

import torch

from ..config import resolve_device_dtype
from .common import count
from ..bench.reference import ORIGINAL_PAD
from ..bench.timing import bench_generate, bench_train


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _print_table(report: dict, unit: str, kinds: list[str]) -> None:
    print(f"{report['model']} on {report['device_name']} ({report['dtype']}, threads={report['threads']}, "
          f"{report['parameters'] / 1e6:.1f}M parameters)")
    print(f"{'path':<10} {'part':<8} {unit:>12} {'peak GiB':>9}")
    for path in ("project", "reference")[: 1 + ("reference" in report)]:
        for kind in kinds:
            row = report[path] if kind == "all" else report[path][kind]
            print(f"{path:<10} {kind:<8} {row[unit.replace('/', '_per_')]:>12.2f} "
                  f"{_fmt(row['peak_memory_gib'], '.2f'):>9}")
    if report["ratio"] is not None:
        low, high = report["ratio_iqr"]
        kinds = ", ".join(f"{kind} {report[f'ratio_{kind}']:.2f}x" for kind in kinds if f"ratio_{kind}" in report)
        print(f"ratio (project / reference), median of {report['pairs']} interleaved pairs: {report['ratio']:.2f}x "
              f"(interquartile {low:.2f}-{high:.2f}x, range {report['ratio_min']:.2f}-{report['ratio_max']:.2f}x)"
              + (f"; {kinds}" if kinds else ""))
    if "harmful_tflops_per_s" in report:
        print(f"harmful step: {report['harmful_tflops_per_s']:.1f} TFLOP/s"
              + (f" of {report['bf16_peak_tflops']:.0f} bf16 peak" if "bf16_peak_tflops" in report else ""))
    print(f"process peak RSS: {report['process_peak_rss_gib']:.2f} GiB")


def _load(args):
    from ..bench.models import load_bench_model

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    return load_bench_model(args.model, device=device, dtype=dtype, layers=args.layers)


def _emit(report: dict, as_json: bool, unit: str, kinds: list[str]) -> int:
    if as_json:
        print(json.dumps(report, sort_keys=True))
    else:
        _print_table(report, unit, kinds)
    return 0


def cmd_bench_train(args) -> int:
    report = bench_train(_load(args), steps=args.steps, batch_size=args.batch_size, warmup=args.warmup,
                         reference=args.reference, reference_pad=args.reference_pad, seed=args.seed)
    return _emit(report, args.json, "samples/s", ["harmful", "benign", "all"])


def cmd_bench_generate(args) -> int:
    report = bench_generate(_load(args), n=args.n, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                            reference=args.reference, seed=args.seed, static_cache=args.static_cache)
    return _emit(report, args.json, "tokens/s", ["all"])


def cmd_bench_serve(args) -> int:
    from ..io import atomic_write_json
    from ..serve.bench import bench_serve, format_bench

    concurrency = tuple(int(c) for c in args.concurrency.split(",") if c.strip())
    report = bench_serve(image_px=args.image_px, overhead_pairs=args.pairs, requests=args.requests,
                         concurrency=concurrency, time_limit_s=args.time_limit)
    print(format_bench(report))
    if args.out:
        atomic_write_json(args.out, report)
        print(f"wrote {args.out}")
    lost = sum(row["lost"] for row in report["throughput"].values())
    return 1 if lost else 0


def _add_common(parser) -> None:
    from ..bench.models import ARCHITECTURES

    parser.add_argument("--model", required=True,
                        help=f"model directory / hub id, or a random-weight architecture: {', '.join(ARCHITECTURES)}")
    parser.add_argument("--reference", action="store_true",
                        help="also time the original code's pattern; print the ratio")
    parser.add_argument("--device", default="auto-device", help="cpu, cuda, cuda:N, auto or auto-device")
    parser.add_argument("--dtype", default="default",
                        help="float32, bfloat16, float16, paper (fp16 language model, fp32 vision tower) "
                             "or default (bf16 on GPU)")
    parser.add_argument("--layers", type=count(1), default=None,
                        help="keep only the first N decoder layers (smoke runs)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the synthetic records and the batch draws")
    parser.add_argument("--threads", type=count(1), default=None,
                        help="CPU threads for torch (1 avoids thread thrashing on a busy, shared CPU)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def add_commands(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="time training steps and generation (vs the original code's pattern)")
    verbs = bench.add_subparsers(dest="bench_command", required=True)
    p = verbs.add_parser("train", help="samples/s of harmful and benign training steps")
    _add_common(p)
    p.add_argument("--steps", type=count(1), default=10, help="timed steps per kind (harmful, benign)")
    p.add_argument("--batch-size", type=count(1), default=2, help="samples per step (paper: 2)")
    p.add_argument("--warmup", type=count(0), default=2, help="untimed steps per kind and path first")
    p.add_argument("--reference-pad", type=count(1), default=ORIGINAL_PAD,
                   help="text tokens the reference pads the output-loss input to (original: 1024; "
                        "capped at the model's context)")
    p.set_defaults(func=cmd_bench_train)
    p = verbs.add_parser("generate", help="tokens/s of greedy answering under the DAVSP defense")
    _add_common(p)
    p.add_argument("--n", type=count(1), default=16, help="queries to answer")
    p.add_argument("--max-new-tokens", type=count(1), default=32, help="tokens per answer at most (EOS stops earlier)")
    p.add_argument("--batch-size", type=count(1), default=16, help="queries per batch on the project path")
    p.add_argument("--static-cache", action="store_true",
                   help="project path with a preallocated KV cache (a GPU then compiles the decoding step)")
    p.set_defaults(func=cmd_bench_generate)
    p = verbs.add_parser("serve", help="gateway overhead (p50/p99 ms) and throughput against an instant upstream")
    p.add_argument("--image-px", type=int, default=336, help="side of the square test image")
    p.add_argument("--pairs", type=int, default=100, help="direct/gateway request pairs for the overhead")
    p.add_argument("--requests", type=int, default=128, help="requests per concurrency level")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated concurrency levels")
    p.add_argument("--time-limit", type=float, default=120.0, help="seconds for the whole run at most")
    p.add_argument("--out", help="also write the numbers as JSON here")
    p.set_defaults(func=cmd_bench_serve)
