"""The small interface every model family implements, and the sequence packing they share.

An adapter owns everything model-specific: loading, the chat prompt and its tokenization, the
image geometry, the differentiable rescale/normalize (and patchify) from canvas pixels to
`pixel_values`, and the path to the decoder layers. Everything else in davsp (vector
extraction, training, generation) is written once against this Protocol.

Image geometry (METHOD.md section 4): with `image_geometry="pad"` (the default, as the official
code) every path shows the model the same picture: the image padded to a centred white square,
then the model's own resize to S x S (`image_to_canvas`); the frame path instead resizes that
white square straight to (S-2p) x (S-2p) for the frame's centre (`prompt.centre_image`). So
every defense differs from `none` only by what the defense adds. `image_geometry="processor"`
(LLaVA only) keeps the processor's own resize + centre crop of the unpadded image instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

import torch
from PIL import Image

from ..errors import DavspError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# How the chat prompt is written: LLaVA's own `conv_templates["llava_v1"]` (the official DAVSP code's)
# or the processor's chat template. Each family has a default (`Adapter.prompt_format`).
PROMPT_FORMATS = ("llava_v1", "chat_template")
IMAGE_GEOMETRIES = ("pad", "processor")
# A model's config.json may name the format it was trained on (the shipped toy world does)
MODEL_PROMPT_FORMAT_KEY = "davsp_prompt_format"


def check_choice(name: str, value: str, allowed: tuple[str, ...], where: str) -> str:
    if value not in allowed:
        raise DavspError(f"{where}: {name} {value!r} is not one of {', '.join(allowed)}")
    return value


def check_prompt_format(recorded: str | None, adapter, what: str) -> None:
    """Refuse an artifact (vector, VSP) made with another prompt format than the adapter's."""
    if recorded is not None and recorded != adapter.prompt_format:
        raise DavspError(
            f"{what} was made with prompt format {recorded!r} but the model is loaded with {adapter.prompt_format!r}; "
            f"pass --prompt-format {recorded} or re-make it with this format"
        )


@dataclass(frozen=True)
class Precision:
    """The floating-point dtypes a model runs in: its language side (embeddings, decoder, LM head, and
    LLaVA's projector) and its vision tower (LLaVA's CLIP tower; Qwen2-VL's `model.visual`, merger included)."""

    language: torch.dtype
    vision: torch.dtype

    @property
    def name(self) -> str:
        known = next((name for name, p in PRECISIONS.items() if p == self), None)
        if known is not None:
            return known
        return f"{str(self.language).removeprefix('torch.')} (vision {str(self.vision).removeprefix('torch.')})"


PRECISIONS = {
    "float32": Precision(torch.float32, torch.float32),
    "bfloat16": Precision(torch.bfloat16, torch.bfloat16),
    "float16": Precision(torch.float16, torch.float16),
    # the official run: LLaVA's builder loads the CLIP tower on its own in fp32, the language model in fp16
    "paper": Precision(torch.float16, torch.float32),
}


def as_precision(dtype: "Precision | torch.dtype | str") -> Precision:
    """A Precision from itself, one torch dtype for the whole model, or a name in PRECISIONS."""
    if isinstance(dtype, Precision):
        return dtype
    if isinstance(dtype, torch.dtype):
        return Precision(dtype, dtype)
    if dtype in PRECISIONS:
        return PRECISIONS[dtype]
    raise DavspError(f"dtype {dtype!r}: choose one of {', '.join(PRECISIONS)}")


def _cast_to_own_dtype(module, args):
    """Forward pre-hook: floating-point inputs in the dtype of the module's weights."""
    dtype = next(module.parameters()).dtype
    return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def set_vision_dtype(model: torch.nn.Module, vision_path: str, precision: Precision,
                     features_to: str | None = None) -> None:
    """Cast the vision tower at `vision_path` to `precision.vision` (the rest stays as loaded, in
    `precision.language`). `features_to` names the module that receives the tower's features when the
    model does not cast them itself (LLaVA's projector): a pre-hook casts its input to its own dtype."""
    resolve_module(model, vision_path).to(precision.vision)
    if features_to is not None and precision.vision != precision.language:
        resolve_module(model, features_to).register_forward_pre_hook(_cast_to_own_dtype)


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
    tokenizer: "PreTrainedTokenizerBase"  # the model's own: generation pads and decodes with it
    canvas_size: int  # S: the square, in pixels, the vision tower sees
    patch_size: int  # pixels per vision token side (a border of whole patches gives the frame leverage)
    image_mean: torch.Tensor  # (3,)
    image_std: torch.Tensor  # (3,)
    layer_path: str  # dotted path from the model to the decoder ModuleList, e.g. "model.language_model.layers"
    vision_path: str  # dotted path to the vision tower, the part a Precision's `vision` dtype applies to
    prompt_format: str  # one of PROMPT_FORMATS: how `prompt_text` is written (recorded in vectors, VSPs, runs)
    image_geometry: str  # one of IMAGE_GEOMETRIES: what `image_to_canvas` does (module docstring)

    @classmethod
    def handles(cls, config) -> bool:
        """True if this adapter serves a model with this `transformers` config."""
        ...

    @classmethod
    def load(cls, path: str, *, device: str = "cpu", dtype: Precision | torch.dtype | str = torch.float32) -> "Adapter":
        """Load a checkpoint; `dtype` is one dtype for the whole model or a Precision (e.g. 'paper')."""
        ...

    @property
    def precision(self) -> Precision:
        """The dtypes the model runs in, read from its weights; `pixel_values` go in `precision.vision`."""
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
        """Token ids of `prompt_text` with the image placeholder expanded to one token per image feature,
        tokenized as the format's reference does (llava_v1: each text chunk around the image on its own)."""
        ...

    def answer_ids(self, answer: str, *, eos: bool = True) -> list[int]:
        """Token ids of an answer (the output-loss targets), no special tokens; EOS appended when `eos`."""
        ...

    def image_to_canvas(self, image: Image.Image) -> torch.Tensor:
        """(3, S, S) float32 in [0, 1], no rescale/normalize: "pad" geometry = white square, then the model's
        resize to S x S; "processor" = the processor's own resize + crop of the image as given."""
        ...

    def preprocessing_error(self, image: Image.Image) -> float:
        """Max |processor pixel_values - this adapter's torch pipeline| for one image (doctor, tests); under
        "pad" the processor is given the white square, as the official code gives it."""
        ...

    def trunk(self) -> torch.nn.Module:
        """The model without its LM head (returns `last_hidden_state`)."""
        ...

    def normalize(self, canvas: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) pixels in [0, 1] -> (B, 3, S, S) normalized; differentiable."""
        ...

    def batch(self, questions: list[str], normalized: torch.Tensor, answers: list[str] | None = None, *,
              answer_eos: bool = True) -> Batch:
        """Tokenize, left-pad and attach pixel inputs built differentiably from `normalized` (B, 3, S, S);
        answers end with EOS when `answer_eos`."""
        ...

    def lm_head(self) -> torch.nn.Module: ...

    def decode(self, token_ids: torch.Tensor) -> list[str]: ...


def normalize_pixels(canvas: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) in [0, 1] -> normalized, as a processor's rescale + normalize; differentiable.
    The (3,) mean and std follow the canvas to its device (canvases live on the model's)."""
    return (canvas - mean.to(canvas.device).view(1, 3, 1, 1)) / std.to(canvas.device).view(1, 3, 1, 1)


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
