"""Training the Visual Safety Prompt with Deep Alignment (METHOD.md §1-2), top to bottom.

    for each step:
        draw a harmful batch or a benign batch (probability 1/2)
        frame every image with the VSP, prepend the safety prefix
        proj = h_L(last prompt token) · v̂_L
        loss = hinge(τ_top - proj) on harmful, hinge(proj - τ_bottom) on benign
             + 0.02 · CE(answer)    (always on benign, with probability 0.05 on harmful: a refusal)
        VSP <- VSP - α · sign(∇ loss) on the border
"""

from __future__ import annotations

import io
import json
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors import safe_open
from safetensors.torch import save as safetensors_save
from tqdm.auto import tqdm

from .activations import last_prompt_states, states_and_answer_logits
from .config import TrainConfig, resolve_layer, resolve_thresholds
from .data.records import Record, load_image
from .defenses import SAFETY_PREFIX, with_prefix
from .errors import DavspError
from .io import append_jsonl, atomic_write_bytes, atomic_write_json, package_versions, read_jsonl
from .prompt import VisualSafetyPrompt
from .vector import HarmfulnessVector, batched


class Pool:
    """One class of training records, prepared once: uint8 centres, prefixed questions, answers."""

    def __init__(self, records: list[Record], vsp: VisualSafetyPrompt, adapter, prefix: str | None):
        self.records = records
        self.prepared = torch.stack([vsp.prepare(load_image(r.image, f"record {r.id!r}"), adapter) for r in records])
        self.questions = [with_prefix(r.question, prefix) for r in records]
        self.answers = [r.answer for r in records]

    def __len__(self) -> int:
        return len(self.records)


def projections(adapter, vsp: VisualSafetyPrompt, pool: Pool, layer: int, direction: torch.Tensor,
                limit: int, batch_size: int = 8) -> list[float]:
    """h_L · v̂_L for the first `limit` records of a pool, with the VSP applied."""
    values: list[float] = []
    with torch.no_grad():
        for idx in batched(list(range(min(limit, len(pool)))), batch_size):
            batch = adapter.batch([pool.questions[i] for i in idx], vsp.compose(pool.prepared[idx], adapter.normalize))
            state = last_prompt_states(adapter, batch, [layer])[layer].float()
            values.extend((state @ direction).tolist())
    return values


def step_loss(adapter, vsp, pool: Pool, idx: list[int], harmful: bool, with_output: bool,
              layer: int, direction: torch.Tensor, thresholds: tuple[float, float], config: TrainConfig):
    """(loss, da_loss, output_loss, proj (B,)) for one batch, one forward."""
    canvases = vsp.compose(pool.prepared[idx], adapter.normalize)  # (B, 3, S, S), differentiable in the VSP
    questions = [pool.questions[i] for i in idx]
    if with_output:
        answers = [config.refusal_answer if harmful else pool.answers[i] for i in idx]
        batch = adapter.batch(questions, canvases, answers)
        state, logits = states_and_answer_logits(adapter, batch, layer)
        output_loss = F.cross_entropy(logits.float(), batch.target_ids)
    else:
        batch = adapter.batch(questions, canvases)
        state = last_prompt_states(adapter, batch, [layer])[layer]  # the forward stops at layer L
        output_loss = torch.zeros((), device=state.device)
    proj = state.float() @ direction  # (B,)
    top, bottom = thresholds
    da_loss = F.relu(top - proj).mean() if harmful else F.relu(proj - bottom).mean()
    loss = config.output_loss_weight * output_loss
    if config.deep_alignment:
        loss = loss + da_loss
    return loss, da_loss, output_loss, proj


@contextmanager
def checkpointed_decoder(adapter, enabled: bool):
    """Recompute the decoder layers during the backward instead of keeping their activations."""
    if not enabled:
        yield
        return
    layers = adapter.decoder_layers()
    if not all(hasattr(layer, "gradient_checkpointing") for layer in layers):
        raise DavspError(f"{adapter.model_id}: its decoder layers do not support activation checkpointing")
    for layer in layers:
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
        layer.training = True  # transformers checks the layer's own flag; its submodules stay in eval (no dropout)
    try:
        yield
    finally:
        for layer in layers:
            layer.gradient_checkpointing = False
            layer.training = False


