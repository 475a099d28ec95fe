"""The harmfulness vector (METHOD.md §2): class means of last-prompt-token states at every layer.

v_l = mean_harmful(h_l) - mean_benign(h_l), v̂_l = v_l / ‖v_l‖, with the safety prefix and no VSP.
Means are streamed in float32. A per-layer separation score, (μ+ - μ-) / pooled std of the
projections, helps choose the supervised layer; it is computed on the first `stats_samples`
records of each class, so extraction never holds every state of a large set.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_save
from tqdm.auto import tqdm

from .activations import last_prompt_states
from .adapters.base import check_prompt_format
from .data.records import Record, load_image
from .defenses import SAFETY_PREFIX, with_prefix
from .errors import DavspError
from .fingerprint import check_same_model, model_probe
from .io import atomic_write_bytes, batched, package_versions, read_safetensors_artifact


@dataclass
class HarmfulnessVector:
    harmful_mean: torch.Tensor  # (N, D) float32, row l-1 is layer l
    benign_mean: torch.Tensor  # (N, D)
    separation: torch.Tensor  # (N,)
    model_probe: torch.Tensor  # (64,) ties the vector to its model
    metadata: dict = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return int(self.harmful_mean.shape[0])

    @property
    def directions(self) -> torch.Tensor:
        """(N, D) unit harmfulness vectors."""
        diff = self.harmful_mean - self.benign_mean
        return diff / diff.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def direction(self, layer: int) -> torch.Tensor:
        return self.directions[layer - 1]

    def class_projections(self, layer: int) -> tuple[float, float]:
        """(μ+, μ-): the class means projected on v̂_layer, the automatic hinge targets."""
        v = self.direction(layer)
        return float(self.harmful_mean[layer - 1] @ v), float(self.benign_mean[layer - 1] @ v)

    def best_layer(self) -> int:
        return int(torch.argmax(self.separation)) + 1

    def check_model(self, adapter) -> None:
        if self.num_layers != adapter.num_layers or self.harmful_mean.shape[1] != adapter.hidden_size:
            raise DavspError(
                f"harmfulness vector has {self.num_layers} layers × {self.harmful_mean.shape[1]} but the model has "
                f"{adapter.num_layers} × {adapter.hidden_size}; extract it on this model"
            )
        check_same_model(self.model_probe, adapter.model, "the harmfulness vector")
        # the states (and the paper's thresholds) depend on the exact prompt the model read
        check_prompt_format(self.metadata.get("prompt_format"), adapter, "the harmfulness vector")

    def save(self, path: str | Path) -> None:
        tensors = {
            "harmful_mean": self.harmful_mean.contiguous(),
            "benign_mean": self.benign_mean.contiguous(),
            "directions": self.directions.contiguous(),
            "separation": self.separation.contiguous(),
            "model_probe": self.model_probe.contiguous(),
        }
        meta = {"davsp_vector": json.dumps(self.metadata, sort_keys=True)}
        atomic_write_bytes(path, safetensors_save(tensors, metadata=meta))

    @classmethod
    def load(cls, path: str | Path) -> "HarmfulnessVector":
        path = Path(path)
        metadata, t = read_safetensors_artifact(
            path, "davsp_vector", ("harmful_mean", "benign_mean", "separation", "model_probe"), "harmfulness-vector")
        layers_by_hidden = t["harmful_mean"].shape
        if t["harmful_mean"].ndim != 2 or t["benign_mean"].shape != layers_by_hidden or \
                tuple(t["separation"].shape) != (layers_by_hidden[0],):
            raise DavspError(f"{path}: inconsistent tensor shapes (harmful_mean {tuple(t['harmful_mean'].shape)}, "
                             f"benign_mean {tuple(t['benign_mean'].shape)}, separation {tuple(t['separation'].shape)})")
        if bool(((t["harmful_mean"] - t["benign_mean"]).norm(dim=-1) == 0).any()):
            raise DavspError(f"{path}: the class means are equal at some layer (no harmfulness direction); "
                             "extract it again from different harmful and benign records")
        return cls(t["harmful_mean"], t["benign_mean"], t["separation"], t["model_probe"], metadata)


def clean_canvases(adapter, records: list[Record]) -> torch.Tensor:
    """(B, 3, S, S) normalized inputs without any VSP, through the model's own geometry."""
    canvases = [adapter.image_to_canvas(load_image(r.image, f"record {r.id!r}")) for r in records]
    return adapter.normalize(torch.stack(canvases))


