"""`davsp demo`: the whole pipeline on the shipped safety-world model, on a CPU, in minutes.

load (from_pretrained) -> harmfulness vector -> train VSPs (DAVSP and the two ablations) ->
generate on held-out splits under every defense -> refusal judge -> one table, summary.json,
an evaluation directory and the HTML report.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from .adapters import load_adapter
from .config import TrainConfig
from .errors import DavspError
from .generate import generate_responses
from .io import atomic_write_json, atomic_write_text
from .train import train_vsp
from .vector import extract_harmfulness_vector

# defense label -> (generation defense, which trained VSP it uses)
DEMO_DEFENSES = {
    "none": ("none", None),
    "prefix": ("prefix", None),
    "vsp": ("vsp", "davsp"),
    "davsp": ("davsp", "davsp"),
    "davsp-output-only": ("davsp", "output-only"),
    "davsp-additive": ("davsp", "additive"),
}
EVAL_SPLITS = ("harmful_heldout", "benign_heldout", "text_harmful")


@dataclass
class DemoConfig:
    steps: int = 300  # the paper's 1200 scaled to a 4-layer model on 48-pixel images
    seed: int = 0
    space: str = "normalized"
    max_new_tokens: int = 24
    batch_size: int = 32
    defenses: tuple[str, ...] = tuple(DEMO_DEFENSES)  # rows to run; only the VSPs they use are trained

    def training(self, **changes) -> TrainConfig:
        from .toy.world import VSP_PADDING, STEER_LAYER

        base = dict(steps=self.steps, seed=self.seed, space=self.space, padding=VSP_PADDING, layer=str(STEER_LAYER),
                    thresholds="auto", batch_size=4, checkpoint_every=max(1, self.steps // 4), device="cpu",
                    dtype="float32", refusal_answer=_refusal())
        return TrainConfig(**{**base, **changes})


def _refusal() -> str:
    from .toy.world import REFUSAL

    return REFUSAL


def _scores(rows_by_split: dict[str, list[dict]], records_by_split) -> dict[str, float]:
    from .toy.world import benign_correct

    def share(rows, predicate) -> float:
        return round(sum(1 for r in rows if predicate(r)) / max(1, len(rows)), 4)

    benign_records = {r.id: r for r in records_by_split["benign_heldout"]}
    return {
        "refusal_rate": share(rows_by_split["harmful_heldout"], lambda r: r["safe"] is True),
        "benign_accuracy": share(rows_by_split["benign_heldout"],
                                 lambda r: benign_correct(benign_records[r["id"]], r["response"])),
        "over_refusal": share(rows_by_split["benign_heldout"],
                              lambda r: r["verdict"] in ("full_refusal", "partial_refusal")),
        "text_refusal": share(rows_by_split["text_harmful"], lambda r: r["safe"] is True),
    }


def run_demo(out: str | Path, config: DemoConfig = DemoConfig(), *, model_dir: str | Path | None = None,
             progress: bool = True) -> dict:
    from .judges import get_judge, judge_responses
    from .toy import MODEL_DIR
    from .toy.world import demo_splits

    started = time.perf_counter()
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DavspError(f"{out}: demo output directory is not empty; choose a new --out")
    unknown = [d for d in config.defenses if d not in DEMO_DEFENSES]
    if unknown or not config.defenses:
        problem = f"unknown defense {unknown[0]!r}" if unknown else "no defense given"
        raise DavspError(f"--defenses: {problem}; choose from {', '.join(DEMO_DEFENSES)}")
    labels = [d for d in DEMO_DEFENSES if d in config.defenses]
    model_dir = Path(model_dir or MODEL_DIR)
    if not (model_dir / "config.json").is_file():
        raise DavspError(f"{model_dir}: the safety-world model is missing; rebuild it with `davsp toy build`")
    adapter = load_adapter(str(model_dir))  # the same from_pretrained path as a hub model
    splits = demo_splits(out / "data", seed=config.seed)

    vector = extract_harmfulness_vector(adapter, splits["harmful_train"], splits["benign_train"], batch_size=32)
    vector.save(out / "vector.safetensors")

    trainings = {
        "davsp": config.training(),
        "output-only": config.training(deep_alignment=False),
        "additive": config.training(kind="additive", space="pixel"),
    }
    needed = {DEMO_DEFENSES[label][1] for label in labels}
    vsps = {}
    for name, training in trainings.items():
        if name not in needed:
            continue
        print(f"training VSP: {name}")
        vsps[name] = train_vsp(adapter, vector, splits["harmful_train"], splits["benign_train"], training,
                               out / "runs" / name, progress=progress)

    judge = get_judge("refusal")
    summary: dict = {"refusal_rate": {}, "benign_accuracy": {}, "over_refusal": {}, "text_refusal": {}}
    all_rows: list[dict] = []
    for label in labels:
        defense, vsp_name = DEMO_DEFENSES[label]
        rows_by_split = {}
        for split in EVAL_SPLITS:
            rows = generate_responses(adapter, splits[split], defense=defense, vsp=vsps.get(vsp_name),
                                      max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
                                      progress=progress)
            rows_by_split[split] = judge_responses([{**r, "defense": label, "split": split} for r in rows], judge)
            all_rows.extend(rows_by_split[split])
        for metric, value in _scores(rows_by_split, splits).items():
            summary[metric][label] = value

    _write_outputs(out, all_rows, summary, config)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    atomic_write_json(out / "summary.json", summary)
    print(format_summary(summary))
    print(f"wrote {out / 'summary.json'} and {out / 'report.html'} ({summary['seconds']} s)")
    return summary


def _write_outputs(out: Path, rows: list[dict], summary: dict, config: DemoConfig) -> None:
    from .evaluate import SCHEMA, evaluate_rows, pick_samples, write_evaluation
    from .report import build_report

    atomic_write_text(out / "responses.judged.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    held_out = [r for r in rows if r["split"] != "text_harmful"]
    metrics = {"schema": SCHEMA, "bootstrap": {"resamples": 1000, "confidence": 0.95, "seed": config.seed},
               "results": evaluate_rows(held_out, seed=config.seed)}
    write_evaluation(out / "eval", metrics, pick_samples(held_out, per_benchmark=3, seed=config.seed))
    trained = [out / "runs" / "davsp"] if (out / "runs" / "davsp").is_dir() else []
    build_report([*trained, out / "eval"], out / "report.html")


def format_summary(summary: dict) -> str:
    metrics = ("refusal_rate", "benign_accuracy", "over_refusal", "text_refusal")
    lines = [f"{'defense':<20}" + "".join(f"{m:>17}" for m in metrics)]
    for label in summary["refusal_rate"]:
        lines.append(f"{label:<20}" + "".join(f"{summary[m][label]:>17.3f}" for m in metrics))
    return "\n".join(lines)
