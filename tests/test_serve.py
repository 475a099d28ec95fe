"""davsp serve as a real server on 127.0.0.1, driven by the official `openai` client, in front of a scriptable
upstream that records what it receives: the pixels and text the model gets, relaying, auth, limits, errors."""

import base64
import io
import json
import logging
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
import torch
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from davsp.cli import main
from davsp.defenses import SAFETY_PREFIX, with_prefix
from davsp.errors import DavspError
from davsp.prompt import VisualSafetyPrompt
from davsp.serve import ServeConfig, ServerThread, build_app
from davsp.serve.protocol import completion, sse

MODEL = "org/capture-model"
KEY, OTHER_KEY = "sk-gateway-KEY-one-0123456789", "sk-gateway-KEY-two-9876543210"
STREAM_PIECES = ["Fr", "amed ", "and ", "stre", "amed", "."]


class Upstream:
    """An OpenAI-compatible upstream whose behaviour a test sets (`mode`); it records every chat body."""

    def __init__(self):
        self.mode = "ok"
        self.bodies: list[dict] = []
        self.stream_bytes = b"".join(sse({"choices": [{"index": 0, "delta": {"content": piece}}]})
                                     for piece in STREAM_PIECES) + b"data: [DONE]\n\n"
        self.app = Starlette(routes=[Route("/v1/chat/completions", self.chat, methods=["POST"]),
                                     Route("/v1/models", self.models), Route("/img.png", self.image)])

    async def models(self, request: Request):
        return JSONResponse({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def image(self, request: Request):
        return Response(_png(_photo(40, 30)), media_type="image/png")

    async def chat(self, request: Request):
        body = await request.json()
        self.bodies.append(body)
        mode = self.mode
        if mode == "slow":
            import asyncio

            await asyncio.sleep(1.5)
        if mode == "garbage":
            return Response(b"<html>proxy error</html>", media_type="text/html")
        if mode == "500":
            return JSONResponse({"error": {"message": "boom"}}, 500)
        if mode == "400":
            return JSONResponse({"error": {"message": "context too long", "type": "invalid_request_error"}}, 400)
        if body.get("stream"):
            async def events():
                for i in range(0, len(self.stream_bytes), 37):  # chunks that split events: relayed as they come
                    yield self.stream_bytes[i : i + 37]
            return StreamingResponse(events(), media_type="text/event-stream")
        return JSONResponse(completion(body["model"], f"seen {len(body['messages'])} messages", "stop", 3, 4))


def _photo(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    channels = 4 if mode == "RGBA" else 3
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels, mode)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(data).decode()


def _pixels(data_url: str) -> tuple[str, np.ndarray]:
    image = Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])))
    return image.format, np.asarray(image)


def _huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (and one tiny IDAT): a decompression bomb's first bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def vsp_file(tmp_path_factory):
    """A pixel-space 8-bit frame of random colours (64 px canvas, 8 px border), recorded as trained for MODEL."""
    path = tmp_path_factory.mktemp("vsp") / "vsp.safetensors"
    vsp = VisualSafetyPrompt.blank(64, 8, "pixel", [0.48, 0.46, 0.41], [0.27, 0.26, 0.28], quantize_8bit=True,
                                   metadata={"model": "/models/capture-model", "family": "llava"})
    vsp.values = torch.round(torch.rand(vsp.values.shape, generator=torch.Generator().manual_seed(1)) * 255) / 255
    vsp.save(path)
    return path


@pytest.fixture(scope="module")
def upstream():
    fake = Upstream()
    with ServerThread(fake.app) as server:
        fake.url = server.url
        yield fake


@pytest.fixture(scope="module")
def key_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys.txt"
    path.write_text(f"# gateway clients\n{KEY}\n\n{OTHER_KEY}\n")
    return path


def _gateway(upstream, vsp_file, **settings):
    config = ServeConfig(upstream=upstream.url + "/v1", vsp=str(vsp_file), **{"upstream_wait_s": 5, **settings})
    return ServerThread(build_app(config))


