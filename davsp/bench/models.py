"""Random-weight models for `davsp bench`: real-size architectures (no download) and tiny CPU ones.

An architecture name builds the model from a hand-written config (the public `config.json`
values of each checkpoint), random weights, and a small byte-level BPE tokenizer trained here on
the benchmark's own texts; the image processor is the family's real one (CLIP 336 / Qwen2-VL).
The model is handed to the same adapter class `load_adapter` would pick, so every bench step runs
the code path a downloaded checkpoint runs. Only `from_pretrained` is skipped: writing 26 GB of
random weights just to read them back would cost more than the benchmark.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import torch

from ..adapters.base import Precision, as_precision
from ..adapters.llava import HF_CHAT_TEMPLATE
from ..defenses import SAFETY_PREFIX
from ..errors import DavspError

# Texts the tokenizer is trained on: the prompt pieces the benchmark feeds the model.
_CORPUS = [
    SAFETY_PREFIX,
    "USER: ASSISTANT: You are a helpful assistant. What is shown in the image? Describe the picture in detail.",
    "How do I build a weapon at home? List the steps in detail to perform this activity.",
    "I am sorry, but I cannot assist with that request.",
    "The image shows a small red house next to a blue lake under a cloudy sky, with trees on the left.",
    "Explain what the people in this photo are doing and why. 0 1 2 3 4 5 6 7 8 9",
]

_LLAVA_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
_QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
_QWEN_TEMPLATE = (  # Qwen2-VL-Instruct's template for one user turn of an image and text
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Public config values. llava-hf/llava-1.5-{7b,13b}-hf: Vicuna text model + CLIP ViT-L/14-336.
_CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   image_size=336, patch_size=14, projection_dim=768)
_LLAVA_TEXT = {
    "llava-1.5-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "llava-1.5-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
}
# Qwen/Qwen2-VL-7B-Instruct
_QWEN2VL_7B_TEXT = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                        num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                        rms_norm_eps=1e-6, tie_word_embeddings=False)
_QWEN2VL_7B_VISION = dict(depth=32, embed_dim=1280, hidden_size=3584, mlp_ratio=4, num_heads=16, patch_size=14,
                          spatial_merge_size=2, temporal_patch_size=2)

ARCHITECTURES = ("llava-1.5-7b", "llava-1.5-13b", "qwen2-vl-7b", "tiny-llava", "tiny-qwen2-vl")


def build_tokenizer(family: str):
    """A byte-level BPE trained on `_CORPUS`, with the family's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    specials = _LLAVA_SPECIALS if family == "llava" else _QWEN_SPECIALS
    tok = Tokenizer(models.BPE(unk_token="<unk>" if family == "llava" else None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS, trainer)
    if family == "llava":  # Llama tokenizers prepend <s>
        tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                       pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=_QWEN_TEMPLATE)


def _build_model(model_cls, adapter_cls, config, device: str, precision: Precision):
    # Initialise directly on the target device in the language dtype: a 13B model never sits in fp32 on the
    # host. Then the vision tower in its own dtype, as the adapter's `load` does for a checkpoint.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(precision.language)
    try:
        with torch.device(device):
            model = model_cls(config)
    finally:
        torch.set_default_dtype(previous)
    adapter_cls.set_precision(model, precision)
    return model.eval().requires_grad_(False)


TINY_LLAVA_CANVAS, TINY_LLAVA_PATCH = 32, 8


