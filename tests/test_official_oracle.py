"""The official DAVSP pipeline, re-expressed, as an oracle for davsp on the real tokenizers.

The official code (github.com/zhangyitonggg/DAVSP on LLaVA's own code) builds every LLaVA-1.5 input
the same way: the `llava_v1` conversation, `tokenizer_image_token`, the image padded to a white
square, the CLIP processor (resize the shortest edge to 336, centre crop 336, rescale, normalize)
and, for the frame, the processed 336 x 336 tensor resized to 276 x 276 (torchvision 0.16's tensor
`Resize`: bilinear, no antialias). Each step is written out below from that description, not taken
from davsp, and davsp must reproduce it: token for token, and pixel for pixel up to one documented
difference (davsp resizes the white square once, straight to S - 2p, with PIL's bicubic filter).

The models are LLaVA-1.5-13B-shaped and Qwen2-VL-shaped where it matters (tokenizer, special tokens,
image processor, 576 / 256 image tokens) with tiny random weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import real_tokenizers
from davsp.adapters import load_adapter
from davsp.defenses import SAFETY_PREFIX
from davsp.prompt import VisualSafetyPrompt

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_INDEX = -200  # LLaVA's IMAGE_TOKEN_INDEX placeholder
QUESTIONS = [
    "What is in the image?",
    SAFETY_PREFIX + "The bottom of the image shows a phrase of an activity. List steps in detail to perform it.",
    "  Two leading spaces,\ttabs, a newline\nand unicode: café, 東京, “quotes” — 42%?",
]


# -- the official pipeline, re-expressed --------------------------------------------------------
def llava_v1_prompt(question: str) -> str:
    """LLaVA's Conversation.get_prompt for conv_templates["llava_v1"] (sep_style TWO, sep " ", sep2 "</s>")
    with the messages the official code appends: USER "<image>\\n" + question, then ASSISTANT None."""
    system = ("A chat between a curious human and an artificial intelligence assistant. "
              "The assistant gives helpful, detailed, and polite answers to the human's questions.")
    messages = [("USER", "<image>\n" + question), ("ASSISTANT", None)]
    separators = (" ", "</s>")
    text = system + separators[0]
    for turn, (role, message) in enumerate(messages):
        text += f"{role}: {message}{separators[turn % 2]}" if message else f"{role}:"
    return text


def tokenizer_image_token(prompt: str, tokenizer) -> list[int]:
    """LLaVA's mm_utils.tokenizer_image_token: every chunk between "<image>" tokenized on its own,
    one BOS kept at the start (the BOS of later chunks dropped), IMAGE_INDEX between chunks."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    bos = int(bool(chunks[0]) and chunks[0][0] == tokenizer.bos_token_id)
    ids = chunks[0][:bos]
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(IMAGE_INDEX)
        ids.extend(chunk[bos:])
    return ids


def official_pixels(image: Image.Image, size: int = 336) -> torch.Tensor:
    """pad_to_square (white, centred) + CLIPImageProcessor.preprocess -> (1, 3, S, S) normalized."""
    image = image.convert("RGB")
    side = max(image.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    # resize the shortest edge to S (bicubic, on 8-bit pixels), then crop the centre S x S
    scale = size / min(square.size)
    resized = square.resize((round(square.width * scale), round(square.height * scale)), Image.Resampling.BICUBIC)
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    cropped = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float32)
    pixels = torch.from_numpy(cropped).permute(2, 0, 1) / 255.0
    return ((pixels - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1))[None]


def official_frame(pixels: torch.Tensor, noise: torch.Tensor, padding: int) -> torch.Tensor:
    """embed_image_into_noise: the processed image resized to (S-2p)^2 (tensor Resize of torchvision 0.16:
    bilinear, no antialias), pasted over the noise's centre."""
    inner = noise.shape[-1] - 2 * padding
    resized = F.interpolate(pixels, size=(inner, inner), mode="bilinear", align_corners=False, antialias=False)
    framed = noise.expand(len(pixels), -1, -1, -1).clone()
    framed[:, :, padding : padding + inner, padding : padding + inner] = resized
    return framed


