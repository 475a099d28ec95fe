"""Faults: kill -9 at every write of `davsp train` and `davsp generate`, torn checkpoints, a full disk,
diverging training, and fuzzed records and configs.

The kills are real (SIGKILL in a child process, see kill_at_write.py); the reruns must end with exactly
what an uninterrupted run writes: every file of a training run byte for byte (VSP values bit-identical
on the CPU), every generated row once.
"""

import errno
import json
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from davsp.cli import main
from davsp.config import TrainConfig
from davsp.data.records import load_records
from davsp.errors import DavspError
from davsp.prompt import VisualSafetyPrompt
from davsp.train import train_vsp
from kill_at_write import KILLED, run_davsp, writes_of


@pytest.fixture(scope="module")
def vector_file(tiny_llava_path, record_files, tmp_path_factory):
    path = tmp_path_factory.mktemp("vector") / "vector.safetensors"
    assert main(["vector", "--model", str(tiny_llava_path), "--device", "cpu", "--harmful", str(record_files["harmful"]),
                 "--benign", str(record_files["benign"]), "--out", str(path)]) == 0
    return path


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _last_line(log: Path) -> str:
    return log.read_text().strip().splitlines()[-1]


# -- kill -9 at every write ------------------------------------------------------------------
def test_train_killed_at_every_write_resumes_to_the_same_files(tiny_llava_path, record_files, vector_file, tmp_path):
    def train(out: Path) -> list[str]:
        return ["train", "--model", str(tiny_llava_path), "--vector", str(vector_file),
                "--harmful", str(record_files["harmful"]), "--benign", str(record_files["benign"]), "--out", str(out),
                "--steps", "4", "--checkpoint-every", "2", "--batch-size", "1", "--padding", "8", "--layer", "2",
                "--projection-samples", "2", "--device", "cpu"]

    log = tmp_path / "log.txt"
    assert run_davsp(train(tmp_path / "full"), log) == 0, log.read_text()[-2000:]
    expected = _files(tmp_path / "full")
    writes = writes_of(log)
    # config, manifest, projections before, 2 x (metrics rows, checkpoint), projections, VSP, preview
    assert writes == 10 and len(expected) == 9  # the metrics file is written twice
    for n in range(1, writes + 1):
        run = tmp_path / f"killed-at-{n}"
        assert run_davsp(train(run), log, kill_at=n) == KILLED
        if n == 2:  # config.json is written: a plain rerun says how to go on
            assert run_davsp(train(run), log) == 2 and "pass --resume to continue it" in _last_line(log)
        assert run_davsp(train(run) + ["--resume"], log) == 0, log.read_text()[-2000:]
        assert _files(run) == expected, f"killed at write {n}"  # no temporary file left either


def test_generate_killed_at_every_write_loses_and_repeats_no_row(tiny_llava_path, record_files, tmp_path):
    def generate(out: Path) -> list[str]:
        return ["generate", "--model", str(tiny_llava_path), "--device", "cpu", "--data", str(record_files["benign"]),
                "--defense", "prefix", "--max-new-tokens", "3", "--batch-size", "3", "--out", str(out)]

    def rows(path: Path) -> list[dict]:
        return sorted(({k: v for k, v in json.loads(line).items() if k != "seconds"}
                       for line in path.read_text().splitlines()), key=lambda row: row["id"])

    log = tmp_path / "log.txt"
    assert run_davsp(generate(tmp_path / "full.jsonl"), log) == 0, log.read_text()[-2000:]
    expected = rows(tmp_path / "full.jsonl")
    assert len(expected) == 8 and writes_of(log) == 3  # 8 records in batches of 3: three appends
    for n in (1, 2, 3):
        out = tmp_path / f"killed-at-{n}.jsonl"
        assert run_davsp(generate(out), log, kill_at=n) == KILLED  # leaves half a line
        assert run_davsp(generate(out), log, kill_at=1) == KILLED  # killed again, removing that half line
        assert run_davsp(generate(out), log) == 0, log.read_text()[-2000:]
        assert rows(out) == expected, f"killed at write {n}"