@torch.no_grad()
def class_state_sums(adapter, records, prefix, batch_size, layers, stats_samples, label):
    """(N, D) float64 sum of the records' states (each batch summed in float32, as streamed), plus the
    first `stats_samples` states, (≤ stats_samples, N, D), kept for statistics."""
    total = torch.zeros(len(layers), adapter.hidden_size, dtype=torch.float64)
    kept = [torch.zeros(0, len(layers), adapter.hidden_size)]
    for chunk in tqdm(list(batched(records, batch_size)), desc=f"states ({label})", leave=False):
        batch = adapter.batch([with_prefix(r.question, prefix) for r in chunk], clean_canvases(adapter, chunk))
        states = last_prompt_states(adapter, batch, layers)
        stacked = torch.stack([states[l].float().cpu() for l in layers], dim=1)  # (B, N, D)
        total += stacked.sum(0).double()
        if sum(len(k) for k in kept) < stats_samples:
            kept.append(stacked)
    return total, torch.cat(kept)[:stats_samples]


def separation_scores(harmful_states, benign_states, directions) -> torch.Tensor:
    """(N,) (mean harmful proj - mean benign proj) / pooled std, per layer."""
    ph = torch.einsum("bnd,nd->bn", harmful_states, directions)
    pb = torch.einsum("bnd,nd->bn", benign_states, directions)
    pooled = ((ph.var(0, unbiased=True) + pb.var(0, unbiased=True)) / 2).sqrt().clamp_min(1e-8)
    return (ph.mean(0) - pb.mean(0)) / pooled


def extract_harmfulness_vector(
    adapter,
    harmful: list[Record],
    benign: list[Record],
    *,
    use_prefix: bool = True,
    batch_size: int = 8,
    stats_samples: int = 256,
    data_hashes: dict | None = None,
) -> HarmfulnessVector:
    if len(harmful) < 2 or len(benign) < 2:
        raise DavspError(f"need at least 2 harmful and 2 benign records (got {len(harmful)} and {len(benign)})")
    prefix = SAFETY_PREFIX if use_prefix else None
    layers = list(range(1, adapter.num_layers + 1))
    h_sum, h_states = class_state_sums(adapter, harmful, prefix, batch_size, layers, stats_samples, "harmful")
    b_sum, b_states = class_state_sums(adapter, benign, prefix, batch_size, layers, stats_samples, "benign")
    return vector_from_sums(adapter, (h_sum, len(harmful), h_states), (b_sum, len(benign), b_states),
                            use_prefix=use_prefix, data_hashes=data_hashes)


def vector_from_sums(adapter, harmful: tuple, benign: tuple, *, use_prefix: bool, data_hashes: dict | None):
    """The vector from each class's (float64 state sum, record count, kept states); `distributed` adds the
    sums of its ranks before calling this."""
    (h_sum, h_count, h_states), (b_sum, b_count, b_states) = harmful, benign
    prefix = SAFETY_PREFIX if use_prefix else None
    h_mean, b_mean = (h_sum / h_count).float(), (b_sum / b_count).float()
    vector = HarmfulnessVector(h_mean, b_mean, torch.zeros(adapter.num_layers), model_probe(adapter.model))
    vector.separation = separation_scores(h_states, b_states, vector.directions)
    vector.metadata = {
        "model": adapter.model_id,
        "family": adapter.family,
        "layer_path": adapter.layer_path,
        "read": "last prompt token (attention-mask based), output of each decoder layer (hidden_states[l])",
        "prompt_format": adapter.prompt_format,
        "image_geometry": adapter.image_geometry,
        "prompt_example": adapter.prompt_text(with_prefix("<question>", prefix)),
        "prefix": use_prefix,
        "counts": {"harmful": h_count, "benign": b_count},
        "stats_samples": {"harmful": len(h_states), "benign": len(b_states)},
        "dtype": adapter.precision.name,
        "data_hashes": data_hashes or {},
        "versions": package_versions(),
    }
    return vector


def separation_table(vector: HarmfulnessVector) -> str:
    lines = ["layer  separation  proj(harmful)  proj(benign)"]
    best = vector.best_layer()
    for layer in range(1, vector.num_layers + 1):
        top, bottom = vector.class_projections(layer)
        mark = "  <- best" if layer == best else ""
        lines.append(f"{layer:5d}  {float(vector.separation[layer - 1]):10.3f}  {top:13.3f}  {bottom:12.3f}{mark}")
    return "\n".join(lines)
