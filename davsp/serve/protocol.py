"""The OpenAI Chat Completions shapes the gateway answers with: errors, completions and stream chunks."""

from __future__ import annotations

import json
import time
import uuid

from starlette.responses import JSONResponse

# status -> OpenAI error type (the official clients map the status to an exception class)
_ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error",
    413: "invalid_request_error", 415: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
    502: "upstream_error", 503: "server_error", 504: "upstream_timeout",
}


class ApiError(Exception):
    """A request answered with an error: status, a one-line message, and a machine-readable code."""

    def __init__(self, status: int, message: str, code: str, *, param: str | None = None,
                 retry_after_s: int | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.retry_after_s = retry_after_s

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else None
        return JSONResponse(error_body(self.status, self.message, self.code, self.param), self.status, headers=headers)


def error_body(status: int, message: str, code: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def completion(model: str, content: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "id": completion_id(), "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def stream_events(model: str, content: str, finish_reason: str, prompt_tokens: int, completion_tokens: int,
                  include_usage: bool) -> list[bytes]:
    """A finished answer as the SSE events of a stream: role, content, finish (, usage), [DONE]."""
    head = {"id": completion_id(), "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
    deltas = [({"role": "assistant", "content": ""}, None), ({"content": content}, None), ({}, finish_reason)]
    chunks = [{**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]} for delta, finish in deltas]
    if include_usage:
        chunks.append({**head, "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
    return [sse(chunk) for chunk in chunks] + [b"data: [DONE]\n\n"]


def sse(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode("utf-8") + b"\n\n"
