"""LLaVA-1.5 family (`LlavaForConditionalGeneration`, e.g. llava-hf/llava-1.5-7b-hf).

By default the prompt is the official DAVSP code's: LLaVA's `llava_v1` conversation (a system line,
then " USER: <image>\n{question} ASSISTANT:"), tokenized as LLaVA's `tokenizer_image_token` does,
and every image is padded to a white square before the CLIP processor's resize (METHOD.md section 4).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from PIL import Image

from ..data.records import to_rgb_on_white
from ..errors import DavspError
from ..prompt import square_white
from .base import (IMAGE_GEOMETRIES, MODEL_PROMPT_FORMAT_KEY, PROMPT_FORMATS, Batch, Precision, as_precision,
                   check_choice, normalize_pixels, pack_left_padded, resolve_module, set_vision_dtype)

# LLaVA's conv_templates["llava_v1"] for one turn: system, then sep " ", "USER: " + message, sep " ",
# and "ASSISTANT:" left open for the answer (the message is "<image>\n" + question).
LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's questions.")
_LLAVA_V1 = LLAVA_V1_SYSTEM + " USER: {image}\n{question} ASSISTANT:"
# The llava-hf processors' chat template: "USER: <image>\n{question} ASSISTANT:", no system line
# (models built in-process by the bench and the tests carry it).
HF_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% else %}{{ item['text'] }}"
    "{% endif %}{% endfor %} {% else %}ASSISTANT: {{ message['content'][0]['text'] }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


class LlavaAdapter:
    family: ClassVar[str] = "llava"
    layer_path = "model.language_model.layers"
    vision_path = "model.vision_tower"

    def __init__(self, model_id: str, model, processor, *, prompt_format: str | None = None,
                 image_geometry: str = "pad"):
        """`prompt_format` None: the one the model's config names (`davsp_prompt_format`), else llava_v1."""
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
        self.prompt_format = check_choice(
            "prompt format", prompt_format or getattr(model.config, MODEL_PROMPT_FORMAT_KEY, None) or "llava_v1",
            PROMPT_FORMATS, model_id)
        if self.prompt_format == "chat_template" and not getattr(processor, "chat_template", None):
            raise DavspError(f"{model_id}: prompt format 'chat_template' but the processor has no chat template; "
                             "use --prompt-format llava_v1")
        self.image_geometry = check_choice("image geometry", image_geometry, IMAGE_GEOMETRIES, model_id)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(processor.image_token)

    @classmethod
    def handles(cls, config) -> bool:
        return config.model_type == "llava"

    @classmethod
    def load(cls, path: str, *, device: str = "cpu", dtype: Precision | torch.dtype | str = torch.float32,
             prompt_format: str | None = None, image_geometry: str = "pad") -> "LlavaAdapter":
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        if prompt_format is not None:  # bad options fail before the weights load
            check_choice("prompt format", prompt_format, PROMPT_FORMATS, path)
        check_choice("image geometry", image_geometry, IMAGE_GEOMETRIES, path)
        precision = as_precision(dtype)
        device_map = "auto" if device == "auto" else None
        model = LlavaForConditionalGeneration.from_pretrained(path, dtype=precision.language, device_map=device_map)
        if device_map is None:
            model = model.to(device)
        cls.set_precision(model, precision)
        model.eval().requires_grad_(False)
        return cls(path, model, AutoProcessor.from_pretrained(path), prompt_format=prompt_format,
                   image_geometry=image_geometry)

    @classmethod
    def set_precision(cls, model, precision: Precision) -> None:
        """The vision tower in `precision.vision`; its features reach the projector in the language dtype,
        as LLaVA's own CLIPVisionTower casts them back to the images' dtype (fp16) before the projector."""
        set_vision_dtype(model, cls.vision_path, precision, features_to="model.multi_modal_projector")

    @property
    def precision(self) -> Precision:
        vision = resolve_module(self.model, self.vision_path)
        return Precision(self.model.get_input_embeddings().weight.dtype, next(vision.parameters()).dtype)

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
        if self.prompt_format == "llava_v1":
            return _LLAVA_V1.format(image=self.processor.image_token, question=question)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _processor_input(self, image: Image.Image) -> Image.Image:
        # "pad": the official code's white square, which the processor's resize then keeps whole
        return square_white(image) if self.image_geometry == "pad" else to_rgb_on_white(image)

    def image_to_canvas(self, image: Image.Image) -> torch.Tensor:
        # The processor's resize (+ centre crop), stopped before rescale/normalize (done in torch below).
        out = self.processor.image_processor(
            images=self._processor_input(image), do_rescale=False, do_normalize=False, return_tensors="np"
        )["pixel_values"][0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32) / 255.0)

    def normalize(self, canvas: torch.Tensor) -> torch.Tensor:
        return normalize_pixels(canvas, self.image_mean, self.image_std)

    def preprocessing_error(self, image: Image.Image) -> float:
        """Max |processor pixel_values - normalize(image_to_canvas(image))| for one image (padded under "pad")."""
        reference = self.processor.image_processor(images=self._processor_input(image), return_tensors="pt")
        reference = reference["pixel_values"]
        ours = self.normalize(self.image_to_canvas(image).unsqueeze(0))
        return float((reference.float() - ours).abs().max())

    def prompt_ids(self, question: str) -> list[int]:
        image_token = self.processor.image_token
        text = self.prompt_text(question)
        if self.prompt_format == "chat_template":  # as the processor tokenizes it: the whole string at once
            return self.tokenizer(text.replace(image_token, image_token * self.num_image_tokens)).input_ids
        # As LLaVA's tokenizer_image_token: each chunk around the image on its own (BOS once, at the start).
        # A Llama tokenizer then starts the chunk after the image with "▁", which the whole string may not.
        first, *rest = text.split(image_token)
        ids = self.tokenizer(first).input_ids
        for chunk in rest:
            ids += [self.image_token_id] * self.num_image_tokens + self.tokenizer(chunk, add_special_tokens=False).input_ids
        return ids

    def answer_ids(self, answer: str, *, eos: bool = True) -> list[int]:
        ids = self.tokenizer(answer, add_special_tokens=False).input_ids
        return ids + [self.tokenizer.eos_token_id] if eos else ids

    def batch(self, questions: list[str], normalized: torch.Tensor, answers: list[str] | None = None, *,
              answer_eos: bool = True) -> Batch:
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id
        input_ids, attention_mask, last, positions, targets = pack_left_padded(
            [self.prompt_ids(q) for q in questions],
            [self.answer_ids(a, eos=answer_eos) for a in answers] if answers is not None else None,
            pad_id,
        )
        device = self.device
        inputs = {
            "input_ids": input_ids.to(device),
            "attention_mask": attention_mask.to(device),
            "pixel_values": normalized.to(device=device, dtype=self.precision.vision),
        }
        return Batch(inputs, last.to(device), positions.to(device), targets.to(device))

    def decode(self, token_ids: torch.Tensor) -> list[str]:
        return [t.strip() for t in self.tokenizer.batch_decode(token_ids, skip_special_tokens=True)]
