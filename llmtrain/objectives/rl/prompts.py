"""Prompts for rollouts: rows of the usual data formats without their final assistant turn, or a
`prompt` field (text or messages), with every other column kept for the reward functions."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ...config import DataConfig, sources
from ...data.chat import normalize_message, to_messages
from ...data.sources import BadRow, BadRowReport, SplitReader, expand, fingerprint, is_hub
from ...errors import DataError

_CONVERSATION_FIELDS = ("messages", "conversations", "prompt", "instruction", "input", "output", "chosen", "rejected")


@dataclass
class PromptSet:
    messages: list  # per prompt: the conversation up to the answer to generate
    token_ids: list  # per prompt: the rendered generation prompt's token ids (np.int32: ~7x less RAM than ints)
    columns: dict  # column name -> per-prompt values (e.g. answer)
    fingerprint: str  # identity of the source files (resume checks)
    origins: list = field(default_factory=list)  # per prompt: its row's "file:line" (reward failure reports)

    def __len__(self) -> int:
        return len(self.messages)


def _prompt_messages(record: dict) -> list[dict]:
    prompt = record.get("prompt")
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list):
        return [dict(m) for m in prompt]
    if isinstance(record.get("messages"), list):  # a prompt-only conversation has no assistant turn to validate
        messages = [normalize_message(m, i) for i, m in enumerate(record["messages"])]
    else:
        messages = to_messages(record)
    while messages and messages[-1]["role"] == "assistant":  # the answer is what the policy generates
        messages = messages[:-1]
    if not messages:
        raise ValueError("no prompt left once the final assistant turn is removed")
    return messages


def load_prompts(d: DataConfig, key: str, tokenizer) -> PromptSet:
    """Every row of data.train / data.eval as a prompt; rows longer than data.max_prompt_len tokens
    or without a prompt are counted and skipped (one error line above data.max_bad_fraction)."""
    srcs = sources(d, key)
    report = BadRowReport()
    messages, ids, rows, origins = [], [], [], []
    for row, _ in SplitReader(srcs, key).rows():
        report.total += 1
        if isinstance(row, BadRow):
            report.add(row)
            continue
        try:
            msgs = _prompt_messages(row.record)
            text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - one bad row is counted, never fatal (DESIGN.md)
            report.add(BadRow(row.origin, f"no prompt: {e}"))
            continue
        tok = tokenizer(text, add_special_tokens=False).input_ids
        if len(tok) > d.max_prompt_len:
            report.add(BadRow(row.origin, f"prompt of {len(tok)} tokens > data.max_prompt_len={d.max_prompt_len}"))
            continue
        messages.append(msgs)
        ids.append(np.asarray(tok, dtype=np.int32))
        rows.append({k: v for k, v in row.record.items() if k not in _CONVERSATION_FIELDS})  # the extra columns only
        origins.append(row.origin)
    try:
        report.check(d.max_bad_fraction, key)
    except Exception as e:  # data.sources' own DataError is not yet an LlmtrainError: one error line either way
        raise DataError(str(e)) from None
    if not messages:
        raise DataError(f"{key}: no usable prompt in {', '.join(s.path for s in srcs)}")
    names = sorted({k for r in rows for k in r})
    columns = {k: [r.get(k) for r in rows] for k in names}
    paths = [p for s in srcs if not is_hub(s) for p in expand(s.path, key)]  # hub ids: named by the recipe
    return PromptSet(messages, ids, columns, fingerprint(paths), origins)

