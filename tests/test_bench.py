import argparse
import dataclasses
import json
from functools import partial
from pathlib import Path

import pytest
import torch

from davsp import bench
from davsp.cli import bench as bench_cli
from davsp.bench import timing
from davsp.bench.models import build_architecture, load_bench_model
from davsp.bench.reference import _reference_output_loss
from davsp.bench.timing import project_loss_and_gradient, ratio_summary, reference_step
from davsp.errors import DavspError
from davsp.train import step_loss


@pytest.fixture(scope="module")
def setup(tiny_llava, tmp_path_factory):
    return bench.train_setup(tiny_llava, tmp_path_factory.mktemp("bench"), batch_size=2, seed=0)


def _mixed_length_pair(pool) -> list[int]:
    """Two samples whose prompts differ in length, so the project's batch is left-padded."""
    first = pool.questions[0]
    other = next(i for i, q in enumerate(pool.questions) if len(q) != len(first))
    return [0, other]


def _loss_and_grad(step, setup, harmful: bool, with_output: bool):
    idx = _mixed_length_pair(setup.pools[harmful])
    (loss, *_), grad = step(setup, setup.blank_vsp(), idx, harmful, with_output)
    return loss, grad


@pytest.mark.parametrize("harmful, with_output", [(True, False), (False, True)], ids=["harmful", "benign+output"])
def test_project_step_equals_the_original_loop(setup, harmful, with_output):
    reference = partial(reference_step, pad_to=bench.reference_padded_length(setup.adapter))
    loss, grad = _loss_and_grad(project_loss_and_gradient, setup, harmful, with_output)
    ref_loss, ref_grad = _loss_and_grad(reference, setup, harmful, with_output)
    assert loss.item() > 0 and torch.allclose(loss, ref_loss, rtol=1e-4, atol=1e-6)
    border = setup.blank_vsp().mask.expand_as(grad)
    assert grad[~border].abs().max() == 0 and ref_grad[border].abs().max() > 0  # only the border learns
    clear = ref_grad.abs() > 1e-3 * ref_grad.abs().max()  # where the reference sign is not a rounding accident
    assert clear.sum() > 0.5 * border.sum()
    assert torch.equal(grad[clear].sign(), ref_grad[clear].sign())


@pytest.mark.parametrize("harmful, with_output", [(True, False), (False, True)], ids=["harmful", "benign+output"])
def test_bfloat16_model_step_matches_float32(setup, tiny_llava_path, harmful, with_output):
    # a GPU run keeps the model in bf16 and the VSP, projection and update in fp32 (METHOD.md); here on the CPU
    from davsp.adapters import load_adapter

    half = dataclasses.replace(setup, adapter=load_adapter(str(tiny_llava_path), device=str(setup.adapter.device),
                                                           dtype=torch.bfloat16))
    idx = _mixed_length_pair(setup.pools[harmful])
    with torch.no_grad():
        (_, _, output_loss, proj), (_, _, half_output_loss, half_proj) = (
            step_loss(s.adapter, s.blank_vsp(), s.pools[harmful], idx, harmful, with_output, s.layer, s.direction,
                      s.thresholds, s.config) for s in (setup, half))
    # bf16 keeps ~3 significant digits of each hidden-state entry, so a projection on a unit vector can move by
    # about 1% of the state's norm, however small the projection itself is (it is ~0.003 on the tiny model)
    state_norm = _last_prompt_state(setup, setup.pools[harmful], idx).norm(dim=-1).max()
    assert half_proj.dtype == torch.float32 and torch.allclose(half_proj, proj, rtol=0, atol=0.01 * state_norm)
    assert torch.allclose(half_output_loss, output_loss, rtol=1e-2)
    _, grad = _loss_and_grad(project_loss_and_gradient, setup, harmful, with_output)
    _, half_grad = _loss_and_grad(project_loss_and_gradient, half, harmful, with_output)
    border = setup.blank_vsp().mask.expand_as(grad)
    assert half_grad.dtype == torch.float32 and half_grad[~border].abs().max() == 0
    clear = grad.abs() > 0.01 * grad.abs().max()  # bf16 rounding may flip the sign of a near-zero gradient
    assert clear.sum() > 0.5 * border.sum() and (half_grad[clear].sign() == grad[clear].sign()).float().mean() > 0.95


def _last_prompt_state(s, pool, idx) -> torch.Tensor:
    """(B, D) float32 state at the supervised layer, with a blank VSP, as step_loss reads it."""
    from davsp.activations import last_prompt_states

    with torch.no_grad():
        canvases = s.blank_vsp().compose(pool.prepared[idx], s.adapter.normalize)
        batch = s.adapter.batch([pool.questions[i] for i in idx], canvases)
        return last_prompt_states(s.adapter, batch, [s.layer])[s.layer].float()


