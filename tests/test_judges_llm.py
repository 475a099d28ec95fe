"""The llm judge against a fake OpenAI-compatible server on loopback: parsing, retries, errors, cache, key hygiene."""

import json
import logging
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from davsp.errors import DavspError
from davsp.judges import get_judge, judge_file
from davsp.judges.llm import (
    LLMJudge,
    endpoint_url,
    llm_score,
    parse_review,
    parse_safety,
    parse_score,
)

API_KEY = "sk-test-SECRET-0123456789"


MARKERS = ("SAFE_ME", "HARM_ME", "FLAKY", "RATE", "DOWN", "GARBAGE", "SHAPE", "SCORE_ME", "SCORE_LOW", "REVIEW_ME",
           "REVIEW_BAD")  # fmt: skip
REPLIES = {
    "HARM_ME": "Unsafe.", "FLAKY": "unsafe", "GARBAGE": "maybe?", "SCORE_ME": "0.7", "SCORE_LOW": "0.2",
    "REVIEW_ME": "8 6\nAssistant 1 is more detailed.", "REVIEW_BAD": "Assistant 1: 8\nAssistant 2: 6",
}  # fmt: skip


class FakeChat:
    """Replies chosen by a marker in the judged response:
    SAFE_ME -> "safe", HARM_ME -> "Unsafe.", FLAKY -> 500 once then "unsafe", RATE -> 429 once
    then "safe", DOWN -> always 500, GARBAGE -> "maybe?", SHAPE -> JSON without choices,
    SCORE_ME -> "0.7", SCORE_LOW -> "0.2", REVIEW_ME -> "8 6" and a comment line, REVIEW_BAD -> two
    scores not on the first line, else "safe".
    """

    def __init__(self):
        self.requests = Counter()  # marker -> requests seen
        self.auth = set()
        self.bodies = []
        self.lock = threading.Lock()

    def reply(self, body: dict) -> tuple[int, dict]:
        text = body["messages"][-1]["content"]
        marker = next(
            (m for m in MARKERS if m in text),
            "OTHER",
        )
        with self.lock:
            self.requests[marker] += 1
            seen = self.requests[marker]
            self.bodies.append(body)
        if marker == "DOWN" or (marker == "FLAKY" and seen == 1):
            return 500, {"error": "boom"}
        if marker == "RATE" and seen == 1:
            return 429, {"error": "slow down"}
        if marker == "SHAPE":
            return 200, {"unexpected": True}
        content = REPLIES.get(marker, "safe")
        return 200, {"choices": [{"message": {"role": "assistant", "content": content}}]}


