import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from davsp.activations import capture
from davsp.adapters import load_adapter
from davsp.adapters.llava import LlavaAdapter
from davsp.prompt import centre_image, square_white
from davsp.errors import DavspError
from davsp.vector import clean_canvases
from davsp.data.records import load_records


SIZES = [(32, 32), (37, 53), (101, 40), (300, 220), (17, 90)]  # (width, height)


def random_image(size) -> Image.Image:
    rng = np.random.default_rng(sum(size))
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def variant(adapter, **options) -> LlavaAdapter:
    """The session's model and processor under other prompt/geometry options."""
    return LlavaAdapter(adapter.model_id, adapter.model, adapter.processor, **options)


@pytest.mark.parametrize("size", SIZES)
def test_pad_geometry_is_the_processor_on_the_white_square(tiny_llava, size):
    image = random_image(size)
    reference = tiny_llava.processor.image_processor(images=square_white(image), return_tensors="pt")
    ours = tiny_llava.batch(["hi"], tiny_llava.normalize(tiny_llava.image_to_canvas(image)[None]))
    assert (reference["pixel_values"] - ours.model_inputs["pixel_values"].cpu()).abs().max() <= 1e-5
    assert tiny_llava.preprocessing_error(image) <= 1e-5


@pytest.mark.parametrize("size", SIZES)
def test_processor_geometry_and_chat_template_match_the_processor(tiny_llava, size):
    adapter = variant(tiny_llava, prompt_format="chat_template", image_geometry="processor")
    image = random_image(size)
    reference = adapter.processor(text=adapter.prompt_text("hi"), images=image, return_tensors="pt")
    ours = adapter.batch(["hi"], adapter.normalize(adapter.image_to_canvas(image)[None]))
    assert (reference["pixel_values"] - ours.model_inputs["pixel_values"].cpu()).abs().max() <= 1e-5
    assert torch.equal(reference["input_ids"], ours.model_inputs["input_ids"].cpu())
    assert adapter.preprocessing_error(image) <= 1e-5


def test_prompt_snapshots(tiny_llava):
    # the last prompt token the method reads depends on this exact text
    assert tiny_llava.prompt_format == "llava_v1"  # the default, although the processor has a chat template
    assert tiny_llava.prompt_text("What is it?") == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions. USER: <image>\nWhat is it? ASSISTANT:"
    )
    chat = variant(tiny_llava, prompt_format="chat_template")
    assert chat.prompt_text("What is it?") == "USER: <image>\nWhat is it? ASSISTANT:"


def test_llava_v1_ids_hold_the_image_tokens_between_the_two_chunks(tiny_llava):
    ids = tiny_llava.prompt_ids("What is it?")
    image = [i for i, t in enumerate(ids) if t == tiny_llava.image_token_id]
    assert len(image) == tiny_llava.num_image_tokens and image == list(range(image[0], image[-1] + 1))
    assert ids[0] == tiny_llava.tokenizer.bos_token_id and ids.count(tiny_llava.tokenizer.bos_token_id) == 1
    assert tiny_llava.tokenizer.decode(ids[image[-1] + 1 :]) == "\nWhat is it? ASSISTANT:"


def test_bad_options_are_clear_errors(tiny_llava, tiny_llava_path):
    with pytest.raises(DavspError, match="prompt format 'vicuna' is not one of llava_v1, chat_template"):
        load_adapter(str(tiny_llava_path), prompt_format="vicuna")
    with pytest.raises(DavspError, match="image geometry 'crop' is not one of pad, processor"):
        variant(tiny_llava, image_geometry="crop")
    processor = copy.copy(tiny_llava.processor)
    processor.chat_template = None
    with pytest.raises(DavspError, match="no chat template; use --prompt-format llava_v1"):
        LlavaAdapter(tiny_llava.model_id, tiny_llava.model, processor, prompt_format="chat_template")


def test_the_toy_world_declares_its_own_template():
    from davsp.toy import MODEL_DIR

    assert load_adapter(str(MODEL_DIR)).prompt_text("q") == "USER: <image>\nq ASSISTANT:"
    assert load_adapter(str(MODEL_DIR), prompt_format="llava_v1").prompt_text("q").startswith("A chat between")