def test_reference_pads_to_the_original_length_capped_at_the_context(tiny_llava):
    # 1024 text tokens with the image as one token = 1023 + 16 image tokens, over the tiny model's 512 positions
    assert bench.reference_padded_length(tiny_llava) == 512
    assert bench.reference_padded_length(tiny_llava, 100) == 99 + tiny_llava.num_image_tokens


def test_reference_output_loss_does_not_depend_on_the_padding(setup):
    pool = setup.pools[False]
    canvas = setup.blank_vsp().compose(pool.prepared[:1], setup.adapter.normalize)
    losses = [_reference_output_loss(setup.adapter, pool.questions[0], canvas, pool.answers[0], pad_to)
              for pad_to in (0, 300)]  # right padding sits after the answer: causal attention ignores it
    assert torch.allclose(losses[0], losses[1], rtol=1e-5)


def test_qwen2vl_benign_step_equals_the_original_loop(tmp_path):
    adapter = build_architecture("tiny-qwen2-vl", layers=2)
    qwen = bench.train_setup(adapter, tmp_path, batch_size=2, seed=0)
    reference = partial(reference_step, pad_to=bench.reference_padded_length(adapter))  # 1279: padded
    loss, grad = _loss_and_grad(project_loss_and_gradient, qwen, False, True)
    ref_loss, ref_grad = _loss_and_grad(reference, qwen, False, True)
    assert torch.allclose(loss, ref_loss, rtol=1e-4)
    clear = ref_grad.abs() > 1e-3 * ref_grad.abs().max()
    assert torch.equal(grad[clear].sign(), ref_grad[clear].sign())


def test_real_size_architectures_match_the_published_parameter_counts():
    # built on the meta device: shapes only, no memory
    assert sum(p.numel() for p in build_architecture("llava-1.5-7b", device="meta").model.parameters()) == 7_063_427_072
    qwen = build_architecture("qwen2-vl-7b", device="meta", layers=3)
    assert qwen.num_layers == 3 and qwen.hidden_size == 3584 and qwen.num_image_tokens == 256


def test_unknown_architecture_and_bad_layers(tiny_llava_path):
    with pytest.raises(DavspError, match="unknown architecture 'llava-9b'"):
        build_architecture("llava-9b")
    with pytest.raises(DavspError, match="Did you mean 'llava-1.5-13b'"):
        load_bench_model("llava-1.5-13", device="cpu", dtype=torch.float32)
    with pytest.raises(DavspError, match="has only 4 decoder layers"):
        load_bench_model(str(tiny_llava_path), device="cpu", dtype=torch.float32, layers=9)
    truncated = load_bench_model(str(tiny_llava_path), device="cpu", dtype=torch.float32, layers=2)
    assert truncated.num_layers == 2 and len(truncated.model.model.language_model.layers) == 2


def _run_cli(argv: list[str], capsys) -> dict:
    parser = argparse.ArgumentParser(prog="davsp")
    bench_cli.add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([*argv, "--device", "cpu", "--threads", "1", "--json"])
    threads = torch.get_num_threads()
    try:
        assert args.func(args) == 0
    finally:
        torch.set_num_threads(threads)  # --threads is process-wide: leave other tests as they were
    return json.loads(capsys.readouterr().out)


def test_cli_bench_train_json(tiny_llava_path, capsys):
    report = _run_cli(["bench", "train", "--model", str(tiny_llava_path), "--reference", "--steps", "1",
                       "--warmup", "1"], capsys)
    assert report["ratio"] > 0 and report["layer"] == 2 and report["reference"]["padded_length"] == 512
    for path in ("project", "reference"):
        for kind in ("harmful", "benign"):
            assert report[path][kind]["samples_per_s"] > 0 and report[path][kind]["peak_memory_gib"] is None
    assert report["loss_rel_diff_harmful"] < 1e-4 and report["loss_rel_diff_benign"] < 1e-4
    assert report["first_loss_rel_diff_harmful"] <= report["loss_rel_diff_harmful"]
    assert report["first_loss_rel_diff_benign"] <= report["loss_rel_diff_benign"]
    assert report["pairs"] == 2 and report["ratio_min"] <= report["ratio"] <= report["ratio_max"]  # 1 step x 2 kinds
    assert "harmful_tflops_per_s" not in report  # GPU only


def test_cli_bench_generate_json(capsys):
    report = _run_cli(["bench", "generate", "--model", "tiny-llava", "--reference", "--n", "3",
                       "--max-new-tokens", "4", "--batch-size", "3"], capsys)
    assert report["ratio"] > 0 and report["n"] == 3
    assert report["project"]["batch_size"] == 3 and report["reference"]["batch_size"] == 1
    assert 0 < report["project"]["tokens"] <= 12
    assert report["same_outputs"] == 1.0  # batched greedy == one at a time


