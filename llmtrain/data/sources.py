"""Read raw rows from data sources, each with its origin ("file:line") for error reports.

A source is a file (JSONL, JSON array, Parquet), a glob of files, or a directory saved with
`datasets.Dataset.save_to_disk`. Rows that cannot be parsed are yielded as `BadRow`s so the
caller counts them instead of crashing on row 3 million.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Iterator, Union

from ..config import ConfigError


class DataError(RuntimeError):
    """Data that cannot be trained on (too many bad rows, nothing left): printed as one line."""


@dataclass
class Row:
    record: dict
    origin: str  # "path:line" (JSONL), "path:#index" (JSON array, Parquet, dataset dir)


@dataclass
class BadRow:
    origin: str
    reason: str


@dataclass
class BadRowReport:
    """Counts malformed rows; aborts the run when their share exceeds data.max_bad_fraction."""

    total: int = 0
    bad: list = field(default_factory=list)  # [BadRow]
    dropped_too_long: int = 0  # samples dropped by data.truncation=drop (policy, not malformed)

    def add(self, bad: BadRow) -> None:
        self.bad.append(bad)

    def summary(self, limit: int = 5) -> str:
        if not self.bad:
            return f"{self.total} rows, none malformed"
        share = len(self.bad) / max(1, self.total)
        examples = "; ".join(f"{b.origin}: {b.reason}" for b in self.bad[:limit])
        more = f" (+{len(self.bad) - limit} more)" if len(self.bad) > limit else ""
        return f"skipped {len(self.bad)} of {self.total} rows ({share:.3%}): {examples}{more}"

    def check(self, max_bad_fraction: float, what: str) -> None:
        if self.total and len(self.bad) / self.total > max_bad_fraction:
            raise DataError(
                f"{what}: {self.summary()} — above data.max_bad_fraction={max_bad_fraction}; "
                "fix the rows or raise data.max_bad_fraction"
            )

    def write(self, path: str) -> None:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            for b in self.bad:
                f.write(json.dumps({"origin": b.origin, "reason": b.reason}) + "\n")
        os.replace(tmp, path)


def _is_dataset_dir(path: str) -> bool:
    return os.path.isdir(path) and (
        os.path.exists(os.path.join(path, "dataset_info.json")) or os.path.exists(os.path.join(path, "dataset_dict.json"))
    )


def expand(path: str, key: str = "data.train") -> list[str]:
    """A source path -> concrete files (sorted, so every rank sees one order) or a dataset dir."""
    if _is_dataset_dir(path):
        return [path]
    if any(ch in path for ch in "*?["):
        files = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p) or _is_dataset_dir(p))
        if not files:
            raise ConfigError(f"{key}: glob {path!r} matches no file")
        return files
    if os.path.isdir(path):
        files = sorted(
            os.path.join(path, f) for f in os.listdir(path) if f.endswith((".jsonl", ".json", ".parquet"))
        )
        if not files:
            raise ConfigError(f"{key}: directory {path!r} holds no .jsonl/.json/.parquet file and is not a saved dataset")
        return files
    if not os.path.exists(path):
        raise ConfigError(f"{key}: file {path!r} not found (paths are relative to the directory you launch from)")
    return [path]


def read_rows(path: str) -> Iterator[Union[Row, BadRow]]:
    """Yield every row of one file or dataset directory."""
    if _is_dataset_dir(path):
        import datasets

        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
        for i, rec in enumerate(ds):
            yield Row(rec, f"{path}:#{i}")
    elif path.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # a corrupt Parquet file is one bad source, named
            raise DataError(f"{path}: cannot read Parquet file ({e})") from None
        for i, rec in enumerate(table.to_pylist()):
            yield Row(rec, f"{path}:#{i}")
    elif path.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: invalid JSON ({e}); a .json source must hold one array of rows") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: a .json source must hold one array of rows (use .jsonl for one row per line)")
        for i, rec in enumerate(data):
            yield Row(rec, f"{path}:#{i}") if isinstance(rec, dict) else BadRow(f"{path}:#{i}", "row is not an object")
    else:  # JSONL (any other extension is read as JSON lines)
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    rec = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    yield BadRow(f"{path}:{lineno}", "not valid UTF-8")
                    continue
                except json.JSONDecodeError as e:
                    yield BadRow(f"{path}:{lineno}", f"bad JSON ({e.msg})")
                    continue
                if not isinstance(rec, dict):
                    yield BadRow(f"{path}:{lineno}", "row is not a JSON object")
                    continue
                yield Row(rec, f"{path}:{lineno}")


def fingerprint(paths: list[str]) -> str:
    """Cheap identity of source files (path, size, mtime): keys caches and resume checks."""
    h = hashlib.sha256()
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.abspath(p)}|{st.st_size}|{int(st.st_mtime)}\n".encode())
    return h.hexdigest()[:16]
