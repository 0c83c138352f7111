"""Prompts for rollouts, read by position from a prepared split.

A row of the usual data formats without its final assistant turn, or a `prompt` field (text or
messages), with every other column kept for the reward functions (llmtrain.data.prompts encodes a
row). The split is prepared once by all ranks together into the content-keyed cache, exactly as SFT
data is (llmtrain.data.prepare_samples: chunks tokenized in parallel, bad rows with file:line,
resumable, `llmtrain prepare` ahead of a run); every rank then reads a prompt when a rollout draws
it: per prompt 28 bytes stay resident (the store's index and payload offsets), not its tokens,
conversation or columns (the in-memory version every rank built before took 1.25 KB per prompt
and ~100 s per 10^6 prompts on every rank; bench/rl_prompts_scale.py).
"""
from __future__ import annotations

from ...data.prompts import decode_payload
from ...data.protocol import DataContext
from ...data.splits import load_split


class PromptSet:
    """Prompt p's token ids (`ids`) and, for the reward functions, its conversation, extra columns and
    file:line (`rows`); `column_names`: every extra column of the split (a row without one gets None)."""

    def __init__(self, store):
        self.store = store
        self.column_names = list(store.manifest.get("payload_columns", []))
        self.fingerprint = store.fingerprint()  # of the ids and payloads: answers are part of the data

    def __len__(self) -> int:
        return len(self.store)

    def ids(self, p: int) -> list[int]:
        return self.store.seq(p)[0].tolist()

    def max_len(self) -> int:
        return int(self.store.seq_lengths().max())

    def rows(self, pids: list[int]) -> tuple[list, dict, list]:
        """(messages, {column: values}, origins) of these prompts, in order (repeats allowed: read once)."""
        decoded = {p: decode_payload(self.store.payload(p)) for p in dict.fromkeys(pids)}
        messages = [decoded[p][0] for p in pids]
        columns = {name: [decoded[p][1].get(name) for p in pids] for name in self.column_names}
        return messages, columns, [decoded[p][2] for p in pids]


def load_prompts(ctx: DataContext, key: str) -> PromptSet:
    """data.train / data.eval as prompts; rows longer than data.max_prompt_len tokens or without a
    prompt are counted bad rows with file:line (one error line above data.max_bad_fraction)."""
    return PromptSet(load_split(ctx, key, "rl"))
