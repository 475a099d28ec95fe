"""Queries/s of `davsp generate` on the shipped safety-world model: the endpoint backend against
`davsp serve --model` at several concurrencies, and torchrun at several rank counts (docs/performance.md).

    python scripts/bench_scaling.py [--concurrency 1,2,4,8,16] [--ranks 1,2] [--repeat 3] [--queries 64]

Every run answers the first `--queries` of the world's held-out queries (24 new tokens, defense prefix)
into a fresh file. The settings are run in turn, `--repeat` rounds of all of them, and the best run of
each is printed with the load average when it started: on a shared machine the other jobs' load comes
and goes, and interleaving gives each setting the same chances. torchrun times are whole commands
(process start and model load included); one rank runs as a plain `davsp generate`, and a plain run
with `--limit 1` shows that fixed cost.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from davsp.endpoint import Endpoint, generate_via_endpoint
from davsp.toy import MODEL_DIR
from davsp.toy.world import demo_splits

MAX_TOKENS = 24


def start_server() -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "davsp", "serve", "--model", str(MODEL_DIR), "--defense", "none", "--port", "0",
               "--device", "cpu", "--batch-size", "32", "--queue-size", "256", "--log-level", "warning"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in server.stderr:
        if "listening on" in line:
            return server, line.split("listening on")[1].strip()
    raise SystemExit("davsp serve did not start")


def best_runs(repeat: int, runs: dict) -> dict:
    """{setting: (best seconds, load average at the start of that run)}, the settings run in turn."""
    results: dict = {key: [] for key in runs}
    for round_ in range(repeat):
        for key, run in runs.items():
            load = os.getloadavg()[0]
            started = time.perf_counter()
            run(round_)
            results[key].append((time.perf_counter() - started, load))
    return {key: min(times) for key, times in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,2,4,8,16", help="levels to run ('' skips the endpoint)")
    parser.add_argument("--ranks", default="1,2", help="rank counts to run ('' skips torchrun)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--queries", type=int, default=64)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="davsp-scaling-"))
    splits = demo_splits(folder / "data", seed=0)
    records = (splits["harmful_heldout"] + splits["benign_heldout"])[: args.queries]
    data = folder / "records.jsonl"
    data.write_text("".join(json.dumps({"id": r.id, "image": str(r.image), "question": r.question}) + "\n"
                            for r in records))
    print(f"{len(records)} queries, {MAX_TOKENS} new tokens, {os.cpu_count()} CPUs")

    if args.concurrency:
        bench_endpoint(args, records, folder)
    if args.ranks:
        bench_torchrun(args, records, folder, data)


def bench_endpoint(args, records, folder: Path) -> None:
    server, url = start_server()
    try:
        endpoint = lambda c: Endpoint(url + "/v1", str(MODEL_DIR), concurrency=c)  # noqa: E731
        generate_via_endpoint(records[:8], endpoint(8), defense="prefix", max_new_tokens=MAX_TOKENS, progress=False)
        levels = [int(x) for x in args.concurrency.split(",")]
        best = best_runs(args.repeat, {c: lambda round_, c=c: generate_via_endpoint(
            records, endpoint(c), defense="prefix", max_new_tokens=MAX_TOKENS,
            out=folder / f"endpoint-{c}-{round_}.jsonl", progress=False) for c in levels})
        for c, (seconds, load) in best.items():
            print(f"endpoint concurrency {c:>3}: {len(records) / seconds:6.1f} queries/s ({seconds:.1f} s, load {load:.1f})")
    finally:
        server.terminate()
        server.wait(30)



def bench_torchrun(args, records, folder: Path, data: Path) -> None:
    def command(ranks: int, out: Path, *extra: str) -> list[str]:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), "-m"]
        return [*(launcher if ranks > 1 else [sys.executable, "-m"]), "davsp", "generate", "--model", str(MODEL_DIR),
                "--device", "cpu", "--data", str(data), "--defense", "prefix", "--max-new-tokens", str(MAX_TOKENS),
                "--batch-size", "8", "--out", str(out), *extra]

    runs = {"fixed": lambda round_: subprocess.run(command(1, folder / f"fixed-{round_}.jsonl", "--limit", "1"),
                                                   check=True, capture_output=True)}
    for ranks in (int(x) for x in args.ranks.split(",")):
        runs[ranks] = lambda round_, ranks=ranks: subprocess.run(
            command(ranks, folder / f"ranks-{ranks}-{round_}.jsonl"), check=True, capture_output=True)
    for key, (seconds, load) in best_runs(args.repeat, runs).items():
        if key == "fixed":
            print(f"process start + model load + 1 query: {seconds:.1f} s (load {load:.1f})")
        else:
            print(f"ranks {key}: {len(records) / seconds:6.1f} queries/s whole command ({seconds:.1f} s, load {load:.1f})")


if __name__ == "__main__":
    main()
