"""`davsp bench train|generate`: the project's training step and generation, timed side by side with
a re-expression of the original DAVSP code on the same model and the same inputs.

The project's step is `train.step_loss` + `autograd.grad` + `vsp.signed_step`. The REFERENCE below
re-expresses the published training loop (train/optimize.py of the original code) on our adapters:

    for each sample (a Python loop, batch of one):
        full forward with output_hidden_states=True, all layers, logits at every position;
        read hidden_states[L][:, -1]
        if the output loss is drawn: a second full forward on prompt + answer right-padded to 1024
        text tokens (no attention mask), logits at every position, CE through `labels`
    mean over samples; one backward through every graph; the same signed step; empty the CUDA cache

It exists to be timed and to pin parity (tests/test_bench.py); it is not a training path.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .config import TrainConfig, resolve_device_dtype, resolve_layer
from .data.records import Record
from .defenses import SAFETY_PREFIX
from .errors import DavspError
from .generate import generate_responses
from .prompt import VisualSafetyPrompt
from .train import Pool, loss_and_gradient, projections, step_loss

ORIGINAL_PAD = 1024  # the original pads prompt + answer to 1024 text tokens (the image counts as one)
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


# -- the reference: the original training step -----------------------------------------------------
def reference_padded_length(adapter, pad_text_tokens: int = ORIGINAL_PAD) -> int:
    """Total positions of the original's fixed-length output-loss input, capped at the model's context."""
    image_tokens = getattr(adapter, "num_image_tokens", 1)
    limit = getattr(adapter.model.config.text_config, "max_position_embeddings", None) or sys.maxsize
    return min(pad_text_tokens - 1 + image_tokens, limit)


def _reference_projection(adapter, question: str, canvas: torch.Tensor, layer: int,
                          direction: torch.Tensor) -> torch.Tensor:
    batch = adapter.batch([question], canvas)  # one sample: no padding, the last token is the prompt's
    out = adapter.model(**batch.model_inputs, output_hidden_states=True, use_cache=False)
    return out.hidden_states[layer][0, -1].float() @ direction  # hidden_states[L]: (1, T, D) -> ()


def _reference_output_loss(adapter, question: str, canvas: torch.Tensor, answer: str, pad_to: int) -> torch.Tensor:
    batch = adapter.batch([question], canvas, [answer])
    inputs = dict(batch.model_inputs)
    inputs.pop("attention_mask")  # the original passes none: right padding is attended, as it was
    width = inputs["input_ids"].shape[1]
    labels = torch.full((1, width), -100, dtype=torch.long, device=batch.target_ids.device)
    labels[0, batch.target_positions + 1] = batch.target_ids  # target_positions predict the next token
    extra = max(0, pad_to - width)
    pad_id = adapter.tokenizer.pad_token_id
    for key, value in inputs.items():  # every per-token tensor: input_ids, and mm_token_type_ids for Qwen
        if value.dim() == 2 and value.shape[1] == width:
            inputs[key] = F.pad(value, (0, extra), value=pad_id if key == "input_ids" else 0)
    labels = F.pad(labels, (0, extra), value=-100)
    return adapter.model(**inputs, labels=labels, use_cache=False).loss  # full (1, T, V) logits inside


def reference_step_loss(adapter, vsp, pool: Pool, idx: list[int], harmful: bool, with_output: bool,
                        layer: int, direction: torch.Tensor, thresholds: tuple[float, float], config: TrainConfig,
                        *, pad_to: int):
    """The original step's loss, same return as `train.step_loss`: (loss, da_loss, output_loss, proj (B,))."""
    if adapter.device.type == "cuda":
        torch.cuda.empty_cache()  # the original empties the allocator's cache after every step
    canvases = vsp.compose(pool.prepared[idx], adapter.normalize)  # (B, 3, S, S)
    questions = [pool.questions[i] for i in idx]
    output_loss = torch.zeros((), device=adapter.device)
    if with_output:
        answers = [config.refusal_answer if harmful else pool.answers[i] for i in idx]
        output_loss = torch.stack([
            _reference_output_loss(adapter, q, canvases[b : b + 1], a, pad_to)
            for b, (q, a) in enumerate(zip(questions, answers))
        ]).mean()
    proj = torch.stack([_reference_projection(adapter, q, canvases[b : b + 1], layer, direction)
                        for b, q in enumerate(questions)])  # (B,)
    top, bottom = thresholds
    da_loss = F.relu(top - proj).mean() if harmful else F.relu(proj - bottom).mean()
    loss = config.output_loss_weight * output_loss + da_loss
    return loss, da_loss, output_loss, proj


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


def loss_and_border_grad(loss_fn, setup: TrainSetup, vsp: VisualSafetyPrompt, idx: list[int], harmful: bool,
                         with_output: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, d loss / d VSP) for one batch through `loss_fn`, by the training loop's own gradient step."""
    (loss, *_), grad = loss_and_gradient(setup.adapter, vsp, setup.pools[harmful], idx, harmful, with_output,
                                         setup.layer, setup.direction, setup.thresholds, setup.config, loss_fn=loss_fn)
    return loss, grad


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


