"""Model-family adapters behind one Protocol, found from the model's config."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import DavspError
from .base import PRECISIONS, Adapter, Batch, Precision, as_precision

ENTRY_POINT_GROUP = "davsp.adapters"  # third-party packages add families here: name = "module:Class"


def _builtin_modules() -> list[str]:
    """Every module in this folder but `base`: adding a family is adding one file here."""
    import pkgutil

    return [f"{__name__}.{m.name}" for m in pkgutil.iter_modules(__path__) if m.name != "base" and not m.ispkg]


def _adapter_classes() -> list[type]:
    """Adapter classes: installed plugins first (so one can take over a family), then the built-in files.
    A class counts as an adapter when it defines `family` and `handles` (the Protocol's lookup part)."""
    import importlib
    import inspect
    from importlib.metadata import entry_points

    found = [ep.load() for ep in entry_points(group=ENTRY_POINT_GROUP)]
    for module_name in _builtin_modules():
        module = importlib.import_module(module_name)
        found += [cls for _, cls in inspect.getmembers(module, inspect.isclass)
                  if cls.__module__ == module_name and isinstance(getattr(cls, "family", None), str)
                  and callable(getattr(cls, "handles", None))]
    return found


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
    classes = _adapter_classes()
    for cls in classes:
        if cls.handles(config):
            return cls
    arch = ", ".join(getattr(config, "architectures", None) or [config.model_type])
    raise DavspError(
        f"{path}: no davsp adapter for model type '{config.model_type}' ({arch}); "
        f"supported families: {', '.join(sorted({cls.family for cls in classes}))}"
    )


def load_adapter(path: str, *, device: str = "cpu", dtype: Precision | torch.dtype | str = torch.float32,
                 prompt_format: str | None = None, image_geometry: str = "pad") -> Adapter:
    """Load a model (hub id or local directory) through `from_pretrained` with the right adapter.

    `prompt_format`: "llava_v1" or "chat_template"; None picks the family's (llava_v1 for LLaVA-1.5, as the
    official code; the chat template for Qwen2-VL). `image_geometry`: "pad" (white square, then the model's
    resize; as published) or "processor" (the processor's own resize + centre crop; LLaVA only).

    `dtype`: one torch dtype (or its name) for the whole model, or a precision preset such as "paper"
    (fp16 language model, fp32 vision tower)."""
    return adapter_class_for(path).load(path, device=device, dtype=as_precision(dtype), prompt_format=prompt_format,
                                        image_geometry=image_geometry)


__all__ = ["PRECISIONS", "Adapter", "Batch", "Precision", "adapter_class_for", "as_precision", "load_adapter"]
