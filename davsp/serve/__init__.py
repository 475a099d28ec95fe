"""`davsp serve`: an OpenAI-compatible gateway that puts a trained DAVSP defense in front of any serving stack.

`build_app(ServeConfig(upstream=..., vsp=...))` is the ASGI app; `run_server(config)` serves it;
`ServerThread(app)` serves it from a background thread. docs/deployment.md has the guarantees.
"""

import importlib

from .config import ServeConfig

# The server stack (starlette, uvicorn, httpx) loads on first use, not with every `davsp` command's parser.
_LAZY = {"Gateway": ".app", "build_app": ".app", "Framer": ".content", "ServerThread": ".server",
         "run_server": ".server"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Framer", "Gateway", "ServeConfig", "ServerThread", "build_app", "run_server"]