# -- damaged run directories -------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tiny_llava, record_files):
    from davsp.vector import extract_harmfulness_vector

    harmful, benign = load_records(record_files["harmful"]), load_records(record_files["benign"])
    return harmful, benign, extract_harmfulness_vector(tiny_llava, harmful, benign)


def config(**changes) -> TrainConfig:
    return TrainConfig(**{"steps": 4, "checkpoint_every": 2, "batch_size": 1, "padding": 8, "layer": "2",
                          "projection_samples": 2, "device": "cpu", **changes})


def _interrupted_copy(full: Path, cut: Path) -> Path:
    """What a run killed after its last checkpoint leaves: no final outputs."""
    shutil.copytree(full, cut)
    for name in ("vsp.safetensors", "vsp.png", "projections.json"):
        (cut / name).unlink()
    return cut


@pytest.mark.parametrize("damage", ["truncated", "garbage", "nan"])
def test_a_damaged_last_checkpoint_falls_back_to_the_one_before(tiny_llava, data, tmp_path, capsys, damage):
    harmful, benign, vector = data
    full = train_vsp(tiny_llava, vector, harmful, benign, config(), tmp_path / "full", progress=False)
    run = _interrupted_copy(tmp_path / "full", tmp_path / "cut")
    last = run / "checkpoints" / "step_000004.safetensors"
    if damage == "truncated":
        last.write_bytes(last.read_bytes()[:-40])
    elif damage == "garbage":
        last.write_bytes(b"\x00" * 64)
    else:
        from safetensors.torch import load_file, save_file

        tensors = load_file(last)
        save_file({**tensors, "values": torch.full_like(tensors["values"], float("nan"))}, last, metadata={"step": "4"})
    resumed = train_vsp(tiny_llava, vector, harmful, benign, config(), run, resume=True, progress=False)
    err = capsys.readouterr().err
    assert f"warning: {last}" in err and "resuming from the checkpoint before it" in err
    assert torch.equal(resumed.values, full.values)
    assert _files(run) == _files(tmp_path / "full")  # step 4 redone and its checkpoint rewritten


def test_a_run_killed_during_initialisation_is_finished_by_resume(tiny_llava, data, tmp_path):
    harmful, benign, vector = data
    full = train_vsp(tiny_llava, vector, harmful, benign, config(), tmp_path / "full", progress=False)
    run = tmp_path / "cut"
    run.mkdir()
    shutil.copy(tmp_path / "full" / "config.json", run)  # killed right after config.json
    (run / ".manifest.json.abc123.tmp").write_text('{"vers')  # and in the middle of the manifest
    with pytest.raises(DavspError, match="pass --resume to continue it"):
        train_vsp(tiny_llava, vector, harmful, benign, config(), run, progress=False)
    resumed = train_vsp(tiny_llava, vector, harmful, benign, config(), run, resume=True, progress=False)
    assert torch.equal(resumed.values, full.values) and _files(run) == _files(tmp_path / "full")


def test_resume_refuses_other_records_or_another_vector(tiny_llava, data, record_files, tmp_path):
    from dataclasses import replace

    from davsp.vector import extract_harmfulness_vector

    harmful, benign, vector = data
    train_vsp(tiny_llava, vector, harmful, benign, config(steps=2), tmp_path / "run", progress=False)
    changed = [replace(benign[0], question="What colour is it?"), *benign[1:]]
    with pytest.raises(DavspError, match=r"--resume with other benign records \(--benign\) than the run started with"):
        train_vsp(tiny_llava, vector, harmful, changed, config(steps=4), tmp_path / "run", resume=True, progress=False)
    other = extract_harmfulness_vector(tiny_llava, harmful[:4], benign[:4])
    with pytest.raises(DavspError, match=r"other harmfulness vector \(--vector\)"):
        train_vsp(tiny_llava, other, harmful, benign, config(steps=4), tmp_path / "run", resume=True, progress=False)
    # an image changed on disk under the same records is other data too
    image = tmp_path / "swapped.png"
    Image.new("RGB", (30, 30), (200, 30, 30)).save(image)
    swapped = [replace(harmful[0], image=image), *harmful[1:]]
    with pytest.raises(DavspError, match=r"other harmful records \(--harmful\)"):
        train_vsp(tiny_llava, vector, swapped, benign, config(steps=4), tmp_path / "run", resume=True, progress=False)


