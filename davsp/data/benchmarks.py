"""Benchmark registry: load any supported benchmark from a local folder in its upstream layout.

    records = load_benchmark("mm-safetybench", "data/mm-safetybench", tiny=True, split="test")

Every loader returns `Record`s with `benchmark`, `category`, an absolute `image` path, the
`question`, the reference `answer` where the benchmark has one, and benchmark-specific
fields in `extra` (see each loader's docstring). Missing images are never dropped:
`check_benchmark` lists them, and `load_benchmark` refuses to return records whose images
are missing unless `check_images=False`.

Splits. VLGuard has official train/test files. For every other benchmark, `split` picks a
seeded train/val/test part by hashing a unit id (the question for MM-SafetyBench, so all
three image types of a question land together; the image for MME and LLaVA-Bench, whose
images carry several questions). Hashing each unit on its own, instead of shuffling the
list, keeps a unit's split the same whatever else is loaded: the tiny version's test part
is exactly the tiny questions in the full test part, so nothing trained on leaks into it.
"""

from __future__ import annotations

import difflib
import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from ..errors import DavspError
from .figstep import load_figstep
from .llavabench import load_llavabench
from .mme import load_mme
from .mmsafetybench import load_mmsafetybench
from .mmvet import load_mmvet
from .records import Record
from .vlguard import load_vlguard

SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.5, 0.1, 0.4)
SPLIT_SEED = 0


@dataclass(frozen=True)
class BenchmarkSpec:
    load: Callable[..., list[Record]]
    options: frozenset[str]  # which of tiny / image_types / subset / split the loader itself takes
    # the unit kept whole by seeded splits, independent of where ROOT is; None: official splits
    split_unit: Callable[[Record], str] | None
    count_by: tuple[str, ...] = ()  # extra fields that `check` counts besides the category


_SPECS: dict[str, BenchmarkSpec] = {
    "mm-safetybench": BenchmarkSpec(
        load_mmsafetybench,
        frozenset({"tiny", "image_types"}),
        split_unit=lambda r: f"{r.extra['scenario']}/{r.extra['question_id']}",
        count_by=("image_type",),
    ),
    "figstep": BenchmarkSpec(load_figstep, frozenset({"tiny"}), split_unit=lambda r: r.id),
    "vlguard": BenchmarkSpec(load_vlguard, frozenset({"split", "subset"}), split_unit=None, count_by=("subset",)),
    "mm-vet": BenchmarkSpec(load_mmvet, frozenset(), split_unit=lambda r: r.id),
    "mme": BenchmarkSpec(
        load_mme,
        frozenset({"subset"}),
        split_unit=lambda r: f"{r.extra['subtask']}/{r.extra['image_id']}",
        count_by=("group",),
    ),
    "llava-bench": BenchmarkSpec(load_llavabench, frozenset(), split_unit=lambda r: r.image.name),
}
BENCHMARKS: tuple[str, ...] = tuple(_SPECS)


@dataclass
class BenchmarkCheck:
    """What `davsp data check` prints: sizes, counts and every missing image."""

    benchmark: str
    root: Path
    records: int
    images: int  # distinct image files referenced
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # "category"/extra field -> value -> records
    missing: list[Path] = field(default_factory=list)  # distinct, in record order


def split_ids(ids: Iterable[str], fractions=SPLIT_FRACTIONS, seed: int = SPLIT_SEED) -> dict[str, set[str]]:
    """Assign each id to train/val/test by a seeded hash: deterministic, disjoint, and one
    id's split never depends on the other ids (sizes follow `fractions` approximately)."""
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != len(SPLITS) or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-9:
        raise DavspError(
            f"split fractions must be 3 non-negative numbers (train, val, test) summing to 1, got {fractions}"
        )
    bounds = [sum(fractions[: i + 1]) for i in range(len(SPLITS))]
    parts: dict[str, set[str]] = {name: set() for name in SPLITS}
    for unit in ids:
        digest = hashlib.sha256(f"{seed}:{unit}".encode("utf-8")).digest()
        position = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
        index = next((i for i, bound in enumerate(bounds) if position < bound), len(SPLITS) - 1)
        parts[SPLITS[index]].add(unit)
    return parts


def load_benchmark(
    name: str,
    root: str | Path,
    *,
    tiny: bool = False,
    split: str | None = None,
    image_types=None,
    subset=None,
    limit: int | None = None,
    check_images: bool = True,
) -> list[Record]:
    """Load a benchmark from `root`; with `check_images`, raise if any image is missing."""
    records = _select(name, root, tiny=tiny, split=split, image_types=image_types, subset=subset, limit=limit)
    if check_images:
        missing = _missing_images(records)
        if missing:
            shown = ", ".join(str(p) for p in missing[:3])
            raise DavspError(
                f"{name}: {len(missing)} of {len({r.image for r in records})} images not found under {root} "
                f"(first: {shown}); list them all with `davsp data check {name} {root}`"
            )
    return records


def check_benchmark(
    name: str,
    root: str | Path,
    *,
    tiny: bool = False,
    split: str | None = None,
    image_types=None,
    subset=None,
    limit: int | None = None,
) -> BenchmarkCheck:
    records = _select(name, root, tiny=tiny, split=split, image_types=image_types, subset=subset, limit=limit)
    fields = ("category",) + _SPECS[name].count_by
    counts = {
        f: dict(Counter(str(r.category if f == "category" else r.extra.get(f)) for r in records)) for f in fields
    }
    return BenchmarkCheck(
        benchmark=name,
        root=Path(root).resolve(),
        records=len(records),
        images=len({r.image for r in records}),
        counts=counts,
        missing=_missing_images(records),
    )


def _select(name: str, root, *, tiny, split, image_types, subset, limit) -> list[Record]:
    spec = _spec(name)
    given = {"tiny": tiny, "image_types": image_types, "subset": subset, "split": split}
    unsupported = [o for o, v in given.items() if v not in (None, False) and o not in spec.options | {"split"}]
    if unsupported:
        raise DavspError(f"{name}: option(s) {', '.join(unsupported)} do not apply to this benchmark")
    if not Path(root).is_dir():
        raise DavspError(f"{root}: benchmark folder not found")
    records = spec.load(root, **{o: v for o, v in given.items() if o in spec.options})
    if split is not None and spec.split_unit is not None:
        records = _in_split(records, split, spec.split_unit)
    _require_unique_ids(name, records)
    if limit is not None:
        if limit < 1:
            raise DavspError(f"limit must be a positive number of records, got {limit}")
        records = records[:limit]
    if not records:
        raise DavspError(f"{name}: no records under {root} for these options")
    return records


def _in_split(records: list[Record], split: str, unit: Callable[[Record], str]) -> list[Record]:
    if split not in SPLITS:
        raise DavspError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    keep = split_ids({unit(r) for r in records})[split]
    return [r for r in records if unit(r) in keep]


def _spec(name: str) -> BenchmarkSpec:
    if name in _SPECS:
        return _SPECS[name]
    close = difflib.get_close_matches(name.lower(), BENCHMARKS, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise DavspError(f"Unknown benchmark '{name}'.{hint} Available: {', '.join(BENCHMARKS)}")


def _require_unique_ids(name: str, records: list[Record]) -> None:
    seen: set[str] = set()
    for record in records:
        if record.id in seen:
            raise DavspError(f"{name}: duplicate record id {record.id!r}; the benchmark files list it twice")
        seen.add(record.id)


def _missing_images(records: list[Record]) -> list[Path]:
    missing = dict.fromkeys(r.image for r in records if r.image is None or not r.image.is_file())
    return list(missing)
