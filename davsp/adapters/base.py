"""The small interface every model family implements, and the sequence packing they share.

An adapter owns everything model-specific: loading, the chat prompt, the image geometry the
processor applies, the differentiable rescale/normalize (and patchify) from canvas pixels to
`pixel_values`, and the path to the decoder layers. Everything else in davsp (vector
extraction, training, generation) is written once against this Protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

import torch
from PIL import Image


@dataclass
class Batch:
    """Model inputs for B samples, left-padded, plus the positions davsp reads.

    `model_inputs` goes straight into `model(**model_inputs)` / `model.generate(...)`.
    `last_prompt_token`: (B,) index of the last prompt token (where the harmfulness vector is read).
    `target_positions`, `target_ids`: (N,) flat indices into (B*T) of the positions whose next token
    is an answer token, and those answer tokens (empty when no answers were given).
    """

    model_inputs: dict[str, torch.Tensor]
    last_prompt_token: torch.Tensor
    target_positions: torch.Tensor
    target_ids: torch.Tensor


@runtime_checkable
class Adapter(Protocol):
    family: ClassVar[str]
    model_id: str
    model: torch.nn.Module
    canvas_size: int  # S: the square, in pixels, the vision tower sees
    patch_size: int  # pixels per vision token side (a border of whole patches gives the frame leverage)
    image_mean: torch.Tensor  # (3,)
    image_std: torch.Tensor  # (3,)
    layer_path: str  # dotted path from the model to the decoder ModuleList, e.g. "model.language_model.layers"

    @classmethod
    def handles(cls, config) -> bool:
        """True if this adapter serves a model with this `transformers` config."""
        ...

    @classmethod
    def load(cls, path: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> "Adapter":
        ...

    @property
    def num_layers(self) -> int: ...

    @property
    def hidden_size(self) -> int: ...

    @property
    def device(self) -> torch.device:
        """Where inputs go (the embedding's device; with device_map="auto" the first shard)."""
        ...

    def decoder_layers(self) -> torch.nn.ModuleList: ...

    def prompt_text(self, question: str) -> str:
        """The full chat prompt for one image + question, ending where the answer begins."""
        ...

    def prompt_ids(self, question: str) -> list[int]:
        """Token ids of `prompt_text` with the image placeholder expanded to one token per image feature."""
        ...

    def answer_ids(self, answer: str) -> list[int]:
        """Token ids of an answer, EOS included (the output-loss targets)."""
        ...

    def image_to_canvas(self, image: Image.Image) -> torch.Tensor:
        """(3, S, S) float32 in [0, 1]: the processor's own geometry (resize/crop), no rescale/normalize."""
        ...

    def preprocessing_error(self, image: Image.Image) -> float:
        """Max |processor pixel_values - this adapter's torch pipeline| for one image (doctor, tests)."""
        ...

    def trunk(self) -> torch.nn.Module:
        """The model without its LM head (returns `last_hidden_state`)."""
        ...

    def normalize(self, canvas: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) pixels in [0, 1] -> (B, 3, S, S) normalized; differentiable."""
        ...

    def batch(self, questions: list[str], normalized: torch.Tensor, answers: list[str] | None = None) -> Batch:
        """Tokenize, left-pad and attach pixel inputs built differentiably from `normalized` (B, 3, S, S)."""
        ...

    def lm_head(self) -> torch.nn.Module: ...

    def decode(self, token_ids: torch.Tensor) -> list[str]: ...


def resolve_module(root: torch.nn.Module, dotted: str) -> torch.nn.Module:
    module = root
    for part in dotted.split("."):
        if not hasattr(module, part):
            raise AttributeError(f"{type(root).__name__} has no module at '{dotted}' (stopped at '{part}')")
        module = getattr(module, part)
    return module


def pack_left_padded(
    prompt_ids: list[list[int]],
    answer_ids: list[list[int]] | None,
    pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate prompt (+ answer) ids per sample and left-pad to the longest.

    Returns input_ids (B, T), attention_mask (B, T), last_prompt_token (B,),
    target_positions (N,) flat in B*T and target_ids (N,).
    """
    answers = answer_ids if answer_ids is not None else [[] for _ in prompt_ids]
    sequences = [p + a for p, a in zip(prompt_ids, answers)]
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    last_prompt = []
    positions, targets = [], []
    for row, (prompt, answer, seq) in enumerate(zip(prompt_ids, answers, sequences)):
        start = width - len(seq)
        input_ids[row, start:] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, start:] = 1
        last = start + len(prompt) - 1
        last_prompt.append(last)
        # logits at position t predict token t + 1: positions last .. last + len(answer) - 1
        positions.extend(row * width + last + k for k in range(len(answer)))
        targets.extend(answer)
    return (
        input_ids,
        attention_mask,
        torch.tensor(last_prompt, dtype=torch.long),
        torch.tensor(positions, dtype=torch.long),
        torch.tensor(targets, dtype=torch.long),
    )
