"""The llm judge against a fake OpenAI-compatible server on loopback: parsing, retries, errors, cache, key hygiene."""

import json
import logging
import threading
from collections import Counter

import pytest
from fake_chat_server import FakeServer, chat_payload, send

from davsp.errors import DavspError
from davsp.judges import get_judge, judge_file
from davsp.judges.llm import (
    MAX_RAW_ERROR_CHARS,
    LLMJudge,
    ReplyCache,
    llm_score,
    parse_review,
    parse_safety,
    parse_score,
)
from davsp.judges.prompts import PROMPTS

API_KEY = "sk-test-SECRET-0123456789"


MARKERS = ("SAFE_ME", "HARM_ME", "FLAKY", "RATE", "DOWN", "GARBAGE", "SHAPE", "SCORE_ME", "SCORE_LOW", "REVIEW_ME",
           "REVIEW_BAD", "NOT_SAFE", "HUGE", "REDIRECT", "CHATTY")  # fmt: skip
REPLIES = {
    "HARM_ME": "Unsafe.", "FLAKY": "unsafe", "GARBAGE": "maybe?", "SCORE_ME": "0.7", "SCORE_LOW": "0.2",
    "REVIEW_ME": "8 6\nAssistant 1 is more detailed.", "REVIEW_BAD": "Assistant 1: 8\nAssistant 2: 6",
    "NOT_SAFE": "Not safe.", "HUGE": "safe" + " " * (2 << 20), "CHATTY": "x" * (MAX_RAW_ERROR_CHARS + 500),
}  # fmt: skip


class FakeChat:
    """Replies chosen by a marker in the judged response:
    SAFE_ME -> "safe", HARM_ME -> "Unsafe.", FLAKY -> 500 once then "unsafe", RATE -> 429 once
    then "safe", DOWN -> always 500, GARBAGE -> "maybe?", SHAPE -> JSON without choices,
    SCORE_ME -> "0.7", SCORE_LOW -> "0.2", REVIEW_ME -> "8 6" and a comment line, REVIEW_BAD -> two
    scores not on the first line, NOT_SAFE -> "Not safe.", HUGE -> "safe" padded past the 1 MiB
    reply cap, REDIRECT -> 302 to another origin (which would answer "safe"), CHATTY -> a long
    unparsable reply, else "safe".
    """

    def __init__(self, elsewhere: str):
        self.elsewhere = elsewhere
        self.requests = Counter()  # marker -> requests seen
        self.auth = set()
        self.bodies = []
        self.lock = threading.Lock()

    def respond(self, handler, body: dict) -> None:
        if handler.path != "/v1/chat/completions":
            return send(handler, 404, {"error": "no"})
        self.auth.add(handler.headers.get("Authorization"))
        text = body["messages"][-1]["content"]
        marker = next((m for m in MARKERS if m in text), "OTHER")
        with self.lock:
            self.requests[marker] += 1
            seen = self.requests[marker]
            self.bodies.append(body)
        if marker == "DOWN" or (marker == "FLAKY" and seen == 1):
            return send(handler, 500, {"error": "boom"})
        if marker == "RATE" and seen == 1:
            return send(handler, 429, {"error": "slow down"}, headers={"Retry-After": "0"})
        if marker == "SHAPE":
            return send(handler, 200, {"unexpected": True})
        if marker == "REDIRECT":
            return send(handler, 302, {}, headers={"Location": self.elsewhere + "/v1/chat/completions"})
        send(handler, 200, chat_payload(REPLIES.get(marker, "safe")))


@pytest.fixture
def elsewhere():
    """Another origin: the judge must never send anything there."""
    with FakeServer(lambda handler, body: send(handler, 200, chat_payload("safe"))) as other:
        yield other


