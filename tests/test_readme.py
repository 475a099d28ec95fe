"""The README's Python API example runs as printed, on the tiny LLaVA instead of the hub model."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def api_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (block,) = [b for b in blocks if "train_vsp(" in b]
    return block


def test_python_api_example_runs(tiny_llava_path, record_files, tmp_path, monkeypatch):
    code = api_example()
    swaps = {
        '"llava-hf/llava-1.5-7b-hf"': repr(str(tiny_llava_path)),
        'device="cuda", dtype="bfloat16"': 'device="cpu", dtype="float32"',
        '"harmful.jsonl"': repr(str(record_files["harmful"])),
        '"benign.jsonl"': repr(str(record_files["benign"])),
        '"test.jsonl"': repr(str(record_files["harmful_heldout"])),
        "TrainConfig(": "TrainConfig(steps=4, checkpoint_every=2, padding=4, ",  # a 32 px canvas; 4 steps do
    }
    for old, new in swaps.items():
        assert old in code, f"README example changed: {old} not found"
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    assert len(namespace["rows"]) == 6 and all(r["defense"] == "davsp" for r in namespace["rows"])
    assert (tmp_path / "runs" / "llava7b" / "vsp.safetensors").is_file()
    assert (tmp_path / "responses.jsonl").read_text().count("\n") == 6