def time_train_path(setup: TrainSetup, loss_fn, harmful: bool, with_output: bool, draws: list[list[int]],
                    warmup: int) -> dict:
    """Run `warmup` untimed then the remaining steps timed, each a full step (loss, gradient, signed update)."""
    device, vsp = setup.adapter.device, setup.blank_vsp()
    losses = []
    _reset_peak(device)
    for i, idx in enumerate(draws):
        if i == warmup:
            _sync(device)
            started = time.perf_counter()
        loss, grad = loss_and_border_grad(loss_fn, setup, vsp, idx, harmful, with_output)
        vsp.signed_step(grad, setup.config.alpha)
        losses.append(loss)
    _sync(device)
    seconds = time.perf_counter() - started
    steps = len(draws) - warmup
    return {"steps": steps, "seconds": seconds, "seconds_per_step": seconds / steps,
            "samples_per_s": steps * setup.config.batch_size / seconds, "peak_memory_gib": _peak_gib(device),
            "losses": [float(x) for x in losses]}


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
            "dtype": str(adapter.model.dtype).removeprefix("torch."), "parameters": _parameters(adapter.model)}


def _rel_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-6) for x, y in zip(a, b))


STEP_KINDS = (("harmful", True, False), ("benign", False, True))  # name, harmful, with output loss


def bench_train(adapter, *, steps: int = 10, batch_size: int = 2, warmup: int = 2, reference: bool = False,
                reference_pad: int = ORIGINAL_PAD, seed: int = 0) -> dict:
    """Time harmful steps (no output loss) and benign steps (with it) for the project path and the reference."""
    if steps < 1 or warmup < 0 or batch_size < 1:
        raise DavspError(f"bench train: need --steps >= 1, --warmup >= 0, --batch-size >= 1 "
                         f"(got {steps}, {warmup}, {batch_size})")
    with tempfile.TemporaryDirectory(prefix="davsp-bench-") as folder:
        setup = train_setup(adapter, Path(folder), batch_size=batch_size, seed=seed)
    paths = {"project": step_loss}
    pad_to = reference_padded_length(adapter, reference_pad)
    if reference:
        paths["reference"] = partial(reference_step_loss, pad_to=pad_to)
    results: dict[str, dict] = {name: {} for name in paths}
    draws = {kind: _draws(len(setup.pools[harmful]), batch_size, warmup + steps, seed + harmful)
             for kind, harmful, _ in STEP_KINDS}  # both paths see the same batches
    for kind, harmful, with_output in STEP_KINDS:
        for name, loss_fn in paths.items():
            results[name][kind] = time_train_path(setup, loss_fn, harmful, with_output, draws[kind], warmup)
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
        report["ratio"] = results["project"]["samples_per_s"] / results["reference"]["samples_per_s"]
        for kind, *_ in STEP_KINDS:
            ours, theirs = results["project"][kind], results["reference"][kind]
            report[f"ratio_{kind}"] = ours["samples_per_s"] / theirs["samples_per_s"]
            report[f"loss_rel_diff_{kind}"] = _rel_diff(ours["losses"], theirs["losses"])
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
    tokens = sum(row["new_tokens"] for row in rows)
    return {"batch_size": batch_size, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "peak_memory_gib": _peak_gib(device), "responses": [row["response"] for row in rows]}


