"""Training configuration: the paper's defaults, loadable from YAML, overridable by CLI flags."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from .adapters.base import IMAGE_GEOMETRIES, PRECISIONS, PROMPT_FORMATS, Precision
from .errors import DavspError
from .io import read_text_utf8
from .prompt import KINDS, SPACES

# The published run (LLaVA-1.5-13B: 40 layers, hidden 5120) supervised layer 20 with τ = 27 / -2.
PAPER_SHAPE = (40, 5120)
PAPER_LAYER = 20
PAPER_THRESHOLDS = (27.0, -2.0)
OUTPUT_TARGETS = ("refusal", "record")
OUTPUT_LOSS_MEANS = ("token", "sample")


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
                                metadata={"help": "target answer for the output loss on harmful samples "
                                                  "(with output_target=record: only for records without an answer)"})
    output_target: str = field(default="refusal", metadata={
        "help": "harmful samples' output-loss target: 'refusal' (always refusal_answer) or 'record' (the record's "
                "own answer, refusal_answer when it has none; published)"})
    answer_eos: bool = field(default=True, metadata={
        "help": "append EOS to the output-loss target (published: false)"})
    output_loss_mean: str = field(default="token", metadata={
        "help": "output cross-entropy averaged over all answer tokens of the batch ('token') or per sample, "
                "then over samples ('sample'; published)"})
    activation_checkpointing: bool = field(default=False, metadata={
        "help": "recompute decoder layers in the backward instead of storing them (less memory, more time)"})
    seed: int = field(default=0, metadata={"help": "seeds every random draw of the run"})
    checkpoint_every: int = field(default=50, metadata={"help": "steps between checkpoints (paper: 50)"})
    projection_samples: int = field(default=32, metadata={"help": "records per class for before/after projections"})
    device: str = field(default="auto-device", metadata={"help": "'cpu', 'cuda', 'auto' (shard over GPUs) or 'auto-device'"})
    dtype: str = field(default="default", metadata={
        "help": "'float32', 'bfloat16', 'float16', 'paper' (fp16 language model, fp32 vision tower, as published) "
                "or 'default' (bf16 on GPU, fp32 on CPU)"})
    prompt_format: str = field(default="default", metadata={
        "help": "'llava_v1' (LLaVA's official conversation, system line included), 'chat_template' (the "
                "processor's) or 'default' (the family's: llava_v1 for LLaVA-1.5, chat_template for Qwen2-VL)"})
    image_geometry: str = field(default="pad", metadata={
        "help": "'pad' (white square, then the model's resize; published) or 'processor' (the processor's own "
                "resize + centre crop; LLaVA only)"})

    def __post_init__(self):
        for f in fields(self):
            setattr(self, f.name, checked_type(f.name, getattr(self, f.name)))
        positive = {"steps": self.steps, "batch_size": self.batch_size, "checkpoint_every": self.checkpoint_every}
        for name, value in positive.items():
            if value < 1:
                raise DavspError(f"config {name}={value!r}: must be a positive integer")
        if not 0.0 < self.alpha <= 1.0:
            raise DavspError(f"config alpha={self.alpha!r}: must be in (0, 1] (pixel units; the paper's is 1/255)")
        if not 0.0 <= self.epsilon <= 1.0:
            raise DavspError(f"config epsilon={self.epsilon!r}: must be in [0, 1] (pixel units)")
        if self.output_loss_weight < 0:
            raise DavspError(f"config output_loss_weight={self.output_loss_weight!r}: must be 0 or more")
        if self.projection_samples < 0:
            raise DavspError(f"config projection_samples={self.projection_samples!r}: must be 0 or more")
        for name in ("harmful_prob", "harmful_output_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise DavspError(f"config {name}={getattr(self, name)!r}: must be in [0, 1]")
        if self.space not in SPACES:
            raise DavspError(f"config space={self.space!r}: choose one of {', '.join(SPACES)}")
        if self.kind not in KINDS:
            raise DavspError(f"config kind={self.kind!r}: choose one of {', '.join(KINDS)}")
        if self.padding < 1:
            raise DavspError(f"config padding={self.padding!r}: must be at least 1 pixel")
        for name, allowed in (("output_target", OUTPUT_TARGETS), ("output_loss_mean", OUTPUT_LOSS_MEANS),
                              ("dtype", ("default", *PRECISIONS)), ("prompt_format", ("default", *PROMPT_FORMATS)),
                              ("image_geometry", IMAGE_GEOMETRIES)):
            if getattr(self, name) not in allowed:
                raise DavspError(f"config {name}={getattr(self, name)!r}: choose one of {', '.join(allowed)}")
        if not self.refusal_answer.strip():
            raise DavspError("config refusal_answer='': the output loss needs a non-empty refusal")
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
            data = yaml.safe_load(read_text_utf8(path)) or {}
        except yaml.YAMLError as exc:
            raise DavspError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        except RecursionError:
            raise DavspError(f"{path}: YAML nested too deeply to read") from None
        if not isinstance(data, dict):
            raise DavspError(f"{path}: expected a mapping of config keys")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise DavspError(f"{path}: unknown config key(s) {', '.join(unknown)}")
        for name, value in data.items():  # the file's own values first, so an error names the file
            try:
                checked_type(name, value)
            except DavspError as exc:
                raise DavspError(f"{path}: {exc}") from None
        return cls(**{**data, **{k: v for k, v in overrides.items() if v is not None}})

    def to_dict(self) -> dict:
        return asdict(self)


_TYPE_NAMES = {bool: "true or false (unquoted)", int: "an integer", float: "a number", str: "text"}


def checked_type(name: str, value):
    """`value` if it has the type of config key `name`'s default (an int is a valid float, made float;
    `layer` may be an integer); else one line with the key, the value and the type expected.

    Strict on purpose: YAML reads `use_prefix: "false"` as the text "false" (true in Python) and
    `alpha: 1e-3` as text (YAML 1.1 wants `1.0e-3`).
    """
    expected = type(TrainConfig.__dataclass_fields__[name].default)
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is bool:
        ok = isinstance(value, bool)
    elif expected is int:
        ok = is_number and isinstance(value, int)
    elif expected is float:
        ok = is_number
    else:
        ok = isinstance(value, str) or (name == "layer" and is_number and isinstance(value, int))
    if not ok:
        hint = ""
        if isinstance(value, str) and expected is bool and value.lower() in ("true", "false"):
            hint = " (remove the quotes)"
        elif isinstance(value, str) and expected in (int, float) and _is_number(value):
            hint = " (YAML reads 1e-3 as text: write 1.0e-3)" if "e" in value.lower() and "." not in value \
                else " (remove the quotes)"
        raise DavspError(f"config {name}={value!r:.60}: expected {_TYPE_NAMES[expected]}, got "
                         f"{type(value).__name__}{hint}")
    if expected is float:
        if not math.isfinite(value):
            raise DavspError(f"config {name}={value!r}: must be a finite number")
        return float(value)
    return value


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_thresholds(text: str) -> tuple[float, float]:
    try:
        top, bottom = (float(x) for x in text.split(","))
    except ValueError:
        raise DavspError(f"thresholds {text!r}: expected 'top,bottom', e.g. '27,-2'") from None
    if not (math.isfinite(top) and math.isfinite(bottom)):
        raise DavspError(f"thresholds {text!r}: both must be finite numbers")
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


def resolve_device_dtype(device: str, dtype: str) -> tuple[str, Precision]:
    """(device, Precision) from the --device and --dtype settings; 'default' is bf16 on a GPU, fp32 on the CPU."""
    import torch

    if device == "auto-device":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "default":
        dtype = "float32" if device == "cpu" else "bfloat16"
    if dtype not in PRECISIONS:
        raise DavspError(f"dtype {dtype!r}: choose {', '.join(PRECISIONS)} or default")
    if device not in ("cpu", "auto") and not device.startswith("cuda"):
        raise DavspError(f"device {device!r}: choose cpu, cuda, cuda:N, auto or auto-device")
    if device != "cpu" and not torch.cuda.is_available():
        raise DavspError(f"device {device!r} needs a GPU but torch sees none")
    return device, PRECISIONS[dtype]
