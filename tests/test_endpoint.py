"""`davsp generate --endpoint`: the shipped safety-world model behind `davsp serve --model` (a subprocess on
127.0.0.1) answers every defense exactly as local generation does, and a run through a fault-injecting
proxy (429s, 500s, missed deadlines, the server killed and restarted) loses and duplicates nothing. The same
answers come back from `transformers serve`, a server davsp did not write."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import openai
import pytest
import torch

from davsp.adapters import load_adapter
from davsp.cli import main
from davsp.endpoint import Endpoint, generate_via_endpoint
from davsp.errors import DavspError
from davsp.generate import generate_responses
from davsp.prompt import VisualSafetyPrompt
from davsp.serve import ServeConfig, ServerThread, build_app
from davsp.toy import MODEL_DIR
from davsp.toy.world import VSP_PADDING, caution_stripes, demo_splits, is_refusal
from fake_chat_server import FakeServer, chat_payload, send
from toy_model_server import START_TIMEOUT_S, ToyModelServer, ask_about_image

MAX_TOKENS = 24  # the demo's answer length: every world answer fits
DEFENSES = ("none", "prefix", "vsp", "davsp")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("endpoint-world")
    server = ToyModelServer()  # loads while the records are drawn and the local answers computed
    try:
        adapter = load_adapter(str(MODEL_DIR))
        splits = demo_splits(folder / "data", seed=0)
        records = splits["harmful_heldout"][::6] + splits["benign_heldout"][::15]  # 6 + 6
        # the world's caution stripes as an 8-bit pixel frame: it tips harmful images into refusals, so the
        # vsp answers show that the frame reached the model through HTTP
        stripes = torch.from_numpy(np.round(caution_stripes() * 255) / 255).float().permute(2, 0, 1)
        vsp = VisualSafetyPrompt(stripes, VSP_PADDING, "pixel", adapter.image_mean, adapter.image_std,
                                 quantize_8bit=True, metadata={"prompt_format": adapter.prompt_format,
                                                               "model": str(MODEL_DIR), "family": adapter.family,
                                                               "canvas_size": adapter.canvas_size})
        vsp.save(folder / "vsp.safetensors")
        local = {d: {r["id"]: r["response"] for r in generate_responses(
            adapter, records, defense=d, vsp=vsp, max_new_tokens=MAX_TOKENS, batch_size=8, progress=False)}
            for d in DEFENSES}
        server.wait_ready()
        state = {"records": records, "vsp": vsp, "vsp_file": folder / "vsp.safetensors", "local": local,
                 "server": server, "folder": folder}
        yield state
        server = state["server"]  # a test may have restarted it: stop the one running now
    finally:
        server.kill()


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_defense_answers_as_local_generation_does(world, tmp_path, capsys):
    records, local, url = world["records"], world["local"], world["server"].url + "/v1"
    harmful = [r.id for r in records if r.extra["harm"] > 0]
    # the defenses differ on this model, so equal answers mean equal inputs (prefix, frame), not a blind model
    assert sum(is_refusal(local["vsp"][i]) for i in harmful) > sum(is_refusal(local["none"][i]) for i in harmful)
    assert local["prefix"] != local["none"]
    for defense in ("none", "vsp", "davsp"):
        out = tmp_path / f"{defense}.jsonl"
        rows = generate_via_endpoint(records, Endpoint(url, str(MODEL_DIR), concurrency=4), defense=defense,
                                     vsp=world["vsp"], max_new_tokens=MAX_TOKENS,
                                     out=out, progress=False)
        assert [r["id"] for r in rows] == [r.id for r in records]  # input order, whatever order answers came in
        assert {r["id"]: r["response"] for r in rows} == local[defense], defense
        written = _rows(out)
        assert sorted(r["id"] for r in written) == sorted(r.id for r in records)
        assert all(r["defense"] == defense and r["new_tokens"] >= 1 and r["model"] == str(MODEL_DIR) for r in written)
    # the command line, resumed: a file holding two answers gets the other ten
    out = tmp_path / "prefix.jsonl"
    generate_via_endpoint(records[:2], Endpoint(url, str(MODEL_DIR)), defense="prefix", max_new_tokens=MAX_TOKENS,
                          out=out, progress=False)
    data = tmp_path / "records.jsonl"
    data.write_text("".join(json.dumps({"id": r.id, "image": str(r.image), "question": r.question}) + "\n"
                            for r in records))
    code = main(["generate", "--endpoint", url, "--served-model", str(MODEL_DIR), "--data", str(data),
                 "--defense", "prefix", "--max-new-tokens", str(MAX_TOKENS), "--concurrency", "3", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert {r["id"]: r["response"] for r in _rows(out)} == local["prefix"] and len(_rows(out)) == len(records)
    # a resume under other settings is refused, not mixed
    code = main(["generate", "--endpoint", url, "--served-model", str(MODEL_DIR), "--data", str(data),
                 "--defense", "prefix", "--max-new-tokens", "5", "--out", str(out)])
    assert code == 2 and "max_new_tokens=24" in capsys.readouterr().err


class FaultyProxy:
    """Forwards chat requests to the model server, except: every 5th gets 429, every 5th+1 gets 500, and the
    first answer from the 7th request on is held past the client's deadline (so the model answers it twice)."""

    def __init__(self, upstream: str, hold_s: float):
        self.upstream, self.hold_s, self.count, self.faults = upstream, hold_s, 0, []
        self.lock = threading.Lock()

    def __call__(self, handler, body) -> None:
        with self.lock:
            self.count += 1
            n = self.count
        if n % 5 == 0:
            self.faults.append(429)
            return send(handler, 429, {"error": {"message": "slow down"}}, headers={"Retry-After": "0"})
        if n % 5 == 1 and n > 1:
            self.faults.append(500)
            return send(handler, 500, {"error": {"message": "boom"}})
        try:
            reply = httpx.post(self.upstream + "/v1/chat/completions", json=body, timeout=60)
        except httpx.HTTPError:  # the model server is down: a gateway's answer
            self.faults.append(502)
            return send(handler, 502, {"error": {"message": "upstream down"}})
        if n >= 7 and "deadline" not in self.faults:
            self.faults.append("deadline")
            handler.server.fake.stopping.wait(self.hold_s)
        send(handler, reply.status_code, body=reply.content)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_transformers_serve_answers_every_defense_as_local_generation_does(world, tmp_path):
    """A third-party OpenAI-compatible server (transformers' own) behind the endpoint backend."""
    port = _free_port()
    command = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(MODEL_DIR), "--host", "127.0.0.1",
               "--port", str(port)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert server.poll() is None, f"transformers serve exited with {server.returncode}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"transformers serve did not start within {START_TIMEOUT_S}s"
            time.sleep(0.5)
        upstream = f"http://127.0.0.1:{port}/v1"
        endpoint = Endpoint(upstream, str(MODEL_DIR), concurrency=2)
        for defense in DEFENSES:
            rows = generate_via_endpoint(world["records"], endpoint, defense=defense, vsp=world["vsp"],
                                         max_new_tokens=MAX_TOKENS, out=tmp_path / f"{defense}.jsonl", progress=False)
            assert {r["id"]: r["response"] for r in rows} == world["local"][defense], defense
        # and `davsp serve` in front of it: a client sends the raw image and question, the gateway frames and
        # prefixes them, and the third-party server answers exactly as local DAVSP generation does
        config = ServeConfig(upstream=upstream, vsp=str(world["vsp_file"]), upstream_wait_s=30)
        with ServerThread(build_app(config)) as gateway:
            with openai.OpenAI(base_url=gateway.url + "/v1", api_key="local", max_retries=0, timeout=60) as client:
                served = {r.id: ask_about_image(client, r, MAX_TOKENS) for r in world["records"]}
        assert served == world["local"]["davsp"]
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(5)


