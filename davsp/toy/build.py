"""`davsp toy build`: train the safety world from a seed and save it in Hugging Face format.

Recipe (reads top to bottom in `build_world`):
1. tokenizer (word level over the world's closed vocabulary), processor, random-init LLaVA;
2. perception: the vision tower alone learns concept and count labels from rendered images;
3. the whole model learns the world's answers with the exact inference layout
   (prompt ids + answer ids + EOS, left padded). Two additions build the linear danger direction a
   large LVLM has and a small closed-set model does not learn on its own:
   - a fixed unit direction e at decoder layer STEER_LAYER: the last prompt token must carry
     e . h = GAIN * danger + b (a linear read-out, MSE);
   - on half of the samples, the danger is shifted by delta (h += GAIN * delta * e from the last
     prompt token on) and the target answer is the world's answer at danger + delta, so the later
     layers must read refusal from that direction (interchange-style training);
4. evaluation on the demo splits, then save (float32 safetensors, a few MB).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..adapters.base import pack_left_padded
from ..activations import edited_output
from ..adapters.llava import LlavaAdapter
from ..io import atomic_write_json
from . import world
from .world import CANVAS, CONCEPTS, PATCH, STEER_LAYER, VSP_PADDING

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% else %}ASSISTANT: {% for item in message['content'] %}{{ item['text'] }}{% endfor %}</s>"
    "{% endif %} {% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
GAIN = 4.0  # residual-stream units per unit of danger along the danger direction


@dataclass
class BuildConfig:
    seed: int = 0
    renders_per_class: int = 30  # images per (concept, count) in the training pool
    vision_steps: int = 3000
    vision_lr: float = 3e-3
    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 50
    probe_weight: float = 1.0
    shift_share: float = 0.5  # share of samples whose danger is shifted along the direction
    shift_range: float = 0.6
    framed_share: float = 0.5  # share of images shrunk into the centre inside a random border (vision phase)
    world_framed_share: float = 0.5  # the same share in the whole-model phase
    prefix_share: float = 0.5  # share of batches whose questions carry the safety prefix
    threads: int = 1  # one thread: reproducible bit for bit, and robust to a shared, busy CPU


# ---------------------------------------------------------------- tokenizer, processor, model


def build_processor():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlavaProcessor, PreTrainedTokenizerFast
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    splitter = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    words = {w for text in world.all_texts() + ["USER: ASSISTANT:"] for w, _ in splitter.pre_tokenize_str(text)}
    vocab = {token: i for i, token in enumerate(list(SPECIAL_TOKENS) + sorted(words))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = splitter
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="left",
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": CANVAS}, crop_size={"height": CANVAS, "width": CANVAS},
        image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD),
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )


def build_model(processor):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tokenizer = processor.tokenizer
    vision = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        image_size=CANVAS, patch_size=PATCH, projection_dim=64,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=processor.image_token_id,
        vision_feature_layer=-1, vision_feature_select_strategy="default", image_seq_length=(CANVAS // PATCH) ** 2,
        davsp_prompt_format="chat_template",  # the world is trained on its own template, not LLaVA's llava_v1
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config.update(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, max_new_tokens=24, do_sample=False,
    )
    return model


# ---------------------------------------------------------------- image pool


@dataclass
class ImagePool:
    """Rendered training images, through the real image processor: (N, 3, S, S) normalized."""

    pixels: torch.Tensor
    concept: torch.Tensor  # (N,) index into CONCEPTS
    count: torch.Tensor  # (N,) 1..3
    by_class: dict[tuple[str, int], list[int]]
    stripes: torch.Tensor  # (3, S, S) the caution frame's stripes, normalized


def render_pool(processor, renders: int, rng: np.random.Generator) -> ImagePool:
    images, concept, count, by_class = [], [], [], {}
    for ci, c in enumerate(CONCEPTS):
        for k in (1, 2, 3):
            for _ in range(renders):
                by_class.setdefault((c.name, k), []).append(len(images))
                images.append(world.render(c.name, k, rng))
                concept.append(ci)
                count.append(k)
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"].float()
    mean = torch.tensor(processor.image_processor.image_mean).view(3, 1, 1)
    std = torch.tensor(processor.image_processor.image_std).view(3, 1, 1)
    stripes = (torch.from_numpy(world.caution_stripes()).permute(2, 0, 1).float() - mean) / std
    return ImagePool(pixels, torch.tensor(concept), torch.tensor(count), by_class, stripes)


def frame_some(
    pixels: torch.Tensor,
    share: float,
    gen: torch.Generator,
    caution: torch.Tensor | None = None,
    stripes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Shrink a random `share` of images (and every one with caution > 0) into the centre (S - 2p)
    inside a random border, as the VSP does.

    Borders (normalized space) are a plain level, pixel noise, or one random colour per patch, so
    the model keeps perceiving a shrunk image whatever frame surrounds it; a caution frame blends
    the hazard stripes into that border with the query's caution strength.
    """
    chosen = torch.rand(pixels.shape[0], generator=gen) < share
    if caution is not None:
        chosen |= caution > 0
    if not chosen.any():
        return pixels
    inner = CANVAS - 2 * VSP_PADDING
    small = F.interpolate(pixels[chosen], size=(inner, inner), mode="bilinear", align_corners=False, antialias=True)
    framed = random_borders(int(chosen.sum()), gen)
    if caution is not None:
        strength = caution[chosen].view(-1, 1, 1, 1)
        framed = (1 - strength) * framed + strength * stripes
    framed[:, :, VSP_PADDING : CANVAS - VSP_PADDING, VSP_PADDING : CANVAS - VSP_PADDING] = small
    out = pixels.clone()
    out[chosen] = framed
    return out


