"""RL prompt rows: a row of the usual data formats without its final assistant turn, or a `prompt`
field (text or messages), rendered with the chat template's generation prompt. What a row keeps
beside its token ids (its *payload*, stored in the prepared split next to the ids): the
conversation up to the answer (the reward functions' `prompts`), every other column (e.g. a gold
`answer`), and its file:line (reward-failure reports)."""
from __future__ import annotations

import json

import numpy as np

from .chat import RowError, normalize_message, row_tools, to_messages
from .chat_base import DEFAULT_OPTIONS, ChatOptions
from .chat_render import Renderer, template_view
from .labels import IGNORE_INDEX

CONVERSATION_FIELDS = ("messages", "conversations", "prompt", "instruction", "input", "output", "chosen", "rejected")


def prompt_messages(record: dict, fmt: str = "auto") -> list[dict]:
    prompt = record.get("prompt")
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list):
        return [dict(m) for m in prompt]
    if isinstance(record.get("messages"), list):  # a prompt-only conversation has no assistant turn to validate
        messages = [normalize_message(m, i) for i, m in enumerate(record["messages"])]
    else:
        messages = to_messages(record, fmt)
    while messages and messages[-1]["role"] == "assistant":  # the answer is what the policy generates
        messages = messages[:-1]
    if not messages:
        raise RowError("no prompt left once the final assistant turn is removed")
    return messages


def encode_prompt(tokenizer, record: dict, fmt: str, max_prompt_len: int, origin: str, *,
                  chat: ChatOptions = DEFAULT_OPTIONS) -> list[tuple]:
    """One row -> [(ids, labels, payload, identity)]: the generation prompt's ids (no trained token),
    rendered as SFT renders (the row's tools, data.template_date: a cached preparation does not depend
    on the day it ran); the payload bytes (decode_payload) and the part of them that is the data's
    identity (without the file:line: moving or re-spelling a file is not new data). RowError when the
    row has no prompt or exceeds max_prompt_len."""
    try:
        messages = prompt_messages(record, fmt)
        text = Renderer(tokenizer, row_tools(record), chat)(template_view(messages), add_generation_prompt=True)
        ids = np.asarray(tokenizer(text, add_special_tokens=False).input_ids, dtype=np.int32)
    except RowError:
        raise
    except Exception as e:  # noqa: BLE001 - e.g. a row's value the tokenizer refuses: one counted bad row
        raise RowError(f"no prompt: {e}") from None
    if len(ids) > max_prompt_len:
        raise RowError(f"prompt of {len(ids)} tokens > data.max_prompt_len={max_prompt_len}")
    extra = {k: v for k, v in record.items() if k not in CONVERSATION_FIELDS}  # = EncodeSpec.extra_columns
    # default=str: a column JSON has no type for (a Parquet timestamp, Decimal, bytes) reaches the reward
    # functions as its str() instead of costing the row; ASCII escapes keep a lone surrogate encodable
    content = json.dumps({"m": messages, "c": extra}, default=str)
    payload = json.dumps({"m": messages, "c": extra, "o": origin}, default=str).encode()
    return [(ids, np.full(len(ids), IGNORE_INDEX, dtype=np.int64), payload, content.encode())]


def decode_payload(raw: bytes) -> tuple[list, dict, str]:
    """-> (messages, extra columns, file:line)."""
    d = json.loads(raw)
    return d["m"], d["c"], d["o"]
