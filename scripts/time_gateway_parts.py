"""Time the gateway's own work on one request, part by part (the breakdown in docs/deployment.md, "Overhead").

The request is `davsp bench serve`'s: one photo-like JPEG of `--image-px` as a data URL, framed by a VSP
of the same canvas and padding as the bench's. Each part is timed alone, median of `--repeats`. Prints
one JSON object, in ms.

    python3 scripts/time_gateway_parts.py
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import time
from statistics import median

import torch
from PIL import Image

from davsp.serve.bench import bench_image
from davsp.serve.content import Framer, Limits, decode_data_url, find_images, parse_body, png_bytes
from davsp.serve.upstream import request_json
from davsp.prompt import VisualSafetyPrompt


def ms(work, repeats: int) -> float:
    work()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append((time.perf_counter() - started) * 1000)
    return round(median(times), 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-px", type=int, default=336)
    parser.add_argument("--padding", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    url = "data:image/jpeg;base64," + base64.b64encode(bench_image(args.image_px)).decode()
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is shown?"}, {"type": "image_url", "image_url": {"url": url}}]}]}).encode()
    vsp = VisualSafetyPrompt(torch.rand(3, args.image_px, args.image_px), args.padding, "pixel",
                             torch.tensor([0.48, 0.46, 0.41]), torch.tensor([0.27, 0.26, 0.28]))
    framer = Framer("davsp", vsp)
    limits = Limits(max_images=16, max_image_pixels=40_000_000, allowed_hosts=())
    image = decode_data_url(url, limits)
    canvas = framer.frame(image)

    def defend():
        request = parse_body(body)
        refs = find_images(request, limits)
        return framer.defend(request, refs, [decode_data_url(ref.url, limits) for ref in refs])

    relayed = defend()
    report = {
        "decode_jpeg": ms(lambda: decode_data_url(url, limits), args.repeats),
        "frame": ms(lambda: framer.frame(image), args.repeats),
        "png_and_base64": ms(lambda: framer.png_data_url(canvas), args.repeats),
        "whole_defend": ms(defend, args.repeats),
        "request_json": ms(lambda: request_json(relayed), args.repeats),
        "json_dumps_for_comparison": ms(lambda: json.dumps(relayed, ensure_ascii=False).encode(), args.repeats),
        "pillow_png_level0_for_comparison": ms(
            lambda: Image.fromarray(canvas).save(io.BytesIO(), format="PNG", compress_level=0), args.repeats),
    }
    for level in (0, 1, 6):
        report[f"png_level{level}"] = {"ms": ms(lambda: png_bytes(canvas, level), args.repeats // 5 or 1),
                                       "kb": len(png_bytes(canvas, level)) // 1000}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
