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

import hashlib
import io
import json
import sys
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
from .fingerprint import model_probe
from .io import (append_jsonl, atomic_write_bytes, atomic_write_json, batched, package_versions, parse_json, read_jsonl,
                 read_text_utf8, sha256_file)
from .prompt import VisualSafetyPrompt
from .vector import HarmfulnessVector


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
            values.extend((state @ direction.to(state.device)).tolist())  # a vector file loads on the CPU
    return values


def output_answers(pool: Pool, idx: list[int], harmful: bool, config: TrainConfig) -> list[str]:
    """Each sample's output-loss target: a benign record's reference answer; for a harmful record the
    fixed refusal, or with output_target='record' its own answer (the refusal when it has none)."""
    if not harmful:
        return [pool.answers[i] for i in idx]
    if config.output_target == "record":
        return [pool.answers[i] or config.refusal_answer for i in idx]
    return [config.refusal_answer] * len(idx)


def answer_cross_entropy(logits: torch.Tensor, batch, mean: str) -> torch.Tensor:
    """Cross-entropy of the answer tokens, (N, V) logits: the mean over all N ('token'), or the mean
    per sample, then over samples ('sample', as published: short answers weigh as much as long ones)."""
    if mean == "token":
        return F.cross_entropy(logits.float(), batch.target_ids)
    per_token = F.cross_entropy(logits.float(), batch.target_ids, reduction="none")  # (N,)
    rows = len(batch.last_prompt_token)
    sample = batch.target_positions // batch.model_inputs["input_ids"].shape[1]  # (N,) row of each target
    sums = per_token.new_zeros(rows).index_add(0, sample, per_token)  # (B,)
    return (sums / torch.bincount(sample, minlength=rows)).mean()


def step_loss(adapter, vsp, pool: Pool, idx: list[int], harmful: bool, with_output: bool,
              layer: int, direction: torch.Tensor, thresholds: tuple[float, float], config: TrainConfig):
    """(loss, da_loss, output_loss, proj (B,)) for one batch, one forward."""
    canvases = vsp.compose(pool.prepared[idx], adapter.normalize)  # (B, 3, S, S), differentiable in the VSP
    questions = [pool.questions[i] for i in idx]
    if with_output:
        batch = adapter.batch(questions, canvases, output_answers(pool, idx, harmful, config),
                              answer_eos=config.answer_eos)
        state, logits = states_and_answer_logits(adapter, batch, layer)
        output_loss = answer_cross_entropy(logits, batch, config.output_loss_mean)
    else:
        batch = adapter.batch(questions, canvases)
        state = last_prompt_states(adapter, batch, [layer])[layer]  # the forward stops at layer L
        output_loss = torch.zeros((), device=state.device)
    proj = state.float() @ direction.to(state.device)  # (B,); a no-op when the caller moved it already
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
                      direction: torch.Tensor, thresholds: tuple[float, float], config: TrainConfig):
    """`step_loss`'s (loss, da_loss, output_loss, proj), detached, and d loss / d VSP values for one batch."""
    vsp.values.requires_grad_(True)
    with checkpointed_decoder(adapter, config.activation_checkpointing):
        losses = step_loss(adapter, vsp, pool, idx, harmful, with_output, layer, direction, thresholds, config)
        (grad,) = torch.autograd.grad(losses[0], vsp.values)
    vsp.values = vsp.values.detach()
    return tuple(x.detach() for x in losses), grad


def _check_adapter_settings(adapter, config: TrainConfig) -> None:
    """The config's prompt format and image geometry are how the CLI loads the model; a Python caller's
    adapter must agree, so config.json never records settings the run did not use."""
    wanted = {"prompt_format": config.prompt_format, "image_geometry": config.image_geometry}
    for name, value in wanted.items():
        if value != "default" and value != getattr(adapter, name):
            raise DavspError(f"config {name}={value!r} but the model was loaded with {getattr(adapter, name)!r}; "
                             f"load it with {name}={value!r} or change the config")


# -- run directory --------------------------------------------------------------------------
# A run directory is written in this order: config.json, manifest.json, projections_before.json, then
# per checkpoint metrics.jsonl rows and checkpoints/step_N.safetensors, then projections.json,
# vsp.safetensors, vsp.png. Each file is written atomically, and `--resume` completes any prefix of
# that sequence (tests/test_faults.py kills a run at every write and resumes it).
def _checkpoint_path(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:06d}.safetensors"


def _save_checkpoint(run: Path, step: int, vsp: VisualSafetyPrompt, generator: torch.Generator) -> None:
    tensors = {"values": vsp.values.detach().cpu().contiguous(), "rng_state": generator.get_state()}
    atomic_write_bytes(_checkpoint_path(run, step), safetensors_save(tensors, metadata={"step": str(step)}))


