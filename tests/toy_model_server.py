"""`davsp serve --model` on the shipped toy model in a subprocess, and one chat question about an image:
shared by the serve and endpoint tests."""

from __future__ import annotations

import base64
import os
import queue
import subprocess
import sys
import threading
import time

import pytest

from davsp.toy import MODEL_DIR

START_TIMEOUT_S = 120
READY = "listening on"


class ToyModelServer:
    """Starts at once (the model loads while a test prepares); `wait_ready()` returns it with `url` and `port` set.
    `port` 0 lets the OS choose; a given port restarts a killed server at the same address."""

    def __init__(self, port: int = 0, *, batch_size: int = 8):
        command = [sys.executable, "-m", "davsp", "serve", "--model", str(MODEL_DIR), "--defense", "none",
                   "--port", str(port), "--device", "cpu", "--batch-size", str(batch_size), "--log-level", "warning"]
        # one torch thread: with the test's own process computing beside it, two threads each thrash two cores
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self._lines.put(line) for line in self.process.stderr], daemon=True).start()
        self.url: str | None = None
        self.port: int | None = None

    def wait_ready(self) -> "ToyModelServer":
        deadline = time.monotonic() + START_TIMEOUT_S
        seen: list[str] = []
        while self.url is None:
            try:
                line = self._lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                pytest.fail(f"davsp serve did not start within {START_TIMEOUT_S}s: {seen[-5:]}")
            seen.append(line)
            if READY in line:
                self.url = line.split(READY)[1].strip()
                self.port = int(self.url.rsplit(":", 1)[1])
        return self

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)

    def stop(self) -> None:
        """As an operator would: SIGTERM, then SIGKILL if it does not exit."""
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.kill()


def ask_about_image(client, record, max_tokens: int, *, stream: bool = False) -> str:
    """The record's image (as the PNG file's bytes) and question in one user message, through the `openai` client."""
    image = "data:image/png;base64," + base64.b64encode(record.image.read_bytes()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                             {"type": "text", "text": record.question}]}]
    if stream:
        chunks = client.chat.completions.create(model=str(MODEL_DIR), messages=messages, max_tokens=max_tokens,
                                                stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reply = client.chat.completions.create(model=str(MODEL_DIR), messages=messages, max_tokens=max_tokens)
    return reply.choices[0].message.content
