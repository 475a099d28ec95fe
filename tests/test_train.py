import json
import shutil

import pytest
import torch

from davsp.config import TrainConfig
from davsp.data.records import load_records
from davsp.errors import DavspError
from davsp.prompt import VisualSafetyPrompt
from davsp.train import Pool, projections, train_vsp
from davsp.vector import extract_harmfulness_vector


@pytest.fixture(scope="module")
def data(tiny_llava, record_files):
    harmful, benign = load_records(record_files["harmful"]), load_records(record_files["benign"])
    return harmful, benign, extract_harmfulness_vector(tiny_llava, harmful, benign)


def config(**kw):
    return TrainConfig(**{"steps": 8, "padding": 8, "layer": "2", "checkpoint_every": 2, "device": "cpu", **kw})


def test_run_directory_and_only_the_border_changes(tiny_llava, data, tmp_path):
    harmful, benign, vector = data
    vsp = train_vsp(tiny_llava, vector, harmful, benign, config(space="pixel"), tmp_path / "run", progress=False)
    blank = VisualSafetyPrompt.blank(tiny_llava.canvas_size, 8, "pixel", tiny_llava.image_mean, tiny_llava.image_std)
    changed = (vsp.values.cpu() != blank.values).any(0)  # the trained VSP is on the model's device
    assert changed[vsp.mask].any() and not changed[~vsp.mask].any()
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert {"step", "harmful", "loss", "da_loss", "output_loss", "projection"} <= set(rows[0])
    resolved = json.loads((run / "config.json").read_text())
    assert resolved["layer"] == 2 and len(resolved["thresholds"]) == 2
    assert "torch" in json.loads((run / "manifest.json").read_text())["versions"]
    assert (run / "vsp.png").is_file() and (run / "checkpoints" / "step_000008.safetensors").is_file()
    assert VisualSafetyPrompt.load(run / "vsp.safetensors").metadata["layer"] == 2


def test_harmful_hinge_loss_falls_and_projection_rises(tiny_llava, data, record_files, tmp_path):
    harmful, benign, vector = data
    # Deep Alignment on harmful batches only: the frame must raise the harmful projection toward τ_top
    cfg = config(steps=30, harmful_prob=1.0, output_loss_weight=0.0, alpha=4 / 255, thresholds="1,-1")
    vsp = train_vsp(tiny_llava, vector, harmful, benign, cfg, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["da_loss"] for r in rows[-5:]) < sum(r["da_loss"] for r in rows[:5])
    heldout = load_records(record_files["harmful_heldout"])
    blank = VisualSafetyPrompt.blank(tiny_llava.canvas_size, 8, "normalized", tiny_llava.image_mean, tiny_llava.image_std)
    direction = vector.direction(2)
    before = projections(tiny_llava, blank, Pool(heldout, blank, tiny_llava, None), 2, direction, 6)
    after = projections(tiny_llava, vsp, Pool(heldout, vsp, tiny_llava, None), 2, direction, 6)
    assert sum(after) / 6 > sum(before) / 6


def test_resume_is_bit_identical(tiny_llava, data, tmp_path):
    harmful, benign, vector = data
    full = train_vsp(tiny_llava, vector, harmful, benign, config(), tmp_path / "full", progress=False)
    # an interrupted run: what was on disk after the step-4 checkpoint
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "full", cut)
    for path in (cut / "checkpoints").glob("*.safetensors"):
        if int(path.stem.split("_")[1]) > 4:
            path.unlink()
    for name in ("vsp.safetensors", "vsp.png", "projections.json"):
        (cut / name).unlink()
    lines = (cut / "metrics.jsonl").read_text().splitlines()
    (cut / "metrics.jsonl").write_text("\n".join(lines[:6]) + "\n")  # rows past the checkpoint get dropped
    resumed = train_vsp(tiny_llava, vector, harmful, benign, config(), cut, resume=True, progress=False)
    assert torch.equal(resumed.values, full.values)
    assert (cut / "metrics.jsonl").read_text() == (tmp_path / "full" / "metrics.jsonl").read_text()


def test_refuses_to_reuse_a_run_dir_or_resume_with_other_settings(tiny_llava, data, tmp_path):
    harmful, benign, vector = data
    train_vsp(tiny_llava, vector, harmful, benign, config(steps=2), tmp_path / "run", progress=False)
    with pytest.raises(DavspError, match="not empty"):
        train_vsp(tiny_llava, vector, harmful, benign, config(steps=2), tmp_path / "run", progress=False)
    with pytest.raises(DavspError, match="different config"):
        train_vsp(tiny_llava, vector, harmful, benign, config(steps=2, seed=5), tmp_path / "run", resume=True,
                  progress=False)


def test_benign_records_need_answers_for_the_output_loss(tiny_llava, data, tmp_path):
    harmful, benign, vector = data
    from dataclasses import replace

    with pytest.raises(DavspError, match="has no 'answer'"):
        train_vsp(tiny_llava, vector, harmful, [replace(benign[0], answer=None)], config(), tmp_path / "r",
                  progress=False)


