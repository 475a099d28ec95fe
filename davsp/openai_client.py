"""One HTTP client for every OpenAI-compatible chat-completions call (judges now; serving later).

`ChatClient(url).chat(request)` posts one chat-completions request (a dict: model, messages, ...)
and returns the parsed reply. What it guarantees, whatever the server does:

- **Credentials stay at the URL given.** The API key is read from an environment variable at each
  request and sent only in the Authorization header to that URL. Redirects are never followed: a
  3xx answer is a failure, so the key cannot be forwarded to another origin and an answer from
  elsewhere is never taken. The key is not stored on the client and is scrubbed from every
  message the client logs or raises.
- **An overall deadline per attempt** (`timeout_s`): connecting, sending and reading the whole
  reply, headers included, must finish within it. A server that drips bytes cannot hold a call
  longer, because the attempt runs under an asyncio deadline that cancels it wherever it waits,
  not under a per-read timeout that each byte resets.
- **A reply size cap** (`max_reply_bytes`, decompressed): a larger reply is a failure, read no
  further than the cap, never returned.
- **Bounded retries** with exponential backoff and jitter on connection errors, deadline misses,
  malformed replies, 408, 409, 425, 429 and 5xx; Retry-After (seconds or an HTTP date) is honoured
  up to `max_retry_after_s`. Other statuses (401, 404, ...), redirects and oversized replies fail
  at once.

A call that fails for good raises `CallFailed`, with a one-line reason and without the key.

The requests run on an event loop in a background thread owned by the client, so threads of the
caller can share one client and its connection pool; `close()` (or garbage collection) ends it.

`ChatRelay` is the counterpart for a server relaying requests from its own event loop (`davsp serve`):
the same key, redirect, deadline and size guarantees, no retries, and answers streamed chunk by chunk.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import random
import re
import threading
import time
import weakref
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from .errors import DavspError

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
MAX_BACKOFF_S = 60.0
# A chat reply of a few thousand tokens is tens of KB; 1 MiB leaves room for logprobs and long outputs.
DEFAULT_MAX_REPLY_BYTES = 1 << 20


class CallFailed(Exception):
    """A request that failed for good (after retries, or at once where retrying cannot help)."""


class _Retryable(Exception):
    """One attempt failed in a way that another attempt may not."""

    def __init__(self, problem: str, retry_after: float | None = None):
        super().__init__(problem)
        self.retry_after = retry_after


@dataclass(frozen=True)
class ChatReply:
    content: str  # choices[0].message.content
    payload: dict  # the whole JSON reply (id, usage, ...)


def chat_completions_url(url: str, flag: str) -> str:
    """Accept a base URL (".../v1") or the full ".../chat/completions" URL; `flag` names the option
    the URL came from, for the error message."""
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise DavspError(f"{flag} {url!r}: expected an http(s) URL such as https://api.openai.com/v1")
    if parts.username is not None or parts.password is not None:
        raise DavspError(f"{flag}: remove the user:password@ part of the URL; the API key goes in --api-key-env")
    url = url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else "a relative location"


class _LoopThread:
    """An event loop running on a daemon thread; sync callers hand it coroutines to run."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="davsp-http", daemon=True)
        self.thread.start()

    def run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def stop(self, http: httpx.AsyncClient) -> None:
        if threading.current_thread() is self.thread:  # the client's last reference went away on the loop itself
            self.loop.create_task(http.aclose()).add_done_callback(lambda _: self.loop.stop())
        elif not self.loop.is_closed():
            self.run(http.aclose())
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join()
            self.loop.close()


