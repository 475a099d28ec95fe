"""Qwen2-VL adapter: parity with the real processor, left padding, gradients, layers, generation."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_qwen2vl import build_tiny_qwen2vl
from transformers import AutoConfig, LlavaConfig, Qwen2VLProcessor

from davsp.adapters import adapter_class_for, load_adapter
from davsp.adapters.qwen2vl import Qwen2VLAdapter
from davsp.errors import DavspError

QUESTIONS = ["What is this?", "Describe every object in the picture, then say which one is the largest."]
SIZES = [(448, 448), (300, 200), (123, 457), (1000, 700), (57, 31)]  # (width, height)


@pytest.fixture(scope="module")
def tiny_path(tiny_qwen2vl_path):
    return tiny_qwen2vl_path


@pytest.fixture(scope="module")
def adapter(tiny_qwen2vl):
    return tiny_qwen2vl  # the session's adapter: no test here changes it


def random_image(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def random_canvases(adapter, sizes) -> torch.Tensor:
    """(len(sizes), 3, S, S) canvases of random images of these (width, height) sizes."""
    return torch.stack([adapter.image_to_canvas(random_image(*size, seed)) for seed, size in enumerate(sizes)])


def canvas_as_pil(canvas: torch.Tensor) -> Image.Image:
    # canvases hold uint8 / 255 exactly, so this is lossless
    return Image.fromarray((canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def reference_processor(adapter) -> Qwen2VLProcessor:
    """The real Qwen2VLProcessor around our tokenizer and image processor.

    Its __init__ insists on a video processor, which needs torchvision; the image + text path we
    compare against does not use it, so set only what that path reads.
    """
    processor = Qwen2VLProcessor.__new__(Qwen2VLProcessor)
    processor.tokenizer = adapter.tokenizer
    processor.image_processor = adapter.image_processor
    processor.chat_template = adapter.tokenizer.chat_template
    processor.image_token, processor.video_token = "<|image_pad|>", "<|video_pad|>"
    processor.image_token_id = adapter.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    processor.video_token_id = adapter.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    return processor


def test_registry_finds_qwen_families(tiny_path, adapter):
    assert adapter_class_for(str(tiny_path)) is Qwen2VLAdapter
    assert isinstance(adapter, Qwen2VLAdapter)
    assert Qwen2VLAdapter.handles(AutoConfig.for_model("qwen2_5_vl"))
    assert not Qwen2VLAdapter.handles(LlavaConfig())


def test_attributes(tiny_path, adapter):
    assert (adapter.canvas_size, adapter.patch_size, adapter.num_image_tokens) == (448, 28, 256)
    assert adapter.hidden_size == 64
    assert adapter.model_id == str(tiny_path)
    assert torch.allclose(adapter.image_mean, torch.tensor(adapter.image_processor.image_mean))
    assert torch.allclose(adapter.image_std, torch.tensor(adapter.image_processor.image_std))
    assert adapter.lm_head() is adapter.model.lm_head


def test_decoder_layers_by_explicit_path(adapter):
    layers = adapter.decoder_layers()
    assert adapter.layer_path == "model.language_model.layers"
    assert layers is adapter.model.model.language_model.layers
    assert len(layers) == adapter.num_layers == adapter.model.config.text_config.num_hidden_layers == 4


def test_missing_layer_path_fails_loudly(adapter, monkeypatch):
    monkeypatch.setattr(Qwen2VLAdapter, "layer_path", "model.layers")
    with pytest.raises(DavspError, match="no decoder layers at 'model.layers'"):
        Qwen2VLAdapter(adapter.model_id, adapter.model, adapter.tokenizer, adapter.image_processor)


def test_canvas_the_processor_would_resize_is_refused(adapter):
    processor = type(adapter.image_processor)(max_pixels=448 * 448)
    for size in (450, 20 * 28):  # not a multiple of 28; beyond max_pixels
        with pytest.raises(DavspError, match=f"would resize a {size}x{size} canvas"):
            Qwen2VLAdapter(adapter.model_id, adapter.model, adapter.tokenizer, processor, canvas_size=size)


def test_image_to_canvas_pads_white_and_centres(adapter):
    canvas = adapter.image_to_canvas(Image.new("RGB", (200, 100), (0, 0, 0)))  # wide: white bands top and bottom
    assert canvas.shape == (3, 448, 448) and canvas.dtype == torch.float32
    column = canvas[:, :, 224]
    assert torch.all(column[:, :100] == 1.0) and torch.all(column[:, -100:] == 1.0)
    assert torch.all(column[:, 120:328] == 0.0)
    transparent = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    assert torch.all(adapter.image_to_canvas(transparent) == 1.0)  # alpha composited onto white, as the processor


@pytest.mark.parametrize("seed,size", list(enumerate(SIZES)))
def test_pixel_values_match_processor(adapter, seed, size):
    canvas = adapter.image_to_canvas(random_image(*size, seed))
    expected = adapter.image_processor(images=canvas_as_pil(canvas), return_tensors="pt")
    pixel_values = adapter.patchify(adapter.normalize(canvas[None]))
    assert pixel_values.shape == expected["pixel_values"].shape
    assert (pixel_values - expected["pixel_values"]).abs().max() <= 1e-5
    batch = adapter.batch(["q"], adapter.normalize(canvas[None]))
    assert torch.equal(batch.model_inputs["image_grid_thw"].cpu(), expected["image_grid_thw"])


def test_batch_matches_processor(adapter):
    """input_ids, mask, mm_token_type_ids, pixel_values and grid all equal the real processor's, left-padded."""
    canvases = random_canvases(adapter, SIZES[1:3])
    ours = adapter.batch(QUESTIONS, adapter.normalize(canvases)).model_inputs
    theirs = reference_processor(adapter)(
        images=[canvas_as_pil(c) for c in canvases],
        text=[adapter.prompt_text(q) for q in QUESTIONS],
        padding=True,
        padding_side="left",
        return_tensors="pt",
    )
    assert set(ours) == set(theirs)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw"):
        assert torch.equal(ours[key].cpu(), theirs[key]), key
    assert (ours["pixel_values"].cpu() - theirs["pixel_values"]).abs().max() <= 1e-5


