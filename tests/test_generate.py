import json

import pytest
import torch

import davsp.generate
from davsp.data.records import load_records
from davsp.errors import DavspError
from davsp.generate import decoding_attention, generate_responses
from davsp.prompt import VisualSafetyPrompt


@pytest.fixture(scope="module")
def records(record_files):
    return load_records(record_files["benign"])[:5]


def test_batched_generation_equals_unbatched_greedy(tiny_llava, records):
    batched = generate_responses(tiny_llava, records, defense="prefix", max_new_tokens=6, batch_size=5, progress=False)
    single = generate_responses(tiny_llava, records, defense="prefix", max_new_tokens=6, batch_size=1, progress=False)
    assert [r["response"] for r in batched] == [r["response"] for r in single]
    assert [r["id"] for r in batched] == [r.id for r in records]


def test_decoding_on_cuda_leaves_out_cudnn_attention():
    # cuDNN plans every new KV length anew: 3x slower first batches on an H200
    with decoding_attention(torch.device("cuda")):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled()
    with decoding_attention(torch.device("cpu")):
        assert torch.backends.cuda.cudnn_sdp_enabled()


def test_generation_decodes_inside_the_device_attention_choice(tiny_llava, records, monkeypatch):
    inside, seen = [], []

    def on_cuda(device):  # what decoding_attention does for CUDA, whatever the test's device
        seen.append(device)
        return decoding_attention(torch.device("cuda"))

    generate = tiny_llava.model.generate
    monkeypatch.setattr(davsp.generate, "decoding_attention", on_cuda)
    monkeypatch.setattr(tiny_llava.model, "generate",
                        lambda **kw: inside.append(not torch.backends.cuda.cudnn_sdp_enabled()) or generate(**kw))
    generate_responses(tiny_llava, records[:2], defense="none", max_new_tokens=2, batch_size=2, progress=False)
    assert seen == [tiny_llava.device] and inside == [True]


def test_output_rows_and_resume(tiny_llava, records, tmp_path):
    out = tmp_path / "responses.jsonl"
    first = generate_responses(tiny_llava, records[:2], defense="none", max_new_tokens=4, batch_size=2, out=out,
                               progress=False)
    # a torn last line (killed mid-write) is tolerated and the finished ids are skipped
    with open(out, "a") as f:
        f.write('{"id": "torn')
    rows = generate_responses(tiny_llava, records, defense="none", max_new_tokens=4, batch_size=2, out=out,
                              progress=False)
    assert [r["response"] for r in rows[:2]] == [r["response"] for r in first]
    written = [json.loads(line) for line in out.read_text().splitlines()]  # every line parses again
    assert sorted(r["id"] for r in written) == sorted(r.id for r in records)
    assert {"id", "benchmark", "category", "question", "defense", "response", "seconds"} <= set(written[0])


def test_vsp_defense_needs_a_vsp(tiny_llava, records):
    with pytest.raises(DavspError, match="needs a VSP"):
        generate_responses(tiny_llava, records, defense="davsp", max_new_tokens=2, progress=False)


def test_vsp_defense_changes_the_input(tiny_llava, records):
    from davsp.generate import defended_inputs

    vsp = VisualSafetyPrompt.blank(tiny_llava.canvas_size, 8, "pixel", tiny_llava.image_mean, tiny_llava.image_std)
    questions, framed = defended_inputs(tiny_llava, records[:1], "davsp", vsp)
    _, clean = defended_inputs(tiny_llava, records[:1], "none", None)
    assert questions[0].startswith("Before processing any instruction") and framed.shape == clean.shape
    assert not framed.equal(clean)


def test_unknown_defense(tiny_llava, records):
    with pytest.raises(DavspError, match="unknown defense"):
        generate_responses(tiny_llava, records, defense="magic", progress=False)


@pytest.mark.parametrize("model", ["tiny_llava", "tiny_qwen2vl"])
def test_static_cache_gives_the_same_answers(model, records, request):
    adapter = request.getfixturevalue(model)
    dynamic = generate_responses(adapter, records[:3], defense="none", max_new_tokens=5, batch_size=3, progress=False)
    static = generate_responses(adapter, records[:3], defense="none", max_new_tokens=5, batch_size=3, progress=False,
                                static_cache=True)
    assert [r["response"] for r in static] == [r["response"] for r in dynamic]
    assert all(r["new_tokens"] > 0 for r in static)
