"""What a tokenizer worker process does: read one chunk of rows, encode each into sequences, write
the chunk (llmtrain.data.prepare_samples hands out the chunks)."""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .samples import ChunkWriter
from .sources import BadRow, Chunk, SplitReader


@dataclass(frozen=True)
class EncodeSpec:
    """How rows become sequences: data.sft.encode_row (SFT), data.preference.encode_pair (DPO) or
    data.prompts.encode_prompt (RL prompts: the ids and a payload per row, nothing trained).
    `options` are extra keyword arguments for them (sorted (name, value) pairs; part of the cache key)."""

    kind: str  # "sft" | "dpo" | "rl"
    max_seq_len: int
    truncation: str = "truncate"
    max_prompt_len: int = 1024
    options: tuple = ()
    # a per-unit number read from this column and stored beside the unit (the reward model's per-pair
    # margin, reward.margin_column); a row without a finite number there is a bad row
    value_column: Optional[str] = None

    def unit_value(self, record: dict) -> Optional[float]:
        if self.value_column is None:
            return None
        from .chat import RowError

        value = record.get(self.value_column)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RowError(f"'{self.value_column}' must be a finite number (reward.margin_column), got {value!r}")
        return float(value)

    @property
    def seqs_per_unit(self) -> int:
        return 2 if self.kind == "dpo" else 1

    @property
    def payloads(self) -> bool:
        return self.kind == "rl"

    def extra_columns(self, record: dict) -> list:
        """The columns a payload keeps beside the prompt (the reward functions' keyword arguments)."""
        from .prompts import CONVERSATION_FIELDS

        return [k for k in record if k not in CONVERSATION_FIELDS]

    def encode(self, tokenizer, record: dict, fmt: str, origin: str = "") -> Optional[list]:
        """-> [(ids, labels[, payload]), ...] (one unit), None when dropped for length; RowError when malformed."""
        if self.kind == "rl":
            from .prompts import encode_prompt

            return encode_prompt(tokenizer, record, fmt, self.max_prompt_len, origin, **dict(self.options))
        if self.kind == "dpo":
            from .preference import encode_pair

            return encode_pair(tokenizer, record, self.max_seq_len, self.max_prompt_len, **dict(self.options))
        from .sft import encode_row

        enc = encode_row(tokenizer, record, fmt, self.max_seq_len, self.truncation, **dict(self.options))
        return None if enc is None else [enc]



_W: dict = {}  # per-process state, set by init_worker, cleared by clear_worker


def init_worker(tokenizer, reader: SplitReader, spec: EncodeSpec, directory: str, dtype: str,
                in_subprocess: bool) -> None:
    # (a remote-code tokenizer's class unpickles in a spawned worker: spawn carries the parent's
    # sys.path, which holds transformers' dynamic-module directory)
    if in_subprocess:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallelism comes from the processes
        _die_with_parent()
    _W.update(tok=tokenizer, reader=reader, spec=spec, dir=directory, dtype=np.dtype(dtype))


def clear_worker() -> None:
    """Drop the per-process state (in-process preparation: the rank goes on to train)."""
    _W.clear()


def _die_with_parent() -> None:
    """A worker of a rank that is SIGKILLed must not tokenize on as an orphan (Linux PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL), 0, 0, 0)


def run_chunk(index: int, chunk: Chunk, delay_s: float = 0.0) -> dict:
    """Read, encode and write one chunk; returns its sidecar. Malformed rows are listed, in row order."""
    from .chat import RowError

    reader, spec, tok = _W["reader"], _W["spec"], _W["tok"]
    fmt = reader.srcs[chunk.source].format
    writer = ChunkWriter(_W["dir"], chunk_name(index), _W["dtype"])
    rows, bad, dropped, columns = 0, [], 0, set()
    try:
        time.sleep(delay_s)  # test hook only (TEST_DELAY_ENV)
        for row in reader.read(chunk):
            rows += 1
            if isinstance(row, BadRow):
                bad.append([row.origin, row.reason])
                continue
            try:
                seqs = spec.encode(tok, row.record, fmt, row.origin)
                value = spec.unit_value(row.record)
            except RowError as e:
                bad.append([row.origin, str(e)])
                continue
            if seqs is None:
                dropped += 1
                continue
            for seq in seqs:  # (ids, labels[, payload, identity])
                writer.add(*seq)
            if spec.payloads:
                columns.update(spec.extra_columns(row.record))
            if value is not None:
                writer.add_unit_value(value)
    except BaseException:
        writer.abort()
        raise
    meta = {"index": index, "rows": rows, "planned_rows": chunk.row_stop - chunk.row_start, "bad": bad,
            "dropped_too_long": dropped}
    if spec.payloads:
        meta["payload_columns"] = sorted(columns)
    return writer.finish(meta)


def chunk_name(index: int) -> str:
    return f"c{index:07d}"