def test_prompt_text_snapshot(adapter):
    assert adapter.prompt_text("What is this?") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_only_the_chat_template_and_the_white_square(adapter, tiny_path):
    assert (adapter.prompt_format, adapter.image_geometry) == ("chat_template", "pad")
    with pytest.raises(DavspError, match="prompt format 'llava_v1': Qwen2-VL supports only 'chat_template'"):
        load_adapter(str(tiny_path), prompt_format="llava_v1")
    with pytest.raises(DavspError, match="image geometry 'processor': Qwen2-VL supports only 'pad'"):
        Qwen2VLAdapter(adapter.model_id, adapter.model, adapter.tokenizer, adapter.image_processor,
                       image_geometry="processor")


def test_answers_become_targets(adapter):
    canvases = torch.zeros(2, 3, 448, 448)
    answers = ["I am sorry.", "The image shows a cat."]
    batch = adapter.batch(QUESTIONS, adapter.normalize(canvases), answers=answers)
    eos = adapter.tokenizer.eos_token_id
    expected = [adapter.tokenizer(a, add_special_tokens=False).input_ids + [eos] for a in answers]
    assert batch.target_ids.tolist() == expected[0] + expected[1]
    flat_ids = batch.model_inputs["input_ids"].reshape(-1)
    assert torch.equal(flat_ids[batch.target_positions + 1], batch.target_ids)  # position t predicts token t + 1
    ids = batch.model_inputs["input_ids"]
    assert ids[torch.arange(2), batch.last_prompt_token + 1].tolist() == [e[0] for e in expected]


