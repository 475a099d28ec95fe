import argparse
import json
from pathlib import Path

import pytest
from PIL import Image

from davsp.data.benchmarks import BENCHMARKS, load_benchmark, split_ids
from davsp.cli.data import add_commands
from davsp.data.records import load_records
from davsp.errors import DavspError


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="davsp")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


def build_mmvet(root: Path, n: int = 3) -> Path:
    (root / "images").mkdir(parents=True)
    items = {
        f"v1_{i}": {"imagename": f"v1_{i}.png", "capability": ["rec"], "question": f"q{i}?", "answer": f"a{i}"}
        for i in range(n)
    }
    (root / "mm-vet.json").write_text(json.dumps(items))
    for item in items.values():
        Image.new("RGB", (4, 4)).save(root / "images" / item["imagename"])
    return root


def test_registry_names_and_did_you_mean(tmp_path):
    assert BENCHMARKS == ("mm-safetybench", "figstep", "vlguard", "mm-vet", "mme", "llava-bench")
    with pytest.raises(DavspError, match="Unknown benchmark 'mmvet'. Did you mean 'mm-vet'\\?"):
        load_benchmark("mmvet", build_mmvet(tmp_path))
    with pytest.raises(DavspError, match="Unknown benchmark 'xyz'. Available: mm-safetybench"):
        load_benchmark("xyz", tmp_path)


def test_options_that_do_not_apply_are_refused_not_ignored(tmp_path):
    root = build_mmvet(tmp_path)
    with pytest.raises(DavspError, match="mm-vet: option\\(s\\) tiny, image_types do not apply"):
        load_benchmark("mm-vet", root, tiny=True, image_types=["SD"])
    with pytest.raises(DavspError, match="unknown split 'dev'"):
        load_benchmark("mm-vet", root, split="dev")
    with pytest.raises(DavspError, match="limit must be a positive"):
        load_benchmark("mm-vet", root, limit=0)
    with pytest.raises(DavspError, match="benchmark folder not found"):
        load_benchmark("mm-vet", tmp_path / "nowhere")
    assert [r.id for r in load_benchmark("mm-vet", root, limit=2)] == ["v1_0", "v1_1"]


def test_split_ids_is_deterministic_disjoint_and_independent_of_other_ids():
    ids = [f"q{i}" for i in range(2000)]
    parts = split_ids(ids)
    assert parts == split_ids(list(reversed(ids)))
    assert set().union(*parts.values()) == set(ids) and sum(len(p) for p in parts.values()) == len(ids)
    assert 900 < len(parts["train"]) < 1100 and 150 < len(parts["val"]) < 250 and 700 < len(parts["test"]) < 900
    half = split_ids(ids[:1000])
    assert all(half[s] == parts[s] & set(ids[:1000]) for s in parts)
    assert split_ids(ids, seed=1) != parts
    assert split_ids(ids, fractions=(0, 0, 1))["test"] == set(ids)
    with pytest.raises(DavspError, match="summing to 1"):
        split_ids(ids, fractions=(0.5, 0.5, 0.5))


def test_duplicate_ids_are_an_error(tmp_path):
    question = {"question_id": 0, "image": "a.jpg", "text": "q", "category": "conv"}
    (tmp_path / "questions.jsonl").write_text(2 * (json.dumps(question) + "\n"))
    (tmp_path / "context.jsonl").write_text(json.dumps({"image": "a.jpg", "caption": "c"}) + "\n")
    (tmp_path / "answers_gpt4.jsonl").write_text(json.dumps({"question_id": 0, "text": "r"}) + "\n")
    with pytest.raises(DavspError, match="llava-bench: duplicate record id '0'"):
        load_benchmark("llava-bench", tmp_path, check_images=False)


def test_cli_check_lists_missing_images_and_exits_1(capsys, figstep_root):
    assert run_cli("data", "check", "figstep", str(figstep_root), "--tiny") == 1
    out = capsys.readouterr().out
    assert "figstep at" in out and "50 records, 50 images, 45 missing" in out
    assert "  Illegal Activity     5" in out
    assert "missing images (45):" in out and "query_ForbidQI_1_2_6.png" in out


def test_cli_check_exits_0_when_complete(tmp_path, capsys):
    assert run_cli("data", "check", "mm-vet", str(build_mmvet(tmp_path))) == 0
    assert "3 records, 3 images, 0 missing" in capsys.readouterr().out


def test_cli_export_round_trips_through_load_records(tmp_path):
    root = build_mmvet(tmp_path / "mm-vet")
    out = tmp_path / "exports" / "mmvet.jsonl"
    assert run_cli("data", "export", "mm-vet", str(root), "--out", str(out), "--limit", "2") == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0] == {
        "id": "v1_0",
        "image": "../mm-vet/images/v1_0.png",
        "question": "q0?",
        "answer": "a0",
        "category": "rec",
        "benchmark": "mm-vet",
        "capabilities": ["rec"],
    }
    loaded = load_records(out)
    original = load_benchmark("mm-vet", root, limit=2)
    assert [(r.id, r.image.resolve(), r.question, r.answer, r.category, r.benchmark, r.extra) for r in loaded] == [
        (r.id, r.image, r.question, r.answer, r.category, r.benchmark, r.extra) for r in original
    ]
    assert not list(out.parent.glob(".*.tmp"))


def test_cli_export_refuses_missing_images(tmp_path, figstep_root):
    with pytest.raises(DavspError, match="45 of 50 images not found"):
        run_cli("data", "export", "figstep", str(figstep_root), "--tiny", "--out", str(tmp_path / "f.jsonl"))
    assert not (tmp_path / "f.jsonl").exists()


def test_cli_render_figstep(tmp_path, capsys, figstep_root):
    csv_path = tmp_path / "two.csv"
    lines = (figstep_root / "SafeBench-Tiny.csv").read_text(encoding="utf-8").splitlines()[:3]
    csv_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert run_cli("data", "render-figstep", "--csv", str(csv_path), "--out", str(tmp_path / "imgs")) == 0
    names = sorted(p.name for p in (tmp_path / "imgs").iterdir())
    assert names == ["query_ForbidQI_1_1_6.png", "query_ForbidQI_1_2_6.png"]
    assert "wrote 2 FigStep images" in capsys.readouterr().out
