"""Tiny random models built from a config in a second: no downloads, no real weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CLI = [sys.executable, "-c", "from celslm.commands.main import run; run()"]


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


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2", seed=1)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama", seed=2)


@pytest.fixture(autouse=True)
def celslm_home(request, tmp_path, monkeypatch) -> Path:
    """Keep every test's models and caches out of the user's home (real-model tests read the installed ones)."""
    if request.node.get_closest_marker("realmodel"):
        return Path(os.environ.get("CELSLM_HOME") or Path.home() / ".cache" / "celslm")
    home = tmp_path / "celslm-home"
    monkeypatch.setenv("CELSLM_HOME", str(home))
    return home


def run_cli(*args: str, input: bytes | None = None, env: dict | None = None, check: bool = False):
    """Run the real command line in a subprocess; returns CompletedProcess with bytes output."""
    result = subprocess.run(CLI + list(args), input=input, capture_output=True,
                            env={**os.environ, **(env or {})}, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"celslm {' '.join(args)} exited {result.returncode}: {result.stderr.decode()[-2000:]}")
    return result


CONTEXT = (
    "def greet(name):\n    \"\"\"Return a greeting for name.\"\"\"\n    return 'Hello, ' + name + '!'\n\n"
    "class Counter:\n    def __init__(self):\n        self.count = 0\n\n    def bump(self):\n        self.count += 1\n"
)


@pytest.fixture(scope="session")
def prefilled(tiny_qwen, tmp_path_factory) -> Path:
    """A folder with ctx.txt and its artifact a.kv (tiny Qwen2, chunks of 64), shared by the server tests."""
    folder = tmp_path_factory.mktemp("prefilled")
    (folder / "ctx.txt").write_text(CONTEXT * 3)
    run_cli("prefill", "-m", str(tiny_qwen), "-c", str(folder / "ctx.txt"), "-o", str(folder / "a.kv"),
            "--chunk-size", "64", check=True)
    return folder


# Two tiny Qwen2 models sharing the byte tokenizer: different depths (5 vs 3) and head dims (24 vs 16),
# and an alignment between them (seconds to build).
LARGE = dict(hidden_size=96, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="session")
def aligned_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    large = save_tiny_model(root / "large", "qwen2", seed=3, **LARGE)
    small = save_tiny_model(root / "small", "qwen2", seed=4)
    calib = root / "calib"
    calib.mkdir()
    for index in range(5):  # distinct texts, each long enough for one 160-byte window
        (calib / f"c{index}.txt").write_text((CONTEXT.replace("name", f"name{index}") + f"# file {index}\n") * 2)
    out = root / "pair.align"
    run_cli("align", "--llm", str(large), "--slm", str(small), "--out", str(out), "--calib", str(calib),
            "--windows", "5", "--window", "160", "--heldout", "1", "--continuation", "32", "--rows", "64",
            "--plots", str(root / "plots"), check=True)
    return {"large": large, "small": small, "align": out, "root": root}