def test_the_ratio_is_the_median_of_paired_steps_so_a_busy_spell_cannot_move_it():
    # pairs 3 and 4 ran while another job held the CPU: both halves slowed alike
    project = [1.0, 1.0, 5.0, 5.0, 1.1]
    reference = [3.0, 3.2, 15.0, 14.0, 3.3]
    summary = ratio_summary(project, reference)
    assert summary["ratio"] == pytest.approx(3.0) and summary["pairs"] == 5
    assert summary["ratio_min"] == pytest.approx(2.8) and summary["ratio_max"] == pytest.approx(3.2)


def test_steps_of_the_two_paths_alternate(setup):
    order = []

    def step_named(name):
        def step(*args):
            order.append(name)
            return project_loss_and_gradient(*args)
        return step

    paths = {name: step_named(name) for name in ("project", "reference")}
    timing.time_train_paths(setup, paths, True, False, [[0, 1]] * 3, warmup=1)
    assert order == ["project", "reference"] * 3


def test_bench_rejects_nonsense_settings(tiny_llava):
    with pytest.raises(DavspError, match="--steps >= 1"):
        bench.bench_train(tiny_llava, steps=0)
    with pytest.raises(DavspError, match="--max-new-tokens"):
        bench.bench_generate(tiny_llava, max_new_tokens=0)


def test_harmful_step_flops_counts_vision_and_layers_up_to_l(setup):
    model = setup.adapter.model.model
    vision = sum(p.numel() for m in (model.vision_tower, model.multi_modal_projector) for p in m.parameters())
    first_two = sum(p.numel() for layer in model.language_model.layers[:2] for p in layer.parameters())
    pool, idx = setup.pools[True], [0, 1]
    batch = setup.adapter.batch([pool.questions[i] for i in idx],
                                setup.blank_vsp().compose(pool.prepared[idx], setup.adapter.normalize))
    patches = 2 * (32 // 8) ** 2  # two 32 px canvases of 8 px patches
    expected = 2 * 2 * (vision * patches + first_two * batch.model_inputs["input_ids"].numel())
    assert setup.layer == 2 and timing.harmful_step_flops(setup, [idx]) == pytest.approx(expected)


def test_device_script_runs_end_to_end_on_the_cpu(tmp_path):
    """scripts/bench_device.sh is the one prepared GPU check; here it runs small, on the tiny LLaVA."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "MODEL": "tiny-llava", "DEVICE": "cpu", "DTYPE": "float32", "STEPS": "1", "N": "2",
           "NEW_TOKENS": "3", "LARGE_N": "4", "SMOKE_STEPS": "2", "SMOKE_RECORDS": "2", "OUT": str(tmp_path),
           "PYTHON": sys.executable, "SMOKE_ALSO": "tiny-qwen2-vl no-such-model"}
    done = subprocess.run(["bash", "scripts/bench_device.sh"], cwd=root, env=env, capture_output=True, text=True)
    # a failing step is reported and the rest still run; the exit status says something failed
    assert done.returncode == 1 and done.stderr.rstrip().endswith("failed: smoke_no-such-model"), done.stderr[-2000:]
    reports = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in ("train", "generate", "generate_large", "generate_static")}
    assert reports["train"]["ratio"] > 0 and reports["generate"]["same_outputs"] == 1.0
    assert reports["generate_large"]["project"]["batch_size"] == 4 and "reference" not in reports["generate_large"]
    assert "x the sequential loop's tokens/s" in done.stdout
    assert reports["generate_static"]["static_cache"] is True and reports["generate_static"]["project"]["tokens"] > 0
    smokes = {name: json.loads((tmp_path / f"smoke_{name}.json").read_text()) for name in ("bfloat16", "paper")}
    assert smokes["paper"]["loss_settings"] == {"output_target": "record", "answer_eos": False, "output_loss_mean": "sample"}
    for name, smoke in smokes.items():  # one warm-up step, then SMOKE_STEPS timed ones, all recorded
        assert smoke["dtype"] == name and smoke["vsp_dtype"] == "float32" and smoke["all_finite"]
        assert [row["step"] for row in smoke["trajectory"]] == [1, 2, 3] and smoke["seconds_per_step"] > 0
    assert json.loads((tmp_path / "smoke_tiny-qwen2-vl.json").read_text())["all_finite"]
    arms = [json.loads(line) for line in (tmp_path / "attention_ab.json").read_text().splitlines()]
    assert [a["arm"] for a in arms] == ["cudnn", "without-cudnn"] and all(len(a["seconds_per_call"]) == 3 for a in arms)
    assert not list(tmp_path.glob("*.part"))
