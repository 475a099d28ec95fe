"""Reading decoder-layer activations with forward hooks, and stopping the forward early.

Layer numbers follow Hugging Face's `hidden_states` convention: layer l (1-based) is the output of
decoder layer l, so `hidden_states[l]` for l < N (the last entry of `hidden_states` is after the
final norm; our layer N is before it).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch


def _hidden_of(output):
    """A decoder layer's hidden states (B, T, D): a tuple's first item or the tensor (both occur across versions)."""
    return output[0] if isinstance(output, tuple) else output


class _StopForward(Exception):
    """Raised by a hook after the last layer we need; never escapes `capture`."""


@contextmanager
def capture(
    layers: torch.nn.ModuleList,
    wanted: list[int],
    *,
    positions: torch.Tensor | None = None,
    stop_after_last: bool = False,
) -> Iterator[dict[int, torch.Tensor]]:
    """Capture the output of decoder layers `wanted` (1-based) into the yielded dict.

    With `positions` (B,), keep only hidden[b, positions[b]] -> (B, D); else the full (B, T, D).
    Outputs keep their autograd graph. With `stop_after_last`, the forward is cut right after the
    deepest wanted layer (the rest of the model is never computed).
    """
    for layer in wanted:
        if not 1 <= layer <= len(layers):
            raise ValueError(f"layer {layer} out of range 1..{len(layers)}")
    captured: dict[int, torch.Tensor] = {}
    deepest = max(wanted)
    handles = []

    def hook_for(layer: int):
        def hook(module, args, output):
            hidden = _hidden_of(output)
            if positions is not None:
                hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), positions.to(hidden.device)]
            captured[layer] = hidden
            if stop_after_last and layer == deepest:
                raise _StopForward

        return hook

    try:
        for layer in wanted:
            handles.append(layers[layer - 1].register_forward_hook(hook_for(layer)))
        yield captured
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def edited_output(layer: torch.nn.Module, edit: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the layer's hidden states (B, T, D) by `edit(hidden)` in every forward inside the block."""

    def hook(module, args, output):
        hidden = edit(_hidden_of(output))
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def last_prompt_states(adapter, batch, wanted: list[int]) -> dict[int, torch.Tensor]:
    """{layer: (B, D)} at the last prompt token, stopping the forward after the deepest layer."""
    with capture(adapter.decoder_layers(), wanted, positions=batch.last_prompt_token, stop_after_last=True) as states:
        adapter.trunk()(**batch.model_inputs, use_cache=False)
    return states


def states_and_answer_logits(adapter, batch, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward for both losses: (B, D) at the last prompt token of `layer`, and (N, V) logits
    at the answer positions only (the LM head never runs on prompt or padding positions)."""
    with capture(adapter.decoder_layers(), [layer], positions=batch.last_prompt_token) as states:
        out = adapter.trunk()(**batch.model_inputs, use_cache=False)
    hidden = out.last_hidden_state  # (B, T, D)
    flat = hidden.reshape(-1, hidden.shape[-1])[batch.target_positions]  # (N, D)
    return states[layer], adapter.lm_head()(flat)