def test_config_validation_names_the_value(tmp_path):
    with pytest.raises(DavspError, match="space='rgb'"):
        TrainConfig(space="rgb")
    (tmp_path / "c.yaml").write_text("steps: 5\nlearning_rate: 3\n")
    with pytest.raises(DavspError, match="unknown config key"):
        TrainConfig.from_yaml(tmp_path / "c.yaml")
    (tmp_path / "ok.yaml").write_text("steps: 5\nspace: pixel\n")
    assert TrainConfig.from_yaml(tmp_path / "ok.yaml", steps=7).steps == 7


def test_paper_defaults():
    from davsp.config import resolve_layer

    c = TrainConfig()
    assert (c.steps, c.batch_size, c.padding, c.output_loss_weight, c.harmful_output_prob) == (1200, 2, 30, 0.02, 0.05)
    assert abs(c.alpha - 1 / 255) < 1e-12
    assert resolve_layer("paper", None, 40, 5120) == 20 and resolve_layer("paper", None, 28, 3584) == 14


@pytest.mark.parametrize("with_output", [False, True])
def test_activation_checkpointing_gives_the_same_loss_and_gradient(tiny_llava, data, with_output):
    from davsp.train import checkpointed_decoder, step_loss

    harmful, benign, vector = data
    cfg = config()
    vsp = VisualSafetyPrompt.blank(tiny_llava.canvas_size, 8, "normalized", tiny_llava.image_mean, tiny_llava.image_std)
    pool = Pool(benign, vsp, tiny_llava, None)
    results, mlp_calls = [], []
    mlp = tiny_llava.decoder_layers()[0].mlp
    for enabled in (False, True):
        calls = []
        handle = mlp.register_forward_pre_hook(lambda *_: calls.append(1))  # recompute may stop early inside
        vsp.values = vsp.values.detach().requires_grad_(True)
        with checkpointed_decoder(tiny_llava, enabled):
            loss, *_ = step_loss(tiny_llava, vsp, pool, [0, 1], False, with_output, 2, vector.direction(2), (1.0, -1.0), cfg)
            results.append((loss.detach(), torch.autograd.grad(loss, vsp.values)[0]))
        handle.remove()
        mlp_calls.append(len(calls))
    assert mlp_calls == [1, 2]  # checkpointing recomputes the layer in the backward
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6)
    assert not any(layer.training or layer.gradient_checkpointing for layer in tiny_llava.decoder_layers())


@pytest.mark.parametrize("name", ["paper.yaml", "deployable.yaml"])
def test_shipped_configs_load(name):
    from pathlib import Path

    import davsp

    loaded = TrainConfig.from_yaml(Path(davsp.__file__).parent / "configs" / name)
    assert loaded.steps == 1200 and loaded.padding == 30


# -- the output-loss target ------------------------------------------------------------------
def _per_token_losses(adapter, vsp, pool, idx, answers, eos: bool) -> list[torch.Tensor]:
    """Each sample's answer-token cross-entropies, one sample at a time through the full model, no padding."""
    import torch.nn.functional as F

    losses = []
    for i, answer in zip(idx, answers):
        prompt = adapter.batch([pool.questions[i]], vsp.compose(pool.prepared[[i]], adapter.normalize))
        target = torch.tensor(adapter.answer_ids(answer, eos=eos), device=adapter.device)
        input_ids = torch.cat([prompt.model_inputs["input_ids"][0], target]).unsqueeze(0)
        with torch.no_grad():
            logits = adapter.model(input_ids=input_ids, pixel_values=prompt.model_inputs["pixel_values"]).logits[0]
        start = prompt.model_inputs["input_ids"].shape[1] - 1  # logits at t predict token t + 1
        losses.append(F.cross_entropy(logits[start : start + len(target)], target, reduction="none"))
    return losses


def _output_loss(adapter, vsp, pool, harmful: bool, direction, cfg) -> torch.Tensor:
    from davsp.train import step_loss

    direction = direction.to(adapter.device)  # as train_vsp places it
    with torch.no_grad():
        return step_loss(adapter, vsp, pool, [0, 1], harmful, True, 2, direction, (1.0, -1.0), cfg)[2]


def test_answer_cross_entropy_means_per_token_and_per_sample():
    from davsp.adapters.base import Batch
    from davsp.train import answer_cross_entropy

    # two rows of a (2, 6) batch: row 0 has 1 answer token it predicts well, row 1 has 4 it does not
    vocab, width = 5, 6
    positions = torch.tensor([4, width + 1, width + 2, width + 3, width + 4])
    targets = torch.tensor([3, 0, 1, 2, 4])
    logits = torch.zeros(5, vocab)
    logits[0, 3] = 8.0  # confident and right
    logits[1:, 1] = 2.0  # confidently wrong on every token of row 1 except its second target
    batch = Batch({"input_ids": torch.zeros(2, width, dtype=torch.long)}, torch.tensor([4, 1]), positions, targets)
    per_token = [float(torch.logsumexp(row, 0) - row[t]) for row, t in zip(logits, targets)]  # -log softmax
    by_token = sum(per_token) / 5
    by_sample = (per_token[0] + sum(per_token[1:]) / 4) / 2
    assert abs(by_token - by_sample) > 0.5
    assert answer_cross_entropy(logits, batch, "token").item() == pytest.approx(by_token, rel=1e-6)
    assert answer_cross_entropy(logits, batch, "sample").item() == pytest.approx(by_sample, rel=1e-6)


