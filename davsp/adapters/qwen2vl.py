"""Qwen2-VL and Qwen2.5-VL (`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`).

Qwen2-VL has no fixed input size: its processor resizes every image to multiples of 28 pixels and
cuts it into 14x14 patches (temporal patch 2 with the single frame duplicated, 2x2 spatial merge).
davsp fixes a square S x S canvas that the processor leaves unchanged and re-expresses the
processor's rescale, normalize and patch flattening in torch, so gradients reach the canvas
(METHOD.md section 6). The tokenizer and image processor are loaded separately because
`AutoProcessor` needs torchvision for Qwen2-VL's video processor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import DavspError
from ..prompt import centre_image
from .base import Batch, Precision, as_precision, normalize_pixels, pack_left_padded, resolve_module, set_vision_dtype

DEFAULT_CANVAS = 448  # 16 x 16 merged tokens; a multiple of 28 inside the default pixel bounds
_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
_IMAGE_TOKEN = "<|image_pad|>"
_TEXT, _IMAGE = 0, 1  # mm_token_type_ids values (video is 2): M-RoPE needs them to place image tokens


class Qwen2VLAdapter:
    family: ClassVar[str] = "qwen2_vl"
    layer_path = "model.language_model.layers"
    vision_path = "model.visual"  # the ViT and its patch merger

    def __init__(self, model_id: str, model, tokenizer, image_processor, canvas_size: int = DEFAULT_CANVAS, *,
                 prompt_format: str | None = None, image_geometry: str = "pad"):
        self.model_id = model_id
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        if not getattr(tokenizer, "chat_template", None):
            raise DavspError(f"{model_id}: no chat template for the tokenizer; add chat_template.jinja to the model")
        self._check_options(model_id, prompt_format, image_geometry)
        self.prompt_format, self.image_geometry = "chat_template", "pad"
        self.vit_patch = int(image_processor.patch_size)  # 14: pixels per ViT patch side
        self.merge = int(image_processor.merge_size)  # 2: 2x2 patches become one LLM token
        self.temporal_patch = int(image_processor.temporal_patch_size)  # 2: a still image is two equal frames
        self.patch_size = self.vit_patch * self.merge  # 28: pixels per LLM image token side
        self.canvas_size = canvas_size
        self._check_canvas_is_fixed_point()
        self.grid = canvas_size // self.vit_patch  # ViT patches per canvas side
        self.num_image_tokens = self.grid * self.grid // self.merge**2
        self.image_mean = torch.tensor(image_processor.image_mean, dtype=torch.float32)
        self.image_std = torch.tensor(image_processor.image_std, dtype=torch.float32)
        self.image_token_id = tokenizer.convert_tokens_to_ids(_IMAGE_TOKEN)
        if self.image_token_id != model.config.image_token_id:
            raise DavspError(
                f"{model_id}: tokenizer id of {_IMAGE_TOKEN} ({self.image_token_id}) differs from the model's "
                f"image_token_id ({model.config.image_token_id}); tokenizer and weights come from different models"
            )
        self._layers = self._resolve_layers()
        _patch_embedding_as_matmul(model)

    @classmethod
    def handles(cls, config) -> bool:
        return config.model_type in _MODEL_TYPES

    @classmethod
    def load(cls, path: str, *, device: str = "cpu", dtype: Precision | torch.dtype | str = torch.float32,
             prompt_format: str | None = None, image_geometry: str = "pad") -> "Qwen2VLAdapter":
        from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

        cls._check_options(path, prompt_format, image_geometry)
        config = AutoConfig.from_pretrained(path)
        if not cls.handles(config):
            raise DavspError(f"{path}: model type '{config.model_type}' is not one of {', '.join(_MODEL_TYPES)}")
        try:  # the small files first, so a broken download fails before the weights load
            tokenizer = AutoTokenizer.from_pretrained(path)
            # the PIL backend when torchvision is missing, the torchvision one otherwise
            image_processor = AutoImageProcessor.from_pretrained(path)
        except (OSError, ValueError) as exc:
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise DavspError(f"{path}: cannot load the tokenizer or image processor ({first_line})") from None
        if not tokenizer.chat_template:
            tokenizer.chat_template = _processor_chat_template(path)
        precision = as_precision(dtype)
        device_map = "auto" if device == "auto" else None
        model = AutoModelForImageTextToText.from_pretrained(path, config=config, dtype=precision.language,
                                                            device_map=device_map)
        if device_map is None:
            model = model.to(device)
        cls.set_precision(model, precision)
        model.eval().requires_grad_(False)
        return cls(path, model, tokenizer, image_processor, prompt_format=prompt_format,
                   image_geometry=image_geometry)

    @classmethod
    def set_precision(cls, model, precision: Precision) -> None:
        """`model.visual` in `precision.vision`. No cast hook: Qwen2-VL's forward casts `pixel_values` to the
        tower's dtype and the merged image features to the text embeddings' dtype itself."""
        set_vision_dtype(model, cls.vision_path, precision)

    @property
    def precision(self) -> Precision:
        vision = resolve_module(self.model, self.vision_path)
        return Precision(self.model.get_input_embeddings().weight.dtype, next(vision.parameters()).dtype)

    @staticmethod
    def _check_options(model_id: str, prompt_format: str | None, image_geometry: str) -> None:
        # Qwen2-VL has one prompt, its chat template (with its default system prompt), and no crop to keep:
        # its processor resizes to multiples of 28, so the canvas is always the white square resized to S.
        if prompt_format not in (None, "chat_template"):
            raise DavspError(f"{model_id}: prompt format {prompt_format!r}: Qwen2-VL supports only 'chat_template'")
        if image_geometry != "pad":
            raise DavspError(f"{model_id}: image geometry {image_geometry!r}: Qwen2-VL supports only 'pad'")

    def _check_canvas_is_fixed_point(self) -> None:
        # The processor's smart_resize keeps an image iff both sides are multiples of patch_size (28) and the
        # pixel count lies within [shortest_edge, longest_edge] (its min_pixels / max_pixels).
        size = self.canvas_size
        low, high = self.image_processor.size["shortest_edge"], self.image_processor.size["longest_edge"]
        if size % self.patch_size or not low <= size * size <= high:
            raise DavspError(
                f"{self.model_id}: the image processor would resize a {size}x{size} canvas; choose a multiple of "
                f"{self.patch_size} with {low} <= S*S <= {high}"
            )

    def _resolve_layers(self) -> torch.nn.ModuleList:
        try:
            layers = resolve_module(self.model, self.layer_path)
        except AttributeError as exc:
            raise DavspError(
                f"{self.model_id}: no decoder layers at '{self.layer_path}' ({exc}); davsp needs transformers 5.x"
            ) from None
        if not isinstance(layers, torch.nn.ModuleList):
            raise DavspError(f"{self.model_id}: '{self.layer_path}' is a {type(layers).__name__}, not a ModuleList")
        return layers

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.text_config.hidden_size)

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def decoder_layers(self) -> torch.nn.ModuleList:
        return self._layers

    def trunk(self) -> torch.nn.Module:
        return self.model.model

    def lm_head(self) -> torch.nn.Module:
        return self.model.lm_head

    def prompt_text(self, question: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def image_to_canvas(self, image: Image.Image) -> torch.Tensor:
        """Pad to a centred white square, resize to S x S (bicubic): (3, S, S) float32 in [0, 1]."""
        return centre_image(image, self.canvas_size).float() / 255.0

    def preprocessing_error(self, image: Image.Image) -> float:
        """Max |processor(canvas) - our torch pipeline| on the canvas this adapter makes of `image`."""
        canvas = self.image_to_canvas(image)
        as_image = Image.fromarray((canvas * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
        reference = self.image_processor(images=as_image, return_tensors="pt")
        if reference["image_grid_thw"].tolist() != [[1, self.grid, self.grid]]:
            return float("inf")  # the processor resized the canvas: the geometry no longer matches
        ours = self.patchify(self.normalize(canvas.unsqueeze(0)))
        return float((reference["pixel_values"].float() - ours).abs().max())

    def normalize(self, canvas: torch.Tensor) -> torch.Tensor:
        return normalize_pixels(canvas, self.image_mean, self.image_std)

    def patchify(self, normalized: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B * g * g, 3 * T * p * p) rows in the processor's order, g = S / p.

        Rows run over 2x2 merge groups in raster order, then the 4 patches of a group in raster
        order; each row is channel-major, with the frame repeated T times before the p x p pixels.
        """
        b, c = normalized.shape[:2]
        p, m, t, g = self.vit_patch, self.merge, self.temporal_patch, self.grid
        x = normalized.reshape(b, c, g // m, m, p, g // m, m, p)  # (B, C, gh, mh, ph, gw, mw, pw)
        x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # (B, gh, gw, mh, mw, C, ph, pw)
        x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, t, -1, -1)  # (B, gh, gw, mh, mw, C, T, ph, pw)
        return x.reshape(b * g * g, c * t * p * p)

    def prompt_ids(self, question: str) -> list[int]:
        # Expand the one image placeholder to one token per merged patch, as the processor does
        text = self.prompt_text(question).replace(_IMAGE_TOKEN, _IMAGE_TOKEN * self.num_image_tokens)
        return self.tokenizer(text).input_ids

    def answer_ids(self, answer: str, *, eos: bool = True) -> list[int]:
        ids = self.tokenizer(answer, add_special_tokens=False).input_ids
        return ids + [self.tokenizer.eos_token_id] if eos else ids

    def batch(self, questions: list[str], normalized: torch.Tensor, answers: list[str] | None = None, *,
              answer_eos: bool = True) -> Batch:
        expected = (len(questions), 3, self.canvas_size, self.canvas_size)
        if tuple(normalized.shape) != expected:
            raise ValueError(f"normalized images have shape {tuple(normalized.shape)}, expected {expected}")
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id
        input_ids, attention_mask, last, positions, targets = pack_left_padded(
            [self.prompt_ids(q) for q in questions],
            [self.answer_ids(a, eos=answer_eos) for a in answers] if answers is not None else None,
            pad_id,
        )
        mm_token_type_ids = torch.where(input_ids == self.image_token_id, _IMAGE, _TEXT)
        grid_thw = torch.tensor([[1, self.grid, self.grid]] * len(questions), dtype=torch.long)
        device = self.device
        inputs = {
            "input_ids": input_ids.to(device),
            "attention_mask": attention_mask.to(device),
            "mm_token_type_ids": mm_token_type_ids.to(device),
            "pixel_values": self.patchify(normalized).to(device=device, dtype=self.precision.vision),
            "image_grid_thw": grid_thw.to(device),
        }
        return Batch(inputs, last.to(device), positions.to(device), targets.to(device))

    def decode(self, token_ids: torch.Tensor) -> list[str]:
        return [t.strip() for t in self.tokenizer.batch_decode(token_ids, skip_special_tokens=True)]


