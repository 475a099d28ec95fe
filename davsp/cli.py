"""The `davsp` command: a thin layer over the Python API. Errors print one line and exit 2."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import fields
from pathlib import Path

from .errors import DavspError

# modules that add their own verbs with `add_commands(subparsers)`
_COMMAND_MODULES: list[str] = ["davsp.data.cli", "davsp.judges.cli", "davsp.evaluate", "davsp.report", "davsp.demo", "davsp.bench",
                                  "davsp.toy.build"]


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _add_model_args(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    parser.add_argument("--model", required=required, help="hub id or local directory of a supported LVLM")
    parser.add_argument("--device", default="auto-device", help="cpu, cuda, auto (shard over GPUs) or auto-device")
    parser.add_argument("--dtype", default="default", help="float32, bfloat16, float16 or default")


def _load(args):
    from .adapters import load_adapter
    from .config import resolve_device_dtype

    device, dtype = resolve_device_dtype(args.device, args.dtype)
    return load_adapter(args.model, device=device, dtype=dtype)


def _hashes(*paths) -> dict:
    from .io import sha256_file

    return {str(p): sha256_file(p) for p in paths if p is not None}


# -- vector ---------------------------------------------------------------------------------
def cmd_vector(args) -> int:
    from .data.records import load_records
    from .io import refuse_to_overwrite_input
    from .vector import extract_harmfulness_vector, separation_table

    refuse_to_overwrite_input(args.out, args.harmful, args.benign)
    harmful, benign = load_records(args.harmful), load_records(args.benign)
    adapter = _load(args)
    vector = extract_harmfulness_vector(adapter, harmful, benign, use_prefix=not args.no_prefix,
                                        batch_size=args.batch_size, data_hashes=_hashes(args.harmful, args.benign))
    vector.save(args.out)
    print(separation_table(vector))
    print(f"wrote {args.out}")
    return 0


# -- train ----------------------------------------------------------------------------------
def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    from .config import TrainConfig

    for f in fields(TrainConfig):
        kind = _bool if isinstance(f.default, bool) else type(f.default)
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=None,
                            help=f"{f.metadata.get('help', '')} (default: {f.default})")


def cmd_train(args) -> int:
    from .config import TrainConfig
    from .data.records import load_records
    from .train import train_vsp
    from .vector import HarmfulnessVector

    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    config = TrainConfig.from_yaml(args.config, **overrides) if args.config else \
        TrainConfig(**{k: v for k, v in overrides.items() if v is not None})
    vector = HarmfulnessVector.load(args.vector)
    harmful, benign = load_records(args.harmful), load_records(args.benign)
    args.device, args.dtype = config.device, config.dtype
    adapter = _load(args)
    train_vsp(adapter, vector, harmful, benign, config, args.out, resume=args.resume,
              data_hashes=_hashes(args.harmful, args.benign, args.vector))
    print(f"wrote {Path(args.out) / 'vsp.safetensors'}")
    return 0


# -- apply ----------------------------------------------------------------------------------
def cmd_apply(args) -> int:
    from .data.records import load_image
    from .io import atomic_write_bytes, refuse_to_overwrite_input
    from .prompt import VisualSafetyPrompt, apply_frame
    import io

    refuse_to_overwrite_input(args.out, args.image, args.vsp)
    framed = apply_frame(VisualSafetyPrompt.load(args.vsp), load_image(Path(args.image)))
    buffer = io.BytesIO()
    framed.save(buffer, format="PNG")
    atomic_write_bytes(args.out, buffer.getvalue())
    print(f"wrote {args.out} ({framed.size[0]}x{framed.size[1]})")
    return 0


# -- generate -------------------------------------------------------------------------------
def cmd_generate(args) -> int:
    from .data.records import load_records
    from .generate import generate_responses
    from .io import refuse_to_overwrite_input
    from .prompt import VisualSafetyPrompt

    refuse_to_overwrite_input(args.out, args.data, args.vsp)
    if (args.data is None) == (args.benchmark is None):
        raise DavspError("give either --data FILE or --benchmark NAME --root DIR")
    if args.benchmark:
        from .data.benchmarks import load_benchmark

        records = load_benchmark(args.benchmark, args.root, tiny=args.tiny, split=args.split, limit=args.limit)
    else:
        records = load_records(args.data)[: args.limit] if args.limit else load_records(args.data)
    vsp = VisualSafetyPrompt.load(args.vsp) if args.vsp else None
    adapter = _load(args)
    rows = generate_responses(adapter, records, defense=args.defense, vsp=vsp, max_new_tokens=args.max_new_tokens,
                              batch_size=args.batch_size, out=args.out, static_cache=args.static_cache)
    print(f"{len(rows)} responses in {args.out}")
    return 0


# -- doctor ---------------------------------------------------------------------------------
def cmd_doctor(args) -> int:
    from .config import resolve_device_dtype
    from .doctor import run_doctor

    device, dtype = resolve_device_dtype(args.device, args.dtype)
    return 0 if run_doctor(args.model, device=device, dtype=str(dtype).removeprefix("torch."), padding=args.padding) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="davsp", description="Deep Aligned Visual Safety Prompts for LVLMs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("vector", help="extract the harmfulness vector (per-layer class means)")
    _add_model_args(p)
    p.add_argument("--harmful", required=True, help="harmful records (JSONL or original JSON)")
    p.add_argument("--benign", required=True, help="benign records")
    p.add_argument("--out", required=True, help="output .safetensors")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-prefix", action="store_true", help="extract without the AdaShield-S prefix")
    p.set_defaults(func=cmd_vector)

    p = sub.add_parser("train", help="train a VSP with Deep Alignment")
    p.add_argument("--model", required=True, help="hub id or local directory")
    p.add_argument("--vector", required=True, help="harmfulness vector from `davsp vector`")
    p.add_argument("--harmful", required=True)
    p.add_argument("--benign", required=True)
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--config", help="YAML file of config keys (flags override it)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    _add_config_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("apply", help="frame an image with a pixel-space VSP (writes a PNG)")
    p.add_argument("--vsp", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("generate", help="greedy, batched answers under a defense")
    _add_model_args(p)
    p.add_argument("--data", help="records (JSONL or original JSON)")
    p.add_argument("--benchmark", help="or a benchmark by name (see `davsp data`), with --root")
    p.add_argument("--root", help="the benchmark's folder")
    p.add_argument("--tiny", action="store_true", help="the benchmark's tiny version, where it has one")
    p.add_argument("--split", help="train, val or test (seeded split by question id)")
    p.add_argument("--out", required=True, help="responses JSONL (resumed if it exists)")
    p.add_argument("--defense", default="davsp", help="none, prefix, vsp or davsp")
    p.add_argument("--vsp", help="VSP .safetensors (for vsp/davsp)")
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int)
    p.add_argument("--static-cache", action="store_true",
                   help="preallocated KV cache; on a GPU transformers then compiles the decoding step")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("doctor", help="check that a model works with davsp")
    _add_model_args(p)
    p.add_argument("--padding", type=int, help="frame width for the gradient check (default: scaled from 30/336)")
    p.set_defaults(func=cmd_doctor)

    for name in _COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def prefer_huge_pages() -> None:
    """Ask PyTorch to back CPU tensors of 2 MB and more with transparent huge pages, unless the user chose.

    A batch of canvases or Qwen2-VL patches is 40-80 MB, freshly allocated per batch; with 4 KiB pages it
    page-faults its way in (batched tiny-Qwen2-VL generation: 1,368 tokens/s, 1,554 with huge pages;
    docs/performance.md).
    PyTorch reads THP_MEM_ALLOC_ENABLE at its first large allocation, so this runs before any command.
    """
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def main(argv: list[str] | None = None) -> int:
    prefer_huge_pages()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DavspError as exc:
        print(f"davsp: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("davsp: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