@pytest.fixture(scope="module")
def gateway(upstream, vsp_file, key_file):
    with _gateway(upstream, vsp_file, api_key_file=str(key_file), max_images=8, max_body_bytes=4 << 20,
                  request_timeout_s=1.0, max_image_pixels=4_000_000, allowed_image_hosts="localhost") as server:
        yield server


@pytest.fixture
def client(gateway):
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEY, max_retries=0, timeout=20) as client:
        yield client


@pytest.fixture(autouse=True)
def reset(upstream):
    upstream.mode = "ok"
    upstream.bodies.clear()


def _user(*parts) -> dict:
    return {"role": "user", "content": list(parts)}


def _image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


def _apply(tmp_path, vsp_file, image_bytes: bytes, name: str) -> np.ndarray:
    """`davsp apply`'s pixels for one image file."""
    source, out = tmp_path / f"{name}.in", tmp_path / f"{name}.png"
    source.write_bytes(image_bytes)
    assert main(["apply", "--vsp", str(vsp_file), "--image", str(source), "--out", str(out)]) == 0
    return np.asarray(Image.open(out))


def test_upstream_gets_davsp_apply_pixels_and_the_prefixed_question(client, upstream, vsp_file, tmp_path):
    rgba = _png(_photo(45, 29, seed=2, mode="RGBA"))  # not square, transparent: white square and white ground
    buffer = io.BytesIO()
    _photo(70, 90, seed=3).save(buffer, format="JPEG", quality=85)
    jpeg = buffer.getvalue()
    messages = [
        {"role": "system", "content": "You are helpful."},
        _user(_text("Hello")),  # before the first image: left as sent
        {"role": "assistant", "content": "Hi."},
        _user(_image(_data_url(rgba)), _text("What is in the first picture?"),
              _image(_data_url(jpeg, "image/jpeg"))),
        {"role": "assistant", "content": "Shapes."},
        _user(_text("And how do I make them?")),  # the turn answered: carries the prefix, as in training
    ]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5)
    assert reply.choices[0].message.content == "seen 6 messages"
    sent = upstream.bodies[-1]["messages"]
    assert sent[0] == messages[0] and sent[1] == messages[1] and sent[2] == messages[2] and sent[4] == messages[4]
    first, text, second = sent[3]["content"]
    assert text["text"] == with_prefix("What is in the first picture?", SAFETY_PREFIX)
    assert sent[5]["content"][0]["text"] == SAFETY_PREFIX + "And how do I make them?"
    for part, original, name in ((first, rgba, "rgba"), (second, jpeg, "jpeg")):
        assert part["image_url"]["url"].startswith("data:image/png;base64,")
        image_format, pixels = _pixels(part["image_url"]["url"])
        expected = _apply(tmp_path, vsp_file, original, name)
        assert image_format == "PNG" and pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
        assert np.array_equal(pixels, expected)  # bit for bit


def test_an_image_without_text_gets_the_prefix_as_its_text(client, upstream):
    client.chat.completions.create(model=MODEL, messages=[_user(_image(_data_url(_png(_photo(9, 9)))))])
    assert upstream.bodies[-1]["messages"][0]["content"][1] == {"type": "text", "text": SAFETY_PREFIX}


def test_text_only_requests_pass_unchanged(client, upstream):
    messages = [{"role": "user", "content": "How are you?"}]
    client.chat.completions.create(model=MODEL, messages=messages, temperature=0.3)
    assert upstream.bodies[-1]["messages"] == messages and upstream.bodies[-1]["temperature"] == 0.3


def test_streaming_is_relayed_chunk_by_chunk_and_intact(client, upstream, gateway):
    messages = [_user(_image(_data_url(_png(_photo(20, 20)))), _text("Describe."))]
    stream = client.chat.completions.create(model=MODEL, messages=messages, stream=True)
    assert [chunk.choices[0].delta.content for chunk in stream] == STREAM_PIECES
    assert upstream.bodies[-1]["stream"] is True
    raw = httpx.post(gateway.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                     json={"model": MODEL, "messages": messages, "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream") and raw.content == upstream.stream_bytes


def test_api_keys_are_required_and_any_listed_key_works(gateway, upstream):
    messages = [{"role": "user", "content": "hi"}]
    for key in ("", "sk-wrong", KEY + "x"):
        with openai.OpenAI(base_url=gateway.url + "/v1", api_key=key or "none", max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError):
                bad.chat.completions.create(model=MODEL, messages=messages)
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key=OTHER_KEY, max_retries=0) as good:
        assert good.models.list().data[0].id == MODEL
    assert httpx.get(gateway.url + "/metrics").status_code == 401
    assert httpx.get(gateway.url + "/healthz").json()["status"] == "ok"  # open, for load balancers
    assert len(upstream.bodies) == 0


