import numpy as np
import pytest
import torch
from PIL import Image

from davsp.errors import DavspError
from davsp.prompt import VisualSafetyPrompt, apply_frame, border_mask, centre_image, square_white


def test_border_mask_counts_the_paper_frame():
    mask = border_mask(336, 30)
    assert int(mask.sum()) * 3 == 110_160  # METHOD.md: 3 × (336² − 276²) trainable values


def test_square_white_centres_and_pads_white():
    image = Image.new("RGB", (10, 4), (0, 0, 0))
    square = np.asarray(square_white(image))
    assert square.shape == (10, 10, 3)
    assert (square[:3] == 255).all() and (square[3:7] == 0).all() and (square[7:] == 255).all()


def _vsp(space="pixel", **kw):
    return VisualSafetyPrompt.blank(32, 4, space, [0.48, 0.45, 0.40], [0.26, 0.26, 0.27], **kw)


@pytest.mark.parametrize("space", ["pixel", "normalized"])
def test_compose_keeps_the_image_and_places_the_frame(space):
    vsp = _vsp(space)
    vsp.values += torch.rand_like(vsp.values)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    prepared = vsp.prepare(image, adapter=None).unsqueeze(0)
    normalize = lambda x: (x - vsp.image_mean.view(1, 3, 1, 1)) / vsp.image_std.view(1, 3, 1, 1)
    canvas = vsp.compose(prepared, normalize)[0]
    inner = normalize(prepared.float() / 255)[0]
    assert torch.equal(canvas[:, 4:28, 4:28], inner)  # the image itself is never perturbed
    border = vsp.values if space == "normalized" else normalize(vsp.values[None])[0]
    assert torch.equal(canvas[:, vsp.mask], border[:, vsp.mask])
    values = vsp.values.requires_grad_(True)
    vsp.compose(prepared.expand(3, -1, -1, -1), normalize).sum().backward()
    assert (values.grad[:, vsp.mask] != 0).all() and (values.grad[:, ~vsp.mask] == 0).all()


def test_signed_step_touches_only_the_border_and_clamps_pixels():
    vsp = _vsp("pixel")
    before = vsp.values.clone()
    vsp.signed_step(torch.randn_like(vsp.values), alpha=1.0)
    changed = (vsp.values != before).any(0)
    assert changed[vsp.mask].all() and not changed[~vsp.mask].any()
    assert vsp.values.min() >= 0 and vsp.values.max() <= 1


def test_normalized_step_is_alpha_over_std():
    vsp = _vsp("normalized")
    grad = torch.ones_like(vsp.values)
    vsp.signed_step(grad, alpha=1 / 255)
    expected = -(1 / 255) / vsp.image_std
    assert torch.allclose(vsp.values[:, 0, 0], expected)


def test_pixel_8bit_png_round_trip_is_exact(tmp_path, tiny_llava):
    vsp = VisualSafetyPrompt.blank(tiny_llava.canvas_size, 8, "pixel", tiny_llava.image_mean, tiny_llava.image_std,
                                   quantize_8bit=True)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        vsp.signed_step(torch.randn(vsp.values.shape, generator=generator), alpha=3 / 255)
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (41, 29, 3), dtype=np.uint8))
    trained_view = vsp.compose(vsp.prepare(image, tiny_llava).unsqueeze(0), tiny_llava.normalize)
    path = tmp_path / "framed.png"
    apply_frame(vsp, image).save(path)
    served = tiny_llava.processor.image_processor(images=Image.open(path), return_tensors="pt")["pixel_values"]
    assert torch.allclose(served, trained_view, atol=1e-6)


def test_save_load_round_trip(tmp_path):
    vsp = _vsp("pixel", metadata={"model": "m"})
    vsp.values += 0.1
    vsp.save(tmp_path / "v.safetensors")
    loaded = VisualSafetyPrompt.load(tmp_path / "v.safetensors")
    assert torch.equal(loaded.values, vsp.values) and loaded.padding == 4 and loaded.metadata == {"model": "m"}


def test_apply_refuses_normalized_prompt():
    with pytest.raises(DavspError, match="pixel-space"):
        apply_frame(_vsp("normalized"), Image.new("RGB", (8, 8)))


def test_bad_settings_are_clear_errors():
    with pytest.raises(DavspError, match="padding 16"):
        VisualSafetyPrompt.blank(32, 16, "pixel", [0.5] * 3, [0.5] * 3)
    with pytest.raises(DavspError, match="8-bit"):
        _vsp("normalized", quantize_8bit=True)


def test_centre_image_size():
    assert centre_image(Image.new("RGB", (50, 20)), 24).shape == (3, 24, 24)