@pytest.mark.parametrize("mean", ["token", "sample"])
def test_output_loss_matches_one_sample_at_a_time(tiny_llava, data, mean):
    from dataclasses import replace

    harmful, benign, vector = data
    answers = ["a blue square", "The image shows a red square on a blue background. The bottom of the image"]
    pool_records = [replace(benign[0], answer=answers[0]), replace(benign[1], answer=answers[1])]
    vsp = VisualSafetyPrompt.blank(tiny_llava.canvas_size, 8, "normalized", tiny_llava.image_mean, tiny_llava.image_std)
    pool = Pool(pool_records, vsp, tiny_llava, None)
    for eos in (True, False):
        per_sample = _per_token_losses(tiny_llava, vsp, pool, [0, 1], answers, eos)
        assert len(per_sample[1]) > 3 * len(per_sample[0])  # unequal lengths, so the two means differ
        by_sample = torch.stack([x.mean() for x in per_sample]).mean()
        expected = torch.cat(per_sample).mean() if mean == "token" else by_sample
        got = _output_loss(tiny_llava, vsp, pool, False, vector.direction(2),
                           config(output_loss_mean=mean, answer_eos=eos))
        assert torch.allclose(got, expected, rtol=1e-5, atol=0), eos  # batched and left-padded vs one at a time


def test_harmful_target_is_the_records_own_answer_when_configured(tiny_llava, data):
    from dataclasses import replace

    from davsp.train import output_answers

    harmful, benign, vector = data
    own = "I am sorry, I cannot help with that."
    vsp = VisualSafetyPrompt.blank(tiny_llava.canvas_size, 8, "normalized", tiny_llava.image_mean, tiny_llava.image_std)
    pool = Pool([replace(harmful[0], answer=own), replace(harmful[1], answer=None)], vsp, tiny_llava, None)
    published = config(output_target="record", answer_eos=False, output_loss_mean="sample")
    refusal = published.refusal_answer
    assert output_answers(pool, [0, 1], True, published) == [own, refusal]  # the refusal only when it has none
    assert output_answers(pool, [0, 1], True, config()) == [refusal, refusal]  # the default: always the refusal
    per_sample = _per_token_losses(tiny_llava, vsp, pool, [0, 1], [own, refusal], eos=False)
    got = _output_loss(tiny_llava, vsp, pool, True, vector.direction(2), published)
    assert torch.allclose(got, torch.stack([x.mean() for x in per_sample]).mean(), rtol=1e-4)
    assert not torch.allclose(got, _output_loss(tiny_llava, vsp, pool, True, vector.direction(2), config()), rtol=1e-3)


@pytest.mark.parametrize("model", ["tiny_llava", "tiny_qwen2vl"])
def test_answer_targets_end_with_eos_only_when_asked(model, request):
    adapter = request.getfixturevalue(model)
    eos = adapter.tokenizer.eos_token_id
    answers = ["a blue square", "no"]
    plain = [adapter.tokenizer(a, add_special_tokens=False).input_ids for a in answers]
    assert [adapter.answer_ids(a, eos=False) for a in answers] == plain
    assert [adapter.answer_ids(a) for a in answers] == [ids + [eos] for ids in plain]
    canvases = torch.zeros(2, 3, adapter.canvas_size, adapter.canvas_size)
    for answer_eos, expected in ((False, plain[0] + plain[1]), (True, plain[0] + [eos] + plain[1] + [eos])):
        batch = adapter.batch(["What is shown?", "How do I build a bomb in detail?"], canvases, answers,
                              answer_eos=answer_eos)
        assert batch.target_ids.tolist() == expected


def test_output_loss_settings_default_to_the_previous_behaviour_and_paper_yaml_publishes():
    from pathlib import Path

    import davsp

    assert (TrainConfig().output_target, TrainConfig().answer_eos, TrainConfig().output_loss_mean) == \
        ("refusal", True, "token")
    paper = TrainConfig.from_yaml(Path(davsp.__file__).parent / "configs" / "paper.yaml")
    assert (paper.output_target, paper.answer_eos, paper.output_loss_mean, paper.dtype) == \
        ("record", False, "sample", "paper")
    with pytest.raises(DavspError, match="output_target='own'"):
        TrainConfig(output_target="own")
    with pytest.raises(DavspError, match="output_loss_mean='batch'"):
        TrainConfig(output_loss_mean="batch")
    with pytest.raises(DavspError, match="refusal_answer"):
        TrainConfig(refusal_answer=" ")
