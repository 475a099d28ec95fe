"""Model-family adapters behind one Protocol, found from the model's config."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import DavspError
from .base import Adapter, Batch

# family name -> "module:Class"; imported lazily so one family's deps never slow another's
_REGISTRY: dict[str, str] = {
    "llava": "davsp.adapters.llava:LlavaAdapter",
    "qwen2_vl": "davsp.adapters.qwen2vl:Qwen2VLAdapter",
}


def _adapter_classes():
    import importlib

    for name, target in _REGISTRY.items():
        module_name, cls_name = target.split(":")
        yield name, getattr(importlib.import_module(module_name), cls_name)


def _read_config(path: str):
    from transformers import AutoConfig

    local = Path(path)
    if local.exists() and not (local / "config.json").is_file():
        raise DavspError(f"{path}: not a model directory (no config.json)")
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DavspError(f"{path}: cannot read model config ({first_line})") from None


def adapter_class_for(path: str):
    config = _read_config(path)
    for _, cls in _adapter_classes():
        if cls.handles(config):
            return cls
    arch = ", ".join(getattr(config, "architectures", None) or [config.model_type])
    raise DavspError(
        f"{path}: no davsp adapter for model type '{config.model_type}' ({arch}); "
        f"supported families: {', '.join(_REGISTRY)}"
    )


def load_adapter(path: str, *, device: str = "cpu", dtype: torch.dtype | str = torch.float32) -> Adapter:
    """Load a model (hub id or local directory) through `from_pretrained` with the right adapter."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return adapter_class_for(path).load(path, device=device, dtype=dtype)


__all__ = ["Adapter", "Batch", "adapter_class_for", "load_adapter"]
