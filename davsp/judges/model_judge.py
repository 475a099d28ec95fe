"""What the harm-classifier judges share: one judge model, run in-process or behind an OpenAI-compatible server."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import DavspError
from ..openai_client import ChatClient


@dataclass
class ModelJudge:
    """In-process when only `model` is given (a local folder or hub id); through the server at `url` otherwise.

    Subclasses set `name` (a non-init field), `version` and `example_model`, and load the model themselves.
    """

    version: ClassVar[str]
    example_model: ClassVar[str]

    model: str
    url: str | None = None
    api_key_env: str = ""  # a self-hosted server usually has no key
    device: str | None = None  # in-process: "cuda", "cpu", ...; None: cuda when there is one
    dtype: str = "auto"  # in-process: "auto" (the checkpoint's), "bfloat16", "float16", "float32"
    timeout_s: float = 60.0
    max_retries: int = 5

    def __post_init__(self):
        if not self.model:
            raise DavspError(f"--judge {self.name} needs --judge-model: a local folder or hub id (e.g. "
                             f"{self.example_model}), or the model name the --judge-url server serves")
        self.client = (ChatClient(self.url, api_key_env=self.api_key_env, timeout_s=self.timeout_s,
                                  max_retries=self.max_retries, url_flag="--judge-url") if self.url else None)
        self._loaded = None

    def label_for(self, row: dict) -> str:
        return f"{self.name}@{self.version}/{self.model}"

    def device_and_dtype(self):
        """(device, torch dtype or "auto") for loading the model in-process."""
        import torch

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        return device, self.dtype if self.dtype == "auto" else getattr(torch, self.dtype)
