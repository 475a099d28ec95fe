"""Adapters are found without a central table: the files in davsp/adapters/, and installed plugins."""

import importlib
import json
import shutil

import pytest

from davsp.adapters import _builtin_modules, adapter_class_for, load_adapter
from davsp.errors import DavspError

PLUGIN = '''
from davsp.adapters.llava import LlavaAdapter


class PluginLlavaAdapter(LlavaAdapter):
    """A family added from one file: a LLaVA variant that asks every question in capitals."""

    family = "plugin_llava"

    @classmethod
    def handles(cls, config) -> bool:
        return getattr(config, "plugin_marker", None) == "yes"

    def prompt_text(self, question: str) -> str:
        return super().prompt_text(question.upper())
'''


def test_builtin_families_are_the_files_in_the_folder():
    assert set(_builtin_modules()) == {"davsp.adapters.llava", "davsp.adapters.qwen2vl"}


def test_a_family_added_from_one_installed_file(tmp_path, tiny_llava_path, monkeypatch):
    (tmp_path / "plugin_family.py").write_text(PLUGIN)
    dist = tmp_path / "plugin_family-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: plugin-family\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[davsp.adapters]\nplugin_llava = plugin_family:PluginLlavaAdapter\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()

    model = tmp_path / "model"
    shutil.copytree(tiny_llava_path, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "plugin_marker": "yes"}))

    adapter = load_adapter(str(model))
    assert type(adapter).__name__ == "PluginLlavaAdapter" and adapter.family == "plugin_llava"
    assert "WHAT IS SHOWN" in adapter.prompt_text("what is shown")
    assert adapter_class_for(str(tiny_llava_path)).family == "llava"  # the plain model keeps the built-in


def test_an_unknown_model_type_names_the_families(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(DavspError, match=r"no davsp adapter for model type 'bert'.*supported families: llava, qwen2_vl"):
        adapter_class_for(str(tmp_path))