def _read_checkpoint(path: Path, shape: torch.Size) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(step, values, rng_state) of a checkpoint; DavspError if it is torn, corrupt or not this run's."""
    try:
        with safe_open(str(path), framework="pt") as f:
            step = int((f.metadata() or {})["step"])
            values, rng_state = f.get_tensor("values"), f.get_tensor("rng_state")
    except Exception as exc:  # safetensors raises its own types for a torn file; a missing key or step
        raise DavspError(f"{path}: unreadable checkpoint ({(str(exc).splitlines() or [type(exc).__name__])[0]})") from None
    if step != int(path.stem.split("_")[1]) or values.shape != shape or not torch.isfinite(values).all():
        raise DavspError(f"{path}: checkpoint does not match its name or this run (step {step}, shape "
                         f"{tuple(values.shape)}) or holds non-finite values")
    return step, values, rng_state


def _restore(run: Path, vsp: VisualSafetyPrompt, generator: torch.Generator, steps: int) -> int:
    """Load the latest readable checkpoint into `vsp` and `generator` (a torn or corrupt one is reported
    on stderr and the one before it used); drop metric rows written after it. Returns its step."""
    step = 0
    for path in sorted((run / "checkpoints").glob("step_*.safetensors"), reverse=True):
        try:
            step, values, rng_state = _read_checkpoint(path, vsp.values.shape)
        except DavspError as exc:
            print(f"davsp: warning: {exc}; resuming from the checkpoint before it", file=sys.stderr)
            continue
        if step > steps:
            raise DavspError(f"{path}: this run is at step {step}, past steps={steps}; resume with --steps {step} "
                             "or more, or choose a new --out")
        vsp.values.copy_(values)
        try:
            generator.set_state(rng_state)
        except (RuntimeError, TypeError) as exc:
            raise DavspError(f"{path}: checkpoint holds an unusable random state ({exc}); delete it to resume "
                             "from the one before") from None
        break
    metrics = run / "metrics.jsonl"
    if metrics.exists():
        rows = list(read_jsonl(metrics, tolerate_torn_tail=True))
        if any(not isinstance(row.get("step"), int) for row in rows):
            raise DavspError(f"{metrics}: a row without an integer 'step'; the file was edited or is not this run's")
        kept = [row for row in rows if row["step"] <= step]
        atomic_write_bytes(metrics, "".join(json.dumps(r) + "\n" for r in kept).encode())
    return step


def records_sha256(records: list[Record]) -> str:
    """sha256 over the records' fields and image bytes: what a resumed run must train on again."""
    digest = hashlib.sha256()
    for r in records:
        if not Path(r.image).is_file():
            raise DavspError(f"record {r.id!r}: image not found: {r.image}")
        digest.update(json.dumps([r.id, r.question, r.answer, r.category, sha256_file(r.image)]).encode() + b"\n")
    return digest.hexdigest()


def vector_sha256(vector: HarmfulnessVector) -> str:
    digest = hashlib.sha256()
    for tensor in (vector.harmful_mean, vector.benign_mean, vector.model_probe):
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


_INPUT_FLAGS = {"harmful": "harmful records (--harmful)", "benign": "benign records (--benign)",
                "vector": "harmfulness vector (--vector)"}


def _read_run_json(path: Path) -> dict:
    value = parse_json(read_text_utf8(path), str(path))
    if not isinstance(value, dict):
        raise DavspError(f"{path}: expected a JSON object; the run directory is damaged")
    return value


_RUN_FILES = ("config.json", "manifest.json", "projections_before.json", "metrics.jsonl", "projections.json",
              "vsp.safetensors", "vsp.png", "checkpoints/step_*.safetensors")


def _remove_stale_temporaries(run: Path) -> None:
    """Delete the temporary files that a killed run's atomic writes left (`.<name>.<random>.tmp`)."""
    for pattern in _RUN_FILES:
        folder, _, name = pattern.rpartition("/")
        for path in (run / folder).glob(f".{name}.*.tmp"):
            path.unlink(missing_ok=True)


