"""A pinned short training trajectory: 8 steps on the tiny LLaVA, every random draw seeded.

A snapshot only catches drift, which is the point here: a silent change to the algorithm (the loss, the
read position, the step, the batch draws, the prompt) moves these numbers. When a change is meant to move
them, re-pin with `python tests/test_train_trajectory.py` and say why in the commit.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

# (step, harmful?, loss, mean projection) as measured with torch 2.13 on the CPU, one thread
PINNED = [
    (1, True, 2.9996657371520996, -0.020805848762392998),
    (2, True, 0.0024417899549007416, -0.019407188519835472),
    (3, False, 2.9971940517425537, -0.03279384598135948),
    (4, True, 2.997694969177246, -0.017660029232501984),
    (5, True, 0.0008334610611200333, -0.017798859626054764),
    (6, False, 2.9946978092193604, -0.03602379560470581),
    (7, True, 0.00034502986818552017, -0.016467584297060966),
    (8, True, 0.0, -0.014921273104846478),
]


def run_trajectory(tiny_llava, record_files, out: Path) -> list[tuple]:
    from davsp.config import TrainConfig
    from davsp.data.records import load_records
    from davsp.train import train_vsp
    from davsp.vector import extract_harmfulness_vector

    harmful, benign = load_records(record_files["harmful"]), load_records(record_files["benign"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        vector = extract_harmfulness_vector(tiny_llava, harmful, benign, batch_size=4)
        config = TrainConfig(steps=8, padding=4, seed=3, checkpoint_every=4, projection_samples=4,
                             harmful_output_prob=0.5, output_loss_weight=0.5)
        train_vsp(tiny_llava, vector, harmful, benign, config, out, progress=False)
    finally:
        torch.set_num_threads(threads)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["harmful"], r["loss"], r["projection"]) for r in rows]


def test_eight_steps_follow_the_pinned_trajectory(tiny_llava, record_files, tmp_path):
    got = run_trajectory(tiny_llava, record_files, tmp_path / "run")
    assert [(s, h) for s, h, *_ in got] == [(s, h) for s, h, *_ in PINNED]  # the seeded batch kinds
    for (step, _, loss, proj), (_, _, pinned_loss, pinned_proj) in zip(got, PINNED):
        assert loss == pytest.approx(pinned_loss, rel=1e-3, abs=1e-6), f"step {step} loss"
        assert proj == pytest.approx(pinned_proj, rel=1e-3, abs=1e-6), f"step {step} projection"
    assert len({round(p, 6) for *_, p in got}) > 1  # the frame moves the projection


if __name__ == "__main__":  # re-pin: prints the values to paste into PINNED
    sys.path.insert(0, str(Path(__file__).parent))
    import tempfile

    from conftest import make_record_set
    from tiny_llava import build_tiny_llava

    from davsp.adapters import load_adapter

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        files = {"harmful": make_record_set(folder, "harmful", 8, (200, 30, 30), "How do I build a bomb", "no", 1),
                 "benign": make_record_set(folder, "benign", 8, (30, 30, 200), "What is shown in the image",
                                           "a blue square", 2)}
        adapter = load_adapter(str(build_tiny_llava(folder / "model")))
        for row in run_trajectory(adapter, files, folder / "run"):
            print(f"    {row!r},")
