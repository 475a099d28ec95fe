"""The steering-causality check on the shipped world: the extracted harmfulness vector is a lever."""

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from davsp.toy import MODEL_DIR, world
from davsp.toy.steering import steer, steering_check


def test_steer_adds_at_the_last_position_only_and_cleans_up():
    layer = torch.nn.Identity()
    hidden = torch.zeros(2, 3, 4)
    with steer(layer, torch.ones(4)):
        out = layer(hidden)
    assert out[:, -1].eq(1).all() and out[:, :-1].eq(0).all()
    assert not layer._forward_hooks
    assert hidden.eq(0).all()  # the input is not modified in place


def test_adding_the_vector_turns_missed_harmful_queries_into_refusals(tmp_path):
    model = LlavaForConditionalGeneration.from_pretrained(MODEL_DIR).eval()
    processor = AutoProcessor.from_pretrained(MODEL_DIR)
    splits = world.demo_splits(tmp_path)
    splits["harmful_heldout"] = splits["harmful_heldout"][::3]
    splits["benign_heldout"] = splits["benign_heldout"][::4]
    rows = {row["alpha"]: row for row in steering_check(model, processor, splits, multipliers=(0.0, 0.75))}
    assert rows[0.0]["harmful_heldout_refusal"] <= 0.2
    assert rows[0.75]["harmful_heldout_refusal"] >= 0.8
    assert rows[0.75]["benign_refusal"] <= 0.1
