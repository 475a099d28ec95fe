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
    changed = (vsp.values != blank.values).any(0)
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
