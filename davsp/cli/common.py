"""Pieces every verb group shares: argument types, the model flags, loading a model from them."""

from __future__ import annotations

import argparse
from dataclasses import fields


def count(minimum: int):
    """argparse type: an integer >= minimum, checked before any model loads (0 or -1 never mean "all")."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
        return value

    return parse


def boolean(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_model_args(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    from ..adapters.base import IMAGE_GEOMETRIES, PROMPT_FORMATS

    parser.add_argument("--model", required=required, help="hub id or local directory of a supported LVLM")
    parser.add_argument("--device", default="auto-device", help="cpu, cuda, auto (shard over GPUs) or auto-device")
    parser.add_argument("--dtype", default="default",
                        help="float32, bfloat16, float16, paper (fp16 language model, fp32 vision tower) or default")
    parser.add_argument("--prompt-format", choices=PROMPT_FORMATS,
                        help="llava_v1 (LLaVA's official conversation) or chat_template (the processor's); "
                             "default: the family's (llava_v1 for LLaVA-1.5, chat_template for Qwen2-VL)")
    parser.add_argument("--image-geometry", choices=IMAGE_GEOMETRIES, default="pad",
                        help="pad (white square, then the model's resize; published) or processor (its own crop)")


def load_model(args):
    from ..adapters import load_adapter
    from ..config import resolve_device_dtype

    device, dtype = resolve_device_dtype(args.device, args.dtype)
    return load_adapter(args.model, device=device, dtype=dtype, prompt_format=args.prompt_format,
                        image_geometry=args.image_geometry)


def hashes(*paths) -> dict:
    from ..io import sha256_file

    return {str(p): sha256_file(p) for p in paths if p is not None}


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    from ..config import TrainConfig

    for f in fields(TrainConfig):
        kind = boolean if isinstance(f.default, bool) else type(f.default)
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=None,
                            help=f"{f.metadata.get('help', '')} (default: {f.default})")