def loss_and_gradient(adapter, vsp, pool: Pool, idx: list[int], harmful: bool, with_output: bool, layer: int,
                      direction: torch.Tensor, thresholds: tuple[float, float], config: TrainConfig, *,
                      loss_fn=step_loss):
    """`loss_fn`'s (loss, da_loss, output_loss, proj), detached, and d loss / d VSP values for one batch.

    `loss_fn` is `step_loss` or one with its signature (the bench's re-expression of the original loop).
    """
    vsp.values.requires_grad_(True)
    with checkpointed_decoder(adapter, config.activation_checkpointing):
        losses = loss_fn(adapter, vsp, pool, idx, harmful, with_output, layer, direction, thresholds, config)
        (grad,) = torch.autograd.grad(losses[0], vsp.values)
    vsp.values = vsp.values.detach()
    return tuple(x.detach() for x in losses), grad


# -- run directory --------------------------------------------------------------------------
def _checkpoint_path(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:06d}.safetensors"


def _save_checkpoint(run: Path, step: int, vsp: VisualSafetyPrompt, generator: torch.Generator) -> None:
    tensors = {"values": vsp.values.detach().cpu().contiguous(), "rng_state": generator.get_state()}
    atomic_write_bytes(_checkpoint_path(run, step), safetensors_save(tensors, metadata={"step": str(step)}))


def _latest_checkpoint(run: Path) -> Path | None:
    found = sorted((run / "checkpoints").glob("step_*.safetensors"))
    return found[-1] if found else None


def _restore(run: Path, vsp: VisualSafetyPrompt, generator: torch.Generator) -> int:
    """Load the latest checkpoint into `vsp` and `generator`; drop metric rows written after it."""
    step = 0
    path = _latest_checkpoint(run)
    if path is not None:
        with safe_open(str(path), framework="pt") as f:
            step = int(f.metadata()["step"])
            vsp.values.copy_(f.get_tensor("values"))
            generator.set_state(f.get_tensor("rng_state"))
    metrics = run / "metrics.jsonl"
    if metrics.exists():
        kept = [row for row in read_jsonl(metrics, tolerate_torn_tail=True) if row["step"] <= step]
        atomic_write_bytes(metrics, "".join(json.dumps(r) + "\n" for r in kept).encode())
    return step


def _prepare_run_dir(run: Path, config: TrainConfig, resume: bool) -> None:
    saved = run / "config.json"
    if resume:
        if not saved.is_file():
            raise DavspError(f"{run}: nothing to resume (no config.json); start without --resume")
        previous = json.loads(saved.read_text())["train"]
        differing = sorted(k for k, v in config.to_dict().items() if k != "steps" and previous.get(k) != v)
        if differing:
            raise DavspError(f"{run}: --resume with a different config ({', '.join(differing)}); use the same settings")
    elif run.exists() and any(run.iterdir()):
        raise DavspError(f"{run}: run directory is not empty; pass --resume to continue it or choose a new --out")
    run.mkdir(parents=True, exist_ok=True)


