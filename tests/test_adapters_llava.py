import numpy as np
import pytest
import torch
from PIL import Image

from davsp.activations import capture
from davsp.adapters import load_adapter
from davsp.errors import DavspError
from davsp.vector import clean_canvases
from davsp.data.records import load_records


@pytest.mark.parametrize("size", [(32, 32), (37, 53), (101, 40), (300, 220), (17, 90)])
def test_preprocessing_matches_processor(tiny_llava, size):
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    reference = tiny_llava.processor(text=tiny_llava.prompt_text("hi"), images=image, return_tensors="pt")
    ours = tiny_llava.batch(["hi"], tiny_llava.normalize(tiny_llava.image_to_canvas(image)[None]))
    assert (reference["pixel_values"] - ours.model_inputs["pixel_values"]).abs().max() <= 1e-5
    assert torch.equal(reference["input_ids"], ours.model_inputs["input_ids"])
    assert tiny_llava.preprocessing_error(image) <= 1e-5


def test_prompt_snapshot(tiny_llava):
    # the last prompt token the method reads depends on this exact text
    assert tiny_llava.prompt_text("What is it?") == "USER: <image>\nWhat is it? ASSISTANT:"


def test_decoder_layers_resolve_to_text_layers(tiny_llava):
    layers = tiny_llava.decoder_layers()
    assert len(layers) == tiny_llava.num_layers == 4
    assert layers is tiny_llava.model.model.language_model.layers


def test_capture_equals_output_hidden_states_and_hooks_removed(tiny_llava, record_files):
    records = load_records(record_files["harmful"])[:3]
    batch = tiny_llava.batch([r.question for r in records], clean_canvases(tiny_llava, records))
    out = tiny_llava.model(**batch.model_inputs, output_hidden_states=True)  # transformers may add its own hooks
    before = hook_counts(tiny_llava)
    with capture(tiny_llava.decoder_layers(), [1, 2, 3]) as states:
        tiny_llava.model(**batch.model_inputs)
    for layer in (1, 2, 3):
        assert torch.equal(states[layer], out.hidden_states[layer])
    assert hook_counts(tiny_llava) == before


def hook_counts(adapter):
    return [len(layer._forward_hooks) for layer in adapter.decoder_layers()]


def test_hooks_removed_after_exception(tiny_llava):
    before = hook_counts(tiny_llava)
    with pytest.raises(RuntimeError):
        with capture(tiny_llava.decoder_layers(), [2]):
            raise RuntimeError("boom")
    assert hook_counts(tiny_llava) == before


def test_early_stop_equals_full_forward(tiny_llava, record_files):
    from davsp.activations import last_prompt_states

    records = load_records(record_files["benign"])[:2]
    batch = tiny_llava.batch([r.question for r in records], clean_canvases(tiny_llava, records))
    early = last_prompt_states(tiny_llava, batch, [2])[2]
    out = tiny_llava.model(**batch.model_inputs, output_hidden_states=True)
    full = out.hidden_states[2][torch.arange(2), batch.last_prompt_token]
    assert torch.allclose(early, full, atol=1e-6)


def test_batched_equals_unbatched_with_left_padding(tiny_llava, record_files):
    from davsp.activations import last_prompt_states

    records = load_records(record_files["harmful"])[:3]
    questions = [r.question + " extra words" * i for i, r in enumerate(records)]  # different lengths -> padding
    canvases = clean_canvases(tiny_llava, records)
    batched = last_prompt_states(tiny_llava, tiny_llava.batch(questions, canvases), [3])[3]
    for i in range(3):
        single = last_prompt_states(tiny_llava, tiny_llava.batch([questions[i]], canvases[i : i + 1]), [3])[3]
        assert torch.allclose(batched[i], single[0], atol=1e-5)


def test_wrong_model_type_is_a_clear_error(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(tmp_path)
    with pytest.raises(DavspError, match="no davsp adapter for model type 'llama'"):
        load_adapter(str(tmp_path))


def test_not_a_model_dir_is_a_clear_error(tmp_path):
    with pytest.raises(DavspError, match="not a model directory"):
        load_adapter(str(tmp_path))