def random_borders(n: int, gen: torch.Generator) -> torch.Tensor:
    """(n, 3, S, S) canvases in normalized space: a third plain, a third noise, a third patchwise colours."""
    kind = torch.randint(3, (n, 1, 1, 1), generator=gen)
    scale = torch.rand(n, 1, 1, 1, generator=gen) * 2.5
    plain = (torch.rand(n, 3, 1, 1, generator=gen) * 2 - 1).expand(-1, -1, CANVAS, CANVAS)
    noise = torch.rand(n, 3, CANVAS, CANVAS, generator=gen) * 2 - 1
    cells = CANVAS // PATCH
    patches = (torch.rand(n, 3, cells, cells, generator=gen) * 2 - 1).repeat_interleave(PATCH, 2).repeat_interleave(PATCH, 3)
    return scale * torch.where(kind == 0, plain, torch.where(kind == 1, noise, patches))


# ---------------------------------------------------------------- training


def train_vision(model, pool: ImagePool, cfg: BuildConfig, gen: torch.Generator) -> float:
    """Perception first: concept (shape x colour) and count from the mean of the patch tokens."""
    tower = model.model.vision_tower
    width = tower.config.hidden_size
    heads = torch.nn.ModuleDict(
        {
            "concept": torch.nn.Sequential(torch.nn.LayerNorm(width), torch.nn.Linear(width, len(CONCEPTS))),
            "count": torch.nn.Sequential(torch.nn.LayerNorm(width), torch.nn.Linear(width, 3)),
        }
    )
    params = list(tower.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.vision_lr, weight_decay=0.01)
    accuracy = 0.0
    for step in tqdm(range(cfg.vision_steps), desc="perception", leave=False):
        _set_lr(optimizer, cfg.vision_lr, step, cfg.vision_steps, cfg.warmup)
        index = torch.randint(len(pool.pixels), (64,), generator=gen)
        pixels = frame_some(pool.pixels[index], cfg.framed_share, gen)
        tokens = tower(pixel_values=pixels).last_hidden_state[:, 1:].mean(1)  # (B, 1 + 36, W) -> (B, W)
        logits_c, logits_k = heads["concept"](tokens), heads["count"](tokens)
        loss = F.cross_entropy(logits_c, pool.concept[index]) + F.cross_entropy(logits_k, pool.count[index] - 1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        hits = (logits_c.argmax(1) == pool.concept[index]) & (logits_k.argmax(1) == pool.count[index] - 1)
        accuracy = 0.9 * accuracy + 0.1 * hits.float().mean().item()
    return accuracy


@torch.no_grad()
def standardize_projector(model, pixels: torch.Tensor, gen: torch.Generator) -> None:
    """Start the projector from whitened vision features at the scale of the word embeddings.

    A trained vision tower's patch states share a large common component; through a random
    projector the language model sees nearly the same (normalized) vector for every image and
    learns to ignore it. Folding per-feature standardization into linear_1 fixes that.
    """
    feats = model.model.vision_tower(pixel_values=pixels).last_hidden_state[:, 1:]  # (N, 36, W)
    feats = feats.reshape(-1, feats.shape[-1])
    mean, std = feats.mean(0), feats.std(0).clamp_min(1e-4)
    projector = model.model.multi_modal_projector
    hidden = projector.linear_1.out_features
    q1 = torch.linalg.qr(torch.randn(hidden, feats.shape[-1], generator=gen))[0]  # (H, W) orthonormal columns
    projector.linear_1.weight.copy_(q1 / std)
    projector.linear_1.bias.copy_(-(q1 / std) @ mean)
    q2 = torch.linalg.qr(torch.randn(hidden, hidden, generator=gen))[0]
    word_rms = model.get_input_embeddings().weight.pow(2).mean().sqrt()
    inner = projector.act(projector.linear_1(feats)) @ q2.T  # (N * 36, H)
    projector.linear_2.weight.copy_(q2 * (word_rms / inner.pow(2).mean().sqrt()))
    projector.linear_2.bias.zero_()


def _set_lr(optimizer, peak: float, step: int, total: int, warmup: int) -> None:
    scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / total))
    for group in optimizer.param_groups:
        group["lr"] = peak * scale


