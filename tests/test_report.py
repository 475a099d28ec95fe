import argparse
import csv
import json
import re

import pytest
from PIL import Image

import davsp.io
from davsp.errors import DavspError
from davsp.evaluate import agreement_of_judges, evaluate_rows, pick_samples, write_evaluation, SCHEMA
from davsp.cli.evaluate import add_commands
from davsp.report import build_report

RESPONSE = '<script>alert("x")</script> & sure'


def make_run(path, *, complete=True):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"layer": 2, "steps": 40}))
    (path / "manifest.json").write_text("{}")
    steps = [{"step": s, "harmful": s % 2 == 0, "loss": 1.0 / (s + 1), "da_loss": 1.0 / (s + 1),
              "output_loss": None if s % 2 == 0 else 0.1, "projection": s / 10 if s % 2 == 0 else -s / 10}
             for s in range(40)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps) + '{"step": 40, "har')
    if complete:
        (path / "projections.json").write_text(json.dumps({
            "layer": 2, "thresholds": [3.0, -1.0],
            "before": {"harmful": [0.1, 0.4, 0.2], "benign": [0.0, -0.2, 0.1]},
            "after": {"harmful": [3.5, 4.0, 3.2], "benign": [-1.5, -2.0, -1.2]}}))
        Image.new("RGB", (24, 24), (250, 0, 0)).save(path / "vsp.png")
    return path


def make_evaluation(path):
    rows = [{"id": str(i), "benchmark": "mm-safetybench", "defense": d, "question": "how to <b>?",
             "response": RESPONSE, "image_type": "SD", "scenario": "01", "verdict": v,
             "safe": v == "full_refusal", "judge": "refusal@1"}
            for i in range(4) for d, v in (("none", "full_compliance"), ("davsp", "full_refusal"))]
    # A harm judge of the same responses: it finds the last undefended answer harmless.
    rows += [{**r, "verdict": "safe" if safe else "unsafe", "safe": safe, "judge": "llm/davsp@1/judge-model"}
             for r in rows[:8] for safe in [r["defense"] == "davsp" or r["id"] == "3"]]
    rows += [{"id": "v1", "benchmark": "mm-vet", "defense": d, "question": "what?", "response": "a cat",
              "verdict": "full_compliance", "safe": False, "capabilities": ["rec"], "score": 0.8, "judge": "refusal@1"}
             for d in ("none", "davsp")]
    metrics = {"schema": SCHEMA, "inputs": [{"path": "judged.jsonl", "sha256": "0"}], "bootstrap": {},
               "results": evaluate_rows(rows, resamples=100), "agreement": agreement_of_judges(rows)}
    write_evaluation(path, metrics, pick_samples(rows, per_benchmark=2))
    return path


@pytest.fixture
def dirs(tmp_path):
    return make_run(tmp_path / "run"), make_evaluation(tmp_path / "eval")


def test_report_is_self_contained_with_tables_images_and_escaped_responses(dirs, tmp_path):
    out = tmp_path / "site" / "report.html"
    build_report(dirs, out)
    page = out.read_text()
    # Frame, curves, histograms: all inline PNGs, nothing fetched from elsewhere.
    images = re.findall(r'<img [^>]*src="([^"]*)"', page)
    assert len(images) == 3 and all(src.startswith("data:image/png;base64,") for src in images)
    assert not re.search(r'(src|href)="(?!data:)', page) and "<link" not in page
    # Tables with the defenses side by side.
    refusal_table = page.index("<caption>Refusal rate on harmful queries (%) · judge refusal@1</caption>"
                               "<tr><th></th><th>none</th><th>davsp</th></tr>")
    rsr_table = page.index("<caption>RSR (%) · judge llm/davsp-auto/judge-model</caption>")
    tables_row = page.index('<div class="tables">')
    assert "</div>" not in page[tables_row:max(refusal_table, rsr_table)]  # side by side in one row of tables
    assert "<td>mm-safetybench</td><td>0.0 [0.0, 0.0]</td><td>100.0 [100.0, 100.0]</td>" in page[refusal_table:]
    assert "<td>mm-safetybench</td><td>25.0 [" in page[rsr_table:]
    # Where the two judges disagree, the report says so and shows the response.
    assert "<h3>Agreement: llm/davsp-auto/judge-model vs refusal@1</h3>" in page
    assert "1 responses they disagree on" in page
    assert "mm-safetybench 3 (none): llm/davsp-auto/judge-model safe=True, refusal@1 safe=False" in page
    assert "<caption>Utility</caption>" in page and "<td>MM-Vet total</td><td>80.0</td>" in page
    assert "<caption>Training runs</caption>" in page
    # Sample responses are escaped, never live markup.
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; sure" in page
    assert "<script" not in page and "how to &lt;b&gt;?" in page


def test_report_writes_the_same_tables_as_markdown_and_csv(dirs, tmp_path):
    out = tmp_path / "report.html"
    build_report(dirs, out)
    markdown = (tmp_path / "report.md").read_text()
    assert "| mm-safetybench | 0.0 [0.0, 0.0] | 100.0 [100.0, 100.0] |" in markdown
    assert "## Training runs" in markdown and "| steps | 40 |" in markdown
    rows = list(csv.DictReader((tmp_path / "report.csv").open()))
    refusal = {r["column"]: float(r["value"]) for r in rows
               if r["table"] == "Refusal rate on harmful queries (%) · judge refusal@1" and r["row"] == "mm-safetybench"}
    assert refusal == {"none": 0.0, "davsp": 100.0}
    rsr = {r["column"]: float(r["value"]) for r in rows
           if r["table"] == "RSR (%) · judge llm/davsp-auto/judge-model" and r["row"] == "mm-safetybench"}
    assert rsr == {"none": 25.0, "davsp": 100.0}
    assert "### Agreement: llm/davsp-auto/judge-model vs refusal@1" in markdown
    assert any(r["table"] == "Training runs" and r["row"] == "steps" and r["value"] == "40" for r in rows)


def test_run_without_projections_or_frame_still_reports(tmp_path):
    run = make_run(tmp_path / "run", complete=False)
    build_report([run], tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    assert "No vsp.png in this run." in page and "No projections.json in this run." in page
    assert page.count("data:image/png;base64,") == 1  # the curves


def test_a_directory_that_is_neither_is_a_one_line_error(dirs, tmp_path):
    stray = tmp_path / "stray"
    stray.mkdir()
    with pytest.raises(DavspError, match=r"stray: neither a training run directory") as error:
        build_report([*dirs, stray], tmp_path / "report.html")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "report.html").exists()


def test_output_must_be_html(dirs, tmp_path):
    with pytest.raises(DavspError, match="must end in .html"):
        build_report(dirs, tmp_path / "report.md")


def test_report_is_written_atomically(dirs, tmp_path, monkeypatch):
    out = tmp_path / "report.html"
    out.write_text("old report")

    real_replace = davsp.io.os.replace

    def fail_rename(src, dst):  # the page itself fails to land; report.md/.csv go through
        if str(dst).endswith(".html"):
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(davsp.io.os, "replace", fail_rename)
    with pytest.raises(OSError, match="disk full"):
        build_report(dirs, out)
    assert out.read_text() == "old report"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_cli_report_exit_status(dirs, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="davsp")
    add_commands(parser.add_subparsers())
    args = parser.parse_args(["report", *map(str, dirs), "--out", str(tmp_path / "r.html")])
    assert args.func(args) == 0
    assert "r.html" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:  # --out is required: argparse exits 2
        parser.parse_args(["report", str(dirs[0])])
    assert exit_info.value.code == 2