def train_vsp(
    adapter,
    vector: HarmfulnessVector,
    harmful: list[Record],
    benign: list[Record],
    config: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    data_hashes: dict | None = None,
    progress: bool = True,
) -> VisualSafetyPrompt:
    run = Path(out_dir)
    vector.check_model(adapter)
    if not harmful or not benign:
        raise DavspError(f"training needs harmful and benign records (got {len(harmful)} and {len(benign)})")
    if config.output_loss_weight > 0:
        missing = [r.id for r in benign if not r.answer]
        if missing:
            raise DavspError(f"benign record {missing[0]!r} has no 'answer' (the output loss needs one; "
                             f"{len(missing)} missing) - add answers or set output_loss_weight 0")
    _prepare_run_dir(run, config, resume)

    layer = resolve_layer(config.layer, vector, adapter.num_layers, adapter.hidden_size)
    thresholds = resolve_thresholds(config.thresholds, vector, layer, adapter.num_layers, adapter.hidden_size)
    device = adapter.device
    direction = vector.direction(layer).to(device)
    vsp = VisualSafetyPrompt.blank(
        adapter.canvas_size, config.padding, config.space, adapter.image_mean, adapter.image_std,
        kind=config.kind, epsilon=config.epsilon, quantize_8bit=config.quantize_8bit,
        metadata={"model": adapter.model_id, "family": adapter.family, "layer": layer,
                  "thresholds": list(thresholds), "canvas_size": adapter.canvas_size},
    )
    vsp.values = vsp.values.to(device)
    prefix = SAFETY_PREFIX if config.use_prefix else None
    pools = {True: Pool(harmful, vsp, adapter, prefix), False: Pool(benign, vsp, adapter, prefix)}

    resolved = {"train": config.to_dict(), "layer": layer, "thresholds": list(thresholds), "model": adapter.model_id,
                "family": adapter.family, "vector": vector.metadata.get("model"), "prefix": prefix}
    if not resume:
        atomic_write_json(run / "config.json", resolved)
        atomic_write_json(run / "manifest.json", {"versions": package_versions(), "data_hashes": data_hashes or {},
                                                 "counts": {"harmful": len(harmful), "benign": len(benign)}})
        before = {c: projections(adapter, vsp, pools[h], layer, direction, config.projection_samples)
                  for h, c in ((True, "harmful"), (False, "benign"))}
        atomic_write_json(run / "projections_before.json", before)

    generator = torch.Generator().manual_seed(config.seed)
    start = _restore(run, vsp, generator) if resume else 0
    pending: list[dict] = []
    bar = tqdm(range(start + 1, config.steps + 1), initial=start, total=config.steps, desc="train VSP",
               disable=not progress)
    for step in bar:
        # every draw comes from one seeded generator, so a resumed run replays the same batches
        harmful = bool(torch.rand((), generator=generator) < config.harmful_prob)
        pool = pools[harmful]
        idx = torch.randint(len(pool), (config.batch_size,), generator=generator).tolist()
        refusal_draw = bool(torch.rand((), generator=generator) < config.harmful_output_prob)
        with_output = config.output_loss_weight > 0 and (not harmful or refusal_draw)
        if not config.deep_alignment and not with_output:
            row = {"step": step, "harmful": harmful, "loss": 0.0, "da_loss": None, "output_loss": None,
                   "projection": None, "projections": []}  # output-loss-only ablation: nothing to learn here
        else:
            (loss, da_loss, output_loss, proj), grad = loss_and_gradient(
                adapter, vsp, pool, idx, harmful, with_output, layer, direction, thresholds, config)
            vsp.signed_step(grad, config.alpha)
            row = {"step": step, "harmful": harmful, "loss": loss.item(), "da_loss": da_loss.item(),
                   "output_loss": output_loss.item() if with_output else None,
                   "projection": proj.mean().item(), "projections": proj.tolist()}
            bar.set_postfix(loss=f"{row['loss']:.3f}", proj=f"{row['projection']:.2f}", kind="H" if harmful else "B")
        pending.append(row)
        if step % config.checkpoint_every == 0 or step == config.steps:
            append_jsonl(run / "metrics.jsonl", pending)
            pending = []
            _save_checkpoint(run, step, vsp, generator)

    _finish(run, adapter, vsp, pools, layer, direction, thresholds, config)
    return vsp


def _finish(run, adapter, vsp, pools, layer, direction, thresholds, config) -> None:
    vsp.values = vsp.values.detach()
    after = {c: projections(adapter, vsp, pools[h], layer, direction, config.projection_samples)
             for h, c in ((True, "harmful"), (False, "benign"))}
    before = json.loads((run / "projections_before.json").read_text())
    atomic_write_json(run / "projections.json",
                      {"layer": layer, "thresholds": list(thresholds), "before": before, "after": after})
    vsp.save(run / "vsp.safetensors")
    buffer = io.BytesIO()
    vsp.preview().save(buffer, format="PNG")
    atomic_write_bytes(run / "vsp.png", buffer.getvalue())
