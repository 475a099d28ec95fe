"""The model probe that ties vectors and VSPs to their model: exact positions on real-size models."""

from __future__ import annotations

import pytest
import torch

from davsp.bench.models import _LLAVA_TEXT, _QWEN2VL_7B_TEXT
from davsp.fingerprint import PROBE_SIZE, model_probe, probe_positions
from fake_device import fake_device

# Input embedding sizes (vocab x hidden) of the real checkpoints davsp bench builds.
REAL_EMBEDDINGS = {name: 32064 * shape["hidden_size"] for name, shape in _LLAVA_TEXT.items()}
REAL_EMBEDDINGS["qwen2-vl-7b"] = _QWEN2VL_7B_TEXT["vocab_size"] * _QWEN2VL_7B_TEXT["hidden_size"]


class _Embedded(torch.nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.embed = torch.nn.Embedding.from_pretrained(weight)

    def get_input_embeddings(self):
        return self.embed


@pytest.mark.parametrize("name", sorted(REAL_EMBEDDINGS))
def test_probe_positions_span_a_real_embedding_exactly(name):
    numel = REAL_EMBEDDINGS[name]
    positions = probe_positions(numel)
    assert positions.dtype == torch.int64 and positions.shape == (PROBE_SIZE,)
    assert positions[0] == 0 and positions[-1] == numel - 1  # a float linspace gives numel here
    assert bool((positions[1:] > positions[:-1]).all())


def test_probe_of_an_embedding_past_float32_precision():
    # 4097 x 4096 values is past 2**24, where float32 can no longer count every position
    weight = torch.arange(4097 * 4096, dtype=torch.float32).reshape(4097, 4096)
    probe = model_probe(_Embedded(weight))
    assert probe.tolist() == probe_positions(weight.numel()).float().tolist()
    assert probe[-1] == weight.numel() - 1


def test_probe_is_the_same_on_the_device():
    weight = torch.randn(300, 70)
    model = _Embedded(weight)
    on_cpu = model_probe(model)
    with fake_device() as device:
        model.to(device)
        on_device = model_probe(model)
    assert on_device.device.type == "cpu" and torch.equal(on_cpu, on_device)
