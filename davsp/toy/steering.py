"""Measuring the safety world: its no-defense behaviour and the steering-causality check.

The causality check (issue 5) asks, before any VSP is trained, whether the harmfulness vector is a
lever on behaviour: add alpha * v_L (v_L = mean harmful - mean benign state at layer L, extracted
with the safety prefix exactly as published) to the residual stream at layer L from the last prompt
token on, generate greedily, and count refusals on harmful image queries and on benign ones.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ..activations import edited_output
from ..adapters.llava import LlavaAdapter
from ..data.records import Record
from ..generate import defended_inputs, generate_batch
from ..prompt import VisualSafetyPrompt
from ..io import batched
from ..vector import extract_harmfulness_vector
from .world import STEER_LAYER, VSP_PADDING, benign_correct, demo_splits, is_refusal

PERCEPTION = ("name", "color", "shape", "count")
MAX_NEW_TOKENS = 20


def adapter_for(model, processor, model_id: str = "toy-world") -> LlavaAdapter:
    return LlavaAdapter(model_id, model, processor)


def steer(layer: torch.nn.Module, vector: torch.Tensor):
    """Add `vector` (D,) to the layer output at the last position of every forward: the last prompt
    token in the prefill (left padding puts it last in every row), then each generated token."""

    def add_at_last_position(hidden: torch.Tensor) -> torch.Tensor:  # (B, T, D)
        hidden = hidden.clone()
        hidden[:, -1] += vector.to(hidden.dtype)
        return hidden

    return edited_output(layer, add_at_last_position)


def responses(adapter, records: list[Record], *, prefix: bool, framed: bool = False, batch_size: int = 16) -> list[str]:
    """Greedy responses; `framed` shows each image through a blank VSP (shrunk into the centre inside
    a mean-colour border: the canvas a VSP starts from), to check perception survives the shrink."""
    vsp = None
    if framed:
        vsp = VisualSafetyPrompt.blank(adapter.canvas_size, VSP_PADDING, "normalized", adapter.image_mean, adapter.image_std)
    defense = ("davsp" if prefix else "vsp") if framed else ("prefix" if prefix else "none")
    out: list[str] = []
    for chunk in batched(records, batch_size):
        questions, canvases = defended_inputs(adapter, chunk, defense, vsp)
        out += generate_batch(adapter, questions, canvases, MAX_NEW_TOKENS)[0]
    return out


def refusal_rate(texts: list[str]) -> float:
    return sum(map(is_refusal, texts)) / max(1, len(texts))


def accuracy(records: list[Record], texts: list[str]) -> float:
    return sum(benign_correct(r, t) for r, t in zip(records, texts)) / max(1, len(records))


@torch.no_grad()
def world_metrics(model, processor, splits: dict[str, list[Record]] | None = None) -> dict:
    """The world's claimed behaviour under `none` and `prefix` (and perception on a framed image)."""
    adapter = adapter_for(model, processor)
    with tempfile.TemporaryDirectory() as tmp:
        splits = splits or demo_splits(Path(tmp))
        benign = splits["benign_heldout"]
        perception = [r for r in benign if r.category in PERCEPTION]
        metrics = {}
        for prefix in (False, True):
            name = "prefix" if prefix else "none"
            benign_texts = responses(adapter, benign, prefix=prefix)
            metrics[name] = {
                "rsr_heldout": refusal_rate(responses(adapter, splits["harmful_heldout"], prefix=prefix)),
                "rsr_train": refusal_rate(responses(adapter, splits["harmful_train"], prefix=prefix)),
                "text_refusal": refusal_rate(responses(adapter, splits["text_harmful"], prefix=prefix)),
                "benign_accuracy": accuracy(benign, benign_texts),
                "over_refusal": refusal_rate(benign_texts),
            }
        metrics["perception"] = accuracy(perception, responses(adapter, perception, prefix=False))
        metrics["perception_framed"] = accuracy(perception, responses(adapter, perception, prefix=False, framed=True))
    return metrics


@torch.no_grad()
def steering_check(
    model,
    processor,
    splits: dict[str, list[Record]],
    multipliers: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0),
    layer: int = STEER_LAYER,
    prefix: bool = False,
) -> list[dict]:
    """Refusal rates on held-out harmful image queries and on benign ones while adding
    alpha * v_layer (the raw mean difference, extracted with the safety prefix) at `layer`."""
    adapter = adapter_for(model, processor)
    vector = extract_harmfulness_vector(adapter, splits["harmful_train"], splits["benign_train"], use_prefix=True)
    raw = vector.harmful_mean[layer - 1] - vector.benign_mean[layer - 1]  # (D,)
    target = adapter.decoder_layers()[layer - 1]
    steps = [r for r in splits["benign_heldout"] if r.category == "steps"]
    rows = []
    for alpha in multipliers:
        with steer(target, alpha * raw):
            rows.append(
                {
                    "alpha": alpha,
                    "harmful_heldout_refusal": refusal_rate(responses(adapter, splits["harmful_heldout"], prefix=prefix)),
                    "benign_steps_refusal": refusal_rate(responses(adapter, steps, prefix=prefix)),
                    "benign_refusal": refusal_rate(responses(adapter, splits["benign_heldout"], prefix=prefix)),
                }
            )
    return rows


def format_rows(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(f"{row[k]:.2f}" for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def check_world(folder: str | Path) -> dict:
    """A world's no-defense metrics and its steering tables, without and with the prefix (`davsp toy check`)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from ..errors import DavspError

    if not (Path(folder) / "config.json").is_file():
        raise DavspError(f"{folder}: no model here (config.json missing); build one with `davsp toy build --out DIR`")
    model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    with tempfile.TemporaryDirectory() as tmp:
        splits = demo_splits(Path(tmp))
        return {"metrics": world_metrics(model, processor, splits),
                "steering": {"no_prefix": steering_check(model, processor, splits, prefix=False),
                             "prefix": steering_check(model, processor, splits, prefix=True)}}