@pytest.fixture
def server(elsewhere):
    fake = FakeChat(elsewhere.origin)
    with FakeServer(fake.respond) as http:
        fake.url = f"{http.origin}/v1"
        yield fake


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
    # a harm judge: its verdict says harmful or not, never that the answer refused
    assert (judged["s"]["verdict"], judged["s"]["safe"]) == ("safe", True)
    assert (judged["u"]["verdict"], judged["u"]["safe"]) == ("unsafe", False)
    assert judged["u"]["judge_raw"] == "Unsafe."
    assert judged["f"]["safe"] is False and server.requests["FLAKY"] == 2  # 500, then success
    assert judged["r"]["safe"] is True and server.requests["RATE"] == 2  # 429 + Retry-After, then success
    for key, reason in [("d", "HTTP 500"), ("g", "unparsable reply"), ("x", "no choices")]:
        assert (judged[key]["verdict"], judged[key]["safe"]) == ("error", None)
        assert reason in judged[key]["judge_error"]
    assert server.requests["DOWN"] == 3  # 1 + max_retries, then error: never "safe"
    assert summary["counts"] == {"safe": 2, "unsafe": 2, "error": 3} and summary["errors"] == 3
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
    with pytest.raises(DavspError, match="--judge-url '127.0.0.1:8000': expected an http"):
        LLMJudge(url="127.0.0.1:8000", model="m", api_key_env="")
    with pytest.raises(DavspError, match=r"--timeout 0 \(> 0\)"):
        LLMJudge(url="http://127.0.0.1:9/v1", model="m", api_key_env="", timeout_s=0)
    judge = LLMJudge(url="http://127.0.0.1:9/v1/", model="m", api_key_env="")
    assert judge.client.url == "http://127.0.0.1:9/v1/chat/completions" and judge.prompt == "davsp-auto"


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
    ("safe", True), ("Unsafe", False), ("**unsafe**", False), (" Safe.\n", True), ('"unsafe"', False),
    ("Not safe.", None), ("not unsafe", None), ("Output: safe.", None), ("The response is safe", None),
    ("unsafe? safe?", None), ("safe, unsafe", None), ("I cannot judge this", None), ("", None), ("safely", None),
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

    from davsp.cli.judge import add_commands

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

    from davsp.cli.evaluate import add_commands as add_evaluate
    from davsp.cli.judge import add_commands as add_judge

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
    assert results["mm-vet"]["none"]["judges"]["refusal@1"]["over_refusal"]["value"] == 0.5


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


# ---- inputs and replies that must never count as safe -------------------------------------------


def test_empty_responses_are_errors_and_are_not_sent(server, judge_factory, tmp_path):
    rows = [{"id": "e", "response": ""}, {"id": "w", "response": " \n\t "}, {"id": "s", "response": "SAFE_ME"}]
    judged, summary, _ = _judge_rows(tmp_path, judge_factory(), rows)
    for key in "ew":
        assert (judged[key]["verdict"], judged[key]["safe"], judged[key]["judge_error"]) == ("error", None, "empty response")
    assert judged["s"]["safe"] is True and len(server.bodies) == 1 and summary["counts"]["safe"] == 1
    # a grader still grades an empty answer (a low score, rather than a row left out of the mean)
    llm_score([{"id": "m", "question": "Q?", "answer": "a", "response": ""}], judge_factory(prompt="mmvet-grader"))
    assert len(server.bodies) == 2


def test_a_reply_that_is_not_exactly_safe_or_unsafe_is_an_error(server, judge_factory, tmp_path):
    rows = [{"id": "n", "response": "NOT_SAFE"}, {"id": "c", "response": "CHATTY"}]
    judged, summary, _ = _judge_rows(tmp_path, judge_factory(), rows)
    assert (judged["n"]["verdict"], judged["n"]["safe"], judged["n"]["judge_raw"]) == ("error", None, "Not safe.")
    assert judged["c"]["judge_error"] == "unparsable reply" and len(judged["c"]["judge_raw"]) == MAX_RAW_ERROR_CHARS
    assert summary["counts"]["safe"] == 0 and summary["errors"] == 2


def test_a_redirect_is_an_error_and_the_other_origin_gets_nothing(server, elsewhere, judge_factory, tmp_path):
    judged, _, _ = _judge_rows(tmp_path, judge_factory(), [{"id": "r", "response": "REDIRECT"}])
    assert (judged["r"]["verdict"], judged["r"]["safe"]) == ("error", None)
    assert f"redirect to {elsewhere.origin} not followed" in judged["r"]["judge_error"]
    assert elsewhere.seen == [] and server.requests["REDIRECT"] == 1


def test_a_huge_reply_is_an_error_and_is_neither_written_nor_cached(server, judge_factory, tmp_path):
    judged, _, out = _judge_rows(tmp_path, judge_factory(), [{"id": "h", "response": "HUGE"}])
    assert (judged["h"]["verdict"], judged["h"]["safe"]) == ("error", None) and "judge_raw" not in judged["h"]
    assert "reply larger than the 1048576-byte cap" in judged["h"]["judge_error"]
    assert out.stat().st_size < 2000 and not list((tmp_path / "cache").rglob("*.json"))
    assert server.requests["HUGE"] == 1  # not retried: the same server would send the same flood


# ---- the cache ---------------------------------------------------------------------------------


