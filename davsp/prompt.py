"""The Visual Safety Prompt: a trainable frame around an image shrunk into the canvas centre.

Shapes: the canvas is (3, S, S); the user's image becomes a (3, S-2p, S-2p) centre; the VSP lives on
the border of width p (`border_mask`). Two spaces (METHOD.md §1):
- "normalized": values in the model's normalized pixel space, unconstrained, as published;
- "pixel": values in [0, 1] RGB, clamped every step (optionally exact to 8 bits), so the frame
  is a real image that `davsp apply` can paste in front of any server.
The "additive" kind is the paper's ablation: an ε-bounded perturbation over the whole image.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save as safetensors_save

from .data.records import to_rgb_on_white
from .errors import DavspError
from .io import atomic_write_bytes, read_safetensors_artifact

SPACES = ("normalized", "pixel")
KINDS = ("frame", "additive")


def square_white(image: Image.Image) -> Image.Image:
    """Pad to a square with white, image centred (as the original code does before framing)."""
    image = to_rgb_on_white(image)
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) uint8."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)


def centred_pixels(image: Image.Image, inner: int) -> np.ndarray:
    """The image as the frame holds it: squared with white, resized to inner×inner (bicubic). (inner, inner, 3) uint8."""
    return np.asarray(square_white(image).resize((inner, inner), Image.Resampling.BICUBIC))


def centre_image(image: Image.Image, inner: int) -> torch.Tensor:
    """`centred_pixels` as a (3, inner, inner) uint8 tensor."""
    return torch.from_numpy(centred_pixels(image, inner).copy()).permute(2, 0, 1)


def border_mask(canvas_size: int, padding: int) -> torch.Tensor:
    """(S, S) bool, True on the border of width `padding`."""
    mask = torch.ones(canvas_size, canvas_size, dtype=torch.bool)
    mask[padding : canvas_size - padding, padding : canvas_size - padding] = False
    return mask


@dataclass
class VisualSafetyPrompt:
    values: torch.Tensor  # (3, S, S) float32 in the prompt's space; only the mask is used
    padding: int
    space: str
    image_mean: torch.Tensor  # (3,) the model's normalisation, to move between spaces
    image_std: torch.Tensor
    kind: str = "frame"
    epsilon: float = 0.0  # additive kind: L∞ bound in [0, 1] pixel units
    quantize_8bit: bool = False
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.space not in SPACES:
            raise DavspError(f"unknown VSP space {self.space!r}; choose one of {', '.join(SPACES)}")
        if self.kind not in KINDS:
            raise DavspError(f"unknown VSP kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.kind == "frame" and not 0 < 2 * self.padding < self.canvas_size:
            raise DavspError(f"padding {self.padding} does not fit a {self.canvas_size}px canvas")
        if self.quantize_8bit and self.space != "pixel":
            raise DavspError("8-bit quantization needs --space pixel")

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def blank(cls, canvas_size: int, padding: int, space: str, image_mean, image_std, **kwargs) -> "VisualSafetyPrompt":
        """Start as the official code does: the mean colour (zeros in normalized space); zeros for additive."""
        mean = torch.as_tensor(image_mean, dtype=torch.float32)
        std = torch.as_tensor(image_std, dtype=torch.float32)
        values = torch.zeros(3, canvas_size, canvas_size)
        if kwargs.get("kind", "frame") == "frame" and space == "pixel":
            start = mean
            if kwargs.get("quantize_8bit"):
                start = torch.round(mean * 255) / 255
            values += start.view(3, 1, 1)
        return cls(values, padding, space, mean, std, **kwargs)

    @property
    def canvas_size(self) -> int:
        return int(self.values.shape[-1])

    @property
    def inner_size(self) -> int:
        return self.canvas_size - 2 * self.padding

    @property
    def mask(self) -> torch.Tensor:
        """(S, S) bool: where the prompt's values are used (the border, or everything for additive)."""
        if self.kind == "additive":
            return torch.ones(self.canvas_size, self.canvas_size, dtype=torch.bool)
        return border_mask(self.canvas_size, self.padding)

    # -- use ------------------------------------------------------------------------------
    def prepare(self, image: Image.Image, adapter) -> torch.Tensor:
        """What the prompt is composed with, as uint8: the centre for a frame, the model's canvas for additive."""
        if self.kind == "additive":
            return torch.round(adapter.image_to_canvas(image) * 255).to(torch.uint8)
        return centre_image(image, self.inner_size)

    def compose(self, prepared: torch.Tensor, normalize) -> torch.Tensor:
        """(B, 3, s, s) uint8 from `prepare` -> (B, 3, S, S) normalized canvases, differentiable in `values`."""
        pixels = prepared.to(self.values.device, torch.float32) / 255.0
        values = self.values.unsqueeze(0)
        if self.kind == "additive":
            return normalize((pixels + values).clamp(0, 1))
        inner = slice(self.padding, self.padding + self.inner_size)
        # the prompt everywhere, then the image over the centre: gradients reach `values` on the border only.
        # Writing the centre in place is faster on a large canvas than pad + where (docs/performance.md).
        canvas = values.expand(len(pixels), -1, -1, -1).clone()
        if self.space == "pixel":
            canvas[:, :, inner, inner] = pixels
            return normalize(canvas)
        canvas[:, :, inner, inner] = normalize(pixels)
        return canvas

    def pixels(self) -> torch.Tensor:
        """(3, S, S) the frame in [0, 1] RGB (normalized values are mapped back and clipped)."""
        values = self.values.detach().cpu()
        if self.space == "normalized":
            values = values * self.image_std.view(3, 1, 1) + self.image_mean.view(3, 1, 1)
        return values.clamp(0, 1) * self.mask

    # -- optimisation ---------------------------------------------------------------------
    def signed_step(self, grad: torch.Tensor, alpha: float) -> None:
        """values <- values - α·sign(grad) on the mask; α in [0, 1] pixel units (÷std in normalized space)."""
        step = torch.full((3, 1, 1), alpha, device=self.values.device)
        if self.space == "normalized":
            step = step / self.image_std.to(self.values.device).view(3, 1, 1)
        mask = self.mask.to(self.values.device)
        with torch.no_grad():
            self.values -= step * grad.sign() * mask
            if self.kind == "additive":
                self.values.clamp_(-self.epsilon, self.epsilon)
            elif self.space == "pixel":
                self.values.clamp_(0, 1)
            if self.quantize_8bit:
                self.values.copy_(torch.round(self.values * 255) / 255)

    # -- files ----------------------------------------------------------------------------
    def _header(self) -> dict:
        return {
            "padding": self.padding, "space": self.space, "kind": self.kind, "epsilon": self.epsilon,
            "quantize_8bit": self.quantize_8bit, "metadata": self.metadata,
        }

    def to_bytes(self) -> bytes:
        tensors = {
            "values": self.values.detach().cpu().float().contiguous(),
            "image_mean": self.image_mean.float().contiguous(),
            "image_std": self.image_std.float().contiguous(),
        }
        return safetensors_save(tensors, metadata={"davsp_vsp": json.dumps(self._header(), sort_keys=True)})

    def save(self, path: str | Path) -> None:
        atomic_write_bytes(path, self.to_bytes())

    @classmethod
    def load(cls, path: str | Path) -> "VisualSafetyPrompt":
        """Read and validate a VSP file: expected tensors and header fields, finite values, consistent shapes."""
        path = Path(path)
        raw_header, tensors = read_safetensors_artifact(path, "davsp_vsp", ("values", "image_mean", "image_std"), "VSP")
        header = _check_header(path, raw_header)
        _check_tensors(path, tensors)
        try:
            return cls(tensors["values"].float(), header["padding"], header["space"], tensors["image_mean"].float(),
                       tensors["image_std"].float(), kind=header["kind"], epsilon=header["epsilon"],
                       quantize_8bit=header["quantize_8bit"], metadata=header["metadata"])
        except DavspError as exc:
            raise DavspError(f"{path}: {exc}") from None

    def preview(self) -> Image.Image:
        """The frame as an RGB image (the additive kind is shown around mid-grey, scaled to ±ε)."""
        if self.kind == "additive":
            scale = 0.5 / max(self.epsilon, 1e-8)
            values = (self.values.detach().cpu() * scale + 0.5).clamp(0, 1)
        else:
            values = self.pixels()
        return Image.fromarray((values * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())


_HEADER_TYPES = {"padding": int, "space": str, "kind": str, "epsilon": (int, float), "quantize_8bit": bool,
                 "metadata": dict}


def _check_header(path: Path, header: dict) -> dict:
    for key, kind in _HEADER_TYPES.items():
        value = header.get(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise DavspError(f"{path}: malformed davsp_vsp header: {key!r} is {value!r:.40}")
    if not math.isfinite(header["epsilon"]) or header["epsilon"] < 0:
        raise DavspError(f"{path}: malformed davsp_vsp header: epsilon {header['epsilon']!r} must be finite and >= 0")
    return header


def _check_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    values, mean, std = tensors["values"], tensors["image_mean"], tensors["image_std"]
    if values.ndim != 3 or values.shape[0] != 3 or values.shape[1] != values.shape[2]:
        raise DavspError(f"{path}: VSP values have shape {tuple(values.shape)}, expected (3, S, S)")
    if tuple(mean.shape) != (3,) or tuple(std.shape) != (3,):
        raise DavspError(f"{path}: image_mean/image_std must have shape (3,)")
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise DavspError(f"{path}: {name} is {tensor.dtype}, expected floating point values")
    if not (std > 0).all():
        raise DavspError(f"{path}: image_std must be positive, got {std.tolist()}")


def apply_frame(vsp: VisualSafetyPrompt, image: Image.Image) -> Image.Image:
    """Frame an image client-side with a pixel-space VSP: the PNG a server's processor turns into the trained input."""
    if vsp.kind != "frame" or vsp.space != "pixel":
        raise DavspError(
            "only a pixel-space frame VSP is a real image; this one is "
            f"{vsp.space}/{vsp.kind} (train with --space pixel to deploy by image)"
        )
    p = vsp.padding
    canvas = (vsp.pixels() * 255).round().to(torch.uint8)
    canvas[:, p : p + vsp.inner_size, p : p + vsp.inner_size] = centre_image(image, vsp.inner_size)
    return Image.fromarray(canvas.permute(1, 2, 0).numpy())
