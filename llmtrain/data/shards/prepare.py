"""Corpus -> token shards (see data/shards/store.py for the on-disk format); run through `llmtrain prepare`.

Sources are file paths, globs, or saved HF dataset directories:
  *.txt            one document per file. A file larger than `max_txt_doc_bytes` is cut at line
                   breaks into several documents (each gets an EOS): one tokenizer call on a
                   multi-GB string needs many GB of RAM, and no seq_len spans such a document
                   anyway. Many small files are grouped, `docs_per_shard` files per shard.
  *.jsonl          one JSON object per line, text in `text_field`; streamed, never loaded whole.
  *.json           a JSON array of objects (loaded whole: prefer .jsonl for big data) or JSON lines.
  *.parquet        column `text_field`, read by row group.
  dataset dir      `datasets.save_to_disk` output (a DatasetDict uses its "train" split).
  hub dataset      a hub id (owner/name) or a local folder laid out as a hub dataset repository,
                   read with `datasets.load_dataset` (hub options: name, split, revision). With
                   streaming, rows are streamed (nothing is downloaded first) and each of the
                   stream's shards (data files) is one unit, tokenized by one worker into one shard;
                   pin `revision` so that a resumed or repeated preparation reads the same files.

Each work unit (source file, chunk of rows) is tokenized in a spawned worker process and written
as one shard: temp names, then os.replace, sidecar last. A rerun skips units whose sidecar
matches (resume after an interrupt); when the manifest already matches the inputs it does
nothing. Tokens are the tokenizer's ids without added special tokens (no BOS; a special-token
string inside a document is encoded as plain text), plus EOS after each document.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import logging
import multiprocessing as mp
import os
from dataclasses import asdict, dataclass
from itertools import chain

import numpy as np

from ...errors import LlmtrainError
from ..line_cuts import jsonl_cuts
from ..tokenizer_id import vocab_hash
from .store import FORMAT_VERSION, MANIFEST_NAME, Manifest, ShardError, ShardInfo, dtype_for_vocab, write_json_atomic

log = logging.getLogger("llmtrain.data.shards.prepare")

DEFAULT_DOCS_PER_SHARD = 50_000  # rows (lines, records, .txt files) per shard
EST_BYTES_PER_TOKEN = 4  # to turn tokens_per_shard into a row count before tokenizing
TOKENIZE_BATCH_DOCS = 256  # documents per encode_batch call
MAX_EXAMPLES = 20  # bad-row locations kept per shard and printed per run


class CorpusError(LlmtrainError, ValueError):
    """The input corpus cannot be prepared as given."""


@dataclass(frozen=True)
class _Source:
    kind: str  # "txt" | "jsonl" | "json" | "parquet" | "hf" | "hub" | "hubstream"
    paths: tuple[str, ...]  # several only for a group of .txt files; a hub id or folder for hub kinds


@dataclass(frozen=True)
class _Unit:
    kind: str
    paths: tuple[str, ...]
    row_start: int
    row_stop: int
    byte_start: int = 0  # jsonl only: file offset of row_start
    name: str = ""
    fingerprint: str = ""


# --- sources ---
def _kind_of(path: str) -> str:
    if os.path.isdir(path):
        if any(os.path.isfile(os.path.join(path, f))
               for f in ("state.json", "dataset_info.json", "dataset_dict.json")):
            return "hf"
        raise CorpusError(f"{path} is a directory but not a saved HF dataset; pass a glob such "
                          f"as '{path}/*.jsonl' instead")
    ext = os.path.splitext(path)[1].lower()
    kinds = {".txt": "txt", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
    if ext not in kinds:
        raise CorpusError(f"{path}: unsupported extension '{ext}'; use .txt, .jsonl, .json, "
                          f".parquet or a saved HF dataset directory")
    return kinds[ext]


def _is_hub_spec(spec: str, hub: dict | None) -> bool:
    from llmtrain.config import SourceConfig
    from llmtrain.data.sources import is_hub

    return is_hub(SourceConfig(spec, name=(hub or {}).get("name")))


def _expand_sources(sources: list[str], hub: dict | None = None) -> list[_Source]:
    if isinstance(sources, str):
        sources = [sources]
    out: list[_Source] = []
    for spec in sources:
        if _is_hub_spec(spec, hub):
            out.append(_Source("hubstream" if (hub or {}).get("streaming") else "hub", (spec,)))
            continue
        paths = [spec] if os.path.exists(spec) else sorted(glob.glob(spec, recursive=True))
        if not paths:
            raise CorpusError(f"data source '{spec}' matches no file or directory; check the "
                              f"path or glob (data.train / data.eval)")
        txt = [os.path.abspath(p) for p in paths if os.path.isfile(p) and _kind_of(p) == "txt"]
        if txt:
            out.append(_Source("txt", tuple(txt)))
        out += [_Source(_kind_of(p), (os.path.abspath(p),)) for p in paths
                if not (os.path.isfile(p) and _kind_of(p) == "txt")]
    return out


def _stamp(path: str) -> list:
    """(size, mtime) of a file, or of every file of a dataset directory: changes mean 'redo'."""
    if os.path.isdir(path):
        return [[os.path.relpath(os.path.join(d, f), path), *_stamp(os.path.join(d, f))]
                for d, _, fs in sorted(os.walk(path)) for f in sorted(fs)]
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def _stamp_of(path: str, kind: str, hub: dict | None) -> list:
    """_stamp for files and dataset dirs; for hub sources what identifies their rows."""
    if kind not in ("hub", "hubstream"):
        return _stamp(path)
    local = _stamp(path) if os.path.isdir(path) else []
    if kind == "hub":
        return [local, getattr(_load_hub(path, _hub_key(hub)), "_fingerprint", None)]
    return [local, _load_hub(path, _hub_key(hub), streaming=True).n_shards]  # no content hash without reading it


def _hub_key(hub: dict | None) -> tuple:
    hub = hub or {}
    return hub.get("name"), hub.get("split") or "train", hub.get("revision")


@functools.lru_cache(maxsize=8)
def _load_hub(path: str, key: tuple, streaming: bool = False):
    import datasets

    name, split, revision = key
    try:
        return datasets.load_dataset(path, name=name, split=split, revision=revision, streaming=streaming)
    except Exception as e:  # unknown id, subset or split; no network
        raise CorpusError(f"cannot load dataset {path!r} (name={name}, split={split}, revision={revision}, "
                          f"streaming={streaming}) with datasets.load_dataset: {' '.join(str(e).split())[:400]}") from None


def _load_hf(path: str):
    import datasets  # slow import: only when a dataset directory is used

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise CorpusError(f"{path} is a DatasetDict without a 'train' split ({list(ds)}); "
                              f"pass the split's directory, e.g. {path}/{next(iter(ds))}")
        ds = ds["train"]
    return ds


# --- planning: sources -> units ---
def _rows_per_unit(docs_per_shard, tokens_per_shard, total_bytes: int, rows: int) -> int:
    if tokens_per_shard is None:
        return docs_per_shard or DEFAULT_DOCS_PER_SHARD
    bytes_per_row = max(1.0, total_bytes / max(rows, 1))
    return max(1, int(tokens_per_shard * EST_BYTES_PER_TOKEN / bytes_per_row))


def _plan(src: _Source, text_field: str, docs_per_shard, tokens_per_shard, hub=None) -> list[_Unit]:
    path = src.paths[0]
    if src.kind == "txt":
        if tokens_per_shard is None:
            k = docs_per_shard or DEFAULT_DOCS_PER_SHARD
            return [_Unit("txt", src.paths[a:a + k], 0, len(src.paths[a:a + k]))
                    for a in range(0, len(src.paths), k)]
        units, group, size = [], [], 0  # group files by bytes, ~tokens_per_shard each
        for p in src.paths:
            group.append(p)
            size += os.path.getsize(p)
            if size >= tokens_per_shard * EST_BYTES_PER_TOKEN:
                units.append(_Unit("txt", tuple(group), 0, len(group)))
                group, size = [], 0
        return units + ([_Unit("txt", tuple(group), 0, len(group))] if group else [])
    if src.kind == "jsonl" or (src.kind == "json" and not _is_json_array(path)):
        lines = jsonl_cuts(path, 1 << 62)[-1][0] if tokens_per_shard else 0  # count pass
        k = _rows_per_unit(docs_per_shard, tokens_per_shard, os.path.getsize(path), lines)
        cuts = jsonl_cuts(path, k)
        return [_Unit("jsonl", src.paths, r0, r1, b0) for (r0, b0), (r1, _) in zip(cuts, cuts[1:])]
    if src.kind == "json":
        with open(path, "rb") as f:
            rows = len(json.load(f))
        nbytes = os.path.getsize(path)
    elif src.kind == "parquet":
        import pyarrow.parquet as pq

        md = pq.ParquetFile(path).metadata
        if text_field not in md.schema.names:
            raise CorpusError(f"{path} has no column '{text_field}' (columns: {md.schema.names}); "
                              f"set text_field / data.text_field")
        rows, nbytes = md.num_rows, os.path.getsize(path) * 3  # ~3x: compressed on disk
    elif src.kind == "hubstream":  # one unit per stream shard (data file): row counts are unknown up front
        n = _load_hub(path, _hub_key(hub), streaming=True).n_shards
        return [_Unit("hubstream", src.paths, i, i + 1) for i in range(n)]
    else:
        ds = _load_hf(path) if src.kind == "hf" else _load_hub(path, _hub_key(hub))
        if text_field not in ds.column_names:
            raise CorpusError(f"{path} has no column '{text_field}' (columns: {ds.column_names}); "
                              f"set text_field / data.text_field")
        rows, nbytes = ds.num_rows, ds.data.nbytes
    k = _rows_per_unit(docs_per_shard, tokens_per_shard, nbytes, rows)
    return [_Unit(src.kind, src.paths, a, min(a + k, rows)) for a in range(0, rows, k)]


def _is_json_array(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    return head.startswith(b"[")


def _name_unit(u: _Unit, settings: dict) -> _Unit:
    key = json.dumps({"v": FORMAT_VERSION, "kind": u.kind, "rows": [u.row_start, u.row_stop],
                      "files": [[p, _stamp_of(p, u.kind, settings.get("hub"))] for p in u.paths], **settings},
                     sort_keys=True)
    fp = hashlib.sha256(key.encode()).hexdigest()
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in
                   os.path.splitext(os.path.basename(u.paths[0].rstrip("/")))[0])[:40]
    return _Unit(u.kind, u.paths, u.row_start, u.row_stop, u.byte_start,
                 f"{stem}-r{u.row_start:09d}-{fp[:10]}", fp)


# --- reading rows (worker side); each yields (text | None, where, reason) ---
def _decode(raw: bytes, where_file: str, first_line: int):
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as e:
        line = first_line + raw.count(b"\n", 0, e.start)
        return None, (f"{where_file}:{line}", f"not valid UTF-8 (byte {e.start} of the document)")


def _utf8_cut(data: bytes, cut: int) -> int:
    while cut > 1 and (data[cut] & 0xC0) == 0x80:  # never start the next piece mid-character
        cut -= 1
    return cut


def _read_txt(u: _Unit, cfg: dict):
    limit = cfg["max_txt_doc_bytes"]
    for path in u.paths:
        with open(path, "rb") as f:
            carry, line = b"", 1
            while True:
                block = carry + f.read(max(0, limit - len(carry)))
                nxt = f.read(1) if len(block) >= limit else b""
                if not nxt:  # the rest of the file is one document (possibly empty)
                    piece, carry = block, b""
                else:  # a big file: end this document at the last line break, if any
                    nl = block.rfind(b"\n")
                    cut = nl + 1 if nl >= 0 else _utf8_cut(block + nxt, len(block))
                    piece, carry = block[:cut], block[cut:] + nxt
                text, bad = _decode(piece, path, line)
                yield (None, *bad) if bad else (text, f"{path}:{line}", None)
                line += piece.count(b"\n")
                if not nxt:
                    break


def _row_from_obj(obj, where: str, field: str):
    if not isinstance(obj, dict):
        return None, where, f"row is {type(obj).__name__}, expected a JSON object"
    if field not in obj:
        return None, where, f"missing field '{field}'"
    text = obj[field]
    if not isinstance(text, str):
        return None, where, f"field '{field}' is {type(text).__name__}, expected a string"
    return text, where, None


def _read_jsonl(u: _Unit, cfg: dict):
    path = u.paths[0]
    with open(path, "rb") as f:
        f.seek(u.byte_start)
        for lineno in range(u.row_start + 1, u.row_stop + 1):
            raw, where = f.readline(), f"{path}:{lineno}"
            if not raw.strip():
                yield "", where, None
                continue
            line, bad = _decode(raw, path, lineno)
            if bad:
                yield None, *bad
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield None, where, f"invalid JSON ({e.msg} at column {e.colno})"
                continue
            yield _row_from_obj(obj, where, cfg["text_field"])


def _read_json(u: _Unit, cfg: dict):
    path = u.paths[0]
    with open(path, "rb") as f:
        rows = json.load(f)
    for i in range(u.row_start, u.row_stop):
        yield _row_from_obj(rows[i], f"{path}[row {i}]", cfg["text_field"])


def _column_rows(values, path: str, first_row: int, field: str):
    for i, text in enumerate(values, start=first_row):
        where = f"{path}[row {i}]"
        if not isinstance(text, str):
            yield None, where, f"field '{field}' is {type(text).__name__}, expected a string"
        else:
            yield text, where, None


def _read_parquet(u: _Unit, cfg: dict):
    import pyarrow.parquet as pq

    pf, field, first = pq.ParquetFile(u.paths[0]), cfg["text_field"], 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        lo, hi = max(u.row_start, first), min(u.row_stop, first + n)
        if lo < hi:  # read only the row groups that overlap the unit
            col = pf.read_row_group(g, columns=[field]).column(field).slice(lo - first, hi - lo)
            yield from _column_rows(col.to_pylist(), u.paths[0], lo, field)
        first += n


def _read_hf(u: _Unit, cfg: dict):
    ds, field = _load_hf(u.paths[0]), cfg["text_field"]
    for a in range(u.row_start, u.row_stop, 1000):
        yield from _column_rows(ds[a:min(a + 1000, u.row_stop)][field], u.paths[0], a, field)


def _read_hub(u: _Unit, cfg: dict):
    ds, field = _load_hub(u.paths[0], _hub_key(cfg.get("hub"))), cfg["text_field"]
    where = f"{u.paths[0]}:{_hub_key(cfg.get('hub'))[1]}"
    for a in range(u.row_start, u.row_stop, 1000):
        yield from _column_rows(ds[a:min(a + 1000, u.row_stop)][field], where, a, field)


def _read_hubstream(u: _Unit, cfg: dict):
    stream = _load_hub(u.paths[0], _hub_key(cfg.get("hub")), streaming=True)
    shard = stream.shard(num_shards=stream.n_shards, index=u.row_start)
    for j, obj in enumerate(shard):
        yield _row_from_obj(obj, f"{u.paths[0]}[stream shard {u.row_start}, row {j}]", cfg["text_field"])


_READERS = {"txt": _read_txt, "jsonl": _read_jsonl, "json": _read_json,
            "parquet": _read_parquet, "hf": _read_hf, "hub": _read_hub, "hubstream": _read_hubstream}

# --- tokenizing and writing (worker side) ---
_W: dict = {}  # per-process worker state, set by _init_worker


def _init_worker(tokenizer_json: str, cfg: dict) -> None:
    from tokenizers import Tokenizer

    if cfg.get("in_subprocess"):
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallelism comes from the processes
    tok = Tokenizer.from_str(tokenizer_json)
    # a literal "<|endoftext|>" inside a document is text, not a document boundary
    tok.encode_special_tokens = True
    _W["tok"], _W["cfg"] = tok, cfg


def _encode(texts: list[str], wheres: list[str], bad: list[str]) -> list[list[int]]:
    tok = _W["tok"]
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    try:
        return [e.ids for e in encode(texts, add_special_tokens=False)]
    except Exception:  # e.g. a lone surrogate from a JSON \ud800 escape: find the culprit
        out = []
        for text, where in zip(texts, wheres):
            try:
                out.append(tok.encode(text, add_special_tokens=False).ids)
            except Exception as e:
                bad.append(f"{where}: cannot be tokenized ({type(e).__name__})")
                out.append(None)
        return out


def _run_unit(args: tuple[_Unit, str]) -> dict:
    """Tokenize one unit into one shard; returns its sidecar."""
    u, out_dir = args
    cfg = _W["cfg"]
    dtype, eos, limit = np.dtype(cfg["dtype"]), cfg["eos_id"], np.iinfo(cfg["dtype"]).max
    tmp = {ext: os.path.join(out_dir, f".{u.name}{ext}.tmp-{os.getpid()}") for ext in (".bin", ".idx.npy")}
    bad, counts, starts, n_tok, sha = [], {"rows": 0, "bad": 0, "empty": 0}, [], 0, hashlib.sha256()
    with open(tmp[".bin"], "wb") as fbin:
        def flush(texts, wheres):
            nonlocal n_tok
            docs = [ids for ids in _encode(texts, wheres, bad) if ids is not None]
            counts["bad"] += len(texts) - len(docs)
            if not docs:
                return
            # one array and one write per batch: documents, each followed by EOS
            flat = np.fromiter(chain.from_iterable(ids + [eos] for ids in docs), dtype=np.int64)
            if flat.max() > limit:
                raise CorpusError(f"token id {flat.max()} does not fit {dtype}: vocab_size is wrong")
            lens = np.array([len(ids) + 1 for ids in docs], dtype=np.int64)
            starts.extend((n_tok + np.cumsum(lens) - lens).tolist())
            buf = flat.astype(dtype).tobytes()
            fbin.write(buf)
            sha.update(buf)
            n_tok += int(flat.shape[0])

        texts, wheres = [], []
        for text, where, reason in _READERS[u.kind](u, cfg):
            counts["rows"] += 1
            if reason is not None:
                counts["bad"] += 1
                bad.append(f"{where}: {reason}")
            elif text == "":
                counts["empty"] += 1
            else:
                texts.append(text)
                wheres.append(where)
                if len(texts) >= TOKENIZE_BATCH_DOCS:
                    flush(texts, wheres)
                    texts, wheres = [], []
        flush(texts, wheres)
    with open(tmp[".idx.npy"], "wb") as f:  # a file object: np.save(path) would append ".npy"
        np.save(f, np.array(starts, dtype=np.int64))
    info = ShardInfo(u.name, n_tok, len(starts), sha.hexdigest(), "", u.paths[0], u.row_start, u.row_stop)
    with open(tmp[".idx.npy"], "rb") as f:
        info.idx_sha256 = hashlib.sha256(f.read()).hexdigest()
    for ext, p in tmp.items():
        os.replace(p, os.path.join(out_dir, u.name + ext))
    sidecar = {"shard": asdict(info), "fingerprint": u.fingerprint, "dtype": cfg["dtype"],
               "rows": counts["rows"], "bad_rows": counts["bad"], "empty_rows": counts["empty"],
               "bad_row_examples": bad[:MAX_EXAMPLES], "files": len(u.paths)}
    write_json_atomic(os.path.join(out_dir, u.name + ".json"), sidecar)  # last: marks it done
    return sidecar


# --- driver ---
def _tokenizer_info(tokenizer, eos_token_id) -> tuple[str, dict]:
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if not hasattr(backend, "to_str"):
        raise CorpusError(f"tokenizer {type(tokenizer).__name__} is not a fast tokenizer; load it "
                          f"with AutoTokenizer.from_pretrained(..., use_fast=True)")
    eos = eos_token_id if eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise CorpusError("the tokenizer has no eos_token; set one or pass eos_token_id=")
    vocab = len(tokenizer) if hasattr(tokenizer, "backend_tokenizer") else \
        backend.get_vocab_size(with_added_tokens=True)
    return backend.to_str(), {"name_or_path": str(getattr(tokenizer, "name_or_path", "") or ""),
                              "sha256": vocab_hash(tokenizer), "vocab_size": int(vocab),
                              "eos_id": int(eos), "dtype": dtype_for_vocab(vocab).name}


def _done_sidecar(u: _Unit, out_dir: str) -> dict | None:
    try:
        with open(os.path.join(out_dir, u.name + ".json")) as f:
            side = json.load(f)
        n = side["shard"]["num_tokens"] * np.dtype(side["dtype"]).itemsize
        ok = (side["fingerprint"] == u.fingerprint
              and os.path.getsize(os.path.join(out_dir, u.name + ".bin")) == n
              and os.path.isfile(os.path.join(out_dir, u.name + ".idx.npy")))
        return side if ok else None
    except (OSError, ValueError, KeyError):
        return None


def _manifest_if_current(out_dir: str, fingerprint: str) -> Manifest | None:
    if not os.path.isfile(os.path.join(out_dir, MANIFEST_NAME)):
        return None
    try:
        m = Manifest.load(out_dir)
    except ShardError:
        return None
    itemsize = np.dtype(m.dtype).itemsize
    for s in m.shards:
        p = os.path.join(out_dir, s.name + ".bin")
        if not os.path.isfile(p) or os.path.getsize(p) != s.num_tokens * itemsize:
            return None
    return m if m.input_fingerprint == fingerprint else None


def _run_units(todo, out_dir, tok_json, cfg, num_workers, progress, on_done) -> None:
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), unit="shard", desc="tokenizing", disable=not progress)
    jobs = [(u, out_dir) for u in todo]
    try:
        if num_workers <= 1 or len(todo) <= 1:
            _init_worker(tok_json, cfg)
            results = map(_run_unit, jobs)
            pool = None
        else:  # spawn: safe with threads (tokenizers' Rayon pool) and identical on every OS
            pool = mp.get_context("spawn").Pool(min(num_workers, len(todo)), _init_worker,
                                                (tok_json, {**cfg, "in_subprocess": True}))
            results = pool.imap_unordered(_run_unit, jobs)
        for side in results:
            on_done(side)
            bar.update(1)
            bar.set_postfix(tokens=f"{side['shard']['num_tokens']:,}", refresh=False)
        if pool is not None:
            pool.close()
            pool.join()
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()  # on error or Ctrl-C: finished shards stay, temp files are redone


def prepare_corpus(sources: list[str], tokenizer, out_dir: str, *, text_field: str = "text",
                   num_workers: int = 2, docs_per_shard: int | None = None,
                   tokens_per_shard: int | None = None, max_bad_fraction: float = 0.001,
                   max_txt_doc_bytes: int = 64 << 20, eos_token_id: int | None = None,
                   progress: bool = True, hub: dict | None = None) -> Manifest:
    """Tokenize `sources` into shards under `out_dir` and return the manifest.

    num_workers: tokenizer processes (<= 1: in this process).
    docs_per_shard: rows per shard (default 50,000); tokens_per_shard: approximate tokens per
        shard instead (estimated at ~4 bytes per token before tokenizing). Give at most one.
    max_bad_fraction: share of bad rows (non-UTF-8, invalid JSON, missing/non-string field) that
        is skipped and counted; more aborts with CorpusError. Empty rows and files are not bad.
    max_txt_doc_bytes: bytes; a larger .txt file is cut at line breaks into several documents.
    eos_token_id: overrides tokenizer.eos_token_id (needed for a bare tokenizers.Tokenizer).
    hub: for sources that are hub datasets (an id or a hub-layout folder): {name, split, revision,
        streaming} as load_dataset takes them (split defaults to train).
    """
    if docs_per_shard is not None and tokens_per_shard is not None:
        raise CorpusError("give docs_per_shard or tokens_per_shard, not both")
    tok_json, tok = _tokenizer_info(tokenizer, eos_token_id)
    srcs = _expand_sources(sources, hub)
    settings = {"text_field": text_field, "tokenizer": tok["sha256"], "eos": tok["eos_id"],
                "dtype": tok["dtype"], "max_txt_doc_bytes": max_txt_doc_bytes}
    if any(s.kind in ("hub", "hubstream") for s in srcs):
        settings["hub"] = {k: (hub or {}).get(k) for k in ("name", "split", "revision", "streaming")}
    kinds = {p: s.kind for s in srcs for p in s.paths}
    files = [p for s in srcs for p in s.paths]
    if len(set(files)) != len(files):
        dup = next(p for p in files if files.count(p) > 1)
        raise CorpusError(f"source file {dup} is matched twice by {sources}; list it once "
                          f"(to upweight a source, give it a mixing weight instead)")
    fingerprint = hashlib.sha256(json.dumps(
        [settings, docs_per_shard, tokens_per_shard, [[p, _stamp_of(p, kinds[p], hub)] for p in files]],
        sort_keys=True).encode()).hexdigest()
    if (m := _manifest_if_current(out_dir, fingerprint)) is not None:
        print(f"[prepare] {out_dir} is up to date ({len(m.shards)} shards, {m.total_tokens:,} "
              f"tokens); nothing to do")
        return m
    os.makedirs(out_dir, exist_ok=True)
    for f in os.listdir(out_dir):  # temp files of an interrupted run: always rewritten
        if ".tmp-" in f:
            os.remove(os.path.join(out_dir, f))
    empty_files = [p for p in files if os.path.isfile(p) and os.path.getsize(p) == 0]
    for p in empty_files:
        log.warning("empty file skipped: %s", p)
    units = [_name_unit(u, settings)
             for s in srcs for u in _plan(s, text_field, docs_per_shard, tokens_per_shard, hub)]
    done = {u.name: side for u in units if (side := _done_sidecar(u, out_dir)) is not None}
    todo = [u for u in units if u.name not in done]
    print(f"[prepare] {len(units)} shards: {len(done)} already done, {len(todo)} to tokenize "
          f"with {num_workers} workers -> {out_dir}")
    planned_rows = sum(u.row_stop - u.row_start for u in units)
    bad_so_far = sum(s["bad_rows"] for s in done.values())

    def on_done(side: dict) -> None:
        nonlocal bad_so_far
        done[side["shard"]["name"]] = side
        bad_so_far += side["bad_rows"]
        if bad_so_far > max_bad_fraction * planned_rows:  # the final share can only be higher
            raise CorpusError(_bad_message(done.values(), bad_so_far, planned_rows, max_bad_fraction))

    _run_units(todo, out_dir, tok_json, {**settings, "dtype": tok["dtype"], "eos_id": tok["eos_id"]},
               num_workers, progress, on_done)
    return _write_manifest(units, done, tok, text_field, files, empty_files, fingerprint,
                           out_dir, max_bad_fraction)


def _bad_message(sides, bad: int, rows: int, max_bad_fraction: float) -> str:
    first = next((e for s in sides for e in s["bad_row_examples"]), "")
    return (f"{bad} bad rows of {rows} (> max_bad_fraction={max_bad_fraction}); first: "
            f"{first}; fix the data or raise data.max_bad_fraction")


def _write_manifest(units, done, tok, text_field, files, empty_files, fingerprint, out_dir,
                    max_bad_fraction) -> Manifest:
    sides = [done[u.name] for u in units]
    rows, bad = sum(s["rows"] for s in sides), sum(s["bad_rows"] for s in sides)
    if bad > max_bad_fraction * max(rows, 1):
        raise CorpusError(_bad_message(sides, bad, rows, max_bad_fraction))
    examples = [e for s in sides for e in s["bad_row_examples"]]
    for e in examples[:MAX_EXAMPLES]:
        log.warning("bad row skipped: %s", e)
    if bad > MAX_EXAMPLES:
        log.warning("... %d bad rows in all (see bad_row_examples in each shard's .json)", bad)
    empty = sum(s["empty_rows"] for s in sides)
    shards = [ShardInfo(**s["shard"]) for s in sides if s["shard"]["num_tokens"] > 0]
    m = Manifest(tokenizer_name_or_path=tok["name_or_path"], tokenizer_sha256=tok["sha256"],
                 vocab_size=tok["vocab_size"], eos_id=tok["eos_id"], dtype=tok["dtype"],
                 text_field=text_field, shards=shards,
                 total_tokens=sum(s.num_tokens for s in shards),
                 total_docs=sum(s.num_docs for s in shards), total_rows=rows,
                 skipped_rows=bad + empty, bad_rows=bad, empty_rows=empty, empty_files=empty_files,
                 bad_row_examples=examples[:100], sources=files, input_fingerprint=fingerprint)
    m.save(out_dir)  # last: its presence means every listed shard is complete
    print(f"[prepare] done: {len(shards)} shards, {m.total_tokens:,} tokens, {m.total_docs:,} "
          f"docs, {m.skipped_rows} rows skipped ({bad} bad, {empty} empty) -> {out_dir}")
    return m
