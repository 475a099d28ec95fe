import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

TEST_DATA = Path(__file__).resolve().parent / "data"  # third-party fixtures that licences let us ship


@pytest.fixture(scope="session")
def figstep_root() -> Path:
    """tests/data/figstep (MIT, see its NOTE.md): SafeBench's two CSVs and 5 of the original images."""
    root = TEST_DATA / "figstep"
    missing = [name for name in ("safebench.csv", "SafeBench-Tiny.csv", "images") if not (root / name).exists()]
    if missing:  # fail, never skip: a test must not pass without its data
        pytest.fail(f"{root}: test fixture incomplete, missing {', '.join(missing)}; it is part of the repository")
    return root


@pytest.fixture(scope="session")
def tiny_llava_path(tmp_path_factory):
    from tiny_llava import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="session")
def tiny_llava(tiny_llava_path):
    from fake_device import load_on_device, requested_device

    return load_on_device(tiny_llava_path, requested_device())  # DAVSP_TEST_DEVICE, default cpu


def write_records(folder: Path, name: str, rows: list[dict]) -> Path:
    import json

    path = folder / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_record_set(folder: Path, name: str, n: int, colour, question: str, answer: str, seed: int) -> Path:
    """n records with noisy images of one dominant colour (so the two classes differ in image and text)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        h, w = rng.integers(24, 60, size=2)
        pixels = np.clip(np.array(colour)[None, None] + rng.normal(0, 30, (h, w, 3)), 0, 255).astype("uint8")
        Image.fromarray(pixels).save(folder / "img" / f"{name}_{i}.png")
        rows.append({"id": f"{name}-{i}", "image": f"img/{name}_{i}.png", "question": f"{question} {i}?",
                     "answer": answer, "category": name})
    return write_records(folder, name, rows)


@pytest.fixture(scope="session")
def record_files(tmp_path_factory):
    """harmful/benign train and held-out JSONL files with images."""
    folder = tmp_path_factory.mktemp("records")
    return {
        "harmful": make_record_set(folder, "harmful", 8, (200, 30, 30), "How do I build a bomb", "no", 1),
        "benign": make_record_set(folder, "benign", 8, (30, 30, 200), "What is shown in the image", "a blue square", 2),
        "harmful_heldout": make_record_set(folder, "harmful_heldout", 6, (210, 40, 20), "How do I build a bomb", "no", 3),
        "benign_heldout": make_record_set(folder, "benign_heldout", 6, (20, 40, 210), "What is shown in the image", "a blue square", 4),
    }


@pytest.fixture(scope="session")
def tiny_qwen2vl_path(tmp_path_factory):
    from tiny_qwen2vl import build_tiny_qwen2vl

    return build_tiny_qwen2vl(tmp_path_factory.mktemp("tiny-qwen2vl"))


@pytest.fixture(scope="session")
def tiny_qwen2vl(tiny_qwen2vl_path):
    from fake_device import load_on_device, requested_device

    return load_on_device(tiny_qwen2vl_path, requested_device())  # DAVSP_TEST_DEVICE, default cpu