class PatchMatmul(torch.nn.Module):
    """The ViT patch embedding (a Conv3d whose kernel is its stride) as one matmul over flattened patches.

    Both compute the same sums; on the CPU the Conv3d and its backward are up to 9x slower than a matmul
    and dominate a training step. The weight is the Conv3d's own parameter, so `proj.weight` still
    names it in the state dict.
    """

    def __init__(self, conv: torch.nn.Conv3d):
        super().__init__()
        self.weight = conv.weight  # (E, C, T, p, p)
        self.bias = conv.bias

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        # (N, C, T, p, p) -> (N, E); PatchEmbed reshapes its output with view(-1, E)
        return F.linear(patches.flatten(1), self.weight.flatten(1), self.bias)


def _patch_embedding_as_matmul(model) -> None:
    try:
        embed = resolve_module(model, "model.visual.patch_embed")
    except AttributeError:
        return  # a layout we do not know: keep the model's own Conv3d
    conv = getattr(embed, "proj", None)
    if isinstance(conv, torch.nn.Conv3d) and tuple(conv.kernel_size) == tuple(conv.stride) and conv.padding == (0, 0, 0):
        embed.proj = PatchMatmul(conv)


def _processor_chat_template(path: str) -> str | None:
    """The template from a processor-only `chat_template.json` (older repos), which AutoTokenizer does not read."""
    from transformers.utils import cached_file

    found = cached_file(path, "chat_template.json", _raise_exceptions_for_missing_entries=False)
    return json.loads(Path(found).read_text(encoding="utf-8"))["chat_template"] if found else None