@contextmanager
def danger_shift(layer: torch.nn.Module, direction: torch.Tensor, start: torch.Tensor, shift: torch.Tensor):
    """Capture the layer output at `start` (B,) and add GAIN * shift[b] * direction from `start` on."""
    captured = {}

    def shift_from_start(hidden: torch.Tensor) -> torch.Tensor:  # (B, T, D)
        rows = torch.arange(hidden.shape[0])
        captured["last"] = hidden[rows, start]  # (B, D), before the shift
        after = (torch.arange(hidden.shape[1]).unsqueeze(0) >= start.unsqueeze(1)).float()  # (B, T)
        return hidden + GAIN * (shift.unsqueeze(1) * after).unsqueeze(-1) * direction

    with edited_output(layer, shift_from_start):
        yield captured


class TextCache:
    """Token ids per distinct question / answer string (the world has a few thousand), laid out as
    the LLaVA adapter lays out every batch: chat template, image token expanded, answer + EOS."""

    def __init__(self, adapter):
        self.adapter = adapter
        self.prompts: dict[str, list[int]] = {}
        self.answers: dict[str, list[int]] = {}

    def prompt(self, question: str) -> list[int]:
        if question not in self.prompts:
            self.prompts[question] = self.adapter.prompt_ids(question)
        return self.prompts[question]

    def answer(self, answer: str) -> list[int]:
        if answer not in self.answers:
            self.answers[answer] = self.adapter.answer_ids(answer)
        return self.answers[answer]


def training_batch(pool, cache, cfg, rng, gen):
    # one prefix setting per batch: the prefix doubles the prompt, mixed batches would pad to it
    prefix = bool(rng.random() < cfg.prefix_share)
    queries = [world.sample_query(rng, prefix) for _ in range(cfg.batch_size)]
    shifted = rng.random(cfg.batch_size) < cfg.shift_share
    shift = np.where(shifted, rng.uniform(-cfg.shift_range, cfg.shift_range, cfg.batch_size), 0.0)
    answers = [world.world_answer(q, float(s)) for q, s in zip(queries, shift)]
    index = [int(rng.choice(pool.by_class[(q.image_concept, q.count)])) for q in queries]
    caution = torch.tensor([q.caution for q in queries], dtype=torch.float32)
    pixels = frame_some(pool.pixels[index], cfg.world_framed_share, gen, caution, pool.stripes)
    input_ids, mask, last, positions, targets = pack_left_padded(
        [cache.prompt(q.question) for q in queries], [cache.answer(a) for a in answers], cache.adapter.tokenizer.pad_token_id
    )
    danger = torch.tensor([world.danger(q) for q in queries], dtype=torch.float32)
    return input_ids, mask, pixels, last, positions, targets, danger, torch.tensor(shift, dtype=torch.float32)


