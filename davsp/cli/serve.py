"""`davsp serve`: the OpenAI-compatible gateway, or a local model served (davsp.serve)."""

from __future__ import annotations

import argparse
import logging
from dataclasses import fields

from ..errors import DavspError


def _flag_type(kind: type):
    from ..serve.config import parse_value

    def parse(text: str):
        try:
            return parse_value("", text, kind, "value")
        except DavspError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def cmd_serve(args) -> int:
    from ..serve import ServeConfig, run_server

    overrides = {f.name: getattr(args, f.name) for f in fields(ServeConfig)}
    config = ServeConfig.load(args.config, **overrides)
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_server(config)
    return 0


def add_commands(subparsers) -> None:
    from ..serve.config import ServeConfig

    p = subparsers.add_parser("serve", help="OpenAI-compatible gateway: frame every image, add the prefix, relay "
                                            "(or serve a local model with --model)")
    p.add_argument("--config", help="YAML file of serve settings (DAVSP_SERVE_* variables override it, flags both)")
    for f in fields(ServeConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=_flag_type(type(f.default)), default=None,
                       help=f"{f.metadata['help']} (default: {f.default!r})")
    p.set_defaults(func=cmd_serve)
