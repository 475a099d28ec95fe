"""What the gateway does to a chat request: check it, frame every image, add the safety prefix.

Images: every `image_url` content part, in any message, is decoded (data URLs; http(s) URLs only from
allowed hosts, fetched by the caller), checked against the limits, framed with exactly the pixels of
`davsp apply` (`prompt.apply_frame`) and sent on as a PNG data URL of the model's canvas size. Content
parts of any other type than text and image_url are refused: other media would reach the model unframed.

The safety prefix: training put it before the question of the single user turn that carries the
image (`<image>` + prefix + question), and the model's answer was read after it. So the prefix goes
before the text of every user message from the first one that carries an image on: the message with
the image reads as in training, and the turn being answered always carries it, as in training. Those
are also exactly the messages that carried it when each earlier turn was the one being answered, so
a conversation's history repeats what the model saw (and an upstream's prefix cache keeps working).
A user message without text gets a text part holding the prefix alone. Messages before the first
image, and conversations without images, are left as they are unless `prefix_text_only` is set.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import struct
import zlib
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

from ..data.records import to_rgb_on_white
from ..defenses import SAFETY_PREFIX, defense_parts, with_prefix
from ..prompt import VisualSafetyPrompt, apply_frame, centred_pixels
from .protocol import ApiError

ACCEPTED_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "GIF"})
_DATA_URL = re.compile(r"data:image/[a-z0-9.+-]+;base64,", re.IGNORECASE)


@dataclass(frozen=True)
class Limits:
    max_images: int
    max_image_pixels: int
    allowed_hosts: frozenset[str]


@dataclass
class ImageRef:
    """One image_url content part: where it sits in the request and where its bytes come from."""

    part: dict  # the content part itself, rewritten in place once framed
    url: str

    @property
    def remote(self) -> bool:
        return not self.url[:5].lower() == "data:"


def parse_body(body: bytes) -> dict:
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, f"request body is not valid JSON ({exc.__class__.__name__}: {str(exc)[:80]})",
                       "invalid_json") from None
    if not isinstance(request, dict):
        raise ApiError(400, "request body must be a JSON object", "invalid_json")
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "invalid_messages", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a 'role'", "invalid_messages",
                           param=f"messages[{i}]")
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of parts", "invalid_messages",
                           param=f"messages[{i}].content")
    if not isinstance(request.get("model"), str):
        raise ApiError(400, "'model' must be a string naming the model", "invalid_model", param="model")
    if not isinstance(request.get("stream", False), bool):
        raise ApiError(400, "'stream' must be true or false", "invalid_stream", param="stream")
    return request


def find_images(request: dict, limits: Limits) -> list[ImageRef]:
    """Every image part of every message, checked for type and source before any byte is decoded."""
    images = []
    for i, message in enumerate(request["messages"]):
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise ApiError(400, f"{where}: a text part needs a string 'text'", "invalid_content", param=where)
                continue
            if kind != "image_url":
                raise ApiError(400, f"{where}: content part type {kind!r} is not accepted (this gateway frames images; "
                               "only 'text' and 'image_url' parts may reach the model)", "unsupported_content",
                               param=where)
            url = part.get("image_url", {}).get("url") if isinstance(part.get("image_url"), dict) else None
            if not isinstance(url, str):
                raise ApiError(400, f"{where}: image_url must be an object with a string 'url'", "invalid_image",
                               param=where)
            images.append(ImageRef(part, url))
            if len(images) > limits.max_images:
                raise ApiError(413, f"more than {limits.max_images} images in one request", "too_many_images")
            if images[-1].remote:
                _check_remote(url, limits, where)
    return images


def _check_remote(url: str, limits: Limits, where: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ApiError(400, f"{where}: image URL must be a base64 data URL (data:image/...;base64,...)", "invalid_image",
                       param=where)
    if parts.hostname.lower() not in limits.allowed_hosts:
        raise ApiError(400, f"{where}: remote image URLs are refused (host {parts.hostname!r} is not allowed); send the "
                       "image as a data URL, or the operator adds the host to allowed_image_hosts", "image_url_refused",
                       param=where)


def decode_data_url(url: str, limits: Limits) -> Image.Image:
    match = _DATA_URL.match(url)
    if not match:
        raise ApiError(400, "image data URL must read data:image/<type>;base64,<data>", "invalid_image")
    try:
        data = base64.b64decode(url[match.end():], validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "image data URL is not valid base64", "invalid_image") from None
    return decode_image(data, limits)


def decode_image(data: bytes, limits: Limits) -> Image.Image:
    """RGB (transparency onto white, as `davsp apply` reads files); the size is checked before decoding."""
    try:
        # only these decoders run (no format whose opening does more than read a header)
        image = Image.open(io.BytesIO(data), formats=sorted(ACCEPTED_FORMATS))
        width, height = image.size
        if width * height > limits.max_image_pixels:
            raise ApiError(413, f"image of {width}x{height} pixels exceeds the limit of {limits.max_image_pixels}",
                           "image_too_large")
        image.load()
    except Image.DecompressionBombError:  # Pillow's own, larger bound, checked when the header is read
        raise ApiError(413, f"image exceeds the limit of {limits.max_image_pixels} pixels", "image_too_large") from None
    except (OSError, SyntaxError, ValueError) as exc:  # not an image of those formats, truncated, corrupt
        raise ApiError(400, f"image cannot be decoded as PNG, JPEG, WEBP or GIF ({str(exc)[:80]})",
                       "invalid_image") from None
    return to_rgb_on_white(image)


def png_bytes(pixels: np.ndarray, compress_level: int) -> bytes:
    """(H, W, 3) uint8 pixels as an 8-bit RGB PNG: one IDAT, no row filter, zlib at `compress_level`.

    Written here rather than by Pillow, whose encoder takes about 20 times longer for a canvas at level 0
    (scripts/time_gateway_parts.py): on the gateway's path, per image, that was most of the time budget.
    """
    height, width, _ = pixels.shape
    rows = np.zeros((height, 1 + 3 * width), np.uint8)  # each row: filter type 0, then its pixels
    rows[:, 1:] = pixels.reshape(height, -1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # bit depth 8, colour type 2 (RGB)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(rows.tobytes(), compress_level)) + chunk(b"IEND", b""))


class Framer:
    """Applies one defense to requests: the VSP frame on every image, the safety prefix on the user text."""

    def __init__(self, defense: str, vsp: VisualSafetyPrompt | None, *, prefix_text_only: bool = False,
                 png_compress_level: int = 0):
        self.use_prefix, self.use_frame = defense_parts(defense)
        self.prefix_text_only = prefix_text_only
        self.png_compress_level = png_compress_level
        self.vsp = vsp
        if self.use_frame:
            # The border does not depend on the image: apply_frame's own pixels, computed once, and per image
            # only its centre (prompt.centred_pixels, as apply_frame makes it). tests/test_serve.py compares the
            # result with `davsp apply` bit for bit.
            white = Image.new("RGB", (vsp.inner_size, vsp.inner_size), (255, 255, 255))
            self._border = np.asarray(apply_frame(vsp, white))

    def frame(self, image: Image.Image) -> np.ndarray:
        """apply_frame(vsp, image), the same pixels, (S, S, 3) uint8."""
        p, inner = self.vsp.padding, self.vsp.inner_size
        canvas = self._border.copy()
        canvas[p : p + inner, p : p + inner] = centred_pixels(image, inner)
        return canvas

    def png_data_url(self, pixels: np.ndarray) -> str:
        png = png_bytes(pixels, self.png_compress_level)
        return "data:image/png;base64," + base64.b64encode(png).decode("ascii")

    def defend(self, request: dict, images: list[ImageRef], decoded: list[Image.Image]) -> dict:
        """The request as the upstream gets it (changed in place and returned)."""
        for ref, image in zip(images, decoded, strict=True):
            # framed or not, the upstream gets the decoded, checked image re-encoded, never the client's bytes
            pixels = self.frame(image) if self.use_frame else np.asarray(image)  # decoded images are RGB
            ref.part["image_url"] = {**ref.part["image_url"], "url": self.png_data_url(pixels)}
        if self.use_prefix:
            self._add_prefix(request["messages"], images_present=bool(images))
        return request

    def _add_prefix(self, messages: list[dict], images_present: bool) -> None:
        if not images_present and not self.prefix_text_only:
            return
        started = not images_present  # text-only with prefix_text_only: every user message
        for message in messages:
            content = message.get("content")
            has_image = isinstance(content, list) and any(
                isinstance(p, dict) and p.get("type") == "image_url" for p in content)
            started = started or has_image
            if not started or message["role"] != "user":
                continue
            if isinstance(content, str):
                message["content"] = with_prefix(content, SAFETY_PREFIX)
                continue
            parts = content or []
            text = next((p for p in parts if p.get("type") == "text"), None)
            if text is None:
                parts.append({"type": "text", "text": SAFETY_PREFIX})
                message["content"] = parts
            else:
                text["text"] = with_prefix(text["text"], SAFETY_PREFIX)
