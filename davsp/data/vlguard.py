"""VLGuard (Zong et al., ICML 2024) in the layout of its Hugging Face release.

    ROOT/test.json, ROOT/train.json   lists of {id, image, safe, instr-resp, ...}
    ROOT/test/<image>, ROOT/train/<image>   (test.zip / train.zip unpacked; `image` is relative)

An unsafe image (`safe: false`, with harmful_category/harmful_subcategory) carries one
{"instruction", "response"}; a safe image carries a {"safe_instruction", "response"} and an
{"unsafe_instruction", "response"}. That gives the three evaluation subsets of upstream:
`unsafes` (unsafe image), `safe_unsafes` (safe image, unsafe question) and `safe_safes`
(safe image, safe question: the benign set for over-refusal).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DavspError
from ._files import choose, read_json, text_field
from .records import Record

BENCHMARK = "vlguard"
SUBSETS = ("unsafes", "safe_unsafes", "safe_safes")
SPLITS = ("test", "train")
_INSTRUCTION_KEY = {"unsafes": "instruction", "safe_unsafes": "unsafe_instruction", "safe_safes": "safe_instruction"}


def load_vlguard(root: str | Path, *, split: str | None = None, subset=None) -> list[Record]:
    """Records with id `{VLGuard id}/{subset}`, subset by subset in file order.

    answer = VLGuard's reference response; category = harmful_category (unsafe images only).
    extra: subset, image_safe, query_safe (true only in safe_safes), harmful_subcategory.
    """
    root = Path(root).resolve()
    split = split or "test"
    if split not in SPLITS:
        raise DavspError(f"VLGuard has the official splits {', '.join(SPLITS)}, not {split!r}")
    path = root / f"{split}.json"
    entries = read_json(path, f"VLGuard {split} metadata", list)
    # the released zip unpacks to a folder named after the split; also accept images beside the json
    image_dir = root / split if (root / split).is_dir() else root
    return [
        record
        for chosen in choose(subset, SUBSETS, "VLGuard subset")
        for number, entry in enumerate(entries)
        if (record := _record(entry, chosen, image_dir, f"{path}: entry {number}")) is not None
    ]


def _record(entry, subset: str, image_dir: Path, where: str) -> Record | None:
    if not isinstance(entry, dict) or not isinstance(entry.get("safe"), bool):
        raise DavspError(f"{where}: expected an object with a boolean 'safe'")
    if entry["safe"] == (subset == "unsafes"):
        return None
    entry_id = text_field(entry, "id", where)
    pairs = entry.get("instr-resp")
    if not isinstance(pairs, list):
        raise DavspError(f"{where} (id {entry_id!r}): 'instr-resp' must be a list")
    key = _INSTRUCTION_KEY[subset]
    pair = next((p for p in pairs if isinstance(p, dict) and key in p), None)
    if pair is None:
        raise DavspError(f"{where} (id {entry_id!r}): no {key!r} in 'instr-resp' (needed for subset {subset})")
    return Record(
        id=f"{entry_id}/{subset}",
        image=image_dir / text_field(entry, "image", where),
        question=text_field(pair, key, where),
        answer=pair.get("response"),
        category=entry.get("harmful_category"),
        benchmark=BENCHMARK,
        extra={
            "subset": subset,
            "image_safe": entry["safe"],
            "query_safe": subset == "safe_safes",
            "harmful_subcategory": entry.get("harmful_subcategory"),
        },
    )

