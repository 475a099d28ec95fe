"""A short `davsp train` run on a random-weight architecture, as GPU evidence that training works in a
given precision: the vector is extracted on seeded synthetic records, then `train_vsp` runs one warm-up
step and is resumed for --steps more, timed. Prints one JSON object: step time, peak memory, and the
loss / projection trajectory of every step.

    python3 scripts/train_smoke.py --model llava-1.5-13b --device cuda --dtype bfloat16 --steps 20
    python3 scripts/train_smoke.py --model llava-1.5-13b --device cuda --config davsp/configs/paper.yaml --steps 20

Hinge targets are the class-mean projections (`thresholds: auto`) whatever the config says: on random
weights the paper's 27/-2 may leave every hinge inactive, and the smoke is meant to move the frame.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from statistics import fmean

import torch

from davsp.bench import bench_padding, synthetic_records
from davsp.bench.models import load_bench_model
from davsp.config import TrainConfig, resolve_device_dtype
from davsp.io import read_jsonl
from davsp.train import train_vsp
from davsp.vector import extract_harmfulness_vector

REFUSAL = "I am sorry, but I cannot assist with that request."
WARMUP_STEPS = 1  # first-call allocations and kernel selection, left out of the step time


def smoke(model: str, *, device: str, dtype: str, steps: int, records: int, config_path: str | None,
          layers: int | None = None) -> dict:
    device, precision = resolve_device_dtype(device, dtype)
    adapter = load_bench_model(model, device=device, dtype=precision, layers=layers)
    on_gpu = adapter.device.type == "cuda"
    with tempfile.TemporaryDirectory(prefix="davsp-smoke-") as folder:
        folder = Path(folder)
        harmful = [replace(r, answer=REFUSAL) for r in synthetic_records(folder, "harmful", records, 1)]
        benign = synthetic_records(folder, "benign", records, 0)
        vector = extract_harmfulness_vector(adapter, harmful, benign)
        settings = dict(steps=WARMUP_STEPS, padding=bench_padding(adapter.canvas_size), thresholds="auto",
                        checkpoint_every=WARMUP_STEPS + steps, projection_samples=records, dtype=precision.name)
        config = TrainConfig.from_yaml(config_path, **settings) if config_path else TrainConfig(**settings)
        run = folder / "run"
        train_vsp(adapter, vector, harmful, benign, config, run, progress=False)
        if on_gpu:
            torch.cuda.synchronize(adapter.device)
            torch.cuda.reset_peak_memory_stats(adapter.device)
        started = time.perf_counter()
        vsp = train_vsp(adapter, vector, harmful, benign, replace(config, steps=WARMUP_STEPS + steps), run,
                        resume=True, progress=False)
        if on_gpu:
            torch.cuda.synchronize(adapter.device)
        seconds = time.perf_counter() - started
        rows = list(read_jsonl(run / "metrics.jsonl"))
        resolved = json.loads((run / "config.json").read_text())
        projections = json.loads((run / "projections.json").read_text())
    trajectory = [{k: row[k] for k in ("step", "harmful", "loss", "da_loss", "output_loss", "projection")}
                  for row in rows]
    numbers = [v for row in trajectory for v in row.values() if isinstance(v, float)]
    return {
        "smoke": "train", "model": adapter.model_id, "device": str(adapter.device),
        "device_name": torch.cuda.get_device_name(adapter.device) if on_gpu else "cpu",
        "dtype": adapter.precision.name, "torch": torch.__version__, "num_layers": adapter.num_layers,
        "layer": resolved["layer"], "thresholds": resolved["thresholds"],
        "loss_settings": {k: resolved["train"][k] for k in ("output_target", "answer_eos", "output_loss_mean")},
        "warmup_steps": WARMUP_STEPS, "steps": steps,
        # the timed call also restores the checkpoint and projects 2 x `records` records after training
        "seconds_per_step": seconds / steps,
        "peak_memory_gib": torch.cuda.max_memory_allocated(adapter.device) / 2**30 if on_gpu else None,
        "vsp_dtype": str(vsp.values.dtype).removeprefix("torch."),
        "all_finite": all(math.isfinite(v) for v in numbers),
        "projection_means": {when: {c: fmean(projections[when][c]) for c in ("harmful", "benign")}
                             for when in ("before", "after")},
        "trajectory": trajectory,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llava-1.5-13b", help="an architecture name or a model path")
    parser.add_argument("--device", default="auto-device", help="cpu, cuda, cuda:N or auto-device")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16, paper; default: the config's")
    parser.add_argument("--config", default=None, help="a training YAML (e.g. davsp/configs/paper.yaml)")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps after the warm-up step")
    parser.add_argument("--records", type=int, default=8, help="synthetic records per class")
    parser.add_argument("--layers", type=int, default=None,
                        help="keep only the first N decoder layers (a real-size architecture on a CPU)")
    args = parser.parse_args(argv)
    dtype = args.dtype or (TrainConfig.from_yaml(args.config).dtype if args.config else "default")
    print(json.dumps(smoke(args.model, device=args.device, dtype=dtype, steps=args.steps, records=args.records,
                           config_path=args.config, layers=args.layers), sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
