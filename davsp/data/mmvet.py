"""MM-Vet (Yu et al., ICML 2024) as released in mm-vet.zip.

    ROOT/mm-vet.json   {"v1_0": {"imagename", "question", "answer", "capability": [...]}, ...}
    ROOT/images/<imagename>
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DavspError
from ._files import read_json, text_field
from .records import Record

BENCHMARK = "mm-vet"


def load_mmvet(root: str | Path) -> list[Record]:
    """Records with MM-Vet's own ids (v1_0 ...), in file order.

    answer = the ground truth (may contain <AND>/<OR>); extra["capabilities"] = the
    capability list (rec, ocr, know, gen, spat, math); category = those names sorted and
    joined with "+" (MM-Vet's "capability integration").
    """
    root = Path(root).resolve()
    path = root / "mm-vet.json"
    records = []
    for key, row in read_json(path, "MM-Vet metadata", dict).items():
        where = f"{path}: item {key!r}"
        capabilities = row.get("capability") if isinstance(row, dict) else None
        if not isinstance(capabilities, list) or not capabilities or not all(isinstance(c, str) for c in capabilities):
            raise DavspError(f"{where}: 'capability' must be a non-empty list of names")
        records.append(
            Record(
                id=key,
                image=root / "images" / text_field(row, "imagename", where),
                question=text_field(row, "question", where),
                answer=text_field(row, "answer", where),
                category="+".join(sorted(capabilities)),
                benchmark=BENCHMARK,
                extra={"capabilities": capabilities},
            )
        )
    return records
