"""A pretraining recipe's data.train / data.eval entries -> their token-shard directories (`llmtrain prepare`).

An entry with `prepare_from` (raw files, globs, saved datasets or a hub dataset) is tokenized into
its `path`; an entry without one must already be prepared and is only checked (tokenizer included).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ...config import DataConfig, SourceConfig, sources
from ...errors import ConfigError, DataError
from ..tokenizer_id import vocab_hash
from .rows import open_shards
from .store import ShardError


@dataclass
class PrepareOptions:
    """`llmtrain prepare` settings (command-line flags, not recipe keys)."""

    workers: int  # tokenizer processes
    docs_per_shard: Optional[int] = None  # rows (lines, records, .txt files) per shard; None: the default
    tokens_per_shard: Optional[int] = None  # approximate tokens per shard instead
    progress: bool = True  # progress bar


def _raw_inputs(src: SourceConfig, key: str, i: int) -> list[str]:
    raw = [src.prepare_from] if isinstance(src.prepare_from, str) else src.prepare_from
    if not raw or not all(isinstance(p, str) and p for p in raw):
        raise ConfigError(f"{key}[{i}].prepare_from={src.prepare_from!r} must be a path/glob or a list of them")
    return raw


def prepare_shards(d: DataConfig, tokenizer, opts: PrepareOptions) -> None:
    """Tokenize every data.train / data.eval entry that has `prepare_from` into its `path`;
    entries without one must already be prepared (checked, tokenizer included)."""
    from .prepare import CorpusError, prepare_corpus

    shard_hash = vocab_hash(tokenizer)
    for key in ("data.train", "data.eval"):
        for i, src in enumerate(sources(d, key)):
            if src.prepare_from is None:
                shards = open_shards(src, key, i, shard_hash)
                print(f"[prepare] {key}[{i}]: {src.path} is prepared ({shards.num_tokens:,} tokens), no prepare_from")
                continue
            print(f"[prepare] {key}[{i}]: {src.prepare_from} -> {src.path}")
            hub = {"name": src.name, "split": src.split, "revision": src.revision, "streaming": src.streaming}
            try:
                prepare_corpus(_raw_inputs(src, key, i), tokenizer, src.path,
                               text_field=(src.columns or {}).get("text", src.text_field), num_workers=opts.workers,
                               docs_per_shard=opts.docs_per_shard, tokens_per_shard=opts.tokens_per_shard,
                               max_bad_fraction=d.max_bad_fraction, progress=opts.progress, hub=hub)
            except (CorpusError, ShardError) as e:
                raise DataError(f"{key}[{i}]: {e}") from None
            open_shards(src, key, i, shard_hash)  # what training will open: sizes and tokenizer