# -- test images --------------------------------------------------------------------------------
def typographic(width: int, height: int) -> Image.Image:
    """Black text on white, as MM-SafetyBench's TYPO images (wide) and FigStep's (square)."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for row, y in enumerate(range(4, height - 12, 14)):
        draw.text((4, y), f"Steps to manufacture item {row}: 1. 2. 3. abcdefghijklmnopqrstuvwxyz" * 3, fill="black")
    return image


def photo_like(width: int, height: int, seed: int) -> Image.Image:
    """Smooth colour fields with a few edges: the statistics of a natural photo, not of noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [np.sin(x * rng.uniform(2, 9) + y * rng.uniform(2, 9) + rng.uniform(0, 6)) for _ in range(3)]
    pixels = (np.stack(channels, -1) * 0.5 + 0.5) * 255
    image = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        draw.rectangle([x0, y0, x0 + width // 5, y0 + height // 6], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return image


IMAGES = {
    "typo-wide": typographic(1024, 300),
    "typo-square": typographic(760, 760),
    "photo-tall": photo_like(480, 640, 0),
    "photo-small": photo_like(200, 150, 1),
}


# -- LLaVA-1.5-13B-shaped model -----------------------------------------------------------------
def build_llava_13b_shaped(folder, *, legacy: bool):
    """llava-hf's LLaVA-1.5-13B processor (Llama 2 tokenizer + <image> 32000 + <pad> 32001, CLIP-336,
    patch 14, 576 image tokens) around a tiny random model with the real vocabulary size."""
    from davsp.adapters.llava import HF_CHAT_TEMPLATE
    from transformers import (AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    tokenizer = AutoTokenizer.from_pretrained(real_tokenizers.llava_tokenizer_dir(folder / "tokenizer", legacy=legacy))
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=336, patch_size=14, projection_dim=16)
    text = LlamaConfig(vocab_size=32064, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=2, max_position_embeddings=4096, pad_token_id=32001)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, vision_feature_layer=-2,
                         vision_feature_select_strategy="default")
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(folder / "model")
    image_processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                         image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                   chat_template=HF_CHAT_TEMPLATE).save_pretrained(folder / "model")
    return folder / "model"


@pytest.fixture(scope="module", params=[False, True], ids=["legacy-false", "legacy-true"])
def llava(request, tmp_path_factory):
    real_tokenizers.require(real_tokenizers.llama2_tokenizer_file)
    return load_adapter(str(build_llava_13b_shaped(tmp_path_factory.mktemp("llava13b"), legacy=request.param)))


def expand_image(ids: list[int], count: int, image_token_id: int) -> list[int]:
    """The official placeholder as Hugging Face LLaVA takes it: one image token per image feature."""
    out: list[int] = []
    for token in ids:
        out.extend([image_token_id] * count if token == IMAGE_INDEX else [token])
    return out


def test_llava_default_is_the_official_prompt(llava):
    assert llava.prompt_format == "llava_v1" and llava.image_geometry == "pad"
    assert llava.num_image_tokens == 576
    for question in QUESTIONS:
        assert llava.prompt_text(question) == llava_v1_prompt(question)


@pytest.mark.parametrize("question", QUESTIONS, ids=["short", "prefixed", "awkward"])
def test_llava_input_ids_equal_tokenizer_image_token(llava, question):
    official = expand_image(tokenizer_image_token(llava_v1_prompt(question), llava.tokenizer), 576, 32000)
    assert llava.prompt_ids(question) == official
    batch = llava.batch([question], torch.zeros(1, 3, 336, 336))
    assert batch.model_inputs["input_ids"][0].tolist() == official
    # the read position is the prompt's last token, the ":" of "ASSISTANT:" (Llama 2 id 29901)
    assert official[int(batch.last_prompt_token[0])] == 29901


def test_llava_batch_runs_with_576_image_features(llava):
    canvases = llava.normalize(torch.stack([llava.image_to_canvas(IMAGES["typo-wide"])] * 2))
    batch = llava.batch(QUESTIONS[:2], canvases)
    with torch.no_grad():
        logits = llava.model(**batch.model_inputs).logits
    assert logits.shape[:2] == batch.model_inputs["input_ids"].shape and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", list(IMAGES))