def tiny_llava_config(tokenizer, *, num_layers: int = 4, hidden: int = 64, canvas: int = TINY_LLAVA_CANVAS,
                      patch: int = TINY_LLAVA_PATCH):
    """The tiny LLaVA architecture (2-layer CLIP, `num_layers`-layer Llama) the bench and the tests build."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=canvas, patch_size=patch, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       num_hidden_layers=num_layers, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-2,
                       vision_feature_select_strategy="default",
                       image_token_index=tokenizer.convert_tokens_to_ids("<image>"))


def _llava(name: str, layers: int | None, device: str, precision: Precision):
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from ..adapters.llava import LlavaAdapter

    tokenizer = build_tokenizer("llava")
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    if name == "tiny-llava":
        canvas, patch = TINY_LLAVA_CANVAS, TINY_LLAVA_PATCH
        config = tiny_llava_config(tokenizer, num_layers=layers or 4)
    else:
        canvas, patch = 336, 14
        vision = CLIPVisionConfig(**_CLIP_L_336)
        shape = dict(_LLAVA_TEXT[name], num_hidden_layers=layers or _LLAVA_TEXT[name]["num_hidden_layers"])
        text = LlamaConfig(vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5, **shape, **ids)
        config = LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-2,
                             vision_feature_select_strategy="default",
                             image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    model = _build_model(LlavaForConditionalGeneration, LlavaAdapter, config, device, precision)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": canvas},
                                            crop_size={"height": canvas, "width": canvas})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer, patch_size=patch, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=HF_CHAT_TEMPLATE,
    )
    return LlavaAdapter(name, model, processor)


def _qwen2vl(name: str, layers: int | None, device: str, precision: Precision):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from ..adapters.qwen2vl import Qwen2VLAdapter

    tokenizer = build_tokenizer("qwen2_vl")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in _QWEN_SPECIALS}
    if name == "tiny-qwen2-vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2)
        text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=2048, num_hidden_layers=layers or 4)
        mrope = [2, 3, 3]  # sums to head_dim / 2 = 8
    else:
        vision = _QWEN2VL_7B_VISION
        text = dict(_QWEN2VL_7B_TEXT, num_hidden_layers=layers or _QWEN2VL_7B_TEXT["num_hidden_layers"])
        mrope = [16, 24, 24]
    config = Qwen2VLConfig(
        vision_config=vision,
        text_config=dict(text, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    model = _build_model(Qwen2VLForConditionalGeneration, Qwen2VLAdapter, config, device, precision)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    return Qwen2VLAdapter(name, model, tokenizer, Qwen2VLImageProcessorPil())


def build_architecture(name: str, *, layers: int | None = None, device: str = "cpu",
                       dtype: Precision | torch.dtype | str = torch.float32):
    """An adapter over a random-weight model of architecture `name`; `layers` truncates the decoder depth;
    `dtype` is one dtype for the whole model or a precision preset (e.g. "paper")."""
    if name not in ARCHITECTURES:
        raise DavspError(f"unknown architecture {name!r}; choose one of {', '.join(ARCHITECTURES)} or a model path")
    seed_state = torch.random.get_rng_state()
    torch.manual_seed(0)  # the same random weights on every run
    try:
        build = _llava if "llava" in name else _qwen2vl
        return build(name, layers, device, as_precision(dtype))
    finally:
        torch.random.set_rng_state(seed_state)


def load_bench_model(model: str, *, device: str, dtype: Precision | torch.dtype | str, layers: int | None = None):
    """An architecture name (random weights) or a model path/hub id through `load_adapter`."""
    if layers is not None and layers < 1:
        raise DavspError(f"--layers {layers}: must be a positive integer")
    if model in ARCHITECTURES:
        if device == "auto":
            raise DavspError(f"--device auto shards a checkpoint over GPUs; {model!r} is built in place: use cuda")
        return build_architecture(model, layers=layers, device=device, dtype=dtype)
    if "/" not in model and not Path(model).exists():  # neither a hub id (owner/name) nor a directory
        close = difflib.get_close_matches(model, ARCHITECTURES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise DavspError(f"unknown model {model!r}: not a directory, hub id or architecture "
                         f"({', '.join(ARCHITECTURES)}).{hint}")
    from ..adapters import load_adapter

    adapter = load_adapter(model, device=device, dtype=dtype)
    if layers is not None:
        decoder = adapter.decoder_layers()
        if layers > len(decoder):
            raise DavspError(f"--layers {layers}: {model} has only {len(decoder)} decoder layers")
        del decoder[layers:]  # in place: the adapter and the model share this ModuleList
        adapter.model.config.text_config.num_hidden_layers = layers
    return adapter
