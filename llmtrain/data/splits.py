"""A run's SFT/DPO split (data.train / data.eval) as prepared samples: the preparation request the
run, `llmtrain prepare` and the mask preview all make (so they share one cache entry), and the
split loaded from it with its bad-row report."""
from __future__ import annotations

import os
from typing import Optional

from .. import distributed as dist
from ..config import DataConfig, DistConfig, sources
from ..errors import DataError
from .chat import chat_options
from .protocol import DataContext


def encode_spec(d: DataConfig, kind: str, value_column: Optional[str] = None):
    """How this run turns rows into sequences (part of the prepared data's cache key); value_column: a
    per-unit number stored beside each unit (the reward model's margin column)."""
    from .prepare_samples import EncodeSpec

    return EncodeSpec(kind=kind, max_seq_len=d.max_seq_len, truncation=d.truncation, max_prompt_len=d.max_prompt_len,
                      options=(("chat", chat_options(d)),),  # data.train_reasoning / template_date
                      value_column=value_column)


def prepare_request(d: DataConfig, output_dir: str, tok_hash: str, key: str, kind: str, info=None,
                    stale_minutes: float = DistConfig.stale_minutes, value_column: Optional[str] = None):
    """key "data.train" | "data.eval", kind "sft" | "dpo"; info: this rank (None: one process);
    stale_minutes: dist.stale_minutes (only several ranks watch each other's heartbeats); value_column:
    a per-unit number stored beside each unit (the reward model's margin column)."""
    from .prepare_samples import Request

    return Request(key=key, srcs=sources(d, key), spec=encode_spec(d, kind, value_column), tok_hash=tok_hash,
                   cache_root=d.cache_dir or os.path.join(output_dir, "cache"), chunk_rows=d.prepare_chunk_rows,
                   workers=d.prepare_workers, timeout_s=d.prepare_timeout_minutes * 60, stale_s=stale_minutes * 60,
                   max_bad_fraction=d.max_bad_fraction, rank=getattr(info, "rank", 0),
                   world_size=getattr(info, "world_size", 1), local_world_size=getattr(info, "local_world_size", 1))


def load_split(ctx: DataContext, key: str, kind: str, value_column: Optional[str] = None):
    """A split's samples, prepared once by all ranks together (llmtrain.data.prepare_samples) into
    the content-keyed cache and read from there by position (pread); the bad-row report goes to
    output_dir on rank 0."""
    from .prepare_samples import TooManyBadRows, prepared_split

    d = ctx.data
    report_path = os.path.join(ctx.output_dir, f"bad_rows_{key.split('.')[-1]}.jsonl")
    try:
        samples, report = prepared_split(prepare_request(d, ctx.output_dir, ctx.tok_hash, key, kind, ctx.info,
                                                         ctx.stale_minutes, value_column),
                                         ctx.tokenizer)
    except TooManyBadRows as e:
        if dist.is_main():
            os.makedirs(ctx.output_dir, exist_ok=True)
            e.report.write(report_path)
        seen = "" if e.complete else " (preparation stopped early: these rows alone exceed the budget of the split)"
        raise DataError(f"{key} (all bad rows listed in {report_path}): {e.report.summary()} — above "
                        f"data.max_bad_fraction={d.max_bad_fraction}{seen}; fix the rows or raise data.max_bad_fraction") from None
    if report.bad and dist.is_main():
        report.write(report_path)
        print(f"{key}: {report.summary()} (all listed in {report_path})", flush=True)
    if report.dropped_too_long:
        dist.print0(f"{key}: dropped {report.dropped_too_long} samples longer than data.max_seq_len={d.max_seq_len} (data.truncation=drop)")
    if len(samples) == 0:
        raise DataError(f"{key}: no usable sample in {', '.join(s.path for s in sources(d, key))}")
    return samples


def prepare_splits(ctx: DataContext, kind: str, workers: int, value_column: Optional[str] = None) -> None:
    """data.train and data.eval prepared into the cache exactly as a training run would (same key: the
    run then starts from them), here in one process with `workers` tokenizer processes (`llmtrain prepare`)."""
    from .prepare_samples import TooManyBadRows, prepared_split

    d = ctx.data
    for key in ("data.train", "data.eval"):
        if not sources(d, key):
            continue
        request = prepare_request(d, ctx.output_dir, ctx.tok_hash, key, kind, value_column=value_column)
        request.workers = workers
        try:
            samples, report = prepared_split(request, ctx.tokenizer)
        except TooManyBadRows as e:
            raise DataError(f"{key}: {e.report.summary()} — above data.max_bad_fraction={d.max_bad_fraction}") from None
        print(f"[prepare] {key}: {len(samples):,} units ({samples.num_seqs:,} sequences) in {samples.dir} "
              f"({report.summary()})")
