"""`davsp evaluate`: loading judged rows, the tables, the evaluation directory and the CLI."""

import argparse
import json

import pytest
from judged_rows import judged, mme_row

from davsp.errors import DavspError
from davsp.cli.evaluate import add_commands
from davsp.evaluate import (
    evaluate_rows,
    load_judged,
    markdown_tables,
    metric_entries,
)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cli(argv):
    parser = argparse.ArgumentParser(prog="davsp")
    add_commands(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


# ---------------------------------------------------------------- loading, tables, CLI


def test_load_judged_rejects_a_row_read_twice(tmp_path):
    path = write_jsonl(tmp_path / "j.jsonl", [judged(True, id="1")])
    with pytest.raises(DavspError, match="pass each judged file once"):
        load_judged([path, path])


def test_load_judged_names_the_line_of_a_bad_verdict(tmp_path):
    path = write_jsonl(tmp_path / "j.jsonl", [judged(True, id="1"), judged(True, id="2", verdict="harmless")])
    with pytest.raises(DavspError, match=r"j\.jsonl:2: verdict 'harmless'"):
        load_judged([path])


def test_tables_put_defenses_side_by_side_in_canonical_order():
    rows = [{**judged(True, id=str(i)), "defense": d} for i, d in enumerate(["davsp", "none", "prefix", "vsp"])]
    text = markdown_tables(metric_entries(evaluate_rows(rows, resamples=0)))
    assert "### Refusal rate on harmful queries (%) · judge refusal@1" in text and "### RSR" not in text
    assert "|  | none | prefix | vsp | davsp |" in text
    assert "| mm-safetybench | 100.0 | 100.0 | 100.0 | 100.0 |" in text


def fixture_rows():
    rows = []
    for defense in ("none", "davsp"):
        rows += [{**judged(i % 3 != 0 or defense == "davsp", id=str(i), image_type="SD", scenario="01"),
                  "defense": defense} for i in range(9)]
        rows.append({**judged(None, id="err", image_type="SD", scenario="01"), "defense": defense})
        rows += [mme_row("OCR", "1", answer, answer) | {"defense": defense} for answer in ("Yes", "No")]
    return rows


def test_cli_writes_the_evaluation_directory_and_prints_the_summary(tmp_path, capsys):
    judged_file = write_jsonl(tmp_path / "judged.jsonl", fixture_rows())
    out = tmp_path / "eval"
    assert cli(["evaluate", str(judged_file), "--out", str(out), "--bootstrap", "200", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "| Refusal rate mm-safetybench [refusal@1] | 66.7 [" in printed and "(1 err)" in printed
    assert "| MME perception | 200.0 | 200.0 |" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["bootstrap"] == {"resamples": 200, "confidence": 0.95, "seed": 3}
    assert metrics["results"]["mm-safetybench"]["davsp"]["judges"]["refusal@1"]["refusal_rate"]["errors"] == 1
    assert metrics["agreement"] == []  # one judge
    assert "### MME subtasks" in (out / "tables.md").read_text()
    assert (out / "tables.csv").read_text().startswith("table,row,column,value,ci_low,ci_high,n,errors\n")
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["defense"] for s in samples} == {"none", "davsp"}
    # Same inputs and seed, same numbers.
    again = tmp_path / "again"
    assert cli(["evaluate", str(judged_file), "--out", str(again), "--bootstrap", "200", "--seed", "3"]) == 0
    assert json.loads((again / "metrics.json").read_text())["results"] == metrics["results"]


def test_cli_errors(tmp_path):
    judged_file = write_jsonl(tmp_path / "judged.jsonl", fixture_rows())
    with pytest.raises(DavspError, match="also an input"):
        cli(["evaluate", str(judged_file), "--out", str(judged_file)])
    with pytest.raises(DavspError, match="--bootstrap -1"):
        cli(["evaluate", str(judged_file), "--out", str(tmp_path / "e"), "--bootstrap", "-1"])
    with pytest.raises(DavspError, match="missing.jsonl: file not found"):
        cli(["evaluate", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "e")])
    with pytest.raises(SystemExit) as exit_info:  # argparse usage error: exit status 2
        cli(["evaluate", str(judged_file)])
    assert exit_info.value.code == 2
    assert not (tmp_path / "e").exists()


def test_davsp_main_exit_status_is_0_on_success_and_2_on_a_user_error(tmp_path, monkeypatch, capsys):
    import davsp.cli

    monkeypatch.setattr(davsp.cli, "VERB_MODULES", ("evaluate",))
    judged_file = write_jsonl(tmp_path / "judged.jsonl", fixture_rows())
    assert davsp.cli.main(["evaluate", str(judged_file), "--out", str(tmp_path / "e")]) == 0
    assert davsp.cli.main(["evaluate", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "e")]) == 2
    assert "davsp: error: " in capsys.readouterr().err


def test_two_judges_of_the_same_responses_get_side_by_side_tables_and_their_disagreements_listed(tmp_path, capsys):
    refusal = [judged(i < 2, id=str(i), response=f"answer {i}") for i in range(6)]
    harm = [judged(i < 4, id=str(i), response=f"answer {i}", judge="harmbench@1/cls", judge_raw="Yes" if i >= 4 else "No")
            for i in range(6)]
    harm[5] = {**harm[5], "verdict": "error", "safe": None}
    files = [write_jsonl(tmp_path / "refusal.jsonl", refusal), write_jsonl(tmp_path / "harm.jsonl", harm)]
    out = tmp_path / "eval"
    assert cli(["evaluate", *map(str, files), "--out", str(out), "--bootstrap", "0"]) == 0
    printed = capsys.readouterr().out
    assert "| Refusal rate mm-safetybench [refusal@1] | 33.3 |" in printed
    assert "| RSR mm-safetybench [harmbench@1/cls] | 80.0 (1 err) |" in printed
    assert "harmbench@1/cls vs refusal@1: Cohen's kappa" in printed and "; 2 disagreements" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    [pair] = metrics["agreement"]
    assert pair["judges"] == ["harmbench@1/cls", "refusal@1"] and (pair["n"], pair["errors_excluded"]) == (5, 1)
    assert sorted(map(tuple, pair["table"])) == [(False, False, 1), (True, False, 2), (True, True, 2)]
    assert [d["id"] for d in pair["disagreements"]] == ["2", "3"]
    assert pair["disagreements"][0]["safe"] == {"harmbench@1/cls": True, "refusal@1": False}
    assert pair["disagreements"][0]["response"] == "answer 2"
    # kappa by hand: p_o = 3/5; a says safe 4/5, b 2/5: p_e = (4*2 + 1*3) / 25 = 11/25
    assert pair["kappa"] == pytest.approx((3 / 5 - 11 / 25) / (1 - 11 / 25))
    tables_md = (out / "tables.md").read_text()
    assert "### Agreement: harmbench@1/cls vs refusal@1" in tables_md
    assert "| mm-safetybench | none | 2 | True | False | answer 2 |" in tables_md


def test_the_same_response_twice_from_one_judge_is_refused_even_across_files(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [judged(True, id="1")])
    b = write_jsonl(tmp_path / "b.jsonl", [judged(False, id="1")])
    with pytest.raises(DavspError, match=r"b\.jsonl:1: row '1' .* already read at .*a\.jsonl:1"):
        load_judged([a, b])
