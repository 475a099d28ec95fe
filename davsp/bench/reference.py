"""A re-expression of the original DAVSP training step (train/optimize.py of the published code) on
davsp's adapters, kept beside the bench to time it and to pin parity (tests/test_bench.py). It is not a
training path: `davsp train` never calls it.

    for each sample (a Python loop, batch of one):
        full forward with output_hidden_states=True, all layers, logits at every position;
        read hidden_states[L][:, -1]
        if the output loss is drawn: a second full forward on prompt + answer right-padded to 1024
        text tokens (no attention mask), logits at every position, CE through `labels`
    mean over samples; one backward through every graph; the same signed step; empty the CUDA cache
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from ..config import TrainConfig
from ..train import Pool

ORIGINAL_PAD = 1024  # the original pads prompt + answer to 1024 text tokens (the image counts as one)


def reference_padded_length(adapter, pad_text_tokens: int = ORIGINAL_PAD) -> int:
    """Total positions of the original's fixed-length output-loss input, capped at the model's context."""
    image_tokens = getattr(adapter, "num_image_tokens", 1)
    limit = getattr(adapter.model.config.text_config, "max_position_embeddings", None) or sys.maxsize
    return min(pad_text_tokens - 1 + image_tokens, limit)


def _reference_projection(adapter, question: str, canvas: torch.Tensor, layer: int,
                          direction: torch.Tensor) -> torch.Tensor:
    batch = adapter.batch([question], canvas)  # one sample: no padding, the last token is the prompt's
    out = adapter.model(**batch.model_inputs, output_hidden_states=True, use_cache=False)
    return out.hidden_states[layer][0, -1].float() @ direction  # hidden_states[L]: (1, T, D) -> ()


def _reference_output_loss(adapter, question: str, canvas: torch.Tensor, answer: str, pad_to: int) -> torch.Tensor:
    batch = adapter.batch([question], canvas, [answer])
    inputs = dict(batch.model_inputs)
    inputs.pop("attention_mask")  # the original passes none: right padding is attended, as it was
    width = inputs["input_ids"].shape[1]
    labels = torch.full((1, width), -100, dtype=torch.long, device=batch.target_ids.device)
    labels[0, batch.target_positions + 1] = batch.target_ids  # target_positions predict the next token
    extra = max(0, pad_to - width)
    pad_id = adapter.tokenizer.pad_token_id
    for key, value in inputs.items():  # every per-token tensor: input_ids, and mm_token_type_ids for Qwen
        if value.dim() == 2 and value.shape[1] == width:
            inputs[key] = F.pad(value, (0, extra), value=pad_id if key == "input_ids" else 0)
    labels = F.pad(labels, (0, extra), value=-100)
    return adapter.model(**inputs, labels=labels, use_cache=False).loss  # full (1, T, V) logits inside


def reference_step_loss(adapter, vsp, pool: Pool, idx: list[int], harmful: bool, with_output: bool,
                        layer: int, direction: torch.Tensor, thresholds: tuple[float, float], config: TrainConfig,
                        *, pad_to: int):
    """The original step's loss, same return as `train.step_loss`: (loss, da_loss, output_loss, proj (B,))."""
    if adapter.device.type == "cuda":
        torch.cuda.empty_cache()  # the original empties the allocator's cache after every step
    canvases = vsp.compose(pool.prepared[idx], adapter.normalize)  # (B, 3, S, S)
    questions = [pool.questions[i] for i in idx]
    output_loss = torch.zeros((), device=adapter.device)
    if with_output:
        answers = [config.refusal_answer if harmful else pool.answers[i] for i in idx]
        output_loss = torch.stack([
            _reference_output_loss(adapter, q, canvases[b : b + 1], a, pad_to)
            for b, (q, a) in enumerate(zip(questions, answers))
        ]).mean()
    proj = torch.stack([_reference_projection(adapter, q, canvases[b : b + 1], layer, direction)
                        for b, q in enumerate(questions)])  # (B,)
    top, bottom = thresholds
    da_loss = F.relu(top - proj).mean() if harmful else F.relu(proj - bottom).mean()
    loss = config.output_loss_weight * output_loss + da_loss
    return loss, da_loss, output_loss, proj


def reference_loss_and_gradient(adapter, vsp, pool: Pool, idx: list[int], harmful: bool, with_output: bool,
                                layer: int, direction: torch.Tensor, thresholds: tuple[float, float],
                                config: TrainConfig, *, pad_to: int):
    """The original step's (loss, da_loss, output_loss, proj), detached, and d loss / d VSP values."""
    vsp.values.requires_grad_(True)
    losses = reference_step_loss(adapter, vsp, pool, idx, harmful, with_output, layer, direction, thresholds,
                                 config, pad_to=pad_to)
    (grad,) = torch.autograd.grad(losses[0], vsp.values)
    vsp.values = vsp.values.detach()
    return tuple(x.detach() for x in losses), grad
