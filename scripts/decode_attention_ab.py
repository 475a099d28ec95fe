"""Time batched generation with and without cuDNN attention (the choice `davsp.generate.decoding_attention` makes).

One arm per process, so neither inherits the other's cached cuDNN plans: a 2-token warm-up, then
`--calls` timed generations of the same batch, then how many of 24-token answers are the same batched
and one query at a time. Prints one JSON line.

    python3 scripts/decode_attention_ab.py --arm without-cudnn   # what davsp does on CUDA
    python3 scripts/decode_attention_ab.py --arm cudnn           # PyTorch's default backend choice
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

import davsp.generate
from davsp.bench import bench_padding, synthetic_records
from davsp.bench.models import load_bench_model
from davsp.generate import defended_inputs, generate_batch
from davsp.prompt import VisualSafetyPrompt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arm", choices=("cudnn", "without-cudnn"), required=True)
    parser.add_argument("--model", default="llava-1.5-13b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--n", type=int, default=8, help="queries in the batch")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--calls", type=int, default=3)
    args = parser.parse_args()
    if args.arm == "cudnn":  # PyTorch's own choice, cuDNN included
        davsp.generate.decoding_attention = lambda device: nullcontext()
    adapter = load_bench_model(args.model, device=args.device, dtype=args.dtype)
    vsp = VisualSafetyPrompt.blank(adapter.canvas_size, bench_padding(adapter.canvas_size), "normalized",
                                   adapter.image_mean, adapter.image_std)
    records = synthetic_records(Path(tempfile.mkdtemp(prefix="davsp-ab-")), "query", args.n, 0)
    questions, canvases = defended_inputs(adapter, records, "davsp", vsp)
    sync = torch.cuda.synchronize if adapter.device.type == "cuda" else (lambda: None)
    generate_batch(adapter, questions, canvases, 2)
    seconds = []
    for _ in range(args.calls):
        sync()
        started = time.perf_counter()
        generate_batch(adapter, questions, canvases, args.max_new_tokens)
        sync()
        seconds.append(round(time.perf_counter() - started, 3))
    batched = generate_batch(adapter, questions, canvases, 24)[0]
    alone = [generate_batch(adapter, questions[i : i + 1], canvases[i : i + 1], 24)[0][0] for i in range(args.n)]
    print(json.dumps({"arm": args.arm, "model": args.model, "dtype": args.dtype, "n": args.n,
                      "max_new_tokens": args.max_new_tokens, "seconds_per_call": seconds,
                      "same_answers_batched_and_alone": sum(a == b for a, b in zip(batched, alone))}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
