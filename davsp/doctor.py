"""`davsp doctor`: check that a user's model works with davsp before spending GPU hours on it."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .activations import last_prompt_states
from .adapters import load_adapter
from .errors import DavspError
from .fingerprint import check_vsp_fits
from .prompt import VisualSafetyPrompt

TOLERANCE = 1e-5
TEST_SIZES = [(37, 53), (64, 64), (101, 40), (300, 220)]


def preprocessing_error(adapter, seed: int = 0) -> float:
    """Max |processor pixel_values - adapter's torch pipeline| over random images of several shapes."""
    rng = np.random.default_rng(seed)
    worst = 0.0
    for w, h in TEST_SIZES:
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        worst = max(worst, adapter.preprocessing_error(image))
    return worst


def border_gradient(adapter, padding: int) -> tuple[float, float]:
    """(mean |grad| on the border, max |grad| inside) of a mid-layer readout w.r.t. the VSP."""
    vsp = VisualSafetyPrompt.blank(adapter.canvas_size, padding, "normalized", adapter.image_mean, adapter.image_std)
    vsp.values = vsp.values.to(adapter.device).requires_grad_(True)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    canvases = vsp.compose(vsp.prepare(image, adapter).unsqueeze(0), adapter.normalize)
    layer = max(1, adapter.num_layers // 2)
    state = last_prompt_states(adapter, adapter.batch(["What is in the image?"], canvases), [layer])[layer]
    (grad,) = torch.autograd.grad(state.float().pow(2).sum(), vsp.values)
    mask = vsp.mask.to(grad.device)
    return float(grad.abs()[:, mask].mean()), float(grad.abs()[:, ~mask].max())


def run_doctor(model: str, *, device: str = "cpu", dtype: str = "float32", padding: int | None = None,
               prompt_format: str | None = None, image_geometry: str = "pad", vsp: str | None = None) -> bool:
    """Print one line per check; return True when all pass. With `vsp`, also check that VSP file fits the model."""
    ok = True

    def report(passed: bool, text: str) -> None:
        nonlocal ok
        ok &= passed
        print(f"[{'ok' if passed else 'FAIL'}] {text}")

    adapter = load_adapter(model, device=device, dtype=dtype, prompt_format=prompt_format,
                           image_geometry=image_geometry)
    report(True, f"adapter: {adapter.family} ({type(adapter.model).__name__}), canvas {adapter.canvas_size}px, "
                 f"patch {adapter.patch_size}px")
    report(True, f"decoder: {adapter.num_layers} layers at {adapter.layer_path}, hidden size {adapter.hidden_size}")
    report(True, f"prompt format {adapter.prompt_format}, image geometry {adapter.image_geometry}: "
                 f"{adapter.prompt_text('<question>')!r}")
    error = preprocessing_error(adapter)
    report(error <= TOLERANCE, f"preprocessing matches the processor: max abs difference {error:.2e} "
                               f"(tolerance {TOLERANCE:g})")
    padding = padding or max(1, round(adapter.canvas_size * 30 / 336))
    border, interior = border_gradient(adapter, padding)
    report(border > 0 and interior == 0.0,
           f"gradient reaches the border (mean |g| {border:.2e}) and not the interior (max |g| {interior:.1e}), "
           f"padding {padding}px")
    if vsp is not None:
        try:
            check_vsp_fits(VisualSafetyPrompt.load(vsp), adapter, f"VSP {vsp}")
            report(True, f"VSP {vsp} was trained for this model")
        except DavspError as exc:
            report(False, str(exc))
    return ok
