"""Read raw rows from data sources, each with its origin ("file:line") for error reports.

A source is a file (JSONL, JSON array, Parquet), a glob of files, a directory of such files, a
directory saved with `datasets.Dataset.save_to_disk`, or a hub dataset: a hub id such as
`HuggingFaceH4/ultrachat_200k` or a local folder laid out as a hub dataset repository (data files
under `data/`, optionally a README.md dataset card defining configs and splits), read with
`datasets.load_dataset` and the source's `name`, `split` and `revision`. A source's `columns`
renames dataset columns to the fields the row formats use. Rows that cannot be parsed are
yielded as `BadRow`s so the caller counts them instead of crashing on row 3 million.

Reading is planned in *chunks*: a row range of one file or dataset that any process can read on
its own, touching only its own bytes (JSONL and JSON arrays by byte range, Parquet by whole row
groups, datasets by index). Chunks in plan order are the rows in file order, so work spread over
processes and ranks keeps the sample order. Chunk size is chosen per split from the total number
of tokenizer processes (see SplitReader.plan). A Parquet file whose row groups are larger than a
chunk (pandas writes one group per file) is first rewritten once, by the planner, into a staged
copy with chunk-sized row groups: otherwise every chunk would decompress the whole group.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Iterator, Optional, Union

from ..config import SourceConfig
from ..errors import ConfigError, DataError  # noqa: F401  (DataError: raised here, imported from here too)
from . import json_array, line_cuts


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
        from .files import replace_atomic, tmp_suffix

        tmp = path + tmp_suffix()
        with open(tmp, "w") as f:
            for b in self.bad:
                f.write(json.dumps({"origin": b.origin, "reason": b.reason}) + "\n")
        replace_atomic(tmp, path)


_DATA_EXTENSIONS = (".jsonl", ".json", ".parquet")
MIN_CHUNK_ROWS = 64  # smaller chunks cost more in files and bookkeeping than they gain in balance
STAMP_SAMPLE_BYTES = 1 << 20  # a file's identity: its size and a hash of its first and last MiB
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
    byte_start: int = 0  # JSONL: file offset of row_start; JSON array: first byte of element row_start
    byte_stop: int = 0  # JSON array: the separator after element row_stop - 1
    staged: str = ""  # Parquet: the staged copy with chunk-sized row groups to read instead of `path`


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


@dataclass
class _Survey:
    """What one pass over a file tells the planner: its rows, and where every g-th row starts."""

    source: int
    path: str
    kind: str
    rows: int
    cuts: list = field(default_factory=list)  # JSONL/JSON: [(row, byte offset)] every g rows, then (rows, end)
    groups: list = field(default_factory=list)  # Parquet: rows per row group


class SplitReader:
    """Plans and reads the rows of one split's sources (data.train or data.eval).

    Datasets (saved or hub) are opened once and memory-mapped by `datasets`; a reader pickles
    cheaply (datasets pickle as their cache file paths, files are opened per chunk), so worker
    processes get it whole.
    """

    def __init__(self, srcs: list[SourceConfig], key: str):
        self.srcs, self.key = srcs, key
        self._datasets: dict = {}  # (source, path) -> datasets.Dataset

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
        """What the rows depend on, cheaply: local files by path, size and a sample of their content
        (not mtimes: node-local copies of one file differ in them), hub datasets by their fingerprint."""
        out = []
        for i, src in enumerate(self.srcs):
            spec = [src.path, src.format, src.name, src.split, src.revision, sorted((src.columns or {}).items())]
            for path in self.paths(i):
                if os.path.exists(path):
                    out.append([spec, os.path.abspath(path), _stamp(path)])
                else:  # a hub id: datasets' fingerprint follows the revision it resolved
                    out.append([spec, path, getattr(self.dataset(i, path), "_fingerprint", None)])
        return out

    # --- planning ---
    def plan(self, max_rows_per_chunk: int, target_chunks: int = 1, stage_dir: Optional[str] = None) -> list[Chunk]:
        """Every source row in chunks, in source and file order. Chunks hold
        clamp(rows of the split / target_chunks, MIN_CHUNK_ROWS, max_rows_per_chunk) rows (a file
        ends its last chunk early), so a split gets at most `target_chunks` + (files - 1) chunks
        however its rows are spread over files. Each file is scanned once. With `stage_dir`, a Parquet file with
        row groups above the chunk size is staged there (see the module docstring)."""
        grain = max(1, min(MIN_CHUNK_ROWS, max_rows_per_chunk))  # chunk sizes are multiples of it
        surveys = [self._survey(i, path, grain) for i in range(len(self.srcs)) for path in self.paths(i)]
        total = sum(s.rows for s in surveys)
        k = min(max_rows_per_chunk, max(MIN_CHUNK_ROWS, -(-total // max(1, target_chunks))))
        k = min(-(-k // grain) * grain, max(grain, max_rows_per_chunk // grain * grain))  # rounded up: <= target chunks
        chunks: list[Chunk] = []
        for s in surveys:
            chunks += self._cut(s, k, stage_dir)
        return chunks

    def _survey(self, i: int, path: str, grain: int) -> _Survey:
        kind = "hub" if is_hub(self.srcs[i]) else _kind(path)
        if kind == "jsonl":
            cuts = line_cuts.jsonl_cuts(path, grain)  # numpy newline scan: ~GB/s, no Python object per line
            return _Survey(i, path, kind, cuts[-1][0], cuts=cuts)
        if kind == "json":
            try:
                plan = json_array.plan_array(path, grain)
            except json_array.JsonArrayError as e:
                raise DataError(f"{path}: invalid JSON array ({e})") from None
            return _Survey(i, path, kind, plan.count, cuts=plan.cuts)
        if kind == "parquet":
            md = self._parquet_metadata(i, path)
            groups = [md.row_group(g).num_rows for g in range(md.num_row_groups)]
            return _Survey(i, path, kind, md.num_rows, groups=groups)
        return _Survey(i, path, kind, self.dataset(i, path).num_rows)

    def _parquet_metadata(self, i: int, path: str):
        import pyarrow.parquet as pq

        try:
            md = pq.ParquetFile(path).metadata
        except Exception as e:  # a corrupt Parquet file is one bad source, named
            raise DataError(f"{path}: cannot read Parquet file ({e})") from None
        missing = [c for c in (self.srcs[i].columns or {}).values() if c not in md.schema.names]
        if missing:
            raise ConfigError(f"{self.where(i)}.columns: {path} has no column(s) {missing} "
                              f"(columns: {md.schema.names})")
        return md

    def _cut(self, s: _Survey, k: int, stage_dir: Optional[str]) -> list[Chunk]:
        if s.kind in ("jsonl", "json"):
            # k is a multiple of the survey's grain, so every k-th row has a cut; the end is the last one
            cuts = [c for c in s.cuts if c[0] % k == 0 and c[0] < s.rows] + [s.cuts[-1]]
            if s.kind == "jsonl":
                return [Chunk(s.source, s.path, s.kind, r0, r1, b0) for (r0, b0), (r1, _) in zip(cuts, cuts[1:])
                        if r1 > r0]
            return [Chunk(s.source, s.path, s.kind, r0, r1, b0, b1 - 1) for (r0, b0), (r1, b1) in zip(cuts, cuts[1:])
                    if r1 > r0]
        if s.kind == "parquet":
            return self._cut_parquet(s, k, stage_dir)
        return [Chunk(s.source, s.path, s.kind, a, min(a + k, s.rows)) for a in range(0, s.rows, k)]

    def _cut_parquet(self, s: _Survey, k: int, stage_dir: Optional[str]) -> list[Chunk]:
        """Whole row groups per chunk: consecutive small groups merged up to k rows; a file with a
        group above k rows is staged first (when a stage_dir is given) into groups of k rows."""
        staged, groups = "", s.groups
        if stage_dir is not None and max(groups, default=0) > k:
            staged = stage_parquet(s.path, k, stage_dir)
            groups = [min(k, s.rows - a) for a in range(0, s.rows, k)]
        chunks, first, rows = [], 0, 0
        for n in groups:
            if rows and rows + n > k:
                chunks.append(Chunk(s.source, s.path, s.kind, first, first + rows, staged=staged))
                first, rows = first + rows, 0
            rows += n
        if rows:
            chunks.append(Chunk(s.source, s.path, s.kind, first, first + rows, staged=staged))
        return chunks

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

    def _read_json(self, c: Chunk) -> Iterator[Union[Row, BadRow]]:
        """Only this chunk's bytes of the array: never the whole file (see json_array)."""
        try:
            elements = json_array.read_range(c.path, c.byte_start, c.byte_stop)
        except json_array.JsonArrayError as e:
            raise DataError(f"{c.path}: {e}") from None
        for j, raw in enumerate(elements):
            yield _json_line(raw, f"{c.path}:#{c.row_start + j}")

    def _read_parquet(self, c: Chunk) -> Iterator[Row]:
        """The row groups of the chunk (whole groups, each read by exactly one chunk)."""
        import pyarrow.parquet as pq

        pf, first = pq.ParquetFile(c.staged or c.path), 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            lo, hi = max(c.row_start, first), min(c.row_stop, first + n)
            if lo < hi:  # only the row groups that overlap the chunk
                table = pf.read_row_group(g)
                if hi - lo < n:  # a plan from before staging, or a file that changed: still right, just slower
                    table = table.slice(lo - first, hi - lo)
                for j, rec in enumerate(table.to_pylist()):
                    yield Row(rec, f"{c.path}:#{lo + j}")
            first += n
            if first >= c.row_stop:
                break

    def _read_dataset(self, c: Chunk) -> Iterator[Row]:
        ds = self.dataset(c.source, c.path)
        label = c.path if c.kind == "saved" else f"{c.path}:{self.srcs[c.source].split or 'train'}"
        for a in range(c.row_start, c.row_stop, 1000):
            batch = ds[a:min(a + 1000, c.row_stop)]  # columns -> rows: one Arrow slice per 1000 rows
            names = list(batch)
            for j, values in enumerate(zip(*(batch[k] for k in names))):
                yield Row(dict(zip(names, values)), f"{label}:#{a + j}")

    def rows(self) -> Iterator[tuple[Union[Row, BadRow], SourceConfig]]:
        """Every row of every source, in order, streamed (one process: previews, small in-memory
        sets; the prepared path reads by chunks). Reading the first N rows costs O(N), not a scan."""
        columns = lambda i: self.srcs[i].columns  # noqa: E731
        for i in range(len(self.srcs)):
            for path in self.paths(i):
                for row in self._stream(i, path):
                    yield (Row(_rename(row.record, columns(i)), row.origin) if isinstance(row, Row) else row), self.srcs[i]

    def _stream(self, i: int, path: str) -> Iterator[Union[Row, BadRow]]:
        kind = "hub" if is_hub(self.srcs[i]) else _kind(path)
        if kind == "jsonl":
            yield from self._read_jsonl(Chunk(i, path, kind, 0, 1 << 62))
        elif kind == "json":
            try:
                for j, raw in enumerate(json_array.iter_elements(path)):
                    yield _json_line(raw, f"{path}:#{j}")
            except json_array.JsonArrayError as e:
                raise DataError(f"{path}: invalid JSON array ({e})") from None
        elif kind == "parquet":
            import pyarrow.parquet as pq

            self._parquet_metadata(i, path)  # the columns check, with its message
            j = 0
            for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):  # bounded memory for any row group
                for rec in batch.to_pylist():
                    yield Row(rec, f"{path}:#{j}")
                    j += 1
        else:
            yield from self._read_dataset(Chunk(i, path, kind, 0, self.dataset(i, path).num_rows))