def test_resume_takes_a_config_json_from_before_newer_keys_when_they_are_defaults(tiny_llava, data, tmp_path):
    harmful, benign, vector = data
    run = tmp_path / "run"
    train_vsp(tiny_llava, vector, harmful, benign, config(steps=2), run, progress=False)
    saved = json.loads((run / "config.json").read_text())
    for key in ("output_target", "answer_eos", "output_loss_mean", "prompt_format", "image_geometry"):
        del saved["train"][key]  # as a run directory made before these keys existed
    (run / "config.json").write_text(json.dumps(saved))
    train_vsp(tiny_llava, vector, harmful, benign, config(steps=4), run, resume=True, progress=False)
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    with pytest.raises(DavspError, match=r"different config \(answer_eos\)"):
        train_vsp(tiny_llava, vector, harmful, benign, config(steps=4, answer_eos=False), run, resume=True,
                  progress=False)


def test_diverging_training_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tiny_llava, data, tmp_path,
                                                                                     monkeypatch):
    import davsp.train

    harmful, benign, vector = data
    real = davsp.train.loss_and_gradient
    calls = []

    def nan_at_step_3(*args, **kwargs):
        (loss, *rest), grad = real(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 3 else loss, *rest), grad

    monkeypatch.setattr(davsp.train, "loss_and_gradient", nan_at_step_3)
    run = tmp_path / "run"
    with pytest.raises(DavspError, match=r"training diverged at step 3: the loss is not finite; the last good "
                                         r"checkpoint is .*step_000002\.safetensors"):
        train_vsp(tiny_llava, vector, harmful, benign, config(), run, progress=False)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000002.safetensors"]
    assert not (run / "vsp.safetensors").exists()