@pytest.fixture
def server():
    fake = FakeChat()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            fake.auth.add(self.headers.get("Authorization"))
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            status, payload = (404, {"error": "no"}) if self.path != "/v1/chat/completions" else fake.reply(body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            if status == 429:
                self.send_header("Retry-After", "0")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield fake
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def judge_factory(server, tmp_path, monkeypatch):
    monkeypatch.setenv("DAVSP_TEST_KEY", API_KEY)

    def make(**options):
        settings = {"url": server.url, "model": "fake-judge", "api_key_env": "DAVSP_TEST_KEY", "backoff_s": 0.001,
                        "max_retries": 2, "timeout_s": 5, "concurrency": 4, "cache_dir": tmp_path / "cache"}  # fmt: skip
        return get_judge("llm", **{**settings, **options})

    return make


ROWS = [
    {"id": "s", "response": "I am sorry. SAFE_ME", "category": "01-Illegal_Activitiy"},
    {"id": "u", "response": "Step 1: HARM_ME", "category": "01-Illegal_Activitiy"},
    {"id": "f", "response": "FLAKY", "category": "01-Illegal_Activitiy"},
    {"id": "r", "response": "RATE", "category": "01-Illegal_Activitiy"},
    {"id": "d", "response": "DOWN", "category": "01-Illegal_Activitiy"},
    {"id": "g", "response": "GARBAGE", "category": "01-Illegal_Activitiy"},
    {"id": "x", "response": "SHAPE", "category": "01-Illegal_Activitiy"},
]


def _judge_rows(tmp_path, judge, rows=ROWS):
    path = tmp_path / "responses.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "judged.jsonl"
    summary = judge_file(path, judge, out, progress=False)
    return {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}, summary, out


def test_verdicts_retries_and_errors(server, judge_factory, tmp_path):
    judged, summary, _ = _judge_rows(tmp_path, judge_factory())
    assert (judged["s"]["verdict"], judged["s"]["safe"]) == ("full_refusal", True)
    assert (judged["u"]["verdict"], judged["u"]["safe"]) == ("full_compliance", False)
    assert judged["u"]["judge_raw"] == "Unsafe."
    assert judged["f"]["safe"] is False and server.requests["FLAKY"] == 2  # 500, then success
    assert judged["r"]["safe"] is True and server.requests["RATE"] == 2  # 429 + Retry-After, then success
    for key, reason in [("d", "HTTP 500"), ("g", "unparsable reply"), ("x", "no choices")]:
        assert (judged[key]["verdict"], judged[key]["safe"]) == ("error", None)
        assert reason in judged[key]["judge_error"]
    assert server.requests["DOWN"] == 3  # 1 + max_retries, then error: never "safe"
    assert summary["errors"] == 3 and summary["counts"]["full_refusal"] == 2
    assert all(r["judge"] == "llm/davsp@1/fake-judge" for r in judged.values())
    assert server.auth == {f"Bearer {API_KEY}"}
    body = server.bodies[0]
    assert body["temperature"] == 0 and body["model"] == "fake-judge" and body["messages"][0]["role"] == "system"


def test_cache_makes_a_rerun_free(server, judge_factory, tmp_path):
    rows = [r for r in ROWS if r["id"] in "suf"]
    _judge_rows(tmp_path, judge_factory(), rows)
    before = sum(server.requests.values())
    (tmp_path / "judged.jsonl").unlink()
    judge = judge_factory()
    judged, summary, _ = _judge_rows(tmp_path, judge, rows)
    assert sum(server.requests.values()) == before  # nothing sent
    assert summary["llm_cache_hits"] == 3 and summary["llm_requests"] == 0
    assert [judged[k]["safe"] for k in "suf"] == [True, False, False]
    # another prompt is another cache key
    _ = judge_factory(prompt="davsp-figstep").judge_batch(rows[:1])
    assert sum(server.requests.values()) == before + 1


def test_rerun_retries_only_errors(server, judge_factory, tmp_path):
    _judge_rows(tmp_path, judge_factory(cache_dir=None))
    sent = sum(server.requests.values())
    judged, summary, _ = _judge_rows(tmp_path, judge_factory(cache_dir=None))
    assert summary["resumed"] == 4 and summary["judged_now"] == 3
    assert sum(server.requests.values()) == sent + 3 + 3 + 1  # d and x: 3 attempts each; g: one garbage reply
    assert judged["s"]["safe"] is True


def test_api_key_never_written_or_logged(server, judge_factory, tmp_path, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    _, _, out = _judge_rows(tmp_path, judge_factory())
    captured = capsys.readouterr()
    texts = [out.read_text(), captured.out, captured.err, caplog.text]
    texts += [p.read_text() for p in (tmp_path / "cache").rglob("*.json")]
    assert len(texts) > 4 and not any(API_KEY in t for t in texts)
    assert "retry" in caplog.text  # retries were logged, just without the key
    assert API_KEY not in repr(judge_factory())


def test_mmsafetybench_router_and_mmvet_score(server, judge_factory, tmp_path):
    judge = judge_factory(prompt="mmsafetybench")
    rows = [
        {"id": "l", "response": "SAFE_ME", "category": "10-Legal_Opinion"},
        {"id": "i", "response": "HARM_ME", "category": "01-Illegal_Activitiy"},
    ]
    results = judge.judge_batch(rows)
    assert [r["judge"] for r in results] == [
        "llm/mmsafetybench-legal_opinion@1/fake-judge",
        "llm/mmsafetybench-general@1/fake-judge",
    ]
    assert [r["safe"] for r in results] == [True, False]
    sent = [b["messages"] for b in server.bodies[-2:]]
    assert all(len(m) == 1 and m[0]["role"] == "user" for m in sent)
    grader = judge_factory(prompt="mmvet-grader")
    scored = llm_score([{"id": "m", "question": "Q?", "answer": "a<AND>b", "response": "SCORE_ME"},
                        {"id": "n", "question": "Q?", "answer": "a", "response": "GARBAGE"}], grader)  # fmt: skip
    assert [r["score"] for r in scored] == [0.7, None] and scored[1]["judge_error"] == "unparsable reply"
    assert all(body["max_tokens"] == 3 for body in server.bodies[-2:])
    with pytest.raises(DavspError, match="not scores"):
        llm_score(rows, judge)


def test_settings_are_checked(monkeypatch, tmp_path):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(DavspError, match="NO_SUCH_KEY_VAR is not set"):
        LLMJudge(url="http://127.0.0.1:9/v1", model="m", api_key_env="NO_SUCH_KEY_VAR")
    with pytest.raises(DavspError, match=r"Unknown judge prompt 'davps'\. Did you mean davsp"):
        LLMJudge(url="http://127.0.0.1:9/v1", model="m", api_key_env="", prompt="davps")
    with pytest.raises(DavspError, match="expected an http"):
        endpoint_url("127.0.0.1:8000")
    assert endpoint_url("http://h/v1/") == "http://h/v1/chat/completions"
    assert endpoint_url("http://h/v1/chat/completions") == "http://h/v1/chat/completions"


def test_unreachable_endpoint_is_an_error_not_safe(tmp_path):
    judge = LLMJudge(
        url="http://127.0.0.1:9/v1",
        model="m",
        api_key_env="",
        max_retries=1,
        backoff_s=0.001,
        timeout_s=2,
        cache_dir=None,
    )
    [result] = judge.judge_batch([{"id": "a", "response": "hello"}])
    assert (result["verdict"], result["safe"]) == ("error", None) and "call failed" in result["judge_error"]


@pytest.mark.parametrize("reply,expected", [
    ("safe", True), ("Unsafe", False), ("**unsafe**", False), ("Output: safe.", True), ("The response is safe", True),
    ("unsafe? safe?", None), ("I cannot judge this", None), ("", None),
])  # fmt: skip
def test_parse_safety(reply, expected):
    assert parse_safety(reply) is expected


@pytest.mark.parametrize(
    "reply,expected", [("0.5", 0.5), ("1.0 ", 1.0), ("0", 0.0), ("1.5", None), ("abc", None), ("-0.1", None)]
)
def test_parse_score(reply, expected):
    assert parse_score(reply) == expected


@pytest.mark.parametrize("reply,expected", [
    ("8 6\nBecause ...", (8.0, 6.0)), ("7,9", (7.0, 9.0)), ("7, 9.5 \n", (7.0, 9.5)), ("10 1", (10.0, 1.0)),
    ("8\n6", None), ("8 6 7", None), ("Assistant 1: 8", None), ("11 5", None), ("nan 5", None), ("", None),
])  # fmt: skip
def test_parse_review(reply, expected):
    assert parse_review(reply) == expected


def test_cli_llm_judge_reports_errors_and_never_prints_the_key(server, tmp_path, monkeypatch, capsys):
    import argparse

    from davsp.judges.cli import add_commands

    monkeypatch.setenv("DAVSP_TEST_KEY", API_KEY)
    responses = tmp_path / "responses.jsonl"
    responses.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:2] + ROWS[4:5]))
    out = tmp_path / "judged.jsonl"
    parser = argparse.ArgumentParser(prog="davsp")
    add_commands(parser.add_subparsers())
    args = parser.parse_args([
        "judge", "--input", str(responses), "--out", str(out), "--judge", "llm", "--judge-url", server.url,
        "--judge-model", "fake-judge", "--api-key-env", "DAVSP_TEST_KEY", "--max-retries", "0", "--no-cache",
        "--no-progress",
    ])  # fmt: skip
    assert args.func(args) == 0
    captured = capsys.readouterr()
    assert "error                 1" in captured.out and "requests 3, cache hits 0" in captured.out
    assert "1 responses could not be judged" in captured.err
    assert API_KEY not in captured.out + captured.err + out.read_text()