def stage_parquet(path: str, k: int, stage_dir: str) -> str:
    """A copy of Parquet file `path` with row groups of k rows (the last one shorter), made once: the
    source is read in one streaming pass (pyarrow iter_batches: memory ~ one batch plus one row
    group's compressed pages, whatever the group's size). Published first-wins, so concurrent
    planners of one cache directory agree on it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .files import publish_once, tmp_suffix

    st = os.stat(path)
    name = hashlib.sha256(f"{os.path.abspath(path)}|{st.st_size}|{k}".encode()).hexdigest()[:16]
    final = os.path.join(stage_dir, f"staged-{name}.parquet")
    if os.path.exists(final):
        return final
    os.makedirs(stage_dir, exist_ok=True)
    tmp = final + tmp_suffix()
    pf = pq.ParquetFile(path)
    with pq.ParquetWriter(tmp, pf.schema_arrow) as writer:
        pending, rows = [], 0
        for batch in pf.iter_batches(batch_size=k):
            pending.append(batch)
            rows += batch.num_rows
            while rows >= k:
                table = pa.Table.from_batches(pending, schema=pf.schema_arrow)
                writer.write_table(table.slice(0, k), row_group_size=k)
                rest = table.slice(k)
                pending, rows = rest.to_batches(), rest.num_rows
        if rows:
            writer.write_table(pa.Table.from_batches(pending, schema=pf.schema_arrow), row_group_size=k)
    publish_once(tmp, final)
    return final


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
    """Identity of a file without reading it all: size and a sha256 of its first and last
    STAMP_SAMPLE_BYTES (every file under a directory, by relative path). Not the mtime: copies of
    one file on node-local disks differ in it, and must share one preparation. (An edit that keeps
    the size and leaves both ends alone goes unnoticed: delete the prepared split after one.)"""
    if os.path.isdir(path):
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
        return [[os.path.relpath(f, path), *_stamp(f)] for f in files]
    size = os.path.getsize(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(STAMP_SAMPLE_BYTES))
        if size > STAMP_SAMPLE_BYTES:
            f.seek(max(STAMP_SAMPLE_BYTES, size - STAMP_SAMPLE_BYTES))
            h.update(f.read(STAMP_SAMPLE_BYTES))
    return [size, h.hexdigest()[:32]]
