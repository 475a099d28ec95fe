"""`davsp serve`: an OpenAI-compatible gateway that puts a trained DAVSP defense in front of any serving stack.

`build_app(ServeConfig(upstream=..., vsp=...))` is the ASGI app; `run_server(config)` serves it;
`ServerThread(app)` serves it from a background thread. docs/deployment.md has the guarantees.
"""

from .app import Gateway, build_app
from .config import ServeConfig
from .content import Framer
from .server import ServerThread, run_server

__all__ = ["Framer", "Gateway", "ServeConfig", "ServerThread", "build_app", "run_server"]
