"""Chat rows -> messages -> token ids with an assistant-only label mask.

Formats (auto-detected per row, or forced with a source's `format`):
  messages  OpenAI:   {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
  sharegpt  ShareGPT: {"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}
  alpaca    Alpaca:   {"instruction": str, "input": str (optional), "output": str, "system": str (optional)}

Masking uses the tokenizer's own chat template. Most templates carry no `{% generation %}`
markers (which transformers' `return_assistant_tokens_mask` needs), so we find each assistant
turn's character span by rendering prefixes of the conversation: the text added between
render(messages[:i], add_generation_prompt=True) and render(messages[:i+1]) is what the model
must produce, end-of-turn token included. Token labels then follow from the fast tokenizer's
character offsets. This works for any template whose renderings of prefixes are string
prefixes of the full rendering (ChatML, Llama-3, Mistral, Gemma, ...); others fail loudly.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

IGNORE_INDEX = -100

_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
_ROLES = ("system", "user", "assistant")


class RowError(ValueError):
    """This one row is malformed: skipped and counted with its file:line."""


class TemplateError(ValueError):
    """The chat template cannot be used for assistant-only masking: a config error."""


def detect_format(record: dict) -> str:
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    raise RowError("no 'messages', 'conversations' or 'instruction'/'output' field")


def to_messages(record: dict, fmt: str = "auto") -> list[dict]:
    """Any supported row form -> validated [{"role", "content"}] ending with an assistant turn."""
    fmt = detect_format(record) if fmt == "auto" else fmt
    if fmt == "messages":
        raw = record.get("messages")
        if not isinstance(raw, list):
            raise RowError("'messages' must be a list")
        messages = []
        for m in raw:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise RowError("each message needs 'role' and 'content'")
            messages.append({"role": m["role"], "content": m["content"]})
    elif fmt == "sharegpt":
        raw = record.get("conversations")
        if not isinstance(raw, list):
            raise RowError("'conversations' must be a list")
        messages = []
        for m in raw:
            if not isinstance(m, dict) or "from" not in m or "value" not in m:
                raise RowError("each conversation turn needs 'from' and 'value'")
            if m["from"] not in _SHAREGPT_ROLES:
                raise RowError(f"unknown role {m['from']!r} (expected one of {', '.join(_SHAREGPT_ROLES)})")
            messages.append({"role": _SHAREGPT_ROLES[m["from"]], "content": m["value"]})
    elif fmt == "alpaca":
        instruction, extra, output = record.get("instruction"), record.get("input") or "", record.get("output")
        if not isinstance(instruction, str) or not isinstance(output, str) or not isinstance(extra, str):
            raise RowError("alpaca rows need string 'instruction' and 'output' (and optional 'input')")
        user = instruction + ("\n\n" + extra if extra.strip() else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        if record.get("system"):
            messages.insert(0, {"role": "system", "content": record["system"]})
    else:
        raise RowError(f"unknown format {fmt!r}")
    validate_messages(messages)
    return messages


def validate_messages(messages: list[dict]) -> None:
    if not messages:
        raise RowError("empty conversation")
    for i, m in enumerate(messages):
        if m["role"] not in _ROLES:
            raise RowError(f"unknown role {m['role']!r} in turn {i} (expected system, user or assistant)")
        if not isinstance(m["content"], str):
            raise RowError(f"turn {i} content is not a string")
        if m["role"] == "system" and i != 0:
            raise RowError(f"system message in turn {i}; only the first turn may be a system prompt")
        if m["role"] == "assistant" and not m["content"].strip():
            raise RowError(f"empty assistant turn {i}")
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError("no assistant turn to learn from")


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Full rendered text and the [start, end) character span of every assistant turn."""
    full = render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        after = render(tokenizer, messages[: i + 1])
        if not (after.startswith(before) and full.startswith(after)):
            raise TemplateError(
                "the chat template does not render conversation prefixes as text prefixes, so assistant "
                "turns cannot be located; set model.chat_template to a prefix-stable template (e.g. ChatML)"
            )
        # trailing whitespace after the end-of-turn token is layout, not something to learn
        end = max(len(after.rstrip()), len(before) + 1)
        spans.append((len(before), end))
    return full, spans


def tokenize_chat(tokenizer, messages: list[dict], last_turn_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """messages -> (input_ids, labels) as int32 arrays; labels = IGNORE_INDEX outside assistant turns
    (outside the final assistant turn with `last_turn_only`, as DPO scores only the response)."""
    text, spans = assistant_spans(tokenizer, messages)
    if last_turn_only:
        spans = spans[-1:]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int32)
    labels = np.full_like(ids, IGNORE_INDEX)
    offsets = enc["offset_mapping"]
    j = 0
    for t, (start, end) in enumerate(offsets):
        # a token is trained when it overlaps an assistant span (spans are sorted, tokens too)
        while j < len(spans) and spans[j][1] <= start:
            j += 1
        if j < len(spans) and start < spans[j][1] and max(end, start + 1) > spans[j][0]:
            labels[t] = ids[t]
    return ids, labels


def default_chat_template() -> str:
    from ..tokenizer_train import CHATML_TEMPLATE

    return CHATML_TEMPLATE


def ensure_chat_template(tokenizer, override: Optional[str] = None) -> None:
    """Use model.chat_template when set (inline jinja or a file), else the tokenizer's own, else ChatML."""
    import os

    if override:
        if os.path.isfile(override):
            with open(override) as f:
                override = f.read()
        tokenizer.chat_template = override
    elif not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = default_chat_template()