def test_cache_holds_only_verdicts_and_a_rerun_asks_again_what_failed(server, judge_factory, tmp_path):
    rows = [{"id": k, "response": m} for k, m in [("s", "SAFE_ME"), ("g", "GARBAGE"), ("d", "DOWN"), ("n", "NOT_SAFE")]]
    _judge_rows(tmp_path, judge_factory(), rows)
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 1  # only "s" got a verdict
    before = Counter(server.requests)
    (tmp_path / "judged.jsonl").unlink()
    judged, summary, _ = _judge_rows(tmp_path, judge_factory(), rows)
    asked = server.requests - before
    assert asked == Counter({"GARBAGE": 1, "DOWN": 3, "NOT_SAFE": 1}) and summary["llm_cache_hits"] == 1
    assert judged["s"]["safe"] is True and judged["s"]["judge_raw"] == "safe"


def test_cache_key_includes_url_model_and_prompt(server, judge_factory, tmp_path):
    row = [{"id": "s", "response": "SAFE_ME"}]
    judge_factory().judge_batch(row)
    localhost = server.url.replace("127.0.0.1", "localhost")  # the same server under another origin
    for options in [{}, {"model": "other-judge"}, {"url": localhost}, {"prompt": "davsp-figstep"},
                    {"url": server.url + "/chat/completions"}]:  # fmt: skip
        judge_factory(**options).judge_batch(row)
    # asked anew for another model, URL or prompt; the full chat-completions URL is the same endpoint
    assert server.requests["SAFE_ME"] == 4


def test_a_bad_reply_left_in_the_cache_is_not_replayed(server, judge_factory, tmp_path):
    judge = judge_factory()
    row = {"id": "s", "response": "SAFE_ME"}
    prompt = PROMPTS["davsp"]
    request = {"model": "fake-judge", "messages": prompt.messages(row), "temperature": 0.0}
    judge.cache.put(ReplyCache.key(judge.client.url, prompt, request), prompt, "fake-judge", "maybe?")
    [result] = judge.judge_batch([row])
    assert result["safe"] is True and server.requests["SAFE_ME"] == 1 and judge.stats["cache_hits"] == 0
    [again] = judge_factory().judge_batch([row])
    assert again["safe"] is True and server.requests["SAFE_ME"] == 1  # the good reply replaced the bad one


# ---- the prompt per row's benchmark -------------------------------------------------------------


def test_the_prompt_follows_each_rows_benchmark_unless_one_is_forced(server, judge_factory, tmp_path):
    rows = [{"id": "f", "response": "SAFE_ME f", "benchmark": "figstep"},
            {"id": "m", "response": "SAFE_ME m", "benchmark": "mm-safetybench"},
            {"id": "x", "response": "SAFE_ME x"}]  # fmt: skip
    judged, _, out = _judge_rows(tmp_path, judge_factory(), rows)
    expected = {"f": "davsp-figstep", "m": "davsp", "x": "davsp"}
    for key, name in expected.items():
        assert judged[key]["judge_prompt"] == f"{name}@1" and judged[key]["judge"] == f"llm/{name}@1/fake-judge"
        assert judged[key]["judge_prompt_sha256"] == PROMPTS[name].sha256
    systems = {b["messages"][1]["content"].split("Response: ")[1][:9]: b["messages"][0]["content"] for b in server.bodies}
    assert "Note:" not in systems["SAFE_ME f"] and "Note:" in systems["SAFE_ME m"] and "Note:" in systems["SAFE_ME x"]
    # forced: every row gets the one prompt, and a file judged under the other choice is not mixed in
    (tmp_path / "forced").mkdir()
    forced, _, _ = _judge_rows(tmp_path / "forced", judge_factory(prompt="davsp-figstep"), rows)
    assert {row["judge_prompt"] for row in forced.values()} == {"davsp-figstep@1"}
    with pytest.raises(DavspError, match=r"judged by 'llm/davsp-figstep@1/fake-judge', not 'llm/davsp@1/fake-judge'"):
        judge_file(tmp_path / "forced" / "responses.jsonl", judge_factory(), tmp_path / "forced" / "judged.jsonl")
    # another judge on the judged file does not keep the llm's prompt fields
    refused = judge_file(out, get_judge("refusal"), tmp_path / "refusal.jsonl", progress=False)
    assert refused["total"] == 3
    assert all("judge_prompt" not in json.loads(line) for line in (tmp_path / "refusal.jsonl").read_text().splitlines())


def test_an_unwritable_cache_costs_the_caching_not_the_verdicts(server, judge_factory, tmp_path, caplog):
    blocker = tmp_path / "cache-is-a-file"
    blocker.write_text("not a folder")
    judged, summary, _ = _judge_rows(tmp_path, judge_factory(cache_dir=blocker / "sub"), ROWS[:2])
    assert [judged[k]["safe"] for k in "su"] == [True, False] and summary["errors"] == 0
    assert caplog.text.count("is not writable") == 1
