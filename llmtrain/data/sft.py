"""SFT data: chat sources -> tokenized, assistant-masked sequences (a `SampleSet`).

Length policy (data.truncation), applied after the chat template:
  truncate  keep the first data.max_seq_len tokens; a sample left with no trained token
            (its answer started past the limit) is skipped and counted as a bad row
  drop      skip any sample longer than data.max_seq_len (counted separately, not as bad)
"""
from __future__ import annotations

from typing import Iterator, Optional, Union

import numpy as np

from ..config import SourceConfig
from .chat import DEFAULT_OPTIONS, ChatOptions, RowError, row_tools, to_messages, tokenize_chat
from .labels import IGNORE_INDEX
from .sources import BadRow, BadRowReport, Row, SplitReader


def iter_rows(srcs: list[SourceConfig], key: str) -> Iterator[tuple[Union[Row, BadRow], SourceConfig]]:
    """Every row of every source in order, in this process (training reads prepared chunks instead)."""
    yield from SplitReader(srcs, key).rows()


def encode_row(tokenizer, record: dict, fmt: str, max_seq_len: int, truncation: str, *,
               chat: ChatOptions = DEFAULT_OPTIONS) -> Optional[tuple]:
    """One chat row -> (ids, labels), None when dropped for length; RowError when malformed or when
    its assistant turns cannot be masked exactly (the only exception a row's content can raise)."""
    ids, labels = tokenize_chat(tokenizer, to_messages(record, fmt), tools=row_tools(record), options=chat)
    if len(ids) > max_seq_len:
        if truncation == "drop":
            return None
        ids, labels = ids[:max_seq_len], labels[:max_seq_len]
    if not (labels[1:] != IGNORE_INDEX).any():
        raise RowError(
            f"no trainable token after truncation to data.max_seq_len={max_seq_len}"
            if len(ids) == max_seq_len
            else "no trainable token"
        )
    return ids, labels


def encoded_rows(srcs: list[SourceConfig], key: str, report: BadRowReport, encode) -> Iterator:
    """encode(record, source) for every row; unparsable rows and RowErrors go to `report` with file:line."""
    for row, src in iter_rows(srcs, key):
        report.total += 1
        if isinstance(row, BadRow):
            report.add(row)
            continue
        try:
            yield encode(row.record, src)
        except RowError as e:
            report.add(BadRow(row.origin, str(e)))


def build_sft_samples(tokenizer, srcs: list[SourceConfig], max_seq_len: int, truncation: str, key: str,
                      report: BadRowReport, chat: ChatOptions = DEFAULT_OPTIONS):
    """Tokenize every row in this process, into memory (small sets, tests); malformed rows go to
    `report` with their file:line. Training prepares the same samples in parallel chunks on disk
    (llmtrain.data.prepare_samples), in the same order."""
    from .samples import SampleSet

    def sequences():
        encode = lambda record, src: encode_row(tokenizer, record, src.format, max_seq_len, truncation,  # noqa: E731
                                                chat=chat)
        for enc in encoded_rows(srcs, key, report, encode):
            if enc is None:
                report.dropped_too_long += 1
                continue
            yield enc

    return SampleSet.from_sequences(sequences())


def split_eval(samples, fraction: float, seed: int):
    """Hold out a seeded `fraction` of units for eval (data.eval_fraction): two views of `samples`
    (no copy), each in the original order."""
    n = len(samples)
    order = np.random.default_rng(seed).permutation(n)
    n_eval = max(1, int(round(n * fraction)))
    eval_idx, train_idx = np.sort(order[:n_eval]), np.sort(order[n_eval:])
    tag = f"eval_fraction={fraction},seed={seed}"
    return samples.subset(train_idx, f"train|{tag}"), samples.subset(eval_idx, f"eval|{tag}")