def _prepare_run_dir(run: Path, config: TrainConfig, resume: bool, inputs: dict) -> bool:
    """Check `run` can take this run; True when it continues a started run (config.json exists).

    A folder holding only a killed run's temporary files counts as empty, with or without --resume.
    """
    if run.is_dir():
        _remove_stale_temporaries(run)
    saved = run / "config.json"
    if not saved.is_file():
        if run.exists() and any(run.iterdir()):
            raise DavspError(f"{run}: folder is not empty and holds no davsp run (no config.json); choose a new --out")
        if resume and not run.exists():
            raise DavspError(f"{run}: nothing to resume (no such folder); start without --resume")
        run.mkdir(parents=True, exist_ok=True)
        return False
    if not resume:
        raise DavspError(f"{run}: run directory is not empty (it holds a run, perhaps interrupted); pass --resume "
                         "to continue it, or choose a new --out")
    previous = _read_run_json(saved).get("train")
    if not isinstance(previous, dict):
        raise DavspError(f"{saved}: no 'train' settings; not a davsp run directory")
    defaults = TrainConfig().to_dict()
    # a key missing from an older run's config.json matches when today's value is its default
    differing = sorted(k for k, v in config.to_dict().items()
                       if k != "steps" and previous.get(k, defaults[k]) != v)
    if differing:
        raise DavspError(f"{run}: --resume with a different config ({', '.join(differing)}); use the same settings")
    manifest = run / "manifest.json"
    recorded = _read_run_json(manifest).get("inputs", {}) if manifest.is_file() else {}
    for role, digest in inputs.items():
        if role in recorded and recorded[role] != digest:
            raise DavspError(f"{run}: --resume with other {_INPUT_FLAGS[role]} than the run started with (sha256 "
                             f"{str(recorded[role])[:12]}… now {digest[:12]}…); pass the same file or choose a new --out")
    return True


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
    _check_adapter_settings(adapter, config)
    if not harmful or not benign:
        raise DavspError(f"training needs harmful and benign records (got {len(harmful)} and {len(benign)})")
    if config.output_loss_weight > 0:
        missing = [r.id for r in benign if not r.answer]
        if missing:
            raise DavspError(f"benign record {missing[0]!r} has no 'answer' (the output loss needs one; "
                             f"{len(missing)} missing) - add answers or set output_loss_weight 0")
    inputs = {"harmful": records_sha256(harmful), "benign": records_sha256(benign), "vector": vector_sha256(vector)}
    started = _prepare_run_dir(run, config, resume, inputs)

    layer = resolve_layer(config.layer, vector, adapter.num_layers, adapter.hidden_size)
    thresholds = resolve_thresholds(config.thresholds, vector, layer, adapter.num_layers, adapter.hidden_size)
    device = adapter.device
    direction = vector.direction(layer).to(device)
    vsp = VisualSafetyPrompt.blank(
        adapter.canvas_size, config.padding, config.space, adapter.image_mean, adapter.image_std,
        kind=config.kind, epsilon=config.epsilon, quantize_8bit=config.quantize_8bit,
        metadata={"model": adapter.model_id, "family": adapter.family, "layer": layer,
                  "thresholds": list(thresholds), "canvas_size": adapter.canvas_size,
                  "prompt_format": adapter.prompt_format, "image_geometry": adapter.image_geometry,
                  "hidden_size": adapter.hidden_size, "model_probe": model_probe(adapter.model).tolist()},
    )
    vsp.values = vsp.values.to(device)
    prefix = SAFETY_PREFIX if config.use_prefix else None
    pools = {True: Pool(harmful, vsp, adapter, prefix), False: Pool(benign, vsp, adapter, prefix)}

    resolved = {"train": config.to_dict(), "layer": layer, "thresholds": list(thresholds), "model": adapter.model_id,
                "family": adapter.family, "vector": vector.metadata.get("model"), "prefix": prefix,
                "prompt_format": adapter.prompt_format, "image_geometry": adapter.image_geometry,
                "precision": adapter.precision.name}  # what `dtype` resolved to (e.g. "default" on a GPU: bfloat16)
    # a resumed run writes whichever of these a kill left unwritten (all are computed before any step)
    if not started:
        atomic_write_json(run / "config.json", resolved)
    if not (run / "manifest.json").is_file():
        atomic_write_json(run / "manifest.json", {"versions": package_versions(), "data_hashes": data_hashes or {},
                                                 "inputs": inputs,
                                                 "counts": {"harmful": len(harmful), "benign": len(benign)}})
    if not (run / "projections_before.json").is_file():
        before = {c: projections(adapter, vsp, pools[h], layer, direction, config.projection_samples)
                  for h, c in ((True, "harmful"), (False, "benign"))}
        atomic_write_json(run / "projections_before.json", before)

    generator = torch.Generator().manual_seed(config.seed)
    start = _restore(run, vsp, generator, config.steps) if started else 0
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
            if not (torch.isfinite(loss) and torch.isfinite(grad).all()):
                _diverged(run, step, "loss" if not torch.isfinite(loss) else "gradient")
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


def _diverged(run: Path, step: int, what: str) -> None:
    """Stop before a non-finite step reaches the VSP; the checkpoints on disk are all finite."""
    found = sorted((run / "checkpoints").glob("step_*.safetensors"))
    kept = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was written yet"
    raise DavspError(f"training diverged at step {step}: the {what} is not finite; {kept} (try a smaller alpha or "
                     "output_loss_weight, or --dtype float32)")


def _finish(run, adapter, vsp, pools, layer, direction, thresholds, config) -> None:
    vsp.values = vsp.values.detach()
    after = {c: projections(adapter, vsp, pools[h], layer, direction, config.projection_samples)
             for h, c in ((True, "harmful"), (False, "benign"))}
    before = _read_run_json(run / "projections_before.json")
    atomic_write_json(run / "projections.json",
                      {"layer": layer, "thresholds": list(thresholds), "before": before, "after": after})
    vsp.save(run / "vsp.safetensors")
    buffer = io.BytesIO()
    vsp.preview().save(buffer, format="PNG")
    atomic_write_bytes(run / "vsp.png", buffer.getvalue())