# ---- graders through `davsp judge`, then `davsp evaluate` ---------------------------------------


def davsp_cli(*argv: str) -> int:
    import argparse

    from davsp.evaluate import add_commands as add_evaluate
    from davsp.judges.cli import add_commands as add_judge

    parser = argparse.ArgumentParser(prog="davsp")
    subparsers = parser.add_subparsers()
    add_judge(subparsers)
    add_evaluate(subparsers)
    args = parser.parse_args(list(argv))
    return args.func(args)


def grade(server, tmp_path, rows, prompt, *extra):
    extra = extra or ("--cache-dir", str(tmp_path / "cache"))
    responses = tmp_path / f"{prompt}.jsonl"
    responses.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / f"{prompt}.graded.jsonl"
    status = davsp_cli(
        "judge", "--input", str(responses), "--out", str(out), "--judge", "llm", "--prompt", prompt,
        "--judge-url", server.url, "--judge-model", "fake-judge", "--api-key-env", "", "--max-retries", "0",
        "--no-progress", *extra,
    )  # fmt: skip
    assert status == 0
    return out, {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}


def evaluate(tmp_path, *judged):
    out = tmp_path / "eval"
    assert davsp_cli("evaluate", *map(str, judged), "--out", str(out), "--bootstrap", "0") == 0
    return json.loads((out / "metrics.json").read_text())["results"], (out / "tables.md").read_text()


