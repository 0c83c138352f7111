"""DPO data: preference rows -> tokenized (chosen, rejected) pairs sharing one prompt.

Row forms (JSONL/JSON/Parquet/saved dataset):
  {"prompt": str | [messages], "chosen": str | [assistant message(s)], "rejected": ...}
  {"chosen": [full conversation], "rejected": [full conversation]}   (UltraFeedback style: the
      prompt is everything before the final assistant turn and must be the same in both)

Length policy (documented in the README):
  * a prompt (everything before the response, chat template included) longer than
    data.max_prompt_len tokens is skipped and counted: cutting it would silently change the question;
  * the response is cut from the right so prompt + response <= data.max_seq_len; the response
    therefore always keeps at least data.max_seq_len - data.max_prompt_len tokens of budget.
Rows with chosen == rejected, an empty response, a prompt mismatch or a bad role are skipped
and counted with their file:line; above data.max_bad_fraction the run aborts.
"""
from __future__ import annotations

import numpy as np

from .chat import (DEFAULT_OPTIONS, ChatOptions, RowError, normalize_message, row_tools, tokenize_chat,
                   validate_messages)
from .labels import IGNORE_INDEX
from .sources import BadRowReport


def _as_messages(value, field: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user" if field == "prompt" else "assistant", "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value):
        return [normalize_message(m, i) for i, m in enumerate(value)]  # keeps reasoning, tool calls, tool turns
    raise RowError(f"'{field}' must be a string or a list of {{role, content}} messages")


def to_pair(record: dict) -> tuple[list[dict], list[dict]]:
    """A preference row -> (chosen conversation, rejected conversation), same prompt, one final answer each."""
    if "chosen" not in record or "rejected" not in record:
        raise RowError("a preference row needs 'chosen' and 'rejected'")
    chosen, rejected = _as_messages(record["chosen"], "chosen"), _as_messages(record["rejected"], "rejected")
    if record.get("prompt") is not None:
        prompt = _as_messages(record["prompt"], "prompt")
        # responses given as full conversations repeat the prompt: keep only what follows it
        if chosen[: len(prompt)] == prompt and rejected[: len(prompt)] == prompt and len(chosen) > len(prompt):
            chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
        chosen, rejected = prompt + chosen, prompt + rejected
    if chosen[:-1] != rejected[:-1]:
        raise RowError("the prompt differs between 'chosen' and 'rejected'")
    for conv in (chosen, rejected):
        if conv[-1]["role"] != "assistant":
            raise RowError("chosen and rejected must end with an assistant response")
        if not (conv[-1]["content"] or "").strip() and not conv[-1].get("tool_calls"):
            raise RowError("empty response")
        validate_messages(conv)
    if chosen[-1] == rejected[-1]:
        raise RowError("chosen equals rejected: nothing to prefer")
    return chosen, rejected


def _prompt_len(labels: np.ndarray) -> int:
    trained = np.flatnonzero(labels != IGNORE_INDEX)
    return int(trained[0]) if len(trained) else len(labels)


def encode_pair(tokenizer, record: dict, max_seq_len: int, max_prompt_len: int, *,
                chat: ChatOptions = DEFAULT_OPTIONS):
    """-> [(chosen_ids, chosen_labels), (rejected_ids, rejected_labels)], labels on the response only."""
    out = []
    tools = row_tools(record)
    for conv in to_pair(record):
        ids, labels = tokenize_chat(tokenizer, conv, last_turn_only=True, tools=tools, options=chat)
        n_prompt = _prompt_len(labels)
        if n_prompt > max_prompt_len:
            raise RowError(f"prompt is {n_prompt} tokens, over data.max_prompt_len={max_prompt_len}")
        out.append((ids[:max_seq_len], labels[:max_seq_len]))
    return out


def build_preference_samples(tokenizer, srcs, cfg, key: str, report: BadRowReport, chat: ChatOptions = DEFAULT_OPTIONS):
    from .samples import SampleSet
    from .sft import encoded_rows

    d = cfg.data

    def sequences():
        encode = lambda record, _src: encode_pair(tokenizer, record, d.max_seq_len, d.max_prompt_len,  # noqa: E731
                                                  chat=chat)
        for pair in encoded_rows(srcs, key, report, encode):
            yield from pair  # chosen, then rejected: SampleSet unit = 2 consecutive sequences

    return SampleSet.from_sequences(sequences(), seqs_per_unit=2)
