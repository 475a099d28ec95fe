"""`davsp toy build | check`: the embedded safety world (davsp.toy)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..errors import DavspError
from ..io import atomic_write_json
from ..toy.build import BuildConfig, build_world
from ..toy.world import STEER_LAYER


def add_commands(subparsers) -> None:
    toy = subparsers.add_parser("toy", help="the embedded safety world")
    verbs = toy.add_subparsers(dest="toy_command", required=True)
    build = verbs.add_parser("build", help="train the safety world from a seed (minutes on 2 CPU cores)")
    build.add_argument("--out", required=True, type=Path, help="folder to write the model to (Hugging Face format)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--steps", type=int, default=BuildConfig.steps, help="whole-model training steps")
    build.set_defaults(func=run_build)
    check = verbs.add_parser("check", help="measure a safety world: no-defense behaviour and the steering-causality check")
    check.add_argument("--model", type=Path, default=None, help="model folder (default: the shipped world)")
    check.add_argument("--out", type=Path, default=None, help="also write the numbers to this JSON file")
    check.set_defaults(func=run_check)


def run_check(args: argparse.Namespace) -> int:
    from ..toy import MODEL_DIR
    from ..toy.steering import check_world, format_rows

    torch.set_num_threads(2)
    result = check_world(args.model or MODEL_DIR)
    print(json.dumps(result["metrics"], indent=2))
    for key, table in result["steering"].items():
        print(f"\nsteering at layer {STEER_LAYER}, alpha x (mean harmful - mean benign), "
              f"{'with' if key == 'prefix' else 'without'} prefix")
        print(format_rows(table))
    if args.out:
        atomic_write_json(args.out, result)
    return 0


def run_build(args: argparse.Namespace) -> int:
    if args.steps < 1:
        raise DavspError(f"--steps must be >= 1 (got {args.steps})")
    if args.out.exists() and any(args.out.iterdir()):
        raise DavspError(f"{args.out}: folder exists and is not empty; choose another --out")
    report = build_world(args.out, BuildConfig(seed=args.seed, steps=args.steps))
    print(f"wrote {args.out} in {report['train_seconds']:.0f} s: {report.get('metrics', {})}")
    return 0