def test_without_keys_only_loopback_is_served(upstream, vsp_file):
    with pytest.raises(DavspError, match="loopback only"):
        build_app(ServeConfig(upstream=upstream.url + "/v1", vsp=str(vsp_file), host="0.0.0.0"))


def _status(gateway, body: bytes | str, content_type: str = "application/json") -> tuple[int, dict]:
    response = httpx.post(gateway.url + "/v1/chat/completions", content=body, timeout=20,
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": content_type})
    return response.status_code, response.json()


def _request(*parts) -> str:
    return json.dumps({"model": MODEL, "messages": [_user(*parts)]})


BAD_REQUESTS = {
    "malformed JSON": ('{"model": "x", "messages": [', "application/json", 400, "invalid_json"),
    "not an object": ("[1, 2]", "application/json", 400, "invalid_json"),
    "no messages": (json.dumps({"model": MODEL}), "application/json", 400, "invalid_messages"),
    "form content type": (_request(_text("hi")), "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
    "text content type": (_request(_text("hi")), "text/plain", 415, "unsupported_media_type"),
    "not an image": (_request(_image(_data_url(b"%PDF-1.4 not an image"))), "application/json", 400, "invalid_image"),
    "truncated PNG": (_request(_image(_data_url(_png(_photo(64, 64))[:400]))), "application/json", 400, "invalid_image"),
    "bad base64": (_request(_image("data:image/png;base64,@@@@")), "application/json", 400, "invalid_image"),
    "not a data URL": (_request(_image("data:text/plain,hello")), "application/json", 400, "invalid_image"),
    "bomb": (_request(_image(_data_url(_huge_png_header(20000, 20000)))), "application/json", 413, "image_too_large"),
    "100 images": (_request(*[_image(_data_url(_png(_photo(4, 4))))] * 100), "application/json", 413,
                   "too_many_images"),
    "other media": (_request({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}),
                    "application/json", 400, "unsupported_content"),
    "remote URL": (_request(_image("http://169.254.169.254/latest/meta-data.png")), "application/json", 400,
                   "image_url_refused"),
    "file URL": (_request(_image("file:///etc/passwd")), "application/json", 400, "invalid_image"),
    "other model": (json.dumps({"model": "gpt-4o", "messages": [_user(_text("hi"))]}), "application/json", 404,
                    "model_not_found"),
    "body too large": (_request(_text("x" * (5 << 20))), "application/json", 413, "request_too_large"),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_each_bad_request_gets_its_status_and_the_server_keeps_serving(gateway, client, upstream, name):
    body, content_type, status, code = BAD_REQUESTS[name]
    got, payload = _status(gateway, body, content_type)
    assert (got, payload["error"]["code"]) == (status, code) and payload["error"]["message"]
    assert upstream.bodies == []  # nothing reached the model
    assert client.chat.completions.create(model=MODEL, messages=[_user(_text("still there?"))]).choices


@pytest.mark.parametrize("mode, status, error", [("garbage", 502, openai.InternalServerError),
                                                 ("500", 502, openai.InternalServerError),
                                                 ("slow", 504, openai.InternalServerError),
                                                 ("400", 400, openai.BadRequestError)])
def test_upstream_failures_are_answered_with_their_status(client, upstream, mode, status, error):
    upstream.mode = mode
    with pytest.raises(error) as caught:
        client.chat.completions.create(model=MODEL, messages=[_user(_text("hi"))])
    assert caught.value.status_code == status
    upstream.mode = "ok"
    assert client.chat.completions.create(model=MODEL, messages=[_user(_text("hi"))]).choices


def test_an_upstream_that_goes_down_is_502_and_a_missing_one_stops_the_start(vsp_file):
    fake = Upstream()
    upstream_server = ServerThread(fake.app).__enter__()
    fake.url = upstream_server.url
    with _gateway(fake, vsp_file) as gateway:
        upstream_server.stop()
        with openai.OpenAI(base_url=gateway.url + "/v1", api_key="local", max_retries=0) as client:
            with pytest.raises(openai.InternalServerError) as caught:
                client.chat.completions.create(model=MODEL, messages=[_user(_text("hi"))])
            assert caught.value.status_code == 502
        assert httpx.get(gateway.url + "/healthz").status_code == 200
    with pytest.raises(DavspError, match="no model list"):
        _gateway(fake, vsp_file, upstream_wait_s=0.3).__enter__()


def test_too_many_requests_in_flight_get_429(upstream, vsp_file):
    upstream.mode = "slow"
    with _gateway(upstream, vsp_file, max_in_flight=1) as gateway:
        with openai.OpenAI(base_url=gateway.url + "/v1", api_key="local", max_retries=0, timeout=20) as client:
            def ask(_):
                try:
                    return client.chat.completions.create(model=MODEL, messages=[_user(_text("hi"))]).choices[0]
                except openai.RateLimitError as exc:
                    return exc.status_code
            with ThreadPoolExecutor(3) as pool:
                results = list(pool.map(ask, range(3)))
    assert results.count(429) >= 1 and any(r != 429 for r in results)


def test_a_vsp_for_another_model_is_refused_unless_forced(upstream, tmp_path):
    other = tmp_path / "other.safetensors"
    vsp = VisualSafetyPrompt.blank(64, 8, "pixel", [0.5] * 3, [0.5] * 3, metadata={"model": "llava-hf/llava-1.5-7b-hf"})
    vsp.save(other)
    with pytest.raises(DavspError, match="does not fit the upstream.*llava-1.5-7b-hf.*org/capture-model"):
        _gateway(upstream, other).__enter__()
    with _gateway(upstream, other, allow_model_mismatch=True) as gateway:
        with openai.OpenAI(base_url=gateway.url + "/v1", api_key="local", max_retries=0) as client:
            assert client.chat.completions.create(model="anything", messages=[_user(_text("hi"))]).choices


def test_allowed_hosts_are_fetched_and_framed_others_refused(client, upstream, vsp_file, tmp_path):
    local = upstream.url.replace("127.0.0.1", "localhost")
    client.chat.completions.create(model=MODEL, messages=[_user(_image(local + "/img.png"), _text("Describe."))])
    image_format, pixels = _pixels(upstream.bodies[-1]["messages"][0]["content"][0]["image_url"]["url"])
    assert image_format == "PNG" and np.array_equal(pixels, _apply(tmp_path, vsp_file, _png(_photo(40, 30)), "fetched"))
    with pytest.raises(openai.BadRequestError, match="not allowed"):
        client.chat.completions.create(model=MODEL, messages=[_user(_image(upstream.url + "/img.png"))])


def test_metrics_and_access_logs_count_without_images_or_keys(client, gateway, caplog):
    with caplog.at_level(logging.INFO, logger="davsp.serve.access"):
        client.chat.completions.create(model=MODEL, messages=[_user(_image(_data_url(_png(_photo(8, 8)))))])
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=MODEL, messages=[_user(_image("data:image/png;base64,@@"))])
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "davsp.serve.access"]
    assert [(line["status"], line["images"], line["error"]) for line in lines[-2:]] == [
        (200, 1, None), (400, 1, "invalid_image")]
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert KEY not in logged and "base64" not in logged
    metrics = httpx.get(gateway.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    framed = next(line for line in metrics.splitlines() if line.startswith("davsp_serve_images_framed_total"))
    assert float(framed.split()[-1]) >= 1
    assert 'davsp_serve_requests_total{path="/v1/chat/completions",status="400"}' in metrics


def test_shutdown_lets_a_request_in_flight_finish(upstream, vsp_file):
    upstream.mode = "slow"
    server = _gateway(upstream, vsp_file).__enter__()
    with openai.OpenAI(base_url=server.url + "/v1", api_key="local", max_retries=0, timeout=20) as client:
        answers = []
        worker = threading.Thread(target=lambda: answers.append(
            client.chat.completions.create(model=MODEL, messages=[_user(_text("hi"))]).choices[0].message.content))
        worker.start()
        time.sleep(0.5)  # the request is waiting on the slow upstream
        server.stop()
        worker.join(10)
    assert answers == ["seen 1 messages"]


def test_settings_come_from_yaml_then_environment_then_flags(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("upstream: http://vllm:8000/v1\ndefense: prefix\nmax_images: 3\nallowed_image_hosts: [a.example, B.example]\n")
    env = {"DAVSP_SERVE_MAX_IMAGES": "5", "DAVSP_SERVE_PREFIX_TEXT_ONLY": "true"}
    config = ServeConfig.load(path, env=env, max_images=None, port=9000)
    assert (config.upstream, config.max_images, config.prefix_text_only, config.port) == (
        "http://vllm:8000/v1", 5, True, 9000)
    assert config.image_hosts == {"a.example", "b.example"}
    assert ServeConfig.load(path, env=env, max_images=7).max_images == 7
    for bad, message in (({"DAVSP_SERVE_MAX_IMAGES": "many"}, "DAVSP_SERVE_MAX_IMAGES"), ({"DAVSP_SERVE_DEFENSE": "vsp"}, "--vsp FILE")):
        with pytest.raises(DavspError, match=message):
            ServeConfig.load(path, env=bad)
    with pytest.raises(DavspError, match="exactly one of --upstream"):
        ServeConfig(upstream="http://a/v1", model="m", defense="none")


def test_cli_errors_are_one_line(capsys, tmp_path):
    assert main(["serve", "--upstream", "http://127.0.0.1:9/v1", "--defense", "davsp"]) == 2
    assert "give --vsp FILE" in capsys.readouterr().err


def test_kept_alive_connections_answer_without_a_delayed_ack_stall():
    # A listening socket made with proto 0 gives accepted sockets asyncio will not set TCP_NODELAY on;
    # then every response on a kept-alive connection waits ~40 ms for the client's delayed ACK.
    async def ok(request: Request):
        return JSONResponse({"n": len(await request.body())})

    with ServerThread(Starlette(routes=[Route("/", ok, methods=["POST"])])) as server, httpx.Client() as http:
        assert server.sock.proto == socket.IPPROTO_TCP
        seconds = []
        for _ in range(10):
            started = time.perf_counter()
            assert http.post(server.url, content=b"x" * 1500).json() == {"n": 1500}
            seconds.append(time.perf_counter() - started)
    assert min(seconds[1:]) < 0.02, seconds  # with the stall, none is under 40 ms


@pytest.mark.parametrize("shape", [(336, 336, 3), (7, 5, 3)])
def test_the_gateways_png_decodes_to_its_pixels_at_every_level(shape):
    from davsp.serve.content import png_bytes

    pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    smooth = np.broadcast_to(np.arange(shape[1], dtype=np.uint8)[None, :, None], shape)
    for level in (0, 1, 9):
        decoded = Image.open(io.BytesIO(png_bytes(pixels, level)))
        assert decoded.format == "PNG" and decoded.mode == "RGB" and np.array_equal(np.asarray(decoded), pixels)
    assert len(png_bytes(smooth, 9)) < len(png_bytes(smooth, 0))


def test_the_relayed_body_is_the_requests_json():
    from davsp.serve.upstream import request_json

    png = "data:image/png;base64," + base64.b64encode(bytes(range(256)) * 40).decode()
    request = {"model": "m", "stream": False, "messages": [
        {"role": "system", "content": "be brief \u00e9 \"quoted\""},
        {"role": "user", "content": [{"type": "text", "text": 'davsp-image-0 "x" \\ \u4f60'},
                                     {"type": "image_url", "image_url": {"url": png, "detail": "high"}},
                                     {"type": "image_url", "image_url": {"url": 'data:image/png;base64,"odd\\'}}]},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png}}]}]}
    before = json.dumps(request)
    assert request_json(request) == json.dumps(request, ensure_ascii=False).encode("utf-8")
    assert json.dumps(request) == before  # the request itself is left as it was