def mmvet_row(key, response, capabilities):
    # a `davsp generate` row of the MM-Vet loader's record, ground truth included
    return {"id": key, "benchmark": "mm-vet", "defense": "none", "category": "+".join(sorted(capabilities)),
            "question": "What is x?", "answer": "-1<AND>-5", "response": response, "capabilities": capabilities}  # fmt: skip


def test_mmvet_grading_through_the_cli_counts_errors_resumes_and_feeds_evaluate(server, tmp_path, capsys):
    rows = [mmvet_row("v1_0", "x = -1 SCORE_ME", ["math", "ocr"]), mmvet_row("v1_1", "SCORE_LOW", ["ocr"]),
            mmvet_row("v1_2", "GARBAGE", ["rec"]), mmvet_row("v1_3", "DOWN", ["rec"])]  # fmt: skip
    out, graded = grade(server, tmp_path, rows, "mmvet-grader", "--no-cache")
    assert [graded[k]["score"] for k in ("v1_0", "v1_1", "v1_2", "v1_3")] == [0.7, 0.2, None, None]
    assert graded["v1_2"]["judge_error"] == "unparsable reply" and graded["v1_2"]["judge_raw"] == "maybe?"
    assert graded["v1_3"]["judge_error"].startswith("call failed: HTTP 500")
    assert "verdict" not in graded["v1_0"] and graded["v1_0"]["judge"] == "llm/mmvet-grader@1/fake-judge"
    assert any(
        b["messages"][0]["content"].endswith("\nWhat is x? | -1 <AND> -5 | x = -1 SCORE_ME | ") for b in server.bodies
    )
    captured = capsys.readouterr()
    assert "scored                2" in captured.out and "error                 2" in captured.out
    assert "2 responses could not be judged" in captured.err
    # a rerun asks again only for the two null scores
    sent = sum(server.requests.values())
    grade(server, tmp_path, rows, "mmvet-grader", "--no-cache")
    assert "2 kept from an earlier run, 2 judged now" in capsys.readouterr().out
    assert sum(server.requests.values()) == sent + 2

    results, tables = evaluate(tmp_path, out)
    mm_vet = results["mm-vet"]["none"]["mm_vet"]
    assert mm_vet["total"] == {"score": pytest.approx(45.0), "n": 2, "errors": 2}  # (0.7 + 0.2) / 2, errors apart
    assert mm_vet["by_capability"]["ocr"]["score"] == pytest.approx(45.0)
    assert mm_vet["by_capability"]["math"]["score"] == pytest.approx(70.0)
    assert mm_vet["by_capability"]["rec"] == {"score": None, "n": 0, "errors": 2}
    assert "| MM-Vet total | 45.0 (2 err) |" in tables and "### MM-Vet by capability" in tables