class ChatClient:
    """Post chat-completions requests to one OpenAI-compatible endpoint (see the module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        api_key_env: str = "OPENAI_API_KEY",  # "" for servers without authentication
        timeout_s: float = 60.0,
        max_retries: int = 5,
        backoff_s: float = 1.0,
        max_retry_after_s: float = MAX_BACKOFF_S,
        max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES,
        max_connections: int = 8,
        url_flag: str = "url",  # the option the URL came from, named in the error for a bad URL
    ):
        if timeout_s <= 0 or max_retries < 0 or backoff_s < 0 or max_reply_bytes < 1 or max_connections < 1:
            raise DavspError(
                f"invalid HTTP client settings: timeout_s={timeout_s} (> 0), max_retries={max_retries} (>= 0), "
                f"backoff_s={backoff_s} (>= 0), max_reply_bytes={max_reply_bytes} (>= 1), "
                f"max_connections={max_connections} (>= 1)"
            )
        if api_key_env and not os.environ.get(api_key_env):
            raise DavspError(
                f"environment variable {api_key_env} is not set: export the API key there, "
                "or pass --api-key-env '' for an endpoint without authentication"
            )
        self.url = chat_completions_url(url, url_flag)
        # the same server's completions endpoint (a raw prompt, for classifiers without a chat template)
        self.completions_url = self.url.removesuffix("/chat/completions") + "/completions"
        self.api_key_env = api_key_env
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_retry_after_s = max_retry_after_s
        self.max_reply_bytes = max_reply_bytes
        self.stats = {"requests": 0, "retries": 0}  # updated on the loop thread only
        self._max_connections = max_connections
        self._started = threading.Lock()
        self._runner: _LoopThread | None = None
        self._http: httpx.AsyncClient | None = None

    def __repr__(self) -> str:
        return f"ChatClient({self.url!r}, api_key_env={self.api_key_env!r}, timeout_s={self.timeout_s})"

    # ---- public, synchronous -------------------------------------------------------------------

    def chat(self, request: dict) -> ChatReply:
        """The reply to one chat-completions request; CallFailed when none could be had."""
        body = json.dumps(request, ensure_ascii=False).encode("utf-8")
        return self._start().run(self._chat(body))

    def complete(self, request: dict) -> ChatReply:
        """The reply to one completions request (model, prompt, ...) at the sibling `/completions`
        URL, with the same guarantees; `content` is choices[0].text."""
        body = json.dumps(request, ensure_ascii=False).encode("utf-8")
        return self._start().run(self._chat(body, self.completions_url, _parse_completion))

    def close(self) -> None:
        """End the background loop and its connections; a later call starts them again."""
        with self._started:
            if self._runner is not None:
                self._finalizer()
                self._runner = None

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> _LoopThread:
        with self._started:
            if self._runner is None:
                self._runner = _LoopThread()
                # follow_redirects=False: a redirect is refused (see _attempt), never followed with the key
                self._http = httpx.AsyncClient(
                    follow_redirects=False,
                    timeout=httpx.Timeout(self.timeout_s),
                    limits=httpx.Limits(max_connections=self._max_connections),
                )
                self._finalizer = weakref.finalize(self, self._runner.stop, self._http)
            return self._runner

    # ---- on the loop thread --------------------------------------------------------------------

    async def _chat(self, body: bytes, url: str | None = None, parse=None) -> ChatReply:
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            self.stats["requests"] += 1
            try:
                return await self._attempt(body, url or self.url, parse or _parse_reply)
            except _Retryable as failure:
                problem, retry_after = self._redact(str(failure)), failure.retry_after
            if attempt == self.max_retries:
                raise CallFailed(f"{problem} (gave up after {attempts} attempts)")
            self.stats["retries"] += 1
            if retry_after is not None:
                delay = min(retry_after, self.max_retry_after_s)
            else:
                delay = min(self.backoff_s * 2**attempt * (1 + random.random() / 4), MAX_BACKOFF_S)
            log.warning("chat request to %s: %s; retry %d/%d in %.1fs", self.url, problem, attempt + 1,
                        self.max_retries, delay)  # fmt: skip
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _attempt(self, body: bytes, url: str, parse) -> ChatReply:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key_env:
            headers["Authorization"] = f"Bearer {os.environ.get(self.api_key_env, '')}"
        try:
            async with asyncio.timeout(self.timeout_s):
                async with self._http.stream("POST", url, content=body, headers=headers) as response:
                    status = response.status_code
                    if 300 <= status < 400:
                        where = self._redact(_origin(response.headers.get("Location", "")))
                        raise CallFailed(
                            f"HTTP {status} redirect to {where} not followed (the API key is only sent to the URL "
                            "given); give the final chat-completions URL instead"
                        )
                    data = await self._read_capped(response)
        except TimeoutError:
            raise _Retryable(f"no complete reply within the {self.timeout_s:g}s deadline") from None
        except httpx.HTTPError as exc:  # connection refused or reset, protocol errors, httpx's own timeouts
            raise _Retryable(self._redact(f"{type(exc).__name__}: {exc}")) from None
        if status in RETRY_STATUS:
            raise _Retryable(f"HTTP {status}", _retry_after(response.headers.get("Retry-After")))
        if status >= 400:
            detail = " ".join(data[:300].decode("utf-8", "replace").split())
            raise CallFailed(self._redact(f"HTTP {status} {detail}".strip()))
        return parse(data)

    async def _read_capped(self, response: httpx.Response) -> bytes:
        too_big = f"reply larger than the {self.max_reply_bytes}-byte cap"
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > self.max_reply_bytes:
            raise CallFailed(f"{too_big} ({declared} bytes declared)")
        chunks, size = [], 0
        async for chunk in response.aiter_bytes():  # decompressed, so a gzip bomb is capped too
            size += len(chunk)
            if size > self.max_reply_bytes:
                raise CallFailed(too_big)
            chunks.append(chunk)
        return b"".join(chunks)

    def _redact(self, text: str) -> str:
        key = os.environ.get(self.api_key_env, "") if self.api_key_env else ""
        return text.replace(key, "***") if key else text


def _parse_reply(data: bytes, path: tuple = ("message", "content")) -> ChatReply:
    """A 2xx body as a ChatReply; a body of another shape is retried like a transport error."""
    try:
        payload = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _Retryable(f"reply is not JSON ({len(data)} bytes)") from None
    try:
        content = payload["choices"][0]
        for key in path:
            content = content[key]
    except (KeyError, IndexError, TypeError):
        raise _Retryable(f"reply has no choices[0].{'.'.join(path)}") from None
    if not isinstance(content, str):
        raise _Retryable("reply content is not text")
    return ChatReply(content, payload)


def _parse_completion(data: bytes) -> ChatReply:
    return _parse_reply(data, ("text",))


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date); None if absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class UpstreamFailed(CallFailed):
    """A relayed call that got no usable answer; `timed_out` tells a missed deadline from the other failures."""

    def __init__(self, problem: str, *, timed_out: bool = False):
        super().__init__(problem)
        self.timed_out = timed_out


class RelayResponse:
    """An upstream answer whose status and headers have arrived; read its body once, whole or chunk by chunk.

    Every read waits at most until the call's deadline and stops at the size cap; the connection is
    released when the body ends, fails, or `aclose()` is called (a relay whose client went away)."""

    def __init__(self, response: httpx.Response, deadline: float, max_reply_bytes: int, redact):
        self.status = response.status_code
        self.content_type = response.headers.get("Content-Type", "")
        self.retry_after = response.headers.get("Retry-After")
        self._response = response
        self._deadline = deadline
        self._max_reply_bytes = max_reply_bytes
        self._redact = redact

    async def chunks(self):
        """The body as it arrives (decompressed); UpstreamFailed past the deadline, the cap or a broken connection."""
        declared = self._response.headers.get("Content-Length", "")
        size = 0
        try:
            if declared.isdigit() and int(declared) > self._max_reply_bytes:
                raise UpstreamFailed(f"reply larger than the {self._max_reply_bytes}-byte cap ({declared} bytes declared)")
            body = self._response.aiter_bytes()
            while True:
                try:
                    # the deadline is absolute, so each wait is bounded by what is left of it
                    async with asyncio.timeout_at(self._deadline):
                        chunk = await anext(body)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise UpstreamFailed("no complete reply within the deadline", timed_out=True) from None
                except httpx.HTTPError as exc:
                    raise UpstreamFailed(self._redact(f"{type(exc).__name__}: {exc}")) from None
                size += len(chunk)
                if size > self._max_reply_bytes:
                    raise UpstreamFailed(f"reply larger than the {self._max_reply_bytes}-byte cap")
                yield chunk
        finally:
            await self.aclose()

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    async def aclose(self) -> None:
        await self._response.aclose()


class ChatRelay:
    """Relay chat-completions requests from a server's own event loop to one OpenAI-compatible endpoint.

    The guarantees of ChatClient that a relay needs hold here too: the key (read from `api_key_env` at
    each call) goes only in the Authorization header to the URL given and is scrubbed from every error;
    redirects are never followed; each call has one overall deadline (`timeout_s`) covering connecting,
    the headers and the whole body, streamed or not; the body is capped at `max_reply_bytes`. There are
    no retries: a relay hands the upstream's answer, or its failure, to its own caller, who decides.
    Create and use it on one event loop (the server's); `aclose()` ends its connections.
    """

    # the scrubbing is ChatClient's; it reads nothing but `api_key_env`
    _redact = ChatClient._redact

    def __init__(self, url: str, *, api_key_env: str = "", timeout_s: float = 300.0,
                 max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES, max_connections: int = 64, url_flag: str = "url"):
        if timeout_s <= 0 or max_reply_bytes < 1 or max_connections < 1:
            raise DavspError(f"invalid relay settings: timeout_s={timeout_s} (> 0), max_reply_bytes={max_reply_bytes} "
                             f"(>= 1), max_connections={max_connections} (>= 1)")
        if api_key_env and not os.environ.get(api_key_env):
            raise DavspError(f"environment variable {api_key_env} is not set: export the upstream's API key there, "
                             "or leave the key variable empty for an upstream without authentication")
        self.url = chat_completions_url(url, url_flag)
        self.models_url = self.url.removesuffix("/chat/completions") + "/models"
        self.api_key_env = api_key_env
        self.timeout_s = timeout_s
        self.max_reply_bytes = max_reply_bytes
        # follow_redirects=False: a redirect is a failure (see _open), never followed with the key
        self._http = httpx.AsyncClient(follow_redirects=False, timeout=httpx.Timeout(timeout_s),
                                       limits=httpx.Limits(max_connections=max_connections,
                                                           max_keepalive_connections=max_connections))

    def __repr__(self) -> str:
        return f"ChatRelay({self.url!r}, api_key_env={self.api_key_env!r}, timeout_s={self.timeout_s})"

    async def post(self, body: bytes, *, stream: bool = False) -> RelayResponse:
        """Send one chat-completions request (JSON bytes); the answer's status and headers, its body unread."""
        accept = "text/event-stream" if stream else "application/json"
        return await self._open("POST", self.url, body, {"Content-Type": "application/json", "Accept": accept})

    async def models(self) -> dict:
        """The upstream's GET /models answer, parsed; UpstreamFailed if it is not a 2xx JSON object."""
        response = await self._open("GET", self.models_url, None, {"Accept": "application/json"})
        data = await response.read()
        if not 200 <= response.status < 300:
            raise UpstreamFailed(self._redact(f"GET {self.models_url}: HTTP {response.status}"))
        try:
            listing = json.loads(data)
        except ValueError:
            listing = None
        if not isinstance(listing, dict):
            raise UpstreamFailed(f"GET {self.models_url}: reply is not a JSON object ({len(data)} bytes)")
        return listing

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _open(self, method: str, url: str, body: bytes | None, headers: dict) -> RelayResponse:
        if self.api_key_env:
            headers["Authorization"] = f"Bearer {os.environ.get(self.api_key_env, '')}"
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                response = await self._http.send(self._http.build_request(method, url, content=body, headers=headers),
                                                 stream=True)
        except TimeoutError:
            raise UpstreamFailed(f"no answer within the {self.timeout_s:g}s deadline", timed_out=True) from None
        except httpx.HTTPError as exc:  # refused, reset, protocol errors
            raise UpstreamFailed(self._redact(f"{type(exc).__name__}: {exc}")) from None
        if 300 <= response.status_code < 400:
            await response.aclose()
            where = self._redact(_origin(response.headers.get("Location", "")))
            raise UpstreamFailed(f"HTTP {response.status_code} redirect to {where} not followed (the API key is only "
                                 "sent to the URL given); give the final URL instead")
        return RelayResponse(response, deadline, self.max_reply_bytes, self._redact)


__all__ = ["DEFAULT_MAX_REPLY_BYTES", "CallFailed", "ChatClient", "ChatRelay", "ChatReply", "RelayResponse",
           "UpstreamFailed", "chat_completions_url"]
