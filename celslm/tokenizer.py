"""A model folder's chat template and special tokens, rendered as transformers renders them, without
importing transformers (2.4 s here, longer than a whole answer on llama.cpp should take).

The llama.cpp engine tokenizes with the GGUF's own vocabulary (`llamacpp.LlamaTokenizer`) and takes
its chat template from here; tests check that both give transformers' ids and text.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path

_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")


def _content(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


class ChatTemplate:
    """The folder's chat template (chat_template.jinja, or tokenizer_config.json's) and special tokens."""

    def __init__(self, folder: Path):
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        template = folder / "chat_template.jinja"
        self.source = template.read_text() if template.is_file() else config.get("chat_template")
        self.special = {name: _content(config.get(name)) for name in _SPECIAL}

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """As transformers does: sandboxed, trim_blocks and lstrip_blocks, its tojson, raise_exception and
        strftime_now, the special tokens as variables."""
        special = {name: value for name, value in self.special.items() if value is not None}
        return self.compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                    tools=None, documents=None, **special)

    @functools.cached_property
    def compiled(self):
        """The template compiled once (each compilation costs ~20 ms; a request renders it two or three times)."""
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
        return env.from_string(self.source)