def three_bands(width: int = 120, height: int = 40) -> Image.Image:
    """A wide image: red, green and blue thirds (a typographic image's phrase runs the whole width)."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    for band in range(3):
        pixels[:, band * width // 3 : (band + 1) * width // 3, band] = 255
    return Image.fromarray(pixels)


def test_none_sees_the_framed_picture_up_to_the_resize(tiny_llava):
    """Under `none` a wide image is padded, not cropped: the canvas resized to the frame's centre is the
    frame's centre, up to resampling; the processor's crop loses the red and blue sides."""
    image, size, inner = three_bands(), tiny_llava.canvas_size, tiny_llava.canvas_size - 8
    canvas = tiny_llava.image_to_canvas(image)  # (3, S, S)
    assert canvas[:, size // 2, 1].tolist() == [1.0, 0.0, 0.0] and canvas[:, size // 2, -2].tolist() == [0, 0, 1.0]
    assert canvas[:, 1, size // 2].tolist() == [1.0, 1.0, 1.0]  # white band above the image
    centre = centre_image(image, inner).float() / 255  # what the frame path holds
    shrunk = F.interpolate(canvas[None], size=(inner, inner), mode="bilinear", antialias=True)[0]
    assert (shrunk - centre).abs().mean() < 0.03
    cropped = variant(tiny_llava, image_geometry="processor").image_to_canvas(image)
    assert cropped[:, size // 2, 1].tolist() == [0.0, 1.0, 0.0]  # the crop starts inside the green band
    shrunk_crop = F.interpolate(cropped[None], size=(inner, inner), mode="bilinear", antialias=True)[0]
    assert (shrunk_crop - centre).abs().mean() > 0.3


def test_prompt_format_is_recorded_and_a_mismatch_refused(tiny_llava, record_files, tmp_path):
    from davsp.config import TrainConfig
    from davsp.generate import generate_responses
    from davsp.prompt import VisualSafetyPrompt
    from davsp.train import train_vsp
    from davsp.vector import extract_harmfulness_vector

    harmful, benign = load_records(record_files["harmful"]), load_records(record_files["benign"])
    vector = extract_harmfulness_vector(tiny_llava, harmful, benign)
    assert (vector.metadata["prompt_format"], vector.metadata["image_geometry"]) == ("llava_v1", "pad")
    config = TrainConfig(steps=1, padding=4, device="cpu", dtype="float32", output_loss_weight=0)
    vsp = train_vsp(tiny_llava, vector, harmful, benign, config, tmp_path / "run", progress=False)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["prompt_format"] == vsp.metadata["prompt_format"] == "llava_v1"
    chat = variant(tiny_llava, prompt_format="chat_template")
    with pytest.raises(DavspError, match="vector was made with prompt format 'llava_v1' but the model is loaded "
                                         "with 'chat_template'; pass --prompt-format llava_v1"):
        train_vsp(chat, vector, harmful, benign, config, tmp_path / "other", progress=False)
    with pytest.raises(DavspError, match="the VSP was made with prompt format 'llava_v1'"):
        generate_responses(chat, benign[:1], defense="vsp", vsp=VisualSafetyPrompt.load(tmp_path / "run" /
                                                                                         "vsp.safetensors"))
    with pytest.raises(DavspError, match="config prompt_format='chat_template' but the model was loaded with"):
        train_vsp(tiny_llava, vector, harmful, benign, TrainConfig(steps=1, prompt_format="chat_template"),
                  tmp_path / "third", progress=False)


def test_cli_records_the_format_and_train_refuses_another(tiny_llava_path, record_files, tmp_path, capsys):
    from davsp.cli import main
    from davsp.vector import HarmfulnessVector

    vector = tmp_path / "v.safetensors"
    common = ["--model", str(tiny_llava_path), "--device", "cpu", "--dtype", "float32"]
    assert main(["vector", *common, "--harmful", str(record_files["harmful"]), "--benign",
                 str(record_files["benign"]), "--out", str(vector), "--prompt-format", "chat_template"]) == 0
    assert HarmfulnessVector.load(vector).metadata["prompt_format"] == "chat_template"
    assert main(["train", "--model", str(tiny_llava_path), "--vector", str(vector), "--harmful",
                 str(record_files["harmful"]), "--benign", str(record_files["benign"]), "--out", str(tmp_path / "r"),
                 "--steps", "1", "--device", "cpu", "--dtype", "float32"]) == 2
    assert "made with prompt format 'chat_template' but the model is loaded with 'llava_v1'" in capsys.readouterr().err
    assert main(["doctor", *common, "--prompt-format", "chat_template", "--image-geometry", "processor"]) == 0
    assert "prompt format chat_template, image geometry processor" in capsys.readouterr().out


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
