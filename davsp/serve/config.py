"""`davsp serve` settings: safe defaults, loadable from YAML and DAVSP_SERVE_* environment variables,
overridden by flags (flags > environment > YAML > defaults)."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from ..defenses import DEFENSES
from ..errors import DavspError

ENV_PREFIX = "DAVSP_SERVE_"
LOOPBACK_NAMES = ("localhost",)


@dataclass
class ServeConfig:
    upstream: str = field(default="", metadata={
        "help": "base URL of the OpenAI-compatible server to protect, e.g. http://127.0.0.1:8000/v1 (or --model)"})
    model: str = field(default="", metadata={
        "help": "serve this local Hugging Face model (directory or hub id) instead of relaying to --upstream"})
    vsp: str = field(default="", metadata={"help": "pixel-space VSP .safetensors (needed by --defense davsp|vsp)"})
    defense: str = field(default="davsp", metadata={
        "help": "davsp (frame + prefix), vsp (frame only), prefix (prefix only) or none (plain relay / model server)"})
    prefix_text_only: bool = field(default=False, metadata={
        "help": "also add the safety prefix to conversations without any image"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on (non-loopback needs --api-key-file)"})
    port: int = field(default=8080, metadata={"help": "port to listen on (0: a free port, printed at start)"})
    api_key_file: str = field(default="", metadata={
        "help": "file of client API keys, one per line (# comments); none = loopback clients only"})
    upstream_api_key_env: str = field(default="", metadata={
        "help": "environment variable holding the upstream's API key (empty: the upstream needs none)"})
    served_model_name: str = field(default="", metadata={"help": "--model: the name clients ask for (default: --model)"})
    allow_model_mismatch: bool = field(default=False, metadata={
        "help": "serve even if the VSP was trained for another model, family or canvas than the upstream's"})
    allowed_image_hosts: str = field(default="", metadata={
        "help": "comma-separated hosts whose http(s) image URLs are fetched and framed (default: none, only data URLs)"})
    max_body_bytes: int = field(default=20 * 1024 * 1024, metadata={"help": "largest request body"})
    max_images: int = field(default=8, metadata={"help": "most images in one request"})
    max_image_pixels: int = field(default=25_000_000, metadata={"help": "largest image, width x height (decompression bombs)"})
    max_image_bytes: int = field(default=10 * 1024 * 1024, metadata={"help": "largest fetched image URL body"})
    request_timeout_s: float = field(default=300.0, metadata={"help": "deadline for the whole answer (504 after it)"})
    max_reply_bytes: int = field(default=16 * 1024 * 1024, metadata={"help": "largest upstream answer, streamed or not"})
    max_in_flight: int = field(default=64, metadata={"help": "concurrent chat requests; more get 429"})
    upstream_wait_s: float = field(default=120.0, metadata={"help": "how long to wait at start for the upstream's /v1/models"})
    shutdown_grace_s: float = field(default=30.0, metadata={"help": "on SIGTERM, time in-flight requests get to finish"})
    png_compress_level: int = field(default=0, metadata={
        "help": "zlib level of the framed PNGs sent upstream (0-9; the pixels are the same at every level)"})
    device: str = field(default="auto-device", metadata={"help": "--model: cpu, cuda, auto or auto-device"})
    dtype: str = field(default="default", metadata={"help": "--model: float32, bfloat16, float16, paper or default"})
    prompt_format: str = field(default="default", metadata={"help": "--model: llava_v1, chat_template or default"})
    image_geometry: str = field(default="pad", metadata={"help": "--model: pad or processor"})
    batch_size: int = field(default=8, metadata={"help": "--model: requests generated together"})
    queue_size: int = field(default=64, metadata={"help": "--model: waiting requests; more get 429"})
    default_max_tokens: int = field(default=256, metadata={"help": "--model: answer length when a request sets none"})
    max_tokens_limit: int = field(default=1024, metadata={"help": "--model: longest answer a request may ask for"})
    log_level: str = field(default="info", metadata={"help": "debug, info, warning or error"})

    def __post_init__(self):
        if bool(self.upstream) == bool(self.model):
            raise DavspError("davsp serve: give exactly one of --upstream URL (relay to a server) or --model PATH "
                             "(serve a local model)")
        if self.defense not in DEFENSES:
            raise DavspError(f"--defense {self.defense!r}: choose one of {', '.join(DEFENSES)}")
        if DEFENSES[self.defense][1] and not self.vsp:
            raise DavspError(f"--defense {self.defense} frames every image: give --vsp FILE (a pixel-space VSP), "
                             "or --defense prefix|none")
        positive = ("port", "max_body_bytes", "max_images", "max_image_pixels", "max_image_bytes", "max_reply_bytes",
                    "max_in_flight", "batch_size", "queue_size", "default_max_tokens", "max_tokens_limit")
        for name in positive:
            if getattr(self, name) < (0 if name == "port" else 1):
                raise DavspError(f"serve setting {name}={getattr(self, name)!r}: must be a positive integer")
        for name in ("request_timeout_s", "upstream_wait_s", "shutdown_grace_s"):
            if not getattr(self, name) > 0:
                raise DavspError(f"serve setting {name}={getattr(self, name)!r}: must be > 0 seconds")
        if not 0 <= self.png_compress_level <= 9:
            raise DavspError(f"png_compress_level={self.png_compress_level}: choose 0-9")
        if self.default_max_tokens > self.max_tokens_limit:
            raise DavspError(f"default_max_tokens {self.default_max_tokens} exceeds max_tokens_limit {self.max_tokens_limit}")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise DavspError(f"log_level={self.log_level!r}: choose debug, info, warning or error")

    @property
    def image_hosts(self) -> frozenset[str]:
        return frozenset(h.strip().lower() for h in self.allowed_image_hosts.split(",") if h.strip())

    @property
    def loopback_only(self) -> bool:
        return is_loopback(self.host)

    @classmethod
    def load(cls, yaml_path: str | Path | None = None, env: dict | None = None, **overrides) -> "ServeConfig":
        """Defaults, then the YAML file, then DAVSP_SERVE_<NAME> variables of `env` (os.environ by default),
        then `overrides` that are not None."""
        values: dict = {}
        if yaml_path:
            values.update(_read_yaml(Path(yaml_path)))
        env = os.environ if env is None else env
        for f in fields(cls):
            text = env.get(ENV_PREFIX + f.name.upper())
            if text is not None:
                values[f.name] = parse_value(f.name, text, type(f.default), f"{ENV_PREFIX}{f.name.upper()}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_value(name: str, text: str, kind: type, where: str):
    """A setting from text (environment, flag): bool, int, float or str, as the field's default is."""
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off", ""):
            return False
        raise DavspError(f"{where}={text!r}: expected true or false")
    try:
        return kind(text)
    except ValueError:
        raise DavspError(f"{where}={text!r}: expected {kind.__name__} for {name}") from None


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise DavspError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise DavspError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise DavspError(f"{path}: expected a mapping of serve settings")
    known = {f.name: f for f in fields(ServeConfig)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise DavspError(f"{path}: unknown serve setting(s) {', '.join(unknown)}")
    if isinstance(data.get("allowed_image_hosts"), list):
        data["allowed_image_hosts"] = ",".join(str(h) for h in data["allowed_image_hosts"])
    for name, value in data.items():
        kind = type(known[name].default)
        if not isinstance(value, kind) and not (kind is float and isinstance(value, int) and not isinstance(value, bool)):
            raise DavspError(f"{path}: {name}: expected {kind.__name__}, got {value!r:.40}")
    return data
