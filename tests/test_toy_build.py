"""`davsp toy build` end to end on a tiny step budget (the full build is never run in tests)."""

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from davsp.adapters.llava import LlavaAdapter
from davsp.defenses import SAFETY_PREFIX
from davsp.errors import DavspError
from davsp.cli import toy as toy_cli
from davsp.toy import build, world
from davsp.toy.build import BuildConfig


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toy") / "model"
    cfg = BuildConfig(renders_per_class=1, vision_steps=2, steps=2, batch_size=4, warmup=1)
    build.build_world(out, cfg, evaluate=False)
    return out


def test_tiny_build_saves_a_loadable_llava(tiny_world: Path):
    model = LlavaForConditionalGeneration.from_pretrained(tiny_world)
    processor = AutoProcessor.from_pretrained(tiny_world)
    assert type(processor).__name__ == "LlavaProcessor"
    assert "CLIPImageProcessor" in type(processor.image_processor).__name__
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert sum(f.stat().st_size for f in tiny_world.iterdir()) < 8_000_000
    assert (tiny_world / "toy_world.json").is_file()


def test_prompt_layout_matches_the_processor(tiny_world: Path):
    processor = AutoProcessor.from_pretrained(tiny_world)
    image = Image.fromarray(np.full((48, 48, 3), 200, dtype=np.uint8))
    question = SAFETY_PREFIX + "What color is the object ?"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    reference = processor(text=prompt, images=image, return_tensors="pt")["input_ids"][0].tolist()
    adapter = LlavaAdapter("toy-world", LlavaForConditionalGeneration.from_pretrained(tiny_world), processor)
    assert adapter.prompt_ids(question) == reference  # the layout the builder trains on
    assert processor.tokenizer.unk_token_id not in reference


def test_closed_vocabulary_round_trips(tiny_world: Path):
    tokenizer = AutoProcessor.from_pretrained(tiny_world).tokenizer
    for text in world.all_texts():
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert tokenizer.unk_token_id not in ids, text
    ids = tokenizer(world.REFUSAL, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    assert tokenizer.decode(ids, skip_special_tokens=True) == world.REFUSAL


def test_build_is_deterministic(tmp_path: Path, tiny_world: Path):
    from safetensors.torch import load_file

    cfg = BuildConfig(renders_per_class=1, vision_steps=2, steps=2, batch_size=4, warmup=1)
    build.build_world(tmp_path / "again", cfg, evaluate=False)
    first = load_file(tiny_world / "model.safetensors")
    second = load_file(tmp_path / "again" / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_cli_refuses_a_non_empty_out(tmp_path: Path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(DavspError, match="not empty"):
        toy_cli.run_build(argparse.Namespace(out=tmp_path, seed=0, steps=1))
