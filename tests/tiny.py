"""Tiny random models built from a config in a second: no downloads, no real weights.

No pytest here: the wheel round trip (tests/wheel_roundtrip.py) builds its model with these too.
"""

from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer(chat: bool = True, extra_special: tuple[str, ...] = ()):
    """A byte-level tokenizer (256 byte tokens + 2 specials, + `extra_special`), with a tiny chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                        additional_special_tokens=["<|im_start|>", *extra_special])
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(arch: str, **overrides):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  eos_token_id=257, bos_token_id=None, pad_token_id=None, tie_word_embeddings=False)
    common.update(overrides)
    if arch == "qwen2":
        return Qwen2Config(**common)
    return LlamaConfig(**common, head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 500.0})


def save_tiny_model(folder: Path, arch: str, seed: int = 0, chat: bool = True, extra_special: tuple[str, ...] = (),
                    **overrides) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides))
    # Random init leaves logits nearly flat; scale them up so greedy choices are well separated.
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(folder)
    byte_tokenizer(chat, extra_special).save_pretrained(folder)
    return folder