def test_faults_and_a_server_restart_lose_and_duplicate_nothing(world, tmp_path):
    records = world["records"]
    # the deadline is long enough for a loaded machine's answers, and shorter than the held one
    proxy = FaultyProxy(world["server"].url, hold_s=8.0)
    out = tmp_path / "davsp.jsonl"
    restarted = threading.Event()

    def kill_and_restart():  # once a third of the answers are saved: kill -9 the model server, start a new one
        while not out.exists() or len(out.read_text().splitlines()) < len(records) // 3:
            time.sleep(0.05)
        port = world["server"].port
        world["server"].kill()
        world["server"] = ToyModelServer(port).wait_ready()
        proxy.upstream = world["server"].url
        restarted.set()

    watcher = threading.Thread(target=kill_and_restart, daemon=True)
    watcher.start()
    with FakeServer(proxy) as server:
        endpoint = Endpoint(server.origin + "/v1", str(MODEL_DIR), concurrency=3, timeout_s=6, max_retries=12,
                            backoff_s=0.25)
        rows = generate_via_endpoint(records, endpoint, defense="davsp", vsp=world["vsp"], max_new_tokens=MAX_TOKENS,
                                     out=out, progress=False)
    watcher.join(START_TIMEOUT_S)
    assert restarted.is_set()
    assert {429, 500, 502, "deadline"} <= set(proxy.faults)
    written = _rows(out)
    assert sorted(r["id"] for r in written) == sorted(r.id for r in records)  # each id exactly once
    assert {r["id"]: r["response"] for r in written} == world["local"]["davsp"]
    assert [r["response"] for r in rows] == [world["local"]["davsp"][r.id] for r in records]


def test_a_request_that_fails_for_good_stops_the_run_and_a_rerun_finishes_it(world, tmp_path):
    records = world["records"][:6]
    requests = {"seen": 0, "refuse": 4}  # the 4th request of the first run is refused

    def respond(handler, body):
        requests["seen"] += 1
        if requests["seen"] == requests["refuse"]:
            return send(handler, 401, {"error": {"message": "bad key"}})
        send(handler, 200, {**chat_payload("an answer"), "usage": {"completion_tokens": 2}})

    out = tmp_path / "r.jsonl"
    with FakeServer(respond) as server:
        endpoint = Endpoint(server.origin + "/v1", "m", concurrency=1, max_retries=0)
        with pytest.raises(DavspError, match=r"record .*HTTP 401.*3 answers saved, 3 left: rerun the same command"):
            generate_via_endpoint(records, endpoint, defense="none", out=out, progress=False)
        assert [r["id"] for r in _rows(out)] == [r.id for r in records[:3]]  # concurrency 1: no later request sent
        requests["refuse"] = None
        rows = generate_via_endpoint(records, endpoint, defense="none", out=out, progress=False)
    assert [r["id"] for r in rows] == [r.id for r in records] and len(_rows(out)) == 6
    assert rows[4]["new_tokens"] == 2 and rows[4]["response"] == "an answer"


def test_a_normalized_space_vsp_cannot_be_sent_as_an_image(world):
    vsp = world["vsp"]
    normalized = VisualSafetyPrompt(torch.zeros_like(vsp.values), vsp.padding, "normalized", vsp.image_mean,
                                    vsp.image_std)
    with pytest.raises(DavspError, match="pixel-space"):
        generate_via_endpoint(world["records"], Endpoint("http://127.0.0.1:9/v1", "m"), defense="davsp",
                              vsp=normalized, progress=False)
