import pytest
import torch

from davsp.adapters import load_adapter
from davsp.data.records import load_records
from davsp.errors import DavspError
from davsp.vector import HarmfulnessVector, extract_harmfulness_vector, separation_table


@pytest.fixture(scope="module")
def vector(tiny_llava, record_files):
    return extract_harmfulness_vector(
        tiny_llava, load_records(record_files["harmful"]), load_records(record_files["benign"]), batch_size=3)


def test_vector_shapes_units_and_metadata(vector, tiny_llava):
    assert vector.harmful_mean.shape == (tiny_llava.num_layers, tiny_llava.hidden_size)
    assert torch.allclose(vector.directions.norm(dim=-1), torch.ones(tiny_llava.num_layers))
    top, bottom = vector.class_projections(2)
    assert top > bottom  # the harmful mean projects higher by construction
    assert vector.metadata["prefix"] is True and vector.metadata["counts"] == {"harmful": 8, "benign": 8}
    assert "<- best" in separation_table(vector)


def test_batch_size_does_not_change_the_vector(vector, tiny_llava, record_files):
    other = extract_harmfulness_vector(
        tiny_llava, load_records(record_files["harmful"]), load_records(record_files["benign"]), batch_size=8)
    assert torch.allclose(other.harmful_mean, vector.harmful_mean, atol=1e-5)


def test_save_load_round_trip(vector, tmp_path, tiny_llava):
    vector.save(tmp_path / "v.safetensors")
    loaded = HarmfulnessVector.load(tmp_path / "v.safetensors")
    assert torch.equal(loaded.directions, vector.directions) and loaded.metadata == vector.metadata
    loaded.check_model(tiny_llava)


def test_vector_from_another_model_with_same_sizes_is_rejected(vector, tmp_path):
    from tiny_llava import build_tiny_llava

    other = load_adapter(str(build_tiny_llava(tmp_path / "other", seed=1)))
    assert other.hidden_size == vector.harmful_mean.shape[1]
    with pytest.raises(DavspError, match="different model"):
        vector.check_model(other)


def test_corrupt_vector_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(DavspError, match="bad.safetensors"):
        HarmfulnessVector.load(bad)


def test_too_few_records(tiny_llava, record_files):
    with pytest.raises(DavspError, match="at least 2"):
        extract_harmfulness_vector(tiny_llava, load_records(record_files["harmful"])[:1],
                                   load_records(record_files["benign"]))
