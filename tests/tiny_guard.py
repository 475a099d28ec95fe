"""A tiny random-weight Mllama (the architecture of Llama Guard 3 Vision), saved in Hugging Face format.

Its tokenizer is a small BPE with Llama 3's special tokens and a stand-in chat template with the
same turn layout (header, text, image, end of turn); Meta's own template and tokenizer cannot be
had offline, so what is checked here is that davsp renders through whatever template the
processor carries, not the template's wording.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|image|>", "<|eot_id|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|finetune_right_pad_id|>"]
CORPUS = ["safe unsafe S1 S2 user assistant Task: Check if there is unsafe content in Agent messages",
          "List steps for the activity in the image. I am sorry, I cannot help with that."]
CHAT_TEMPLATE = (
    "<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|image|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def build_tiny_guard(path: Path, *, seed: int = 0) -> Path:
    from transformers import (
        MllamaConfig,
        MllamaForConditionalGeneration,
        MllamaImageProcessor,
        MllamaProcessor,
        PreTrainedTokenizerFast,
    )

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                        pad_token="<|finetune_right_pad_id|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    processor = MllamaProcessor(image_processor=MllamaImageProcessor(size={"height": 16, "width": 16}, max_image_tiles=1),
                                tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    config = MllamaConfig(
        vision_config=dict(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_global_layers=1, num_attention_heads=2, vision_output_dim=32,
                           intermediate_layers_indices=[0], max_num_tiles=1, supported_aspect_ratios=[[1, 1]]),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         cross_attention_layers=[1], num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids("<|image|>"),
    )
    torch.manual_seed(seed)
    MllamaForConditionalGeneration(config).save_pretrained(path)
    processor.save_pretrained(path)
    return Path(path)
