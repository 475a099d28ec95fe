"""Tie artifacts to the model they were made on, robustly to dtype (bf16 vs fp32 load)."""

from __future__ import annotations

import torch

from .errors import DavspError

PROBE_SIZE = 64


def model_probe(model: torch.nn.Module) -> torch.Tensor:
    """(64,) float32: fixed-position samples of the input embedding matrix."""
    weight = model.get_input_embeddings().weight.detach()
    flat = weight.reshape(-1)
    index = torch.linspace(0, flat.numel() - 1, PROBE_SIZE, device=flat.device).long()
    return flat[index].float().cpu()


def check_same_model(saved: torch.Tensor, model: torch.nn.Module, what: str) -> None:
    current = model_probe(model)
    if saved.shape != current.shape or not torch.allclose(saved, current, rtol=2e-2, atol=1e-3):
        raise DavspError(f"{what} was made on a different model (weights do not match); rebuild it for this model")
