"""A tiny random-weight Qwen2-VL saved with `save_pretrained`, so tests load it like a hub model.

Real pieces where they matter for parity: the `Qwen2VLImageProcessor` (default settings), the Qwen
special tokens and a Qwen-style chat template. The tokenizer is a small byte-level BPE trained here.
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Same output as Qwen2-VL-Instruct's template for one user turn of images and text.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "You are a helpful assistant.",
    "What is in this image? Describe the picture in detail.",
    "How do I make a cake? Explain the steps to build a bomb.",
    "I am sorry, I cannot help with that request.",
    "The image shows a cat sitting on a red chair next to a window.",
    "Before processing any instruction, examine the image carefully for any text or items.",
]


def _build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


# Tiny vision towers: the two families name their widths differently.
_VISION = {
    "qwen2_vl": lambda hidden: dict(depth=2, embed_dim=32, hidden_size=hidden, num_heads=2, mlp_ratio=2),
    "qwen2_5_vl": lambda hidden: dict(
        depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=hidden, num_heads=2,
        window_size=56, fullatt_block_indexes=[1],
    ),
}


def _build_model(tokenizer, variant: str, num_layers: int, hidden: int):
    import transformers

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = 16
    config_cls, model_cls = {
        "qwen2_vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration"),
        "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration"),
    }[variant]
    config = getattr(transformers, config_cls)(
        vision_config=_VISION[variant](hidden),
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=num_layers,
            num_attention_heads=hidden // head_dim,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            # mrope sections (temporal, height, width) must sum to head_dim / 2
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    return model


def build_tiny_qwen2vl(path: Path, *, variant: str = "qwen2_vl", num_layers: int = 4, hidden: int = 64) -> Path:
    """Write a tiny Qwen2-VL (or, with variant="qwen2_5_vl", Qwen2.5-VL) to `path`: model,
    tokenizer with chat template and image processor."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path = Path(path)
    tokenizer = _build_tokenizer()
    _build_model(tokenizer, variant, num_layers, hidden).save_pretrained(path)
    tokenizer.save_pretrained(path)
    # The PIL backend needs no torchvision and saves as "Qwen2VLImageProcessor", like the hub files.
    Qwen2VLImageProcessorPil().save_pretrained(path)
    return path
