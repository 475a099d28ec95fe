"""Hostile and unlucky inputs: each gets one clear line and a non-zero exit, or the right result."""

import json
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from davsp.cli import main
from davsp.data.figstep import read_safebench, render_figstep
from davsp.data.records import load_image, load_records
from davsp.errors import DavspError
from davsp.evaluate import csv_text, entry, markdown_table


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height: enough for Pillow's size check, nothing to decode."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


def _records(tmp_path: Path, rows: list[dict]) -> Path:
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps({"image": "a.png", "question": "q?", **r}) + "\n" for r in rows))
    return path


# -- records --------------------------------------------------------------------------------
def test_non_utf8_records_name_the_byte(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_bytes(b'{"id": "1", "image": "a.png", "question": "caf\xe9?"}\n')
    with pytest.raises(DavspError, match=r"records\.jsonl: not UTF-8 text \(invalid byte at offset 46\)"):
        load_records(path, check_images=False)


def test_json_nested_too_deep_is_one_line(tmp_path):
    path = tmp_path / "records.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DavspError, match="nested too deeply"):
        load_records(path)


@pytest.mark.parametrize("field, value, message", [
    ("answer", 42, "'answer' must be a string or absent, got int 42"),
    ("category", ["x"], "'category' must be a string or absent"),
    ("id", None, "'id' must be a non-empty string or an integer, got None"),
    ("id", True, "'id' must be a non-empty string or an integer"),
    ("id", 1.5, "'id' must be a non-empty string or an integer"),
])
def test_record_fields_of_the_wrong_type_are_refused_at_load(tmp_path, field, value, message):
    path = _records(tmp_path, [{"id": "ok", "answer": "fine"}, {"id": "x2", field: value}])
    with pytest.raises(DavspError, match=rf"records\.jsonl:2 .*{message}"):
        load_records(path)


def test_integer_ids_are_read_as_strings(tmp_path):
    assert [r.id for r in load_records(_records(tmp_path, [{"id": 7}, {"id": "b"}]))] == ["7", "b"]


# -- images ---------------------------------------------------------------------------------
def test_transparent_pixels_become_white_not_black(tmp_path):
    rgba = np.zeros((4, 6, 4), dtype=np.uint8)  # fully transparent black
    rgba[0, 0] = (10, 20, 30, 255)  # one opaque pixel
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    pixels = np.asarray(load_image(tmp_path / "t.png"))
    assert pixels[0, 0].tolist() == [10, 20, 30]
    assert (pixels.reshape(-1, 3)[1:] == 255).all()


def test_palette_transparency_becomes_white(tmp_path):
    image = Image.new("P", (3, 3), 0)
    image.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    image.putpixel((1, 1), 1)
    image.save(tmp_path / "p.png", transparency=0)
    pixels = np.asarray(load_image(tmp_path / "p.png"))
    assert pixels[1, 1].tolist() == [200, 0, 0] and pixels[0, 0].tolist() == [255, 255, 255]


def test_a_decompression_bomb_is_refused_before_decoding(tmp_path):
    bomb = _png_header_only(tmp_path / "bomb.png", 20000, 20000)
    with pytest.raises(DavspError, match="bomb.png is too large to decode safely"):
        load_image(bomb, "record 'x'")
    rows = tmp_path / "records.jsonl"
    rows.write_text(json.dumps({"id": "x", "image": "bomb.png", "question": "q?"}) + "\n")
    with pytest.raises(DavspError, match=r"records\.jsonl:1 \(id 'x'\): image .*bomb.png is too large"):
        load_records(rows)


def test_a_truncated_image_is_one_line(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "i.png")
    data = (tmp_path / "i.png").read_bytes()
    (tmp_path / "i.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DavspError, match="cannot read image"):
        load_image(tmp_path / "i.png", "record 'i'")


# -- FigStep rendering stays inside --out ---------------------------------------------------
def test_render_figstep_refuses_path_parts_in_names(tmp_path):
    csv_path = tmp_path / "evil.csv"
    csv_path.write_text("dataset,category_id,task_id,category_name,question,instruction\n"
                        "SafeBench,../../escape,1,Topic,How?,Steps to do it.\n")
    with pytest.raises(DavspError, match=r"evil\.csv:2: category_id '\.\./\.\./escape' may hold only letters"):
        read_safebench(csv_path)
    with pytest.raises(DavspError):
        render_figstep(csv_path, tmp_path / "out")
    assert not list(tmp_path.rglob("*.png"))


# -- outputs that a spreadsheet or a Markdown viewer would run -------------------------------
def test_csv_cells_that_look_like_formulas_are_neutralised():
    cells = [entry("=HYPERLINK(\"http://x\")", "@SUM(A1)", "-cmd", -0.5, n=3)]
    row = csv_text(cells).splitlines()[1]
    assert row.startswith("\"'=HYPERLINK(\"\"http://x\"\")\",'@SUM(A1),'-cmd,-0.5")


def test_markdown_tables_show_html_as_text():
    table = markdown_table(["<b>h</b>"], [["<script>alert(1)</script> | x"]])
    assert "<script>" not in table and "&lt;script&gt;" in table and "\\|" in table


# -- the command line -----------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["generate", "--model", "m", "--data", "d", "--out", "o", "--limit", "0"], "--limit: 0 is below 1"),
    (["generate", "--model", "m", "--data", "d", "--out", "o", "--limit", "-1"], "--limit: -1 is below 1"),
    (["generate", "--model", "m", "--data", "d", "--out", "o", "--batch-size", "0"], "--batch-size: 0 is below 1"),
    (["vector", "--model", "m", "--harmful", "h", "--benign", "b", "--out", "o", "--batch-size", "x"],
     "expected an integer, got 'x'"),
])
def test_counts_below_one_are_refused_before_anything_loads(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_an_output_that_is_a_directory_is_one_line(tmp_path, capsys):
    from davsp.prompt import VisualSafetyPrompt

    vsp = VisualSafetyPrompt.blank(16, 2, "pixel", [0.5] * 3, [0.25] * 3)
    vsp.save(tmp_path / "vsp.safetensors")
    Image.new("RGB", (5, 5)).save(tmp_path / "img.png")
    (tmp_path / "outdir").mkdir()
    code = main(["apply", "--vsp", str(tmp_path / "vsp.safetensors"), "--image", str(tmp_path / "img.png"),
                 "--out", str(tmp_path / "outdir")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "outdir: is a directory" in err


def test_os_errors_and_unexpected_errors_are_one_line_unless_debug(monkeypatch, capsys):
    import errno

    import davsp.cli.model as cli

    def full_disk(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out.jsonl")

    def bug(args):
        raise ZeroDivisionError("division by zero\nsecond line")

    for func, code, expected in ((full_disk, 2, "davsp: error: /data/out.jsonl: No space left on device"),
                                 (bug, 1, "davsp: error: unexpected ZeroDivisionError: division by zero (rerun")):
        monkeypatch.setattr(cli, "cmd_doctor", func)
        assert main(["doctor", "--model", "m"]) == code
        err = capsys.readouterr().err
        assert err.startswith(expected) and err.count("\n") == 1 and "Traceback" not in err
    with pytest.raises(ZeroDivisionError):
        main(["--debug", "doctor", "--model", "m"])


def test_importing_davsp_changes_no_process_state():
    code = ("import os; calls = []; real = os.umask\n"
            "os.umask = lambda m: calls.append(m) or real(m)\n"
            "import davsp, davsp.io, davsp.cli\n"
            "assert calls == [], calls\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# -- artifacts ------------------------------------------------------------------------------
def _vsp_file(path: Path, *, values=None, header=None, drop=None) -> Path:
    from safetensors.torch import save_file

    tensors = {"values": torch.zeros(3, 16, 16) if values is None else values,
               "image_mean": torch.full((3,), 0.5), "image_std": torch.full((3,), 0.25)}
    if drop:
        tensors.pop(drop)
    base = {"padding": 2, "space": "pixel", "kind": "frame", "epsilon": 0.0, "quantize_8bit": False, "metadata": {}}
    raw = header if isinstance(header, str) else json.dumps({**base, **(header or {})})
    save_file(tensors, str(path), metadata={"davsp_vsp": raw})
    return path


@pytest.mark.parametrize("kwargs, message", [
    ({"values": torch.full((3, 16, 16), float("nan"))}, "values holds non-finite"),
    ({"values": torch.zeros(3, 16, 8)}, r"shape \(3, 16, 8\), expected \(3, S, S\)"),
    ({"header": "{not json"}, "malformed davsp_vsp header"),
    ({"header": {"padding": "2"}}, "malformed davsp_vsp header: 'padding' is '2'"),
    ({"header": {"quantize_8bit": "false"}}, "'quantize_8bit' is 'false'"),
    ({"header": {"padding": 9}}, "padding 9 does not fit a 16px canvas"),
    ({"drop": "image_std"}, r"not a davsp VSP file"),
])
def test_corrupt_vsp_files_are_refused_with_the_reason(tmp_path, kwargs, message):
    from davsp.prompt import VisualSafetyPrompt

    path = _vsp_file(tmp_path / "vsp.safetensors", **kwargs)
    with pytest.raises(DavspError, match=message):
        VisualSafetyPrompt.load(path)


def test_a_truncated_vsp_file_is_one_line(tmp_path):
    from davsp.prompt import VisualSafetyPrompt

    path = _vsp_file(tmp_path / "vsp.safetensors")
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DavspError, match="cannot read VSP"):
        VisualSafetyPrompt.load(path)


def _vector_file(path: Path, **changes) -> Path:
    from safetensors.torch import save_file

    tensors = {"harmful_mean": torch.ones(3, 4), "benign_mean": torch.zeros(3, 4), "separation": torch.ones(3),
               "model_probe": torch.zeros(64), "directions": torch.ones(3, 4) / 2}
    tensors.update(changes)
    save_file(tensors, str(path), metadata={"davsp_vector": json.dumps({"model": "m"})})
    return path


@pytest.mark.parametrize("changes, message", [
    ({"harmful_mean": torch.tensor([[float("inf")] * 4] * 3)}, "harmful_mean holds non-finite values"),
    ({"benign_mean": torch.zeros(2, 4)}, "inconsistent tensor shapes"),
    ({"benign_mean": torch.ones(3, 4)}, "the class means are equal"),
])
def test_corrupt_vector_files_are_refused_with_the_reason(tmp_path, changes, message):
    from davsp.vector import HarmfulnessVector

    with pytest.raises(DavspError, match=message):
        HarmfulnessVector.load(_vector_file(tmp_path / "v.safetensors", **changes))


# -- bad numbers and types in a training config ----------------------------------------------
@pytest.mark.parametrize("line, message", [
    ('use_prefix: "false"', "config use_prefix='false': expected true or false (unquoted), got str (remove the quotes)"),
    ("alpha: 1e-3", "config alpha='1e-3': expected a number, got str (YAML reads 1e-3 as text: write 1.0e-3)"),
    ('steps: "1200"', "config steps='1200': expected an integer, got str"),
    ("steps: 12.5", "config steps=12.5: expected an integer, got float"),
    ("alpha: .nan", "config alpha=nan: must be a finite number"),
    ("output_loss_weight: .inf", "config output_loss_weight=inf: must be a finite number"),
    ("alpha: -0.01", "config alpha=-0.01: must be in (0, 1]"),
    ("epsilon: -0.1", "config epsilon=-0.1: must be in [0, 1]"),
    ("output_loss_weight: -1", "config output_loss_weight=-1.0: must be 0 or more"),
    ("thresholds: nan,-2", "thresholds 'nan,-2': both must be finite numbers"),
    ("quantize_8bit: 1", "config quantize_8bit=1: expected true or false"),
    ("layer: [20]", "config layer=[20]: expected text, got list"),
])
def test_config_values_of_the_wrong_type_or_range_are_refused(tmp_path, line, message):
    from davsp.config import TrainConfig

    path = tmp_path / "c.yaml"
    path.write_text(f"steps: 5\n{line}\n")
    with pytest.raises(DavspError, match=re.escape(message)):
        TrainConfig.from_yaml(path)


def test_config_type_errors_from_the_file_name_the_file_and_flags_are_checked_too(tmp_path, capsys):
    from davsp.config import TrainConfig

    (tmp_path / "c.yaml").write_text('deep_alignment: "no"\n')
    with pytest.raises(DavspError, match=r"c\.yaml: config deep_alignment='no'"):
        TrainConfig.from_yaml(tmp_path / "c.yaml")
    assert TrainConfig(layer=20, alpha=1).alpha == 1.0  # an integer layer and an integer alpha are fine
    # argparse's float() reads "nan"; the config refuses it before any file or model is read
    assert main(["train", "--model", "m", "--vector", "v", "--harmful", "h", "--benign", "b",
                 "--out", str(tmp_path / "o"), "--alpha", "nan"]) == 2
    assert capsys.readouterr().err == "davsp: error: config alpha=nan: must be a finite number\n"


# -- a VSP made for another model --------------------------------------------------------------
def _vsp_for(adapter, **metadata):
    from davsp.prompt import VisualSafetyPrompt

    return VisualSafetyPrompt.blank(adapter.canvas_size, 8, "pixel", adapter.image_mean, adapter.image_std,
                                    metadata=metadata)


def test_a_vsp_from_another_model_with_the_same_canvas_is_refused(tiny_llava, record_files):
    from davsp.fingerprint import check_vsp_fits, model_probe
    from davsp.generate import generate_responses
    from davsp.prompt import VisualSafetyPrompt

    records = load_records(record_files["benign"])[:1]
    other_norm = VisualSafetyPrompt.blank(tiny_llava.canvas_size, 8, "pixel", [0.5] * 3, [0.5] * 3)
    with pytest.raises(DavspError, match=r"the VSP was trained with image mean \[0.5, 0.5, 0.5\] but the model uses"):
        generate_responses(tiny_llava, records, defense="vsp", vsp=other_norm, max_new_tokens=1, progress=False)
    for metadata, message in (({"family": "qwen2_vl"}, "family 'qwen2_vl'"),
                              ({"hidden_size": 4096}, "hidden_size 4096 but this one has 64"),
                              ({"model_probe": [0.25] * 64}, "made on a different model"),
                              ({"model_probe": "abc"}, "malformed model_probe")):
        with pytest.raises(DavspError, match=message):
            check_vsp_fits(_vsp_for(tiny_llava, **metadata), tiny_llava)
    check_vsp_fits(_vsp_for(tiny_llava, family=tiny_llava.family, hidden_size=tiny_llava.hidden_size,
                            model_probe=model_probe(tiny_llava.model).tolist()), tiny_llava)
    check_vsp_fits(_vsp_for(tiny_llava), tiny_llava)  # a VSP file from before the fingerprint: what it has matches


def test_training_records_the_model_fingerprint_in_the_vsp(tiny_llava, record_files, tmp_path):
    from davsp.config import TrainConfig
    from davsp.fingerprint import check_vsp_fits
    from davsp.prompt import VisualSafetyPrompt
    from davsp.train import train_vsp
    from davsp.vector import extract_harmfulness_vector

    harmful, benign = load_records(record_files["harmful"]), load_records(record_files["benign"])
    vector = extract_harmfulness_vector(tiny_llava, harmful, benign)
    train_vsp(tiny_llava, vector, harmful, benign, TrainConfig(steps=1, padding=8, layer="2", device="cpu"),
              tmp_path / "run", progress=False)
    saved = VisualSafetyPrompt.load(tmp_path / "run" / "vsp.safetensors")
    assert saved.metadata["hidden_size"] == tiny_llava.hidden_size and len(saved.metadata["model_probe"]) == 64
    check_vsp_fits(saved, tiny_llava)


def test_doctor_checks_a_vsp_against_the_model(tiny_llava_path, tmp_path, capsys):
    from davsp.doctor import run_doctor
    from davsp.prompt import VisualSafetyPrompt

    VisualSafetyPrompt.blank(32, 8, "pixel", [0.5] * 3, [0.5] * 3).save(tmp_path / "other.safetensors")
    assert not run_doctor(str(tiny_llava_path), vsp=str(tmp_path / "other.safetensors"))
    assert "[FAIL] VSP " in capsys.readouterr().out


# -- generated rows record what produced them ------------------------------------------------
def test_generate_rows_carry_provenance_and_a_resume_under_other_settings_is_refused(tiny_llava, record_files,
                                                                                     tmp_path):
    from davsp.generate import generate_responses, vsp_sha256
    from davsp.io import sha256_file

    records = load_records(record_files["benign"])[:2]
    out = tmp_path / "rows.jsonl"
    vsp = _vsp_for(tiny_llava)
    vsp.save(tmp_path / "vsp.safetensors")
    generate_responses(tiny_llava, records[:1], defense="vsp", vsp=vsp, max_new_tokens=2, out=out, progress=False)
    row = json.loads(out.read_text())
    assert row["image"] == str(records[0].image) and row["vsp_sha256"] == sha256_file(tmp_path / "vsp.safetensors")
    assert vsp_sha256(vsp) == row["vsp_sha256"]
    assert {k: row[k] for k in ("model", "family", "defense", "prompt_format", "image_geometry", "max_new_tokens",
                                "dtype")} == {"model": tiny_llava.model_id, "family": tiny_llava.family, "defense": "vsp",
                                              "prompt_format": tiny_llava.prompt_format, "image_geometry": "pad",
                                              "max_new_tokens": 2, "dtype": "float32"}
    before = out.read_bytes()
    other_vsp = _vsp_for(tiny_llava, note="another run")
    for kwargs, field in (({"defense": "davsp", "vsp": vsp}, "defense"), ({"defense": "vsp", "vsp": other_vsp}, "vsp_sha256"),
                          ({"defense": "vsp", "vsp": vsp, "max_new_tokens": 3}, "max_new_tokens")):
        with pytest.raises(DavspError, match=rf"rows\.jsonl: row '{records[0].id}' was produced with {field}=.*"
                                             "choose another --out"):
            generate_responses(tiny_llava, records, **{"max_new_tokens": 2, **kwargs}, out=out, progress=False)
    assert out.read_bytes() == before
    rows = generate_responses(tiny_llava, records, defense="vsp", vsp=vsp, max_new_tokens=2, out=out, progress=False)
    assert [r["id"] for r in rows] == [r.id for r in records] and len(out.read_text().splitlines()) == 2
    old = tmp_path / "old.jsonl"  # rows of an older davsp: no provenance to match
    old.write_text(json.dumps({"id": records[0].id, "defense": "none", "response": "hi"}) + "\n")
    with pytest.raises(DavspError, match=r"was produced with model='\(absent\)'"):
        generate_responses(tiny_llava, records, defense="none", max_new_tokens=2, out=old, progress=False)


# -- report injection ------------------------------------------------------------------------
def test_script_in_run_and_evaluation_names_renders_as_text(tmp_path):
    from davsp.report import build_report
    from test_report import make_evaluation, make_run

    run = make_run(tmp_path / "run<img src=x onerror=alert(1)>")
    evaluation = make_evaluation(tmp_path / "eval<script>alert(2)")
    build_report([run, evaluation], tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    markdown = (tmp_path / "report.md").read_text()
    assert "<img src=x" not in page and "<script>alert(2)" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page and "&lt;script&gt;alert(2)" in page
    assert "<img src=x" not in markdown and "<script>" not in markdown


def test_serve_with_a_local_model_refuses_a_vsp_trained_for_another(tiny_llava_path, tmp_path):
    from davsp.prompt import VisualSafetyPrompt
    from davsp.serve import ServeConfig, build_app

    foreign = VisualSafetyPrompt.blank(32, 4, "pixel", [0.5] * 3, [0.25] * 3, quantize_8bit=True)  # not CLIP's mean/std
    foreign.save(tmp_path / "foreign.safetensors")
    with pytest.raises(DavspError, match="foreign.safetensors"):
        build_app(ServeConfig(model=str(tiny_llava_path), vsp=str(tmp_path / "foreign.safetensors"), device="cpu"))