def bench_generate(adapter, *, n: int = 16, max_new_tokens: int = 32, batch_size: int = 16, reference: bool = False,
                   seed: int = 0, static_cache: bool = False) -> dict:
    """Greedy answers under the DAVSP defense: one batched pass (project) vs one sample at a time (reference).

    `static_cache` applies to the project path only; the reference keeps the original's dynamic cache.
    """
    if n < 1 or max_new_tokens < 1 or batch_size < 1:
        raise DavspError(f"bench generate: need --n, --max-new-tokens, --batch-size >= 1 "
                         f"(got {n}, {max_new_tokens}, {batch_size})")
    vsp = VisualSafetyPrompt.blank(adapter.canvas_size, bench_padding(adapter.canvas_size), "normalized",
                                   adapter.image_mean, adapter.image_std)
    with tempfile.TemporaryDirectory(prefix="davsp-bench-") as folder:
        records = synthetic_records(Path(folder), "query", n, seed)
        # warm-up: first-call allocations and kernel selection; a static cache is sized to prompt +
        # max_new_tokens, so its compilation on a GPU needs the full length once
        generate_responses(adapter, records[:batch_size], defense="davsp", vsp=vsp,
                           max_new_tokens=max_new_tokens if static_cache else 2, batch_size=batch_size,
                           progress=False, static_cache=static_cache)
        results = {"project": _time_generation(adapter, records, vsp, max_new_tokens, batch_size, static_cache)}
        if reference:
            results["reference"] = _time_generation(adapter, records, vsp, max_new_tokens, 1)
    report = {"bench": "generate", **_environment(adapter), "n": n, "max_new_tokens": max_new_tokens,
              "static_cache": static_cache, **results,
              "ratio": None}
    if reference:
        ours, theirs = results["project"], results["reference"]
        report["ratio"] = ours["tokens_per_s"] / theirs["tokens_per_s"]
        report["same_outputs"] = sum(a == b for a, b in zip(ours["responses"], theirs["responses"])) / n
    for result in results.values():
        del result["responses"]
    report["process_peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return report


# -- CLI ----------------------------------------------------------------------------------------------
def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _print_table(report: dict, unit: str, kinds: list[str]) -> None:
    print(f"{report['model']} on {report['device_name']} ({report['dtype']}, threads={report['threads']}, "
          f"{report['parameters'] / 1e6:.1f}M parameters)")
    print(f"{'path':<10} {'part':<8} {unit:>12} {'peak GiB':>9}")
    for path in ("project", "reference")[: 1 + ("reference" in report)]:
        for kind in kinds:
            row = report[path] if kind == "all" else report[path][kind]
            print(f"{path:<10} {kind:<8} {row[unit.replace('/', '_per_')]:>12.2f} "
                  f"{_fmt(row['peak_memory_gib'], '.2f'):>9}")
    if report["ratio"] is not None:
        ratios = ", ".join(f"{k.removeprefix('ratio_')} {v:.2f}x" for k, v in report.items() if k.startswith("ratio_"))
        print(f"ratio (project / reference): {report['ratio']:.2f}x" + (f" ({ratios})" if ratios else ""))
    if "harmful_tflops_per_s" in report:
        print(f"harmful step: {report['harmful_tflops_per_s']:.1f} TFLOP/s"
              + (f" of {report['bf16_peak_tflops']:.0f} bf16 peak" if "bf16_peak_tflops" in report else ""))
    print(f"process peak RSS: {report['process_peak_rss_gib']:.2f} GiB")


def _load(args):
    from .bench_models import load_bench_model

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    return load_bench_model(args.model, device=device, dtype=dtype, layers=args.layers)


def _emit(report: dict, as_json: bool, unit: str, kinds: list[str]) -> int:
    if as_json:
        print(json.dumps(report, sort_keys=True))
    else:
        _print_table(report, unit, kinds)
    return 0


def cmd_bench_train(args) -> int:
    report = bench_train(_load(args), steps=args.steps, batch_size=args.batch_size, warmup=args.warmup,
                         reference=args.reference, reference_pad=args.reference_pad, seed=args.seed)
    return _emit(report, args.json, "samples/s", ["harmful", "benign", "all"])


def cmd_bench_generate(args) -> int:
    report = bench_generate(_load(args), n=args.n, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                            reference=args.reference, seed=args.seed, static_cache=args.static_cache)
    return _emit(report, args.json, "tokens/s", ["all"])


def _count(minimum: int):
    """argparse type: an integer >= minimum, checked before any model loads."""
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
        return value

    return parse


def _add_common(parser) -> None:
    from .bench_models import ARCHITECTURES

    parser.add_argument("--model", required=True,
                        help=f"model directory / hub id, or a random-weight architecture: {', '.join(ARCHITECTURES)}")
    parser.add_argument("--reference", action="store_true",
                        help="also time the original code's pattern; print the ratio")
    parser.add_argument("--device", default="auto-device", help="cpu, cuda, cuda:N, auto or auto-device")
    parser.add_argument("--dtype", default="default", help="float32, bfloat16, float16 or default (bf16 on GPU)")
    parser.add_argument("--layers", type=_count(1), default=None,
                        help="keep only the first N decoder layers (smoke runs)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the synthetic records and the batch draws")
    parser.add_argument("--threads", type=_count(1), default=None,
                        help="CPU threads for torch (1 avoids thread thrashing on a busy, shared CPU)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def add_commands(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="time training steps and generation (vs the original code's pattern)")
    verbs = bench.add_subparsers(dest="bench_command", required=True)
    p = verbs.add_parser("train", help="samples/s of harmful and benign training steps")
    _add_common(p)
    p.add_argument("--steps", type=_count(1), default=10, help="timed steps per kind (harmful, benign)")
    p.add_argument("--batch-size", type=_count(1), default=2, help="samples per step (paper: 2)")
    p.add_argument("--warmup", type=_count(0), default=2, help="untimed steps per kind and path first")
    p.add_argument("--reference-pad", type=_count(1), default=ORIGINAL_PAD,
                   help="text tokens the reference pads the output-loss input to (original: 1024; "
                        "capped at the model's context)")
    p.set_defaults(func=cmd_bench_train)
    p = verbs.add_parser("generate", help="tokens/s of greedy answering under the DAVSP defense")
    _add_common(p)
    p.add_argument("--n", type=_count(1), default=16, help="queries to answer")
    p.add_argument("--max-new-tokens", type=_count(1), default=32, help="tokens per answer at most (EOS stops earlier)")
    p.add_argument("--batch-size", type=_count(1), default=16, help="queries per batch on the project path")
    p.add_argument("--static-cache", action="store_true",
                   help="project path with a preallocated KV cache (a GPU then compiles the decoding step)")
    p.set_defaults(func=cmd_bench_generate)