def test_refusal_judge_on_a_graded_file_adds_over_refusal_and_keeps_scores(server, tmp_path):
    rows = [mmvet_row("v1_0", "SCORE_ME", ["ocr"]), mmvet_row("v1_1", "I am sorry, I cannot help. GARBAGE", ["rec"])]
    graded, _ = grade(server, tmp_path, rows, "mmvet-grader")
    both = tmp_path / "graded.refusal.jsonl"
    assert davsp_cli("judge", "--input", str(graded), "--out", str(both), "--no-progress") == 0
    judged = {r["id"]: r for r in map(json.loads, both.read_text().splitlines())}
    assert judged["v1_1"]["verdict"] == "full_refusal" and judged["v1_1"]["score"] is None
    assert judged["v1_1"]["judge"] == "refusal@1" and "judge_error" not in judged["v1_1"]  # the grader's is dropped
    results, _ = evaluate(tmp_path, both)
    assert results["mm-vet"]["none"]["mm_vet"]["total"]["score"] == pytest.approx(70.0)
    assert results["mm-vet"]["none"]["over_refusal"]["value"] == 0.5


def llava_row(key, category, response):
    # a `davsp generate` row of the LLaVA-Bench loader's record: answer = GPT-4 reference, context = caption
    return {"id": key, "benchmark": "llava-bench", "defense": "davsp", "category": category, "question": "What?",
            "answer": f"reference {key}", "context": "A dog on a red sofa.", "response": response}  # fmt: skip


def test_llava_bench_review_through_the_cli_and_evaluate(server, tmp_path, capsys):
    rows = [llava_row("0", "conv", "REVIEW_ME"), llava_row("1", "detail", "REVIEW_ME"),
            llava_row("2", "complex", "REVIEW_BAD"), llava_row("3", "complex", "GARBAGE")]  # fmt: skip
    out, graded = grade(server, tmp_path, rows, "llava-bench-review")
    assert (graded["0"]["score_reference"], graded["0"]["score_model"]) == (8.0, 6.0)
    for key in ("2", "3"):
        assert (graded[key]["score_reference"], graded[key]["score_model"]) == (None, None)
        assert graded[key]["judge_error"] == "unparsable reply"
    assert graded["2"]["judge_raw"] == "Assistant 1: 8\nAssistant 2: 6"
    assert graded["0"]["judge"] == "llm/llava-bench-review@1/fake-judge"
    [body] = [b for b in server.bodies if "\nreference 0\n" in b["messages"][-1]["content"]]
    system, user = body["messages"]
    assert system["content"].startswith("You are a helpful and precise assistant")
    assert user["content"].startswith(
        "[Context]\nA dog on a red sofa.\n\n[Question]\nWhat?\n\n[Assistant 1]\n"
        "reference 0\n\n[End of Assistant 1]\n\n[Assistant 2]\nREVIEW_ME\n\n"
    )
    assert body["max_tokens"] == 1024 and body["temperature"] == 0
    assert "scored                2" in capsys.readouterr().out

    results, tables = evaluate(tmp_path, out)
    llava = results["llava-bench"]["davsp"]["llava_bench"]
    assert llava["overall"] == {"relative": pytest.approx(75.0), "model": 6.0, "reference": 8.0, "n": 2, "errors": 2}
    assert llava["by_category"]["complex"]["relative"] is None and llava["by_category"]["complex"]["errors"] == 2
    assert "| LLaVA-Bench relative | 75.0 (2 err) |" in tables and "### LLaVA-Bench relative by category" in tables


def test_grading_rows_without_ground_truth_stops_before_any_request(server, tmp_path):
    rows = [{k: v for k, v in mmvet_row("v1_0", "SCORE_ME", ["ocr"]).items() if k != "answer"}]
    with pytest.raises(DavspError, match=r"needs a text field 'answer'; row 'v1_0' has None"):
        grade(server, tmp_path, rows, "mmvet-grader")
    rows = [{k: v for k, v in llava_row("0", "conv", "REVIEW_ME").items() if k != "context"}]
    with pytest.raises(DavspError, match=r"llava-bench-review@1 needs a text field 'context'"):
        grade(server, tmp_path, rows, "llava-bench-review")
    assert not server.bodies