def test_gradient_reaches_canvas(adapter):
    canvas = torch.rand(2, 3, 448, 448, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    batch = adapter.batch(QUESTIONS, adapter.normalize(canvas), answers=["Yes.", "No."])
    logits = adapter.model(**batch.model_inputs).logits  # (B, T, V)
    flat = logits.reshape(-1, logits.shape[-1])[batch.target_positions]
    torch.nn.functional.cross_entropy(flat, batch.target_ids).backward()
    assert canvas.grad is not None and torch.isfinite(canvas.grad).all()
    assert (canvas.grad[0].abs() > 0).float().mean() > 0.9 and (canvas.grad[1].abs() > 0).float().mean() > 0.9


def last_prompt_hidden(adapter, questions, canvases) -> torch.Tensor:
    """(layers + 1, B, D) hidden states at each sample's last prompt token."""
    batch = adapter.batch(questions, adapter.normalize(canvases))
    with torch.no_grad():
        hidden = adapter.model(**batch.model_inputs, output_hidden_states=True).hidden_states
    rows = torch.arange(len(questions))
    return torch.stack([h[rows, batch.last_prompt_token] for h in hidden])


def test_batched_equals_unbatched(adapter):
    canvases = random_canvases(adapter, SIZES[:2])
    batched = last_prompt_hidden(adapter, QUESTIONS, canvases)
    assert batched.shape == (adapter.num_layers + 1, 2, adapter.hidden_size)
    for i, question in enumerate(QUESTIONS):
        single = last_prompt_hidden(adapter, [question], canvases[i : i + 1])
        assert torch.allclose(batched[:, i], single[:, 0], atol=1e-5), question


def test_generate_batched_equals_unbatched(adapter):
    canvases = random_canvases(adapter, SIZES[:2])

    def new_tokens(questions, images):
        inputs = adapter.batch(questions, adapter.normalize(images)).model_inputs
        out = adapter.model.generate(**inputs, min_new_tokens=4, max_new_tokens=4, do_sample=False)  # no early EOS
        return out[:, inputs["input_ids"].shape[1] :]

    batched = new_tokens(QUESTIONS, canvases)
    assert batched.shape == (2, 4)
    for i, question in enumerate(QUESTIONS):
        assert torch.equal(batched[i], new_tokens([question], canvases[i : i + 1])[0])
    texts = adapter.decode(batched)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_decode_skips_special_tokens(adapter):
    ids = adapter.tokenizer("<|im_start|>a cat<|im_end|>", add_special_tokens=False).input_ids
    assert adapter.decode(torch.tensor([ids])) == ["a cat"]


def test_qwen2_5_vl_loads_and_runs(tmp_path):
    adapter = load_adapter(str(build_tiny_qwen2vl(tmp_path / "tiny-qwen2.5vl", variant="qwen2_5_vl")))
    assert type(adapter.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert adapter.num_layers == 4
    assert type(adapter.model.model.visual.patch_embed.proj).__name__ == "PatchMatmul"
    canvas = adapter.image_to_canvas(random_image(90, 60, 0))[None].requires_grad_(True)
    batch = adapter.batch(QUESTIONS[:1], adapter.normalize(canvas))
    adapter.model(**batch.model_inputs).logits[0, batch.last_prompt_token[0]].sum().backward()
    assert canvas.grad.abs().sum() > 0
    assert adapter.model.generate(**batch.model_inputs, max_new_tokens=2, do_sample=False).shape[1] == (
        batch.model_inputs["input_ids"].shape[1] + 2
    )


def test_chat_template_from_processor_file(tiny_path, adapter, tmp_path):
    """Older repos keep the template only in the processor's chat_template.json."""
    shutil.copytree(tiny_path, tmp_path, dirs_exist_ok=True)
    template = (tmp_path / "chat_template.jinja").read_text()
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    assert load_adapter(str(tmp_path)).prompt_text("hi") == adapter.prompt_text("hi")
    (tmp_path / "chat_template.json").unlink()
    with pytest.raises(DavspError, match="no chat template"):
        load_adapter(str(tmp_path))


def test_missing_image_processor_is_a_clear_error(tiny_path, tmp_path):
    shutil.copytree(tiny_path, tmp_path, dirs_exist_ok=True)
    (tmp_path / "preprocessor_config.json").unlink()
    with pytest.raises(DavspError, match="cannot load the tokenizer or image processor"):
        load_adapter(str(tmp_path))


def test_wrong_model_type_is_refused(tmp_path):
    LlavaConfig().save_pretrained(tmp_path)
    with pytest.raises(DavspError, match="'llava' is not one of qwen2_vl, qwen2_5_vl"):
        Qwen2VLAdapter.load(str(tmp_path))


def test_patch_embedding_matmul_equals_the_conv3d(tiny_path, adapter):
    from transformers import AutoModelForImageTextToText

    from davsp.adapters.qwen2vl import PatchMatmul

    original = AutoModelForImageTextToText.from_pretrained(str(tiny_path)).model.visual.patch_embed
    ours = adapter.model.model.visual.patch_embed
    assert isinstance(original.proj, torch.nn.Conv3d) and isinstance(ours.proj, PatchMatmul)
    assert set(ours.state_dict()) == set(original.state_dict())  # same weights, same names
    patches = adapter.patchify(adapter.normalize(random_canvases(adapter, SIZES[:2])))
    torch.testing.assert_close(ours(patches.to(adapter.device)).cpu(), original(patches), rtol=1e-5, atol=1e-5)
