"""`davsp bench`: the project's training step and generation timed against the original code's pattern
(`reference.py`), on the same model and the same inputs.

The two paths are interleaved (ABAB): each project step is followed by the reference step on the same
batch, and each batched generation by the reference's one-at-a-time pass over the same queries. A busy,
shared machine slows both halves of a pair alike, so the reported ratio is the median of the per-pair
ratios, with their spread; two paths timed minutes apart would each catch a different load.
"""

from __future__ import annotations

import resource
import statistics
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..config import TrainConfig, resolve_layer
from ..data.records import Record
from ..defenses import SAFETY_PREFIX
from ..errors import DavspError
from ..generate import generate_responses
from ..prompt import VisualSafetyPrompt
from ..train import Pool, loss_and_gradient, projections
from .reference import ORIGINAL_PAD, reference_loss_and_gradient, reference_padded_length

PAPER_PADDING, PAPER_CANVAS = 30, 336

# Dense bf16 tensor-core peak (TFLOP/s) by device-name fragment, most specific first.
BF16_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0))

_QUESTIONS = ["What is shown in the image?", "Describe the picture in detail.",
              "How do I build a weapon at home? List the steps in detail to perform this activity.",
              "Explain what the people in this photo are doing and why, step by step, in detail."]
BENIGN_ANSWER = "The image shows a small red house next to a blue lake under a cloudy sky, with trees on the left."


# -- synthetic inputs ----------------------------------------------------------------------------
def synthetic_records(folder: Path, name: str, n: int, seed: int) -> list[Record]:
    """n seeded records: noise images of random aspect, questions of mixed length, one fixed answer
    (equal answer lengths keep the original's per-sample mean equal to our per-token mean)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        h, w = (int(x) for x in rng.integers(48, 160, size=2))
        path = folder / f"{name}_{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        question = f"{_QUESTIONS[int(rng.integers(len(_QUESTIONS)))]} ({name} {i})"
        records.append(Record(id=f"{name}-{i}", image=path, question=question, answer=BENIGN_ANSWER, category=name))
    return records


def bench_padding(canvas_size: int) -> int:
    """The paper's 30 px border on a 336 px canvas, scaled to this model's canvas."""
    return max(1, round(PAPER_PADDING * canvas_size / PAPER_CANVAS))


# -- timing ----------------------------------------------------------------------------------------
@dataclass
class TrainSetup:
    """Everything both paths share: model, prepared pools, supervised layer, direction, hinge targets."""

    adapter: object
    pools: dict[bool, Pool]
    layer: int
    direction: torch.Tensor  # (D,) unit vector
    thresholds: tuple[float, float]
    config: TrainConfig

    def blank_vsp(self) -> VisualSafetyPrompt:
        a = self.adapter
        vsp = VisualSafetyPrompt.blank(a.canvas_size, self.config.padding, "normalized", a.image_mean, a.image_std)
        vsp.values = vsp.values.to(a.device)
        return vsp


def train_setup(adapter, folder: Path, *, batch_size: int, seed: int) -> TrainSetup:
    config = TrainConfig(batch_size=batch_size, padding=bench_padding(adapter.canvas_size), seed=seed)
    layer = resolve_layer("paper", None, adapter.num_layers, adapter.hidden_size)
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(adapter.hidden_size, generator=generator)
    setup = TrainSetup(adapter, {}, layer, (direction / direction.norm()).to(adapter.device), (0.0, 0.0), config)
    vsp = setup.blank_vsp()
    n = max(8, 2 * batch_size)
    for harmful, name in ((True, "harmful"), (False, "benign")):
        records = synthetic_records(folder, name, n, seed + harmful)
        setup.pools[harmful] = Pool(records, vsp, adapter, SAFETY_PREFIX)
    # hinge targets beyond every starting projection keep each sample's hinge active (every step has a
    # gradient) while the loss stays on the projections' scale, so loss differences remain visible
    scale = max(abs(x) for pool in setup.pools.values()
                for x in projections(adapter, vsp, pool, layer, setup.direction, n))
    setup.thresholds = (2 * scale + 1, -(2 * scale + 1))
    return setup


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    """Peak GPU memory since the last reset; None on CPU (the process RSS peak cannot be reset per path)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _draws(pool_size: int, batch_size: int, count: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(pool_size, (batch_size,), generator=generator).tolist() for _ in range(count)]