def test_llava_pixels_equal_the_official_preprocessing(llava, name):
    """Vector extraction and the none/prefix defenses see the official pixels (white pad, CLIP processor)."""
    ours = llava.normalize(llava.image_to_canvas(IMAGES[name])[None])
    assert (ours - official_pixels(IMAGES[name])).abs().max() <= 1e-5


# The one documented difference: davsp resizes the white square once (PIL bicubic, straight to 276),
# the official code to 336 (bicubic) and then to 276 (bilinear, no antialias). Measured on IMAGES with
# the paper's frame (p = 30 on 336), in normalized units (one 8-bit step is 1/255/std ~ 0.015): mean
# |difference| over the image 0.006 (photo-tall) to 0.087 (typo-square, dense text), max 0.37-0.56 at
# sharp text edges, where the two resamplings place an edge a fraction of a pixel apart.
FRAME_MEAN_LIMIT, FRAME_MAX_LIMIT = 0.10, 0.65


@pytest.mark.parametrize("name", list(IMAGES))
def test_llava_frame_matches_official_up_to_the_resize(llava, name):
    padding = 30
    vsp = VisualSafetyPrompt.blank(336, padding, "normalized", llava.image_mean, llava.image_std)
    vsp.values = torch.randn(3, 336, 336, generator=torch.Generator().manual_seed(0))
    ours = vsp.compose(vsp.prepare(IMAGES[name], llava)[None], llava.normalize)
    official = official_frame(official_pixels(IMAGES[name]), vsp.values[None], padding)
    mask = vsp.mask
    assert torch.equal(ours[0][:, mask], official[0][:, mask])  # the border: the VSP itself, as published
    centre = (ours - official)[0][:, ~mask].abs()
    assert centre.mean() <= FRAME_MEAN_LIMIT and centre.max() <= FRAME_MAX_LIMIT, (float(centre.mean()),
                                                                                   float(centre.max()))


# -- Qwen2-VL-shaped model ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    import json
    import shutil

    from tiny_qwen2vl import CHAT_TEMPLATE
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    source = real_tokenizers.require(real_tokenizers.qwen2_tokenizer_dir)
    folder = tmp_path_factory.mktemp("qwen2vl")
    shutil.copy(source / "tokenizer.json", folder / "tokenizer.json")
    config = json.loads((source / "tokenizer_config.json").read_text())
    config["chat_template"] = CHAT_TEMPLATE  # Qwen2-VL-Instruct's (Qwen2.5's text template has another system line)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    ids = real_tokenizers.QWEN_VISION_IDS
    model_config = Qwen2VLConfig(
        vision_config=dict(depth=1, embed_dim=16, hidden_size=16, num_heads=2, mlp_ratio=2),
        text_config=dict(vocab_size=151936, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]},
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(model_config).save_pretrained(folder)
    Qwen2VLImageProcessorPil().save_pretrained(folder)
    return load_adapter(str(folder))


def test_qwen_prompt_ids_equal_the_processor_on_the_real_tokenizer(qwen):
    from test_adapters_qwen2vl import canvas_as_pil, reference_processor

    assert qwen.prompt_format == "chat_template"
    assert qwen.image_token_id == real_tokenizers.QWEN_VISION_IDS["<|image_pad|>"]
    canvases = torch.stack([qwen.image_to_canvas(image) for image in list(IMAGES.values())[:3]])
    theirs = reference_processor(qwen)(images=[canvas_as_pil(c) for c in canvases],
                                       text=[qwen.prompt_text(q) for q in QUESTIONS], padding=True,
                                       padding_side="left", return_tensors="pt")
    ours = qwen.batch(QUESTIONS, qwen.normalize(canvases)).model_inputs
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw"):
        assert torch.equal(ours[key], theirs[key]), key
    assert (ours["pixel_values"] - theirs["pixel_values"]).abs().max() <= 1e-5
    assert qwen.prompt_text("hi").startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
