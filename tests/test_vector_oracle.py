"""An independent oracle for the harmfulness vector.

`davsp vector` reads states with forward hooks, in left-padded batches, stops the forward after the
deepest layer it needs and streams the class means. The oracle below does none of that: one record
at a time (no padding, so the last prompt token is the last position), a full forward with
`output_hidden_states=True`, and a plain mean over a Python list.
"""

import pytest
import torch

from davsp.data.records import load_records
from davsp.defenses import SAFETY_PREFIX, with_prefix
from davsp.vector import clean_canvases, extract_harmfulness_vector


@torch.no_grad()
def oracle_class_mean(adapter, records, prefix) -> torch.Tensor:
    """(N-1, D): mean over records of hidden_states[l][0, -1] for l = 1 .. N-1."""
    states = []
    for record in records:
        batch = adapter.batch([with_prefix(record.question, prefix)], clean_canvases(adapter, [record]))
        out = adapter.model(**batch.model_inputs, output_hidden_states=True, use_cache=False)
        # hidden_states[N] is after the final norm; davsp's layer N is the decoder output before it
        states.append(torch.stack([h[0, -1].float().cpu() for h in out.hidden_states[1:-1]]))
    return torch.stack(states).mean(0)


@pytest.mark.parametrize("model", ["tiny_llava", "tiny_qwen2vl"])
@pytest.mark.parametrize("use_prefix", [True, False])
def test_vector_means_equal_the_oracle(model, use_prefix, request, record_files):
    adapter = request.getfixturevalue(model)
    harmful = load_records(record_files["harmful"])[:5]
    benign = load_records(record_files["benign"])[:6]  # unequal counts: a mean, not a sum, is compared
    vector = extract_harmfulness_vector(adapter, harmful, benign, use_prefix=use_prefix, batch_size=4)
    prefix = SAFETY_PREFIX if use_prefix else None
    last = adapter.num_layers - 1
    expected = {"harmful": oracle_class_mean(adapter, harmful, prefix), "benign": oracle_class_mean(adapter, benign, prefix)}
    for ours, name in ((vector.harmful_mean, "harmful"), (vector.benign_mean, "benign")):
        scale = expected[name].abs().max()
        assert torch.allclose(ours[:last], expected[name], atol=1e-4 * scale, rtol=1e-4), \
            f"{name}: max diff {(ours[:last] - expected[name]).abs().max():.3g} (scale {scale:.3g})"
    # the direction is the unit difference of those means, at every layer
    diff = expected["harmful"] - expected["benign"]
    assert torch.allclose(vector.directions[:last], diff / diff.norm(dim=-1, keepdim=True), atol=1e-4)
