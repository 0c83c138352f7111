"""Read raw rows from data sources, each with its origin ("file:line") for error reports.

A source is a file (JSONL, JSON array, Parquet), a glob of files, a directory of such files, a
directory saved with `datasets.Dataset.save_to_disk`, or a hub dataset: a hub id such as
`HuggingFaceH4/ultrachat_200k` or a local folder laid out as a hub dataset repository (data files
under `data/`, optionally a README.md dataset card defining configs and splits), read with
`datasets.load_dataset` and the source's `name`, `split` and `revision`. A source's `columns`
renames dataset columns to the fields the row formats use. Rows that cannot be parsed are
yielded as `BadRow`s so the caller counts them instead of crashing on row 3 million.

Reading is planned in *chunks*: a row range of one file or dataset that any process can read on
its own (JSONL from a byte offset, Parquet by row group, datasets by index). Chunks in plan order
are the rows in file order, so work spread over processes and ranks keeps the sample order.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Iterator, Optional, Union

from ..config import ConfigError, SourceConfig


class DataError(RuntimeError):
    """Data that cannot be trained on (too many bad rows, nothing left): printed as one line."""


@dataclass
class Row:
    record: dict
    origin: str  # "path:line" (JSONL), "path:#index" (JSON array, Parquet, dataset dir), "id:split:#index" (hub)


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


_DATA_EXTENSIONS = (".jsonl", ".json", ".parquet")
MIN_CHUNK_ROWS = 64  # smaller chunks cost more in files and bookkeeping than they gain in balance
TARGET_CHUNKS_PER_FILE = 1024  # enough for every tokenizer process of a few nodes to share one file
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _is_dataset_dir(path: str) -> bool:
    return os.path.isdir(path) and (
        os.path.exists(os.path.join(path, "dataset_info.json")) or os.path.exists(os.path.join(path, "dataset_dict.json"))
    )


def _is_hub_folder(path: str) -> bool:
    """A local folder laid out as a hub dataset repository: a dataset card or data/ folder, no data file on top."""
    if not os.path.isdir(path) or _is_dataset_dir(path):
        return False
    top = [f for f in os.listdir(path) if f.endswith(_DATA_EXTENSIONS)]
    return not top and (os.path.isfile(os.path.join(path, "README.md")) or os.path.isdir(os.path.join(path, "data")))


def is_hub(src: SourceConfig) -> bool:
    """Read with datasets.load_dataset: a hub-layout folder, or a path that is no local file but looks
    like a hub id (owner/name). `name` on a plain directory asks for load_dataset too."""
    path = src.path
    if _is_hub_folder(path) or (src.name is not None and os.path.isdir(path) and not _is_dataset_dir(path)):
        return True
    return (not os.path.exists(path) and not any(ch in path for ch in "*?[")
            and _HUB_ID.fullmatch(path) is not None and not path.endswith(_DATA_EXTENSIONS))


def expand(path: str, key: str = "data.train") -> list[str]:
    """A local source path -> concrete files (sorted, so every rank sees one order) or a dataset dir."""
    if _is_dataset_dir(path):
        return [path]
    if any(ch in path for ch in "*?["):
        files = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p) or _is_dataset_dir(p))
        if not files:
            raise ConfigError(f"{key}: glob {path!r} matches no file")
        return files
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(_DATA_EXTENSIONS))
        if not files:
            raise ConfigError(f"{key}: directory {path!r} holds no .jsonl/.json/.parquet file and is not a saved "
                              "dataset (a folder laid out as a hub dataset needs data/ or a README.md)")
        return files
    if not os.path.exists(path):
        raise ConfigError(f"{key}: file {path!r} not found (paths are relative to the directory you launch from; "
                          "a hub dataset is named owner/name)")
    return [path]


@dataclass(frozen=True)
class Chunk:
    """Rows [row_start, row_stop) of one file or dataset of source `source` (an index into the split's sources)."""

    source: int
    path: str  # file, saved dataset directory, hub id or hub-layout folder
    kind: str  # jsonl | json | parquet | saved | hub
    row_start: int
    row_stop: int  # JSONL: physical lines (blank lines are skipped, not counted as rows)
    byte_start: int = 0  # JSONL: file offset of row_start


def _kind(path: str) -> str:
    if _is_dataset_dir(path):
        return "saved"
    return "parquet" if path.endswith(".parquet") else "json" if path.endswith(".json") else "jsonl"


def _rename(record: dict, columns: Optional[dict]) -> dict:
    if columns:
        record = dict(record)
        for ours, theirs in columns.items():
            if theirs in record:
                record[ours] = record.pop(theirs)
    return record


class SplitReader:
    """Plans and reads the rows of one split's sources (data.train or data.eval).

    Datasets (saved or hub) are opened once and memory-mapped by `datasets`; a reader pickles
    cheaply (datasets pickle as their cache file paths), so worker processes get it whole.
    """

    def __init__(self, srcs: list[SourceConfig], key: str):
        self.srcs, self.key = srcs, key
        self._datasets: dict = {}  # (source, path) -> datasets.Dataset
        self._json: dict = {}  # path -> parsed JSON array (a .json source is one array, read whole)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_json"] = {}  # a worker parses the JSON array it reads itself, instead of receiving a copy
        return state

    # --- opening ---
    def where(self, i: int) -> str:
        return f"{self.key}[{i}]"

    def paths(self, i: int) -> list[str]:
        src = self.srcs[i]
        if is_hub(src):
            return [src.path]
        if src.streaming:
            raise ConfigError(f"{self.where(i)}.streaming=true: streaming is for pretraining preparation "
                              "(prepare_from); SFT/DPO hub datasets are loaded into the datasets cache (memory-mapped)")
        return expand(src.path, self.key)

    def dataset(self, i: int, path: str):
        """The datasets.Dataset of a saved directory or hub source (the source's split, default train)."""
        if (i, path) not in self._datasets:
            self._datasets[(i, path)] = self._open(i, path)
        return self._datasets[(i, path)]

    def _open(self, i: int, path: str):
        import datasets  # slow import: only for dataset sources

        src = self.srcs[i]
        if _is_dataset_dir(path):
            ds = datasets.load_from_disk(path)
            if isinstance(ds, datasets.DatasetDict):
                if src.split is not None and src.split not in ds:
                    raise ConfigError(f"{self.where(i)}.split={src.split!r}: {path} has splits {list(ds)}")
                ds = ds[src.split or ("train" if "train" in ds else next(iter(ds)))]
        else:
            try:
                ds = datasets.load_dataset(path, name=src.name, split=src.split or "train", revision=src.revision)
            except Exception as e:  # unknown id, subset or split; no network: one line, with what was asked
                raise ConfigError(f"{self.where(i)}: cannot load dataset {path!r} (name={src.name}, "
                                  f"split={src.split or 'train'}, revision={src.revision}) with datasets.load_dataset: "
                                  f"{' '.join(str(e).split())[:400]}") from None
        missing = [c for c in (src.columns or {}).values() if c not in ds.column_names]
        if missing:
            raise ConfigError(f"{self.where(i)}.columns: {path} has no column(s) {missing} (columns: {ds.column_names})")
        return ds

    def identity(self) -> list:
        """What the rows depend on, cheaply: file stamps (path, size, mtime), datasets' own fingerprints."""
        out = []
        for i, src in enumerate(self.srcs):
            spec = [src.path, src.format, src.name, src.split, src.revision, sorted((src.columns or {}).items())]
            for path in self.paths(i):
                if _is_dataset_dir(path) or is_hub(src):
                    stamps = _stamp(path) if os.path.exists(path) else []
                    out.append([spec, path, stamps, getattr(self.dataset(i, path), "_fingerprint", None)])
                else:
                    out.append([spec, path, _stamp(path)])
        return out

    # --- planning ---
    def plan(self, max_rows_per_chunk: int, target_chunks: int = TARGET_CHUNKS_PER_FILE) -> list[Chunk]:
        """Every source row in chunks, in source and file order. A file is cut into about
        `target_chunks` chunks of MIN_CHUNK_ROWS..max_rows_per_chunk rows, so that hundreds of
        processes can share even a mid-sized file. Depends on the data only."""
        from .shards.prepare import _jsonl_cuts  # numpy newline scan: ~GB/s, no Python object per line

        chunks = []
        for i in range(len(self.srcs)):
            for path in self.paths(i):
                kind = "hub" if is_hub(self.srcs[i]) else _kind(path)
                n = _jsonl_cuts(path, 1 << 62)[-1][0] if kind == "jsonl" else self._num_rows(i, path, kind)
                k = min(max_rows_per_chunk, max(MIN_CHUNK_ROWS, -(-n // target_chunks)))
                if kind == "jsonl":
                    cuts = _jsonl_cuts(path, k) if n > k else [(0, 0), (n, os.path.getsize(path))]
                    chunks += [Chunk(i, path, kind, r0, r1, b0) for (r0, b0), (r1, _) in zip(cuts, cuts[1:]) if r1 > r0]
                else:
                    chunks += [Chunk(i, path, kind, a, min(a + k, n)) for a in range(0, n, k)]
        return chunks

    def _num_rows(self, i: int, path: str, kind: str) -> int:
        if kind == "json":
            return len(self._json_rows(path))
        if kind == "parquet":
            import pyarrow.parquet as pq

            try:
                md = pq.ParquetFile(path).metadata
            except Exception as e:  # a corrupt Parquet file is one bad source, named
                raise DataError(f"{path}: cannot read Parquet file ({e})") from None
            missing = [c for c in (self.srcs[i].columns or {}).values() if c not in md.schema.names]
            if missing:
                raise ConfigError(f"{self.where(i)}.columns: {path} has no column(s) {missing} "
                                  f"(columns: {md.schema.names})")
            return md.num_rows
        return self.dataset(i, path).num_rows

    # --- reading ---
    def read(self, chunk: Chunk) -> Iterator[Union[Row, BadRow]]:
        columns = self.srcs[chunk.source].columns
        reader = {"jsonl": self._read_jsonl, "json": self._read_json, "parquet": self._read_parquet}.get(
            chunk.kind, self._read_dataset)
        for row in reader(chunk):
            yield Row(_rename(row.record, columns), row.origin) if isinstance(row, Row) else row

    def _read_jsonl(self, c: Chunk) -> Iterator[Union[Row, BadRow]]:
        with open(c.path, "rb") as f:
            f.seek(c.byte_start)
            for lineno in range(c.row_start + 1, c.row_stop + 1):
                raw = f.readline()
                if not raw:
                    return  # the file ended (it changed since planning; the stamp in the cache key sees that)
                if not raw.strip():
                    continue
                yield _json_line(raw, f"{c.path}:{lineno}")

    def _json_rows(self, path: str) -> list:
        if path not in self._json:
            try:
                with open(path, encoding="utf-8") as f:
                    data = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{path}: invalid JSON ({e}); a .json source must hold one array of rows") from None
            if not isinstance(data, list):
                raise DataError(f"{path}: a .json source must hold one array of rows (use .jsonl for one row per line)")
            self._json = {path: data}  # one file at a time: a worker holds at most one parsed array
        return self._json[path]

    def _read_json(self, c: Chunk) -> Iterator[Union[Row, BadRow]]:
        data = self._json_rows(c.path)
        for i in range(c.row_start, c.row_stop):
            rec = data[i]
            yield Row(rec, f"{c.path}:#{i}") if isinstance(rec, dict) else BadRow(f"{c.path}:#{i}", "row is not an object")

    def _read_parquet(self, c: Chunk) -> Iterator[Row]:
        import pyarrow.parquet as pq

        pf, first = pq.ParquetFile(c.path), 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            lo, hi = max(c.row_start, first), min(c.row_stop, first + n)
            if lo < hi:  # only the row groups that overlap the chunk
                table = pf.read_row_group(g).slice(lo - first, hi - lo)
                for j, rec in enumerate(table.to_pylist()):
                    yield Row(rec, f"{c.path}:#{lo + j}")
            first += n

    def _read_dataset(self, c: Chunk) -> Iterator[Row]:
        ds = self.dataset(c.source, c.path)
        label = c.path if c.kind == "saved" else f"{c.path}:{self.srcs[c.source].split or 'train'}"
        for a in range(c.row_start, c.row_stop, 1000):
            batch = ds[a:min(a + 1000, c.row_stop)]  # columns -> rows: one Arrow slice per 1000 rows
            names = list(batch)
            for j, values in enumerate(zip(*(batch[k] for k in names))):
                yield Row(dict(zip(names, values)), f"{label}:#{a + j}")

    def rows(self) -> Iterator[tuple[Union[Row, BadRow], SourceConfig]]:
        """Every row of every source, in order (one process; the prepared path reads by chunks)."""
        for c in self.plan(1 << 40, target_chunks=1):
            for row in self.read(c):
                yield row, self.srcs[c.source]


def _json_line(raw: bytes, origin: str) -> Union[Row, BadRow]:
    try:
        rec = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return BadRow(origin, "not valid UTF-8")
    except json.JSONDecodeError as e:
        return BadRow(origin, f"bad JSON ({e.msg})")
    if not isinstance(rec, dict):
        return BadRow(origin, "row is not a JSON object")
    return Row(rec, origin)


def read_rows(path: str) -> Iterator[Union[Row, BadRow]]:
    """Yield every row of one file or dataset directory."""
    for row, _ in SplitReader([SourceConfig(path=path)], "source").rows():
        yield row


def _stamp(path: str) -> list:
    """(size, mtime) of a file, or of every file under a directory: a change means 'prepare again'."""
    if os.path.isdir(path):
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
        return [[os.path.relpath(f, path), *_stamp(f)] for f in files]
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def fingerprint(paths: list[str]) -> str:
    """Cheap identity of source files (path, size, mtime): keys caches and resume checks."""
    h = hashlib.sha256()
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.abspath(p)}|{st.st_size}|{int(st.st_mtime)}\n".encode())
    return h.hexdigest()[:16]
