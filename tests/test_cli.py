"""The CLI end to end on the tiny model, and its one-line errors."""

import json
import math
import os

import pytest
import torch
from PIL import Image

from davsp.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_vector_train_apply_generate(capsys, tmp_path, tiny_llava_path, record_files):
    code, out, _ = run(capsys, "vector", "--model", tiny_llava_path, "--harmful", record_files["harmful"],
                       "--benign", record_files["benign"], "--out", tmp_path / "v.safetensors", "--device", "cpu")
    assert code == 0 and "separation" in out
    (tmp_path / "c.yaml").write_text("# davsp train --config c.yaml ...\nsteps: 3\npadding: 8\n")
    code, _, err = run(capsys, "train", "--model", tiny_llava_path, "--vector", tmp_path / "v.safetensors",
                       "--harmful", record_files["harmful"], "--benign", record_files["benign"],
                       "--out", tmp_path / "run", "--config", tmp_path / "c.yaml", "--space", "pixel",
                       "--quantize-8bit", "true", "--device", "cpu")
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["space"] == "pixel"
    image = record_files["benign"].parent / "img" / "benign_0.png"
    code, _, _ = run(capsys, "apply", "--vsp", tmp_path / "run" / "vsp.safetensors", "--image", image,
                     "--out", tmp_path / "framed.png")
    assert code == 0 and Image.open(tmp_path / "framed.png").size == (32, 32)
    code, _, err = run(capsys, "generate", "--model", tiny_llava_path, "--vsp", tmp_path / "run" / "vsp.safetensors",
                       "--data", record_files["benign"], "--out", tmp_path / "r.jsonl", "--defense", "davsp",
                       "--max-new-tokens", "3", "--limit", "2", "--device", "cpu")
    assert code == 0, err
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 2


def test_doctor_passes_on_the_tiny_model(capsys, tiny_llava_path):
    code, out, _ = run(capsys, "doctor", "--model", tiny_llava_path, "--device", "cpu")
    assert code == 0, out
    assert "max abs difference" in out and "4 layers" in out and "hidden size 64" in out


@pytest.mark.parametrize("case", ["missing_file", "corrupt_image", "empty_set", "wrong_model", "bad_json"])
def test_bad_inputs_give_one_line_errors(capsys, tmp_path, tiny_llava_path, record_files, case):
    data = tmp_path / "data.jsonl"
    model = tiny_llava_path
    expected = {
        "missing_file": "file not found",
        "corrupt_image": "cannot read image",
        "empty_set": "no records",
        "wrong_model": "no davsp adapter",
        "bad_json": ":2: not valid JSON",
    }[case]
    if case == "corrupt_image":
        (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
        data.write_text(json.dumps({"id": "a", "image": "broken.png", "question": "q"}) + "\n")
    elif case == "empty_set":
        data.write_text("\n")
    elif case == "bad_json":
        image = record_files["benign"].parent / "img" / "benign_0.png"
        data.write_text(json.dumps({"id": "a", "image": str(image), "question": "q"}) + "\n{oops\n")
    elif case == "wrong_model":
        from transformers import GPT2Config, GPT2LMHeadModel

        GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=20)).save_pretrained(tmp_path / "gpt2")
        model = tmp_path / "gpt2"
        data = record_files["benign"]
    elif case == "missing_file":
        data = tmp_path / "nope.jsonl"
    code, out, err = run(capsys, "generate", "--model", model, "--data", data, "--out", tmp_path / "o.jsonl",
                         "--defense", "none", "--max-new-tokens", "2", "--device", "cpu")
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("davsp: error:") and expected in last and "Traceback" not in err
    assert not (tmp_path / "o.jsonl").exists()


def test_vector_from_other_model_is_rejected_by_train(capsys, tmp_path, tiny_llava_path, record_files):
    from tiny_llava import build_tiny_llava

    other = build_tiny_llava(tmp_path / "other", seed=7)
    assert run(capsys, "vector", "--model", other, "--harmful", record_files["harmful"], "--benign",
               record_files["benign"], "--out", tmp_path / "v.safetensors", "--device", "cpu")[0] == 0
    code, _, err = run(capsys, "train", "--model", tiny_llava_path, "--vector", tmp_path / "v.safetensors",
                       "--harmful", record_files["harmful"], "--benign", record_files["benign"],
                       "--out", tmp_path / "run", "--steps", "2", "--device", "cpu")
    assert code == 2 and "different model" in err


def test_output_may_not_overwrite_an_input(capsys, tmp_path, tiny_llava_path, record_files):
    code, _, err = run(capsys, "generate", "--model", tiny_llava_path, "--data", record_files["benign"],
                       "--out", record_files["benign"], "--device", "cpu")
    assert code == 2 and "also an input" in err


