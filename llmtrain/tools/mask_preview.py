"""The mask preview (`llmtrain inspect`, launch/inspect_data.py): what is trained, before GPU hours are spent on it.

Text preview (default): the first N rows decoded with trained tokens highlighted (only those rows
are read and encoded), then, when the split is prepared already, its share of trained tokens and
its bad-row report. Data preview (`--json OUT`, DESIGN.md 1.4): JSON Lines, one
object per row of the first N rows of data.train in file order,
  {"line": L, "input_ids": [...], "trained": [0/1, ...]}   trained[i] = 1 exactly when token i is a
                                                           loss target (labels[i] != IGNORE, i > 0)
  {"line": L, "bad": "reason"}                             a row that training skips
L is the row's line in its JSONL file (for JSON arrays, Parquet and saved datasets: its 0-based
row index, as in bad-row reports). Rows go through the same encode_row the training run uses.
"""
from __future__ import annotations

import json
import os

import numpy as np

from ..config import DataConfig, sources
from ..data.chat import RowError, chat_options
from ..data.labels import IGNORE_INDEX
from ..data.sources import BadRow


def highlight(tokenizer, ids: np.ndarray, labels: np.ndarray, color: bool) -> str:
    """Decode token by token; trained runs are wrapped in green (terminal) or [[ ]] (plain text)."""
    out, trained_run = [], []

    def flush():
        if trained_run:
            text = tokenizer.decode(trained_run)
            out.append(f"\033[42;30m{text}\033[0m" if color else f"[[{text}]]")
            trained_run.clear()

    for t, (tok, lab) in enumerate(zip(ids.tolist(), labels.tolist())):
        if lab != IGNORE_INDEX and t > 0:
            trained_run.append(tok)
        else:
            flush()
            out.append(tokenizer.decode([tok]))
    flush()
    return "".join(out)


def _line(origin: str) -> int:
    """"path:12" -> 12 (JSONL line); "path:#3" -> 3 (row index)."""
    return int(origin.rsplit(":", 1)[1].lstrip("#"))


def mask_records(tok, d: DataConfig, n: int):
    """The first n rows of data.train as DESIGN.md 1.4 objects, encoded exactly as training encodes them."""
    for rec in preview_records(tok, d, n):
        if len(rec) == 2:
            yield {"line": _line(rec[0]), "bad": rec[1]}
            continue
        origin, ids, labels = rec
        trained = (labels != IGNORE_INDEX).astype(np.int8)
        trained[:1] = 0  # nothing predicts the first token
        yield {"line": _line(origin), "input_ids": ids.tolist(), "trained": trained.tolist()}


def write_json(tok, d: DataConfig, n: int, out_path: str) -> int:
    """Write the preview atomically (a reader never sees half a file); returns the rows written."""
    tmp = out_path + ".tmp"
    rows = bad = 0
    with open(tmp, "w") as f:
        for rec in mask_records(tok, d, n):
            f.write(json.dumps(rec) + "\n")
            rows, bad = rows + 1, bad + ("bad" in rec)
    os.replace(tmp, out_path)
    print(f"--- wrote {rows} rows ({bad} bad) of data.train to {out_path}")
    return rows


def preview_records(tok, d: DataConfig, n: int):
    """(origin, ids, labels) or (origin, reason) for the first n rows of data.train: only those rows are
    read and encoded, as training encodes them (never the whole split)."""
    from ..data.sft import encode_row, iter_rows

    chat = chat_options(d)
    for k, (row, src) in enumerate(iter_rows(sources(d, "data.train"), "data.train")):
        if k >= n:
            return
        if isinstance(row, BadRow):
            yield row.origin, row.reason
            continue
        try:
            enc = encode_row(tok, row.record, src.format, d.max_seq_len, d.truncation, chat=chat)
        except RowError as e:
            yield row.origin, str(e)
            continue
        if enc is None:
            yield row.origin, f"longer than data.max_seq_len={d.max_seq_len} (data.truncation=drop)"
            continue
        yield (row.origin, *enc)


def print_rows(tok, d: DataConfig, n: int, color: bool) -> None:
    """The first n rows of data.train with their trained tokens highlighted (or why each bad one is skipped)."""
    for i, rec in enumerate(preview_records(tok, d, n)):
        if len(rec) == 2:
            print(f"--- row {i} ({rec[0]}): skipped: {rec[1]}")
            continue
        origin, ids, labels = rec
        print(f"--- sample {i} ({origin}): {len(ids)} tokens, {int((labels[1:] != IGNORE_INDEX).sum())} trained ---")
        print(highlight(tok, ids, labels, color))


def prepared_train_split(d: DataConfig, output_dir: str, tok, tok_hash: str):
    """data.train's samples if a preparation (a training run, `llmtrain prepare`) made them already
    (same request, same cache entry: nothing is tokenized here), else None."""
    from ..data.prepare_samples import open_prepared
    from ..data.splits import prepare_request

    return open_prepared(prepare_request(d, output_dir, tok_hash, "data.train", "sft"), tok)


def print_split_figures(samples, max_seq_len: int) -> None:
    """The prepared split's totals (share of trained tokens, lengths) and its bad-row report."""
    from ..data.prepare_samples import report_of

    report = report_of(samples)
    targets = samples.seq_targets()
    total = int(samples.seq_lengths().sum())
    print(f"--- {samples.num_seqs} samples, {total} tokens, {int(targets.sum())} trained "
          f"({targets.sum() / max(total, 1):.1%}); mean length {total / max(samples.num_seqs, 1):.1f}, "
          f"max {int(samples.seq_lengths().max(initial=0))} (data.max_seq_len={max_seq_len})")
    print(f"--- {report.summary()}")
    if report.dropped_too_long:
        print(f"--- dropped {report.dropped_too_long} samples longer than data.max_seq_len (data.truncation=drop)")
