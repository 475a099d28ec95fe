"""The `davsp` command line: a thin layer over the Python API, one module per verb group.

Library modules never parse arguments; each module here adds its verbs with `add_commands(subparsers)`
and calls the same functions the README shows from Python. Errors print one line and exit non-zero.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..errors import DavspError
from .common import count

# one module per verb group, in the order `davsp --help` lists them
VERB_MODULES = ("model", "data", "judge", "evaluate", "demo", "bench", "toy", "serve", "reproduce")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="davsp", description="Deep Aligned Visual Safety Prompts for LVLMs")
    parser.add_argument("--debug", action="store_true", help="print the full traceback of an unexpected error")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in VERB_MODULES:
        importlib.import_module(f"{__name__}.{name}").add_commands(subparsers)
    return parser


def prefer_huge_pages() -> None:
    """Ask PyTorch to back CPU tensors of 2 MB and more with transparent huge pages, unless the user chose.

    A batch of canvases or Qwen2-VL patches is 40-80 MB, freshly allocated per batch; with 4 KiB pages it
    page-faults its way in (measured in docs/performance.md, "Huge pages on the CPU").
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
    except OSError as exc:  # full disk, read-only folder, a directory where a file belongs, ...
        if args.debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"davsp: error: {where}{exc.strerror or exc} (check the path, its permissions and free space)",
              file=sys.stderr)
        return 2
    except Exception as exc:  # the one boundary: a bug or an unforeseen input gets one line, not a traceback
        if args.debug:
            raise
        message = (str(exc).strip().splitlines() or [""])[0]
        print(f"davsp: error: unexpected {type(exc).__name__}: {message} (rerun with `davsp --debug ...` for the "
              "traceback, and report it)", file=sys.stderr)
        return 1


__all__ = ["build_parser", "count", "main"]
