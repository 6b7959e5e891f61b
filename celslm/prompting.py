"""How context and prompt text become token ids, with or without the model's chat template.

With a chat template, the context opens a user turn ("chat" framing) and the private prompt closes
it, so the model reads: <turn start> context, blank line, prompt <turn end> <assistant start>. The
template is rendered once around two markers and split there, so any model's template works.
"""

from __future__ import annotations

from dataclasses import dataclass

_CONTEXT_MARK = "\x00celslm-context\x00"
_PROMPT_MARK = "\x00celslm-prompt\x00"
SEPARATOR = "\n\n"


@dataclass(frozen=True)
class ChatFrame:
    head: str  # everything the template puts before the user's text
    tail: str  # everything after it, through the assistant's opening


def chat_frame(tokenizer) -> ChatFrame | None:
    if not getattr(tokenizer, "chat_template", None):
        return None
    messages = [{"role": "user", "content": _CONTEXT_MARK + _PROMPT_MARK}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if _CONTEXT_MARK not in text or _PROMPT_MARK not in text:
        return None
    return ChatFrame(head=text[: text.index(_CONTEXT_MARK)], tail=text[text.index(_PROMPT_MARK) + len(_PROMPT_MARK) :])


def default_framing(tokenizer) -> str:
    return "chat" if chat_frame(tokenizer) else "raw"


def context_ids(tokenizer, context: str, framing: str) -> list[int]:
    if framing == "chat":
        frame = chat_frame(tokenizer)
        if frame is None:
            raise ValueError("chat framing needs a tokenizer with a chat template")
        return tokenizer(frame.head + context, add_special_tokens=False)["input_ids"]
    return tokenizer(context, add_special_tokens=True)["input_ids"]


def empty_prompt(tokenizer, prompt: str, raw: bool) -> bool:
    """Whether `prompt_ids` would give no ids, without tokenizing: on the llama.cpp engine the vocabulary
    comes with the model, and the artifact's layers should not wait for it to load."""
    return not prompt and (raw or chat_frame(tokenizer) is None)


def prompt_ids(tokenizer, prompt: str, framing: str, raw: bool) -> list[int]:
    """The private prompt's ids, continuing a context prefilled with `framing`."""
    frame = None if raw else chat_frame(tokenizer)
    if frame is None:
        text = prompt
    elif framing == "chat":
        text = SEPARATOR + prompt + frame.tail
    else:  # a plain-text context followed by a whole chat turn
        text = SEPARATOR + frame.head + prompt + frame.tail
    return tokenizer(text, add_special_tokens=False)["input_ids"]
