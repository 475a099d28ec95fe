"""LLaVA-1.5 family (`LlavaForConditionalGeneration`, e.g. llava-hf/llava-1.5-7b-hf)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from PIL import Image

from .base import Batch, pack_left_padded, resolve_module

# LLaVA-1.5's vicuna_v1 format, used when the processor ships no chat template
_VICUNA_TEMPLATE = "USER: {image}\n{question} ASSISTANT:"


class LlavaAdapter:
    family: ClassVar[str] = "llava"
    layer_path = "model.language_model.layers"

    def __init__(self, model_id: str, model, processor):
        self.model_id = model_id
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        image_processor = processor.image_processor
        crop = image_processor.crop_size
        if crop["height"] != crop["width"]:
            raise ValueError(f"{model_id}: LLaVA canvas must be square, processor crops to {crop}")
        self.canvas_size = int(crop["height"])
        self.patch_size = int(model.config.vision_config.patch_size)
        self.image_mean = torch.tensor(image_processor.image_mean, dtype=torch.float32)
        self.image_std = torch.tensor(image_processor.image_std, dtype=torch.float32)
        self.num_image_tokens = (self.canvas_size // self.patch_size) ** 2
        if model.config.vision_feature_select_strategy == "full":
            self.num_image_tokens += 1  # the CLS token is kept
        self._layers = resolve_module(model, self.layer_path)

    @classmethod
    def handles(cls, config) -> bool:
        return config.model_type == "llava"

    @classmethod
    def load(cls, path: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> "LlavaAdapter":
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        device_map = "auto" if device == "auto" else None
        model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype, device_map=device_map)
        if device_map is None:
            model = model.to(device)
        model.eval().requires_grad_(False)
        return cls(path, model, AutoProcessor.from_pretrained(path))

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
        image_token = self.processor.image_token
        if getattr(self.processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return _VICUNA_TEMPLATE.format(image=image_token, question=question)

    def image_to_canvas(self, image: Image.Image) -> torch.Tensor:
        # The processor's own resize + centre crop, stopped before rescale/normalize (done in torch below).
        out = self.processor.image_processor(
            images=image.convert("RGB"), do_rescale=False, do_normalize=False, return_tensors="np"
        )["pixel_values"][0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32) / 255.0)

    def normalize(self, canvas: torch.Tensor) -> torch.Tensor:
        # (B, 3, S, S) in [0, 1] -> (B, 3, S, S) normalized, as the processor's rescale + normalize
        return (canvas - self.image_mean.view(1, 3, 1, 1)) / self.image_std.view(1, 3, 1, 1)

    def preprocessing_error(self, image: Image.Image) -> float:
        """Max |processor pixel_values - normalize(image_to_canvas(image))| for one image."""
        reference = self.processor.image_processor(images=image, return_tensors="pt")["pixel_values"]
        ours = self.normalize(self.image_to_canvas(image).unsqueeze(0))
        return float((reference.float() - ours).abs().max())

    def prompt_ids(self, question: str) -> list[int]:
        image_token = self.processor.image_token
        text = self.prompt_text(question).replace(image_token, image_token * self.num_image_tokens)
        return self.tokenizer(text, add_special_tokens=True).input_ids

    def answer_ids(self, answer: str) -> list[int]:
        return self.tokenizer(answer, add_special_tokens=False).input_ids + [self.tokenizer.eos_token_id]

    def batch(self, questions: list[str], normalized: torch.Tensor, answers: list[str] | None = None) -> Batch:
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id
        input_ids, attention_mask, last, positions, targets = pack_left_padded(
            [self.prompt_ids(q) for q in questions],
            [self.answer_ids(a) for a in answers] if answers is not None else None,
            pad_id,
        )
        device = self.device
        inputs = {
            "input_ids": input_ids.to(device),
            "attention_mask": attention_mask.to(device),
            "pixel_values": normalized.to(device=device, dtype=self.model.dtype),
        }
        return Batch(inputs, last.to(device), positions.to(device), targets.to(device))

    def decode(self, token_ids: torch.Tensor) -> list[str]:
        return [t.strip() for t in self.tokenizer.batch_decode(token_ids, skip_special_tokens=True)]