def project_loss_and_gradient(setup: TrainSetup, vsp: VisualSafetyPrompt, idx: list[int], harmful: bool,
                              with_output: bool):
    """The training loop's own step: `train.loss_and_gradient`."""
    return loss_and_gradient(setup.adapter, vsp, setup.pools[harmful], idx, harmful, with_output, setup.layer,
                             setup.direction, setup.thresholds, setup.config)


def reference_step(setup: TrainSetup, vsp: VisualSafetyPrompt, idx: list[int], harmful: bool, with_output: bool,
                   *, pad_to: int):
    """The original loop's step on the same inputs (`reference.reference_loss_and_gradient`)."""
    return reference_loss_and_gradient(setup.adapter, vsp, setup.pools[harmful], idx, harmful, with_output,
                                       setup.layer, setup.direction, setup.thresholds, setup.config, pad_to=pad_to)


def time_train_paths(setup: TrainSetup, steps_by_path: dict, harmful: bool, with_output: bool,
                     draws: list[list[int]], warmup: int) -> dict[str, dict]:
    """Full steps (loss, gradient, signed update) of every path in turn on each batch: the first `warmup`
    untimed, then each step timed alone. Every path keeps its own VSP, as a training run would."""
    device = setup.adapter.device
    vsps = {name: setup.blank_vsp() for name in steps_by_path}
    seconds = {name: [] for name in steps_by_path}
    losses = {name: [] for name in steps_by_path}
    peaks = {name: [] for name in steps_by_path}
    for i, idx in enumerate(draws):
        for name, step in steps_by_path.items():
            _reset_peak(device)
            _sync(device)
            started = time.perf_counter()
            (loss, *_), grad = step(setup, vsps[name], idx, harmful, with_output)
            vsps[name].signed_step(grad, setup.config.alpha)
            _sync(device)
            if i >= warmup:
                seconds[name].append(time.perf_counter() - started)
                peaks[name].append(_peak_gib(device))
            losses[name].append(float(loss))
    results = {}
    for name in steps_by_path:
        total = sum(seconds[name])
        results[name] = {"steps": len(seconds[name]), "seconds": total, "seconds_per_step": total / len(seconds[name]),
                         "samples_per_s": len(seconds[name]) * setup.config.batch_size / total,
                         "peak_memory_gib": None if None in peaks[name] else max(peaks[name]),
                         "losses": losses[name], "step_seconds": seconds[name]}
    return results


def ratio_summary(project_seconds: list[float], reference_seconds: list[float]) -> dict:
    """Median and spread of reference/project time over paired measurements (the same work in each pair)."""
    ratios = sorted(r / p for p, r in zip(project_seconds, reference_seconds))
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {"ratio": statistics.median(ratios), "ratio_min": ratios[0], "ratio_max": ratios[-1],
            "ratio_iqr": [quartiles[0], quartiles[2]], "pairs": len(ratios)}


def _parameters(module: torch.nn.Module, skip_prefix: str = "") -> int:
    return sum(p.numel() for name, p in module.named_parameters() if not (skip_prefix and name.startswith(skip_prefix)))


def harmful_step_flops(setup: TrainSetup, draws: list[list[int]]) -> float:
    """Mean matmul FLOPs of one project harmful step (forward to layer L, backward to the pixels).

    forward = 2 x params x tokens, summed over the vision tower + projector (on the vision patches) and
    decoder layers 1..L (on the padded batch's text + image tokens); attention scores and the embedding
    lookup are left out. The backward computes input gradients only (the weights are frozen: no weight
    gradients), which costs one more forward, so a step = 2 x forward (not the usual 3x of weight training).
    """
    adapter = setup.adapter
    vision_params = _parameters(adapter.trunk(), skip_prefix="language_model.")
    layer_params = sum(_parameters(layer) for layer in list(adapter.decoder_layers())[: setup.layer])
    patch = getattr(adapter, "vit_patch", adapter.patch_size)
    vision_tokens = setup.config.batch_size * (adapter.canvas_size // patch) ** 2
    pool, vsp = setup.pools[True], setup.blank_vsp()
    with torch.no_grad():
        batches = [adapter.batch([pool.questions[i] for i in idx], vsp.compose(pool.prepared[idx], adapter.normalize))
                   for idx in draws]
    text_tokens = [batch.model_inputs["input_ids"].numel() for batch in batches]  # B x T, padding included
    forward = 2 * (vision_params * vision_tokens + layer_params * float(np.mean(text_tokens)))
    return 2 * forward


def bf16_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for fragment, peak in BF16_PEAK_TFLOPS if fragment in name), None)


