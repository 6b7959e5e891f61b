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


# ---------------------------------------------------------------- tiny GGUF files (both engines load them)

GGUF_SPECIALS = ("<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")


def _hf_to_gguf_name(name: str) -> str | None:
    table = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if name in table:
        return table[name]
    parts = name.split(".")  # model.layers.{i}.{module}.{proj}.{weight|bias}
    blk = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    module = ".".join(parts[3:-1])
    return f"blk.{parts[2]}.{blk[module]}.{parts[-1]}" if module in blk else None


def _permute(weight, heads: int):
    """convert_hf_to_gguf's Q/K row permutation for NORM-RoPE architectures (llama)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def save_tiny_gguf(path: Path, arch: str = "llama", seed: int = 0, layers: int = 3, context: int = 1024,
                   **overrides) -> Path:
    """A tiny random model as a GGUF file (fp32 weights, a byte-level BPE vocabulary plus chat specials, a
    chat template) written the way convert_hf_to_gguf writes `arch` (llama or qwen2)."""
    import gguf
    from transformers import AutoModelForCausalLM

    vocab = len(GGUF_SPECIALS) + 257
    config = tiny_config(arch, vocab_size=vocab, num_hidden_layers=layers, max_position_embeddings=context,
                         eos_token_id=GGUF_SPECIALS.index("<|im_end|>"), bos_token_id=1, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(context)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    # byte-level BPE, one token per byte and one merge (llama.cpp wants one), pre-tokenized as the
    # bundled models of this architecture are (SmolLM2 for llama, Qwen2.5 for qwen2)
    from tokenizers import pre_tokenizers

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm" if arch == "llama" else "qwen2")
    pieces, kind = sorted(pre_tokenizers.ByteLevel.alphabet()) + ["ĠĠ"], gguf.TokenType.NORMAL
    tokens = [*GGUF_SPECIALS[:3], *pieces, *GGUF_SPECIALS[3:]]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL,
             *([kind] * len(pieces)), gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types(types)
    writer.add_token_merges(["Ġ Ġ"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, tensor in model.state_dict().items():
        target = _hf_to_gguf_name(name)
        if target is None:
            continue
        array = tensor.detach().float().numpy()
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            array = _permute(array, heads if "q_proj" in name else kv_heads)
        writer.add_tensor(target, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
