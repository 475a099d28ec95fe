"""Tie artifacts to the model they were made on, robustly to dtype (bf16 vs fp32 load)."""

from __future__ import annotations

import torch

from .errors import DavspError

PROBE_SIZE = 64


def probe_positions(numel: int) -> torch.Tensor:
    """(64,) int64: evenly spaced flat positions from the first element to the last.

    Integer arithmetic, so the positions are exact and the same on every device: a float linspace
    rounds the last position past the end of any real embedding matrix (more than 2**24 values).
    """
    return torch.arange(PROBE_SIZE, dtype=torch.int64) * (numel - 1) // (PROBE_SIZE - 1)


def model_probe(model: torch.nn.Module) -> torch.Tensor:
    """(64,) float32: fixed-position samples of the input embedding matrix."""
    flat = model.get_input_embeddings().weight.detach().reshape(-1)
    return flat[probe_positions(flat.numel()).to(flat.device)].float().cpu()


def check_same_model(saved: torch.Tensor, model: torch.nn.Module, what: str) -> None:
    current = model_probe(model)
    if saved.shape != current.shape or not torch.allclose(saved, current, rtol=2e-2, atol=1e-3):
        raise DavspError(f"{what} was made on a different model (weights do not match); rebuild it for this model")


def check_vsp_fits(vsp, adapter, what: str = "the VSP") -> None:
    """Refuse a VSP trained for another model: one line naming what differs.

    Checked: the canvas, the image mean/std the VSP was trained under (in every VSP file), the prompt
    format, and, where the file records them (VSPs trained since they were added), the family, the
    hidden size and the weights probe. A VSP from a model with the same canvas but another
    normalisation would otherwise frame every image wrongly without any error.
    """
    from .adapters.base import check_prompt_format

    if vsp.canvas_size != adapter.canvas_size:
        raise DavspError(f"{what} has a {vsp.canvas_size}px canvas but the model's is {adapter.canvas_size}px; "
                         "use a VSP trained on this model")
    for name, saved, current in (("image mean", vsp.image_mean, adapter.image_mean),
                                 ("image std", vsp.image_std, adapter.image_std)):
        if not torch.allclose(saved.float().cpu(), torch.as_tensor(current, dtype=torch.float32).cpu(), atol=1e-6):
            raise DavspError(f"{what} was trained with {name} {_rounded(saved)} but the model uses {_rounded(current)}; "
                             "use a VSP trained on this model")
    recorded = vsp.metadata
    for key, current in (("family", adapter.family), ("hidden_size", adapter.hidden_size)):
        if recorded.get(key) is not None and recorded[key] != current:
            raise DavspError(f"{what} was trained on a model with {key} {recorded[key]!r} but this one has "
                             f"{current!r}; use a VSP trained on this model")
    check_prompt_format(recorded.get("prompt_format"), adapter, what)
    probe = recorded.get("model_probe")
    if probe is not None:
        if not isinstance(probe, list) or not all(isinstance(x, (int, float)) for x in probe):
            raise DavspError(f"{what}: malformed model_probe in its metadata (expected a list of numbers)")
        check_same_model(torch.tensor(probe, dtype=torch.float32), adapter.model, what)


def _rounded(values) -> list[float]:
    return [round(float(x), 4) for x in torch.as_tensor(values).flatten()]
