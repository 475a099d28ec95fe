"""Training configuration: the paper's defaults, loadable from YAML, overridable by CLI flags."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from .errors import DavspError
from .prompt import KINDS, SPACES

# The published run (LLaVA-1.5-13B: 40 layers, hidden 5120) supervised layer 20 with τ = 27 / -2.
PAPER_SHAPE = (40, 5120)
PAPER_LAYER = 20
PAPER_THRESHOLDS = (27.0, -2.0)


@dataclass
class TrainConfig:
    steps: int = field(default=1200, metadata={"help": "signed-gradient steps (paper: 1200)"})
    batch_size: int = field(default=2, metadata={"help": "samples per step (paper: 2)"})
    padding: int = field(default=30, metadata={"help": "frame width in canvas pixels (paper: 30 on 336)"})
    layer: str = field(default="paper", metadata={
        "help": "supervised layer: an integer, 'paper' (20 for 40-layer models, else the middle) or 'auto' (best separation)"})
    thresholds: str = field(default="paper", metadata={
        "help": "'top,bottom' hinge targets, 'paper' (27,-2 on the paper's model shape, else auto) or 'auto' (class-mean projections)"})
    output_loss_weight: float = field(default=0.02, metadata={"help": "weight of the output cross-entropy (paper: 0.02)"})
    harmful_output_prob: float = field(default=0.05, metadata={"help": "chance a harmful step also gets the refusal loss"})
    harmful_prob: float = field(default=0.5, metadata={"help": "chance a step draws a harmful batch"})
    alpha: float = field(default=1 / 255, metadata={"help": "signed step size in [0,1] pixel units (paper: 1/255)"})
    space: str = field(default="normalized", metadata={"help": "'normalized' (published) or 'pixel' (deployable image)"})
    quantize_8bit: bool = field(default=False, metadata={"help": "pixel space: keep values exact to 8 bits (PNG-exact)"})
    kind: str = field(default="frame", metadata={"help": "'frame' (VSP) or 'additive' (full-image ε-ball ablation)"})
    epsilon: float = field(default=32 / 255, metadata={"help": "additive ablation: L∞ bound in pixel units"})
    deep_alignment: bool = field(default=True, metadata={"help": "false = ablation with the output loss only"})
    use_prefix: bool = field(default=True, metadata={"help": "prepend the AdaShield-S prefix (as published)"})
    refusal_answer: str = field(default="I am sorry, but I cannot assist with that request.",
                                metadata={"help": "target answer for the output loss on harmful samples"})
    activation_checkpointing: bool = field(default=False, metadata={
        "help": "recompute decoder layers in the backward instead of storing them (less memory, more time)"})
    seed: int = field(default=0, metadata={"help": "seeds every random draw of the run"})
    checkpoint_every: int = field(default=50, metadata={"help": "steps between checkpoints (paper: 50)"})
    projection_samples: int = field(default=32, metadata={"help": "records per class for before/after projections"})
    device: str = field(default="auto-device", metadata={"help": "'cpu', 'cuda', 'auto' (shard over GPUs) or 'auto-device'"})
    dtype: str = field(default="default", metadata={"help": "'float32', 'bfloat16', 'float16' or 'default' (bf16 on GPU, fp32 on CPU)"})

    def __post_init__(self):
        positive = {"steps": self.steps, "batch_size": self.batch_size, "checkpoint_every": self.checkpoint_every}
        for name, value in positive.items():
            if int(value) < 1:
                raise DavspError(f"config {name}={value!r}: must be a positive integer")
        for name in ("harmful_prob", "harmful_output_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise DavspError(f"config {name}={getattr(self, name)!r}: must be in [0, 1]")
        if self.space not in SPACES:
            raise DavspError(f"config space={self.space!r}: choose one of {', '.join(SPACES)}")
        if self.kind not in KINDS:
            raise DavspError(f"config kind={self.kind!r}: choose one of {', '.join(KINDS)}")
        if self.padding < 1:
            raise DavspError(f"config padding={self.padding!r}: must be at least 1 pixel")
        if not self.deep_alignment and self.output_loss_weight <= 0:
            raise DavspError("deep_alignment=false needs output_loss_weight > 0 (nothing would be trained)")
        self.layer = str(self.layer)
        self.thresholds = str(self.thresholds)
        if self.layer not in ("paper", "auto") and not self.layer.isdigit():
            raise DavspError(f"config layer={self.layer!r}: an integer, 'paper' or 'auto'")
        if self.thresholds not in ("paper", "auto"):
            parse_thresholds(self.thresholds)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> "TrainConfig":
        path = Path(path)
        if not path.is_file():
            raise DavspError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise DavspError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise DavspError(f"{path}: expected a mapping of config keys")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise DavspError(f"{path}: unknown config key(s) {', '.join(unknown)}")
        return cls(**{**data, **{k: v for k, v in overrides.items() if v is not None}})

    def to_dict(self) -> dict:
        return asdict(self)


def parse_thresholds(text: str) -> tuple[float, float]:
    try:
        top, bottom = (float(x) for x in text.split(","))
    except ValueError:
        raise DavspError(f"thresholds {text!r}: expected 'top,bottom', e.g. '27,-2'") from None
    if top <= bottom:
        raise DavspError(f"thresholds {text!r}: top must exceed bottom")
    return top, bottom


def resolve_layer(setting: str, vector, num_layers: int, hidden_size: int) -> int:
    if setting == "auto":
        return vector.best_layer()
    if setting == "paper":
        return PAPER_LAYER if (num_layers, hidden_size) == PAPER_SHAPE else max(1, num_layers // 2)
    layer = int(setting)
    if not 1 <= layer <= num_layers:
        raise DavspError(f"layer {layer} out of range 1..{num_layers}")
    return layer


def resolve_thresholds(setting: str, vector, layer: int, num_layers: int, hidden_size: int) -> tuple[float, float]:
    if setting == "paper" and (num_layers, hidden_size) == PAPER_SHAPE and layer == PAPER_LAYER:
        return PAPER_THRESHOLDS
    if setting in ("paper", "auto"):
        return vector.class_projections(layer)
    return parse_thresholds(setting)


def resolve_device_dtype(device: str, dtype: str):
    import torch

    if device == "auto-device":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "default":
        dtype = "float32" if device == "cpu" else "bfloat16"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise DavspError(f"dtype {dtype!r}: choose float32, bfloat16, float16 or default")
    if device not in ("cpu", "auto") and not device.startswith("cuda"):
        raise DavspError(f"device {device!r}: choose cpu, cuda, cuda:N, auto or auto-device")
    if device != "cpu" and not torch.cuda.is_available():
        raise DavspError(f"device {device!r} needs a GPU but torch sees none")
    return device, getattr(torch, dtype)