# -- a full disk -----------------------------------------------------------------------------
def _full_disk_after(monkeypatch, n: int) -> None:
    """os.fsync raises ENOSPC from its n-th call on: how a full disk surfaces when the data is flushed."""
    import os

    real, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) >= n:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_a_full_disk_is_one_line_and_keeps_the_previous_output(tmp_path, monkeypatch, capsys):
    vsp = VisualSafetyPrompt.blank(16, 2, "pixel", [0.5] * 3, [0.25] * 3)
    vsp.save(tmp_path / "vsp.safetensors")
    Image.new("RGB", (5, 5), "red").save(tmp_path / "img.png")
    out = tmp_path / "framed.png"
    out.write_bytes(b"previous output")
    _full_disk_after(monkeypatch, 1)
    code = main(["apply", "--vsp", str(tmp_path / "vsp.safetensors"), "--image", str(tmp_path / "img.png"),
                 "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err == f"davsp: error: {out}: No space left on device (check the path, its permissions and " \
                                "free space)\n"
    assert out.read_bytes() == b"previous output" and sorted(p.name for p in tmp_path.iterdir()) == \
        ["framed.png", "img.png", "vsp.safetensors"]  # no temporary file left behind


def test_generate_on_a_full_disk_stops_with_one_line_and_a_rerun_completes(tiny_llava_path, record_files, tmp_path,
                                                                            monkeypatch, capsys):
    out = tmp_path / "rows.jsonl"
    argv = ["generate", "--model", str(tiny_llava_path), "--device", "cpu", "--data", str(record_files["benign"]),
            "--defense", "none", "--max-new-tokens", "2", "--batch-size", "3", "--out", str(out)]
    with monkeypatch.context() as patch:
        _full_disk_after(patch, 2)  # the first batch is written, the second fails
        assert main(argv) == 2
    err = capsys.readouterr().err
    errors = re.findall(r"davsp: error:[^\r\n]*", err)  # progress bars share stderr
    assert errors == [f"davsp: error: {out}: No space left on device (check the path, its permissions and free space)"]
    assert "Traceback" not in err
    assert main(argv) == 0
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert sorted(ids) == sorted(r.id for r in load_records(record_files["benign"]))  # each id once


# -- fuzzed inputs ---------------------------------------------------------------------------
HOSTILE_VALUES = ["false", "1e-3", "nan", float("nan"), float("inf"), -1, -0.5, 0, 10**30, True, None, [], {"a": 1},
                  "", "../../x", "<script>", "\u202e", 2.5]


def _mutate_text(rng: random.Random, text: str) -> str:
    chars = list(text)
    for _ in range(rng.randint(1, 4)):
        position = rng.randrange(len(chars) + 1)
        action = rng.choice(["insert", "delete", "truncate"])
        if action == "insert":
            chars.insert(position, rng.choice(['"', "'", ":", "{", "[", "\n", "-", " ", "\t", "!", "&", "*", "\\", "\x00"]))
        elif action == "delete" and chars:
            del chars[min(position, len(chars) - 1)]
        else:
            chars = chars[:position]
    return "".join(chars)


def test_fuzzed_configs_load_or_raise_davsp_error(tmp_path):
    import yaml

    base = TrainConfig().to_dict()
    rng = random.Random(15)
    outcomes = {"loaded": 0, "refused": 0}
    for case in range(60):
        values = dict(base)
        if case % 2:  # well-formed YAML, hostile values
            for key in rng.sample(sorted(values), rng.randint(1, 3)):
                values[key] = rng.choice(HOSTILE_VALUES)
            if rng.random() < 0.2:
                values[rng.choice(["lr", "Steps", "steps "])] = 1
            text = yaml.safe_dump(values, allow_unicode=True)
        else:  # damaged YAML text
            text = _mutate_text(rng, yaml.safe_dump(values))
        path = tmp_path / f"config-{case}.yaml"
        path.write_text(text)
        try:
            TrainConfig.from_yaml(path)
            outcomes["loaded"] += 1
        except DavspError as exc:
            assert "\n" not in str(exc)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 20 and outcomes["loaded"] > 0  # the fuzz reaches both outcomes


def test_fuzzed_records_load_or_raise_davsp_error(tmp_path):
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "a.png")
    valid = [{"id": f"r{i}", "image": "a.png", "question": f"What is shown {i}?", "answer": "blue",
              "category": "c"} for i in range(3)]
    rng = random.Random(16)
    outcomes = {"loaded": 0, "refused": 0}
    for case in range(60):
        rows = [dict(r) for r in valid]
        if case % 2:
            row = rng.choice(rows)
            key = rng.choice(["id", "image", "question", "answer", "category", "benchmark", "extra"])
            if rng.random() < 0.2:
                row.pop(key, None)
            else:
                row[key] = rng.choice(HOSTILE_VALUES + ["a.png", "missing.png", "r0", 7])
            text = "".join(json.dumps(r) + "\n" for r in rows)
        else:
            text = _mutate_text(rng, "".join(json.dumps(r) + "\n" for r in rows))
        path = tmp_path / f"records-{case}.jsonl"
        path.write_bytes(text.encode() + (b"" if case % 7 else b'{"id": "\xff"}\n'))  # now and then not UTF-8
        try:
            load_records(path)
            outcomes["loaded"] += 1
        except DavspError as exc:
            assert "\n" not in str(exc)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 20 and outcomes["loaded"] > 0


def test_a_read_only_output_folder_is_one_line(tmp_path, monkeypatch, capsys):
    """Simulated: the tests may run as root, whom a chmod does not stop. The kernel's answer to a write into
    a read-only folder is EACCES when the temporary file is created; that is what os.open raises here."""
    import os

    vsp = VisualSafetyPrompt.blank(16, 2, "pixel", [0.5] * 3, [0.25] * 3)
    vsp.save(tmp_path / "vsp.safetensors")
    Image.new("RGB", (5, 5), "red").save(tmp_path / "img.png")
    locked = tmp_path / "locked"
    locked.mkdir()
    real_open = os.open

    def open_(path, *args, **kwargs):
        if Path(path).parent == locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)
    code = main(["apply", "--vsp", str(tmp_path / "vsp.safetensors"), "--image", str(tmp_path / "img.png"),
                 "--out", str(locked / "framed.png")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"davsp: error: {locked}/") and "Permission denied (check the path" in err
    assert err.count("\n") == 1 and not any(locked.iterdir())
