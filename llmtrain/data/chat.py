"""Chat rows -> messages -> token ids with an assistant-only label mask.

Formats (auto-detected per row, or forced with a source's `format`):
  messages  OpenAI:   {"messages": [{"role": "system"|"user"|"assistant"|"tool"|..., "content": str}, ...],
                       "tools": [function schemas] (optional)}
            assistant messages may carry `reasoning_content` (or `reasoning` / `thinking`) and
            `tool_calls`; tool results are `tool` (or `ipython`) messages
  sharegpt  ShareGPT: {"conversations": [{"from": "system"|"human"|"gpt"|"observation"|"function_call", "value": str}, ...]}
  alpaca    Alpaca:   {"instruction": str, "input": str (optional), "output": str, "system": str (optional)}

Masking (chat_render.py renders, chat_spans.py locates and verifies): only assistant turns are
trained, end-of-turn included; reasoning per `ChatOptions.train_reasoning`; tool results,
system and user turns never. A row that cannot be masked exactly raises RowError (one counted
bad row with its reason), whatever the template does with it.
"""
from __future__ import annotations

import json
from typing import Optional

import numpy as np

from .chat_base import DEFAULT_OPTIONS, ChatOptions, RowError  # noqa: F401  (re-exported: the chat API)

MASK_VERSION = 2  # bump when masks change for the same rows and template: keys the tokenization cache

_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "observation": "tool", "tool": "tool", "function_call": "assistant"}
_ROLES = ("system", "developer", "user", "assistant", "tool", "ipython")
_REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")


def chat_options(data_cfg) -> ChatOptions:
    """The DataConfig keys that shape masks (also part of the tokenization cache key)."""
    return ChatOptions(train_reasoning=data_cfg.train_reasoning, template_date=data_cfg.template_date)


def detect_format(record: dict) -> str:
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    raise RowError("no 'messages', 'conversations' or 'instruction'/'output' field")


def to_messages(record: dict, fmt: str = "auto") -> list[dict]:
    """Any supported row form -> validated messages (role, content and the optional fields kept)."""
    fmt = detect_format(record) if fmt == "auto" else fmt
    if fmt == "messages":
        raw = record.get("messages")
        if not isinstance(raw, list):
            raise RowError("'messages' must be a list")
        messages = [normalize_message(m, i) for i, m in enumerate(raw)]
    elif fmt == "sharegpt":
        raw = record.get("conversations")
        if not isinstance(raw, list):
            raise RowError("'conversations' must be a list")
        messages = [_sharegpt_message(m, i) for i, m in enumerate(raw)]
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


def row_tools(record: dict) -> Optional[list]:
    """The row's tool (function) schemas, passed to the template as `tools`; a JSON string is parsed."""
    tools = record.get("tools")
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise RowError("'tools' is a string that is not JSON") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RowError("'tools' must be a list of function schemas (objects)")
    return tools


def normalize_message(m, i: int) -> dict:
    """One OpenAI-style message -> {role, content[, reasoning_content][, tool_calls][, tool_call_id, name]}."""
    if not isinstance(m, dict) or "role" not in m:
        raise RowError(f"turn {i}: each message needs 'role' and 'content'")
    role = m["role"]
    if role not in _ROLES:
        raise RowError(f"unknown role {role!r} in turn {i} (expected one of {', '.join(_ROLES)})")
    content = m.get("content")
    if isinstance(content, list):
        raise RowError(f"turn {i} content is a list of parts (multimodal content); only text content is supported")
    out = {"role": role, "content": content}
    reasoning = next((m[k] for k in _REASONING_KEYS if m.get(k) is not None), None)
    if reasoning is not None:
        if role != "assistant" or not isinstance(reasoning, str):
            raise RowError(f"turn {i}: reasoning must be a string on an assistant message")
        if reasoning.strip():
            out["reasoning_content"] = reasoning
    if m.get("tool_calls"):
        if role != "assistant":
            raise RowError(f"turn {i}: only assistant messages carry tool_calls")
        out["tool_calls"] = [_tool_call(c, i) for c in m["tool_calls"]] if isinstance(m["tool_calls"], list) else None
        if out["tool_calls"] is None:
            raise RowError(f"turn {i}: tool_calls must be a list")
    for key in ("tool_call_id", "name"):
        if m.get(key) is not None and role in ("tool", "ipython"):
            out[key] = m[key]
    if content is None and not out.get("tool_calls"):
        raise RowError(f"turn {i}: each message needs 'role' and 'content'")
    return out


def _tool_call(call, i: int) -> dict:
    """{"function": {"name", "arguments"}} or flat {"name", "arguments"}; JSON-string arguments are parsed,
    since transformers' chat templates expect an object."""
    fn = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise RowError(f"turn {i}: a tool call needs a function name")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            pass  # kept as the string it is: some templates render it verbatim
    out = {"type": call.get("type", "function"), "function": {"name": fn["name"], "arguments": args}}
    if call.get("id") is not None:
        out["id"] = call["id"]
    return out


def _sharegpt_message(m, i: int) -> dict:
    if not isinstance(m, dict) or "from" not in m or "value" not in m:
        raise RowError("each conversation turn needs 'from' and 'value'")
    if m["from"] not in _SHAREGPT_ROLES:
        raise RowError(f"unknown role {m['from']!r} (expected one of {', '.join(_SHAREGPT_ROLES)})")
    if m["from"] != "function_call":
        return normalize_message({"role": _SHAREGPT_ROLES[m["from"]], "content": m["value"]}, i)
    try:  # the call itself, as JSON: {"name": ..., "arguments": ...} or a list of them
        calls = json.loads(m["value"])
    except (TypeError, json.JSONDecodeError):
        raise RowError(f"turn {i}: a function_call value must be JSON {{name, arguments}}") from None
    calls = calls if isinstance(calls, list) else [calls]
    return normalize_message({"role": "assistant", "content": None, "tool_calls": calls}, i)


def validate_messages(messages: list[dict]) -> None:
    if not messages:
        raise RowError("empty conversation")
    for i, m in enumerate(messages):
        if m["content"] is not None and not isinstance(m["content"], str):
            raise RowError(f"turn {i} content is not a string")
        if m["role"] == "assistant" and not (m["content"] or "").strip() and not m.get("tool_calls"):
            raise RowError(f"empty assistant turn {i}")
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError("no assistant turn to learn from")


def tokenize_chat(tokenizer, messages: list[dict], last_turn_only: bool = False, *, tools: Optional[list] = None,
                  options: ChatOptions = DEFAULT_OPTIONS) -> tuple[np.ndarray, np.ndarray]:
    """messages -> (input_ids, labels) as int32 arrays; labels = IGNORE_INDEX outside assistant turns
    (outside the final assistant turn with `last_turn_only`, as DPO scores only the response).
    RowError when the row cannot be rendered or masked exactly."""
    from .chat_render import Renderer
    from .chat_spans import assistant_spans, labels_from_spans

    renderer = Renderer(tokenizer, tools, options)
    text, spans = assistant_spans(renderer, messages, last_turn_only)
    return labels_from_spans(tokenizer, text, spans)


# ChatML. Every message renders to a fixed string that depends only on that message, so rendering
# messages[:k] is a prefix of rendering messages[:k+1]; the SFT data code relies on this to find
# where each assistant turn starts. {% generation %} marks the trained span (content + <|im_end|>)
# for `return_assistant_tokens_mask=True`; it renders nothing itself.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\n' -}}"
    "{%- else -%}"
    "{{- message['content'] + '<|im_end|>' + '\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)


def default_chat_template() -> str:
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