def test_doctor_passes_on_tiny_qwen2vl(capsys, tiny_qwen2vl_path):
    code, out, _ = run(capsys, "doctor", "--model", tiny_qwen2vl_path, "--device", "cpu")
    assert code == 0, out
    assert "qwen2_vl" in out and "canvas 448px" in out


def test_vector_and_train_on_tiny_qwen2vl(capsys, tmp_path, tiny_qwen2vl_path, record_files):
    assert run(capsys, "vector", "--model", tiny_qwen2vl_path, "--harmful", record_files["harmful"], "--benign",
               record_files["benign"], "--out", tmp_path / "v.safetensors", "--device", "cpu")[0] == 0
    code, _, err = run(capsys, "train", "--model", tiny_qwen2vl_path, "--vector", tmp_path / "v.safetensors",
                       "--harmful", record_files["harmful"], "--benign", record_files["benign"],
                       "--out", tmp_path / "run", "--steps", "3", "--padding", "28", "--device", "cpu")
    assert code == 0, err


@pytest.mark.parametrize("model, padding", [("tiny_llava_path", 4), ("tiny_qwen2vl_path", 28)])
def test_bfloat16_model_trains_a_float32_frame_and_generates(request, capsys, tmp_path, record_files, model, padding):
    # what a GPU user runs (--dtype bfloat16), on the CPU: the model in bf16, the VSP and its update in fp32
    from davsp.prompt import VisualSafetyPrompt, border_mask

    common = ["--model", request.getfixturevalue(model), "--device", "cpu", "--dtype", "bfloat16"]
    data = ["--harmful", record_files["harmful"], "--benign", record_files["benign"]]
    assert run(capsys, "vector", *common, *data, "--out", tmp_path / "v.safetensors")[0] == 0
    code, _, err = run(capsys, "train", *common, *data, "--vector", tmp_path / "v.safetensors",
                       "--out", tmp_path / "run", "--steps", "3", "--padding", padding)
    assert code == 0, err
    vsp = VisualSafetyPrompt.load(tmp_path / "run" / "vsp.safetensors")
    border = border_mask(vsp.canvas_size, padding)
    moved = vsp.values != 0  # a normalized-space frame starts at zeros
    assert vsp.values.dtype == torch.float32 and moved[:, border].any() and not moved[:, ~border].any()
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    code, _, err = run(capsys, "generate", *common, "--vsp", tmp_path / "run" / "vsp.safetensors",
                       "--data", record_files["benign"], "--out", tmp_path / "r.jsonl", "--max-new-tokens", "3",
                       "--limit", "2")
    assert code == 0, err
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 2


def test_generate_over_a_benchmark_by_name(capsys, tmp_path, tiny_llava_path, figstep_root):
    import shutil

    root = tmp_path / "figstep"
    shutil.copytree(figstep_root, root)
    code, _, err = run(capsys, "generate", "--model", tiny_llava_path, "--benchmark", "figstep", "--root", root,
                       "--out", tmp_path / "fig.jsonl", "--defense", "prefix", "--max-new-tokens", "2",
                       "--device", "cpu")
    assert code == 2 and "495 of 500 images not found" in err  # only 5 originals are shipped: listed, not dropped
    (root / "safebench.csv").write_text("\n".join((root / "safebench.csv").read_text().splitlines()[:1] + [
        line for line in (root / "safebench.csv").read_text().splitlines()[1:]
        if any(f"ForbidQI,{c},{t}," in line for c, t in [(1, 1), (3, 2), (5, 3), (8, 4), (10, 5)])]) + "\n")
    code, _, err = run(capsys, "generate", "--model", tiny_llava_path, "--benchmark", "figstep", "--root", root,
                       "--out", tmp_path / "fig.jsonl", "--defense", "prefix", "--max-new-tokens", "2",
                       "--device", "cpu")
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "fig.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and {r["benchmark"] for r in rows} == {"figstep"} and all("topic" in r for r in rows)


@pytest.mark.parametrize("preset, expected", [(None, "1"), ("0", "0")])
def test_main_asks_torch_for_huge_pages_unless_the_user_chose(capsys, monkeypatch, tmp_path, preset, expected):
    # PyTorch reads THP_MEM_ALLOC_ENABLE at its first large CPU allocation, so main sets it before any command
    if preset is None:
        monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    else:
        monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", preset)
    code, _, err = run(capsys, "apply", "--vsp", tmp_path / "missing.safetensors", "--image", tmp_path / "x.png",
                       "--out", tmp_path / "y.png")
    assert code == 2 and "VSP file not found" in err
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == expected


def test_the_command_line_loads_the_server_stack_only_for_serve():
    import subprocess
    import sys

    probe = ("import sys; from davsp.cli import build_parser; build_parser(); "
             "print(sorted(m for m in ('starlette', 'uvicorn', 'prometheus_client') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