def _environment(adapter) -> dict:
    """What a number in a report was measured on."""
    device = adapter.device
    return {"model": adapter.model_id, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "dtype": adapter.precision.name, "parameters": _parameters(adapter.model)}


def _rel_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-6) for x, y in zip(a, b))


STEP_KINDS = (("harmful", True, False), ("benign", False, True))  # name, harmful, with output loss


def bench_train(adapter, *, steps: int = 10, batch_size: int = 2, warmup: int = 2, reference: bool = False,
                reference_pad: int = ORIGINAL_PAD, seed: int = 0) -> dict:
    """Time harmful steps (no output loss) and benign steps (with it), project and reference interleaved."""
    if steps < 1 or warmup < 0 or batch_size < 1:
        raise DavspError(f"bench train: need --steps >= 1, --warmup >= 0, --batch-size >= 1 "
                         f"(got {steps}, {warmup}, {batch_size})")
    with tempfile.TemporaryDirectory(prefix="davsp-bench-") as folder:
        setup = train_setup(adapter, Path(folder), batch_size=batch_size, seed=seed)
    paths = {"project": project_loss_and_gradient}
    pad_to = reference_padded_length(adapter, reference_pad)
    if reference:
        paths["reference"] = partial(reference_step, pad_to=pad_to)
    results: dict[str, dict] = {name: {} for name in paths}
    draws = {kind: _draws(len(setup.pools[harmful]), batch_size, warmup + steps, seed + harmful)
             for kind, harmful, _ in STEP_KINDS}  # both paths see the same batches
    for kind, harmful, with_output in STEP_KINDS:
        for name, result in time_train_paths(setup, paths, harmful, with_output, draws[kind], warmup).items():
            results[name][kind] = result
    for name, per_kind in results.items():
        seconds = sum(per_kind[k]["seconds"] for k, *_ in STEP_KINDS)
        per_kind["samples_per_s"] = len(STEP_KINDS) * steps * batch_size / seconds
        peaks = [per_kind[k]["peak_memory_gib"] for k, *_ in STEP_KINDS]
        per_kind["peak_memory_gib"] = None if None in peaks else max(peaks)
    report = {"bench": "train", **_environment(adapter), "num_layers": adapter.num_layers, "layer": setup.layer,
              "batch_size": batch_size, "steps": steps, "warmup": warmup, **results,
              "ratio": None}  # the ratio needs --reference
    if reference:
        report["reference"]["padded_length"] = pad_to
        pairs = {kind: (results["project"][kind]["step_seconds"], results["reference"][kind]["step_seconds"])
                 for kind, *_ in STEP_KINDS}
        report.update(ratio_summary(*(sum((p[i] for p in pairs.values()), []) for i in (0, 1))))
        for kind, (ours, theirs) in pairs.items():
            report[f"ratio_{kind}"] = ratio_summary(ours, theirs)["ratio"]
            ours_losses, their_losses = results["project"][kind]["losses"], results["reference"][kind]["losses"]
            report[f"loss_rel_diff_{kind}"] = _rel_diff(ours_losses, their_losses)
            # the one step both paths take from the same frame: in bf16 the trajectories part after it
            report[f"first_loss_rel_diff_{kind}"] = _rel_diff(ours_losses[:1], their_losses[:1])
    peak = bf16_peak_tflops(adapter.device)
    if adapter.device.type == "cuda":
        flops = harmful_step_flops(setup, draws["harmful"][warmup:])
        achieved = flops / results["project"]["harmful"]["seconds_per_step"] / 1e12
        report["harmful_tflops_per_s"] = achieved
        if peak is not None:
            report["bf16_peak_tflops"] = peak
            report["harmful_mfu"] = achieved / peak
    report["process_peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return report


# -- generation -------------------------------------------------------------------------------------
def _time_generation(adapter, records, vsp, max_new_tokens: int, batch_size: int, static_cache: bool = False) -> dict:
    device = adapter.device
    _reset_peak(device)
    _sync(device)
    started = time.perf_counter()
    rows = generate_responses(adapter, records, defense="davsp", vsp=vsp, max_new_tokens=max_new_tokens,
                              batch_size=batch_size, progress=False, static_cache=static_cache)
    _sync(device)
    seconds = time.perf_counter() - started
    return {"tokens": sum(row["new_tokens"] for row in rows), "seconds": seconds, "peak_memory_gib": _peak_gib(device),
            "responses": [row["response"] for row in rows]}


def _generation_totals(chunks: list[dict], batch_size: int) -> dict:
    tokens, seconds = sum(c["tokens"] for c in chunks), sum(c["seconds"] for c in chunks)
    peaks = [c["peak_memory_gib"] for c in chunks]
    return {"batch_size": batch_size, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "peak_memory_gib": None if None in peaks else max(peaks),
            "responses": [r for c in chunks for r in c["responses"]]}


def bench_generate(adapter, *, n: int = 16, max_new_tokens: int = 32, batch_size: int = 16, reference: bool = False,
                   seed: int = 0, static_cache: bool = False) -> dict:
    """Greedy answers under the DAVSP defense: batches of `batch_size` (project) vs one sample at a time
    (reference), interleaved batch by batch over the same queries.

    `static_cache` applies to the project path only; the reference keeps the original's dynamic cache.
    """
    if n < 1 or max_new_tokens < 1 or batch_size < 1:
        raise DavspError(f"bench generate: need --n, --max-new-tokens, --batch-size >= 1 "
                         f"(got {n}, {max_new_tokens}, {batch_size})")
    vsp = VisualSafetyPrompt.blank(adapter.canvas_size, bench_padding(adapter.canvas_size), "normalized",
                                   adapter.image_mean, adapter.image_std)
    chunks: dict[str, list[dict]] = {"project": [], "reference": []}
    with tempfile.TemporaryDirectory(prefix="davsp-bench-") as folder:
        records = synthetic_records(Path(folder), "query", n, seed)
        # warm-up: first-call allocations and kernel selection; a static cache is sized to prompt +
        # max_new_tokens, so its compilation on a GPU needs the full length once
        generate_responses(adapter, records[:batch_size], defense="davsp", vsp=vsp,
                           max_new_tokens=max_new_tokens if static_cache else 2, batch_size=batch_size,
                           progress=False, static_cache=static_cache)
        for start in range(0, n, batch_size):
            chunk = records[start : start + batch_size]
            chunks["project"].append(_time_generation(adapter, chunk, vsp, max_new_tokens, batch_size, static_cache))
            if reference:
                chunks["reference"].append(_time_generation(adapter, chunk, vsp, max_new_tokens, 1))
    results = {"project": _generation_totals(chunks["project"], batch_size)}
    if reference:
        results["reference"] = _generation_totals(chunks["reference"], 1)
    report = {"bench": "generate", **_environment(adapter), "n": n, "max_new_tokens": max_new_tokens,
              "static_cache": static_cache, **results, "ratio": None}
    if reference:
        ours, theirs = results["project"], results["reference"]
        # tokens per second: a pair's ratio is (their seconds / our seconds) x (our tokens / their tokens)
        report.update(ratio_summary([c["seconds"] / max(c["tokens"], 1) for c in chunks["project"]],
                                    [c["seconds"] / max(c["tokens"], 1) for c in chunks["reference"]]))
        report["same_outputs"] = sum(a == b for a, b in zip(ours["responses"], theirs["responses"])) / n
    for result in results.values():
        del result["responses"]
    report["process_peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return report
