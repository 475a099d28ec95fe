"""`davsp vector | train | apply | generate | doctor`: the method's own steps (davsp.vector, davsp.train,
davsp.prompt, davsp.generate, davsp.endpoint, davsp.distributed, davsp.doctor)."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from ..errors import DavspError
from .common import add_config_flags, add_model_args, count, hashes, load_model
from .reproduce import add_endpoint_args


# -- vector ---------------------------------------------------------------------------------
def cmd_vector(args) -> int:
    from ..data.records import load_records
    from ..distributed import extract_vector_sharded, is_main, launched, setup
    from ..io import refuse_to_overwrite_input
    from ..vector import extract_harmfulness_vector, separation_table

    refuse_to_overwrite_input(args.out, args.harmful, args.benign)
    harmful, benign = load_records(args.harmful), load_records(args.benign)
    if launched():  # one rank of a torchrun job: its own device, its share of the batches
        args.device = setup(args.device)
    adapter = load_model(args)
    extract = extract_vector_sharded if launched() else extract_harmfulness_vector
    vector = extract(adapter, harmful, benign, use_prefix=not args.no_prefix,
                     batch_size=args.batch_size, data_hashes=hashes(args.harmful, args.benign))
    if not is_main():
        return 0
    vector.save(args.out)
    print(separation_table(vector))
    print(f"wrote {args.out}")
    return 0


# -- train ----------------------------------------------------------------------------------
def cmd_train(args) -> int:
    from ..config import TrainConfig
    from ..data.records import load_records
    from ..train import train_vsp
    from ..vector import HarmfulnessVector

    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    config = TrainConfig.from_yaml(args.config, **overrides) if args.config else \
        TrainConfig(**{k: v for k, v in overrides.items() if v is not None})
    vector = HarmfulnessVector.load(args.vector)
    harmful, benign = load_records(args.harmful), load_records(args.benign)
    args.device, args.dtype = config.device, config.dtype
    args.prompt_format = None if config.prompt_format == "default" else config.prompt_format
    args.image_geometry = config.image_geometry
    adapter = load_model(args)
    train_vsp(adapter, vector, harmful, benign, config, args.out, resume=args.resume,
              data_hashes=hashes(args.harmful, args.benign, args.vector))
    print(f"wrote {Path(args.out) / 'vsp.safetensors'}")
    return 0


# -- apply ----------------------------------------------------------------------------------
def cmd_apply(args) -> int:
    from ..data.records import load_image
    from ..io import atomic_write_bytes, refuse_to_overwrite_input
    from ..prompt import VisualSafetyPrompt, apply_frame
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
    from ..data.records import load_records
    from ..generate import generate_responses
    from ..io import refuse_to_overwrite_input
    from ..prompt import VisualSafetyPrompt

    refuse_to_overwrite_input(args.out, args.data, args.vsp)
    if bool(args.model) == bool(args.endpoint):
        raise DavspError("give either --model PATH (generate here) or --endpoint URL --served-model NAME (a server)")
    if (args.data is None) == (args.benchmark is None):
        raise DavspError("give either --data FILE or --benchmark NAME --root DIR")
    if args.benchmark:
        from ..data.benchmarks import load_benchmark

        records = load_benchmark(args.benchmark, args.root, tiny=args.tiny, split=args.split, limit=args.limit)
    else:
        records = load_records(args.data)[: args.limit] if args.limit else load_records(args.data)
    vsp = VisualSafetyPrompt.load(args.vsp) if args.vsp else None
    if args.endpoint:
        from ..endpoint import generate_via_endpoint
        from .reproduce import endpoint_from_args

        rows = generate_via_endpoint(records, endpoint_from_args(args), defense=args.defense, vsp=vsp,
                                     max_new_tokens=args.max_new_tokens, out=args.out)
        print(f"{len(rows)} responses in {args.out}")
        return 0
    from ..distributed import generate_sharded, is_main, launched, setup

    if launched():  # one rank of a torchrun job: its own device, every WORLD_SIZE-th batch
        args.device = setup(args.device)
    adapter = load_model(args)
    generate = generate_sharded if launched() else generate_responses
    rows = generate(adapter, records, defense=args.defense, vsp=vsp, max_new_tokens=args.max_new_tokens,
                    batch_size=args.batch_size, out=args.out, static_cache=args.static_cache)
    if not is_main():
        return 0
    print(f"{len(rows)} responses in {args.out}")
    return 0


# -- doctor ---------------------------------------------------------------------------------
def cmd_doctor(args) -> int:
    from ..config import resolve_device_dtype
    from ..doctor import run_doctor

    device, dtype = resolve_device_dtype(args.device, args.dtype)
    return 0 if run_doctor(args.model, device=device, dtype=dtype.name, padding=args.padding,
                           prompt_format=args.prompt_format, image_geometry=args.image_geometry, vsp=args.vsp) else 1


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("vector", help="extract the harmfulness vector (per-layer class means)")
    add_model_args(p)
    p.add_argument("--harmful", required=True, help="harmful records (JSONL or original JSON)")
    p.add_argument("--benign", required=True, help="benign records")
    p.add_argument("--out", required=True, help="output .safetensors")
    p.add_argument("--batch-size", type=count(1), default=8)
    p.add_argument("--no-prefix", action="store_true", help="extract without the AdaShield-S prefix")
    p.set_defaults(func=cmd_vector)

    p = subparsers.add_parser("train", help="train a VSP with Deep Alignment")
    p.add_argument("--model", required=True, help="hub id or local directory")
    p.add_argument("--vector", required=True, help="harmfulness vector from `davsp vector`")
    p.add_argument("--harmful", required=True)
    p.add_argument("--benign", required=True)
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--config", help="YAML file of config keys (flags override it)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    add_config_flags(p)
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("apply", help="frame an image with a pixel-space VSP (writes a PNG)")
    p.add_argument("--vsp", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_apply)

    p = subparsers.add_parser("generate", help="greedy, batched answers under a defense")
    add_model_args(p, required=False)
    add_endpoint_args(p)
    p.add_argument("--data", help="records (JSONL or original JSON)")
    p.add_argument("--benchmark", help="or a benchmark by name (see `davsp data`), with --root")
    p.add_argument("--root", help="the benchmark's folder")
    p.add_argument("--tiny", action="store_true", help="the benchmark's tiny version, where it has one")
    p.add_argument("--split", help="train, val or test (seeded split by question id)")
    p.add_argument("--out", required=True, help="responses JSONL (resumed if it exists)")
    p.add_argument("--defense", default="davsp", help="none, prefix, vsp or davsp")
    p.add_argument("--vsp", help="VSP .safetensors (for vsp/davsp)")
    p.add_argument("--max-new-tokens", type=count(1), default=1024)
    p.add_argument("--batch-size", type=count(1), default=8)
    p.add_argument("--limit", type=count(1), help="only the first N records")
    p.add_argument("--static-cache", action="store_true",
                   help="preallocated KV cache; on a GPU transformers then compiles the decoding step")
    p.set_defaults(func=cmd_generate)

    p = subparsers.add_parser("doctor", help="check that a model works with davsp")
    add_model_args(p)
    p.add_argument("--padding", type=count(1), help="frame width for the gradient check (default: scaled from 30/336)")
    p.add_argument("--vsp", help="also check that this VSP file was trained for the model")
    p.set_defaults(func=cmd_doctor)
