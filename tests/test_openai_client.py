"""davsp.openai_client against a fake server on 127.0.0.1 that redirects, rate-limits, fails, drips,
floods and talks nonsense: the guarantees in the module docstring, each tried."""

import gc
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fake_chat_server import FakeServer, chat_payload, drip, send

from davsp.errors import DavspError
from davsp.openai_client import DEFAULT_MAX_REPLY_BYTES, CallFailed, ChatClient, _retry_after, chat_completions_url

API_KEY = "sk-test-SECRET-0123456789"
REQUEST = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
HUGE = 30 * 1024 * 1024  # the size of the reply that once went into the output and the cache


def respond(handler, body):
    """The scenario is the first path segment: /<scenario>/v1/chat/completions."""
    scenario = handler.path.split("/")[1]
    fake = handler.server.fake
    seen = sent_to(fake, scenario)  # this request included
    if scenario == "ok":
        send(handler, 200, chat_payload(f"hello {body['messages'][0]['content']}"))
    elif scenario == "redirect":
        send(handler, 302, {}, headers={"Location": fake.elsewhere + "/v1/chat/completions"})
    elif scenario == "rate":  # 429 once, then an answer
        send(handler, *((429, {"error": "slow down"}) if seen == 1 else (200, chat_payload("after 429"))),
             headers={"Retry-After": "0"})  # fmt: skip
    elif scenario == "rate-long":  # asks for an hour, once
        send(handler, *((429, {}) if seen == 1 else (200, chat_payload("waited"))), headers={"Retry-After": "3600"})
    elif scenario == "down":
        send(handler, 500, {"error": "boom"})
    elif scenario == "denied":  # a careless server that echoes the credentials in its error
        send(handler, 401, {"error": f"bad key: {handler.headers.get('Authorization')}"})
    elif scenario == "garbage":
        send(handler, 200, body=b"<html>oops</html>")
    elif scenario == "shape":
        send(handler, 200, {"unexpected": True})
    elif scenario == "drip-body":  # honest headers, then one byte every 0.4 s
        data = json.dumps(chat_payload("safe" + " " * 40)).encode()
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        drip(handler, data, 0.4, fake.stopping)
    elif scenario == "drip-head":  # even the status line comes one byte every 0.4 s
        drip(handler, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n", 0.4, fake.stopping)
    elif scenario in ("huge", "huge-undeclared"):  # a valid reply that parses as "safe", 30 MB long
        handler.send_response(200)
        handler.send_header(*(("Content-Length", str(HUGE)) if scenario == "huge" else ("Connection", "close")))
        handler.end_headers()
        handler.wfile.write(b'{"choices": [{"message": {"content": "safe')
        chunk = b" " * (1 << 20)
        for _ in range(HUGE >> 20):
            if fake.stopping.is_set():
                return
            handler.wfile.write(chunk)
        handler.wfile.write(b'"}}]}')
    else:
        send(handler, 404, {"error": "no such scenario"})


@pytest.fixture
def servers(monkeypatch):
    """The fake API, and another origin that a redirect points to (it must never be reached)."""
    monkeypatch.setenv("DAVSP_TEST_KEY", API_KEY)
    with FakeServer(lambda handler, body: send(handler, 200, chat_payload("elsewhere"))) as elsewhere:
        with FakeServer(respond) as api:
            api.elsewhere = elsewhere.origin
            yield api, elsewhere


@pytest.fixture
def client_for(servers):
    api, _ = servers
    made = []

    def make(scenario, **options):
        settings = {"api_key_env": "DAVSP_TEST_KEY", "timeout_s": 5, "max_retries": 2, "backoff_s": 0.001, **options}
        made.append(ChatClient(f"{api.origin}/{scenario}/v1", **settings))
        return made[-1]

    yield make
    for client in made:
        client.close()


def sent_to(api, scenario):
    return sum(1 for path, _, _ in api.seen if path.split("/")[1] == scenario)


def test_a_reply_comes_back_parsed_with_the_key_in_the_header_only(servers, client_for):
    api, _ = servers
    reply = client_for("ok").chat(REQUEST)
    assert reply.content == "hello hi" and reply.payload["id"] == "fake"
    [(path, auth, body)] = api.seen
    assert path == "/ok/v1/chat/completions" and auth == f"Bearer {API_KEY}" and body == REQUEST


def test_a_redirect_to_another_origin_is_refused_and_the_key_never_leaves(servers, client_for):
    api, elsewhere = servers
    client = client_for("redirect")
    with pytest.raises(CallFailed, match=rf"HTTP 302 redirect to {elsewhere.origin} not followed"):
        client.chat(REQUEST)
    assert elsewhere.seen == [] and sent_to(api, "redirect") == 1  # not followed, not retried


def test_429_is_retried_and_retry_after_is_honoured_within_its_cap(servers, client_for):
    api, _ = servers
    client = client_for("rate")
    assert client.chat(REQUEST).content == "after 429"
    assert sent_to(api, "rate") == 2 and client.stats == {"requests": 2, "retries": 1}
    start = time.monotonic()
    assert client_for("rate-long", max_retry_after_s=0.2).chat(REQUEST).content == "waited"
    assert time.monotonic() - start < 3  # an hour asked, 0.2 s waited


def test_5xx_until_the_retries_run_out_is_a_failure(servers, client_for):
    api, _ = servers
    with pytest.raises(CallFailed, match=r"^HTTP 500 \(gave up after 3 attempts\)$"):
        client_for("down").chat(REQUEST)
    assert sent_to(api, "down") == 3


@pytest.mark.parametrize("scenario,reason", [("garbage", "reply is not JSON"), ("shape", "no choices")])
def test_malformed_replies_are_retried_then_fail(servers, client_for, scenario, reason):
    api, _ = servers
    with pytest.raises(CallFailed, match=reason):
        client_for(scenario, max_retries=1).chat(REQUEST)
    assert sent_to(api, scenario) == 2


@pytest.mark.parametrize("scenario", ["drip-body", "drip-head"])
def test_the_deadline_covers_the_whole_reply_against_a_dripping_server(servers, client_for, scenario):
    # one byte every 0.4 s resets a per-read timeout forever; the overall deadline of 1 s must hold
    client = client_for(scenario, timeout_s=1.0, max_retries=0)
    start = time.monotonic()
    with pytest.raises(CallFailed, match=r"no complete reply within the 1s deadline \(gave up after 1 attempts\)"):
        client.chat(REQUEST)
    assert 0.9 < time.monotonic() - start < 1.5


@pytest.mark.parametrize("scenario", ["huge", "huge-undeclared"])
def test_a_reply_over_the_size_cap_is_a_failure_not_retried(servers, client_for, scenario):
    api, _ = servers
    with pytest.raises(CallFailed, match=rf"reply larger than the {DEFAULT_MAX_REPLY_BYTES}-byte cap"):
        client_for(scenario).chat(REQUEST)
    assert sent_to(api, scenario) == 1


def test_the_key_is_scrubbed_from_errors_and_never_logged(servers, client_for, caplog):
    caplog.set_level(logging.DEBUG)  # httpx and httpcore log at DEBUG too
    with pytest.raises(CallFailed) as failure:
        client_for("denied").chat(REQUEST)
    assert str(failure.value).startswith("HTTP 401") and "bad key: Bearer ***" in str(failure.value)
    with pytest.raises(CallFailed):
        client_for("down").chat(REQUEST)
    assert "retry 1/2" in caplog.text
    assert API_KEY not in str(failure.value) + caplog.text + repr(client_for("ok"))
    assert all(API_KEY not in repr(value) for value in vars(client_for("ok")).values())


def test_threads_share_one_client_and_close_ends_its_loop(servers, client_for):
    api, _ = servers
    client = client_for("ok", max_connections=4)
    requests = [{**REQUEST, "messages": [{"role": "user", "content": str(i)}]} for i in range(16)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        replies = list(pool.map(client.chat, requests))
    assert [r.content for r in replies] == [f"hello {i}" for i in range(16)] and sent_to(api, "ok") == 16
    thread = client._runner.thread
    client.close()
    assert not thread.is_alive()
    assert client.chat(REQUEST).content == "hello hi"  # starts again after close


def test_settings_and_urls_are_checked(monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(DavspError, match="NO_SUCH_KEY_VAR is not set"):
        ChatClient("http://127.0.0.1:9/v1", api_key_env="NO_SUCH_KEY_VAR")
    with pytest.raises(DavspError, match=r"timeout_s=0 \(> 0\)"):
        ChatClient("http://127.0.0.1:9/v1", api_key_env="", timeout_s=0)
    with pytest.raises(DavspError, match="--judge-url '127.0.0.1:8000': expected an http"):
        chat_completions_url("127.0.0.1:8000", "--judge-url")
    with pytest.raises(DavspError, match="remove the user:password@ part"):
        chat_completions_url("http://me:pw@h/v1", "url")
    assert chat_completions_url("http://h/v1/", "url") == "http://h/v1/chat/completions"
    assert chat_completions_url("http://h/v1/chat/completions", "url") == "http://h/v1/chat/completions"


def test_unreachable_endpoint_fails_after_its_retries():
    client = ChatClient("http://127.0.0.1:9/v1", api_key_env="", max_retries=1, backoff_s=0.001, timeout_s=2)
    with client, pytest.raises(CallFailed, match=r"ConnectError.*\(gave up after 2 attempts\)"):
        client.chat(REQUEST)


@pytest.mark.parametrize("value,expected", [
    ("0", 0.0), ("2.5", 2.5), (" 7 ", 7.0), ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0), ("soon", None), ("-3", None),
    (None, None),
])  # fmt: skip
def test_retry_after_reads_seconds_and_http_dates(value, expected):
    assert _retry_after(value) == expected


def test_a_future_http_date_is_a_wait():
    when = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 < _retry_after(when) <= 30


def test_no_thread_is_left_behind_by_a_forgotten_client(servers):
    api, _ = servers
    client = ChatClient(f"{api.origin}/ok/v1", api_key_env="")
    assert client.chat(REQUEST).content == "hello hi"
    thread = client._runner.thread
    del client  # its finalizer stops the loop thread
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()