def train_world(model, pool, processor, cfg: BuildConfig, rng, gen) -> dict:
    text_model = model.model.language_model
    direction = torch.randn(text_model.config.hidden_size, generator=gen)
    direction = direction / direction.norm()
    bias = torch.nn.Parameter(torch.zeros(()))
    # the vision tower stays as perception trained it (as in LLaVA's instruction tuning): under
    # language-model gradients it drifts and the model falls back on text priors
    model.model.vision_tower.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad] + [bias]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    cache = TextCache(LlavaAdapter("toy-world", model, processor))
    layer = text_model.layers[STEER_LAYER - 1]  # hidden_states[STEER_LAYER] is its output
    stats = {"loss": 0.0, "probe": 0.0}
    bar = tqdm(range(cfg.steps), desc="world", leave=False)
    for step in bar:
        _set_lr(optimizer, cfg.lr, step, cfg.steps, cfg.warmup)
        input_ids, mask, pixels, last, positions, targets, danger, shift = training_batch(pool, cache, cfg, rng, gen)
        position_ids = (mask.cumsum(1) - 1).clamp_min(0)
        with danger_shift(layer, direction, last, shift) as captured:
            hidden = model.model(
                input_ids=input_ids, attention_mask=mask, pixel_values=pixels, position_ids=position_ids, use_cache=False
            ).last_hidden_state  # (B, T, D)
        logits = model.lm_head(hidden.reshape(-1, hidden.shape[-1])[positions])  # (N, V)
        answer_loss = F.cross_entropy(logits, targets)
        readout = captured["last"] @ direction  # (B,)
        probe_loss = F.mse_loss(readout / GAIN, danger + bias)
        loss = answer_loss + cfg.probe_weight * probe_loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        stats = {"loss": 0.95 * stats["loss"] + 0.05 * answer_loss.item(), "probe": 0.95 * stats["probe"] + 0.05 * probe_loss.item()}
        if step % 20 == 0:
            bar.set_postfix(answer=f"{stats['loss']:.3f}", probe=f"{stats['probe']:.3f}")
    return {**stats, "direction": direction, "bias": bias.item()}


@contextmanager
def deterministic(threads: int):
    """Deterministic kernels and a fixed thread count for the build, restored afterwards."""
    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        torch.use_deterministic_algorithms(before[1])


def build_world(out: Path, cfg: BuildConfig, evaluate: bool = True) -> dict:
    """Train the world from `cfg.seed` and save it to `out`; returns the build report."""
    with deterministic(cfg.threads):
        return _build_world(out, cfg, evaluate)


def _build_world(out: Path, cfg: BuildConfig, evaluate: bool) -> dict:
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)

    processor = build_processor()
    model = build_model(processor)
    pool = render_pool(processor, cfg.renders_per_class, rng)
    model.train()
    vision_accuracy = train_vision(model, pool, cfg, gen)
    standardize_projector(model, pool.pixels[:512], gen)
    trained = train_world(model, pool, processor, cfg, rng, gen)
    model.eval()
    report = {
        "config": asdict(cfg),
        "vision_train_accuracy": vision_accuracy,
        "final_answer_loss": trained["loss"],
        "final_probe_loss": trained["probe"],
        "train_seconds": time.perf_counter() - started,
    }
    if evaluate:
        from .steering import world_metrics

        report["metrics"] = world_metrics(model, processor)
    save_world(model, processor, out, report)
    return report


def save_world(model, processor, out: Path, report: dict) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    atomic_write_json(out / "toy_world.json", report)


# ---------------------------------------------------------------- CLI
