"""Find the top-level elements of a JSON array file without parsing it (a .json source: one array of rows).

Why not json.load: a 2 GB array (OpenHermes-2.5) costs ~5 GB of Python objects, in every process
that reads any part of it. Instead a numpy scan (string- and escape-aware, ~GB/s, bounded memory)
finds the byte offsets of the separators between top-level elements once, at planning; a worker
then reads only its chunk's byte range and json.loads each element of it, so one malformed
element is one bad row rather than a broken file.

The scan looks only at the bytes " \\ [ ] { } , (UTF-8 continuation bytes are never ASCII, so
multi-byte characters cannot fake one). A quote is escaped when an odd run of backslashes
precedes it; outside strings, brackets change the depth and a comma at depth 1 separates two
top-level elements.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

BLOCK_BYTES = 4 << 20  # bytes scanned at once: the scan's memory is a few times this, whatever the file size

_INTERESTING = np.zeros(256, dtype=bool)
_INTERESTING[list(b'"\\[]{},')] = True
_DELTA = np.zeros(256, dtype=np.int8)
_DELTA[list(b"[{")] = 1
_DELTA[list(b"]}")] = -1
_WS = b" \t\r\n"
_BOM = b"\xef\xbb\xbf"


class JsonArrayError(ValueError):
    """The file is not one well-formed JSON array (its structure, not one element, is broken)."""


@dataclass
class _State:
    depth: int = 0  # bracket depth before the block
    in_str: bool = False  # inside a string before the block
    bs_run: int = 0  # backslashes ending the previous block (a quote right after an odd run is escaped)


def _scan(buf: bytes, st: _State) -> tuple[np.ndarray, int]:
    """Positions (in `buf`) of commas at depth 1 and of the bracket closing the array (-1: not in buf);
    advances `st` past `buf`. Raises JsonArrayError on a bracket that closes more than it opened."""
    a = np.frombuffer(buf, dtype=np.uint8)
    pos = np.flatnonzero(_INTERESTING[a])  # sparse: quotes, backslashes, brackets, commas only
    ch = a[pos]
    is_q, is_bs = ch == 34, ch == 92
    escaped = np.zeros(len(pos), dtype=bool)
    if len(pos) and pos[0] == 0 and is_q[0] and st.bs_run % 2:
        escaped[0] = True  # the previous block ended in an odd backslash run
    new_bs_run = 0
    if is_bs.any():
        idx = np.arange(len(pos))
        adjacent = np.zeros(len(pos), dtype=bool)  # element s directly follows a backslash byte at s-1
        adjacent[1:] = is_bs[:-1] & (pos[1:] == pos[:-1] + 1)
        run_first = np.maximum.accumulate(np.where(is_bs & ~adjacent, idx, -1))  # first backslash of the run
        run_len = idx - run_first + 1 + np.where(pos[np.maximum(run_first, 0)] == 0, st.bs_run, 0)
        escaped[1:] |= is_q[1:] & adjacent[1:] & (run_len[:-1] % 2 == 1)
        if is_bs[-1] and pos[-1] == len(a) - 1:
            new_bs_run = int(run_len[-1])
    real_q = is_q & ~escaped
    quotes_before = np.cumsum(real_q) - real_q  # real quotes before each element
    outside = ((quotes_before + st.in_str) % 2 == 0) & ~is_q & ~is_bs
    delta = np.where(outside, _DELTA[ch], 0).astype(np.int64)
    depth = st.depth + np.cumsum(delta)  # depth after each element
    if len(depth) and depth.min() < 0:
        raise JsonArrayError("a bracket closes more than was opened")
    closing = np.flatnonzero(outside & (delta < 0) & (depth == 0))
    commas = pos[outside & (ch == 44) & (depth == 1)]
    close = int(pos[closing[0]]) if len(closing) else -1
    if close >= 0:
        commas = commas[commas < close]
    st.depth = int(depth[-1]) if len(depth) else st.depth
    st.in_str = bool((st.in_str + int(real_q.sum())) % 2)
    st.bs_run = new_bs_run
    return commas, close


@dataclass
class ArrayPlan:
    """Top-level elements of one array file: `count`, and `cuts`, the (element index, byte offset of
    its start) of every `every`-th element, plus (count, offset of the closing bracket)."""

    count: int
    cuts: list


def _open_bracket(f, path: str) -> int:
    """Offset just past the opening '[' (after whitespace and a UTF-8 BOM)."""
    head = f.read(1 << 16)
    body = head[len(_BOM):] if head.startswith(_BOM) else head
    stripped = body.lstrip(_WS)
    if not stripped.startswith(b"["):
        what = "is empty" if not stripped else f"starts with {stripped[:1]!r}"
        raise JsonArrayError(f"{path}: a .json source must hold one array of rows; it {what} "
                             "(use .jsonl for one row per line)")
    return len(head) - len(stripped) + 1


def plan_array(path: str, every: int) -> ArrayPlan:
    """One pass over the file: the element count and the start offset of every `every`-th element
    (the last cut is (count, offset of the closing bracket + 1), so element range [i, j) always
    spans bytes [cut_i, cut_j - 1))."""
    cuts: list = []
    with open(path, "rb") as f:
        start = _open_bracket(f, path)
        f.seek(start)
        st, offset, count, close, first_has_bytes = _State(depth=1), start, 0, -1, False
        elem_start = start  # offset of the current element's first byte
        while close < 0:
            buf = f.read(BLOCK_BYTES)
            if not buf:
                raise JsonArrayError(f"{path}: the array is never closed (truncated file?)")
            commas, close = _scan(buf, st)
            if count == 0 and not first_has_bytes:  # "[ ]" holds no element, "[x]" one
                first_end = commas[0] if len(commas) else (close if close >= 0 else len(buf))
                first_has_bytes = bool(buf[:first_end].strip(_WS))
            for c in commas.tolist():
                if count % every == 0:
                    cuts.append((count, elem_start))
                count, elem_start = count + 1, offset + c + 1
            if close >= 0:
                close += offset
                if (buf[close - offset + 1:] + f.read(1 << 16)).strip(_WS):
                    raise JsonArrayError(f"{path}: data after the closing bracket of the array")
            offset += len(buf)
    if count or first_has_bytes:  # the element after the last comma (or the only one)
        if count % every == 0:
            cuts.append((count, elem_start))
        count += 1
    cuts.append((count, close + 1))
    return ArrayPlan(count, cuts)


def split_elements(buf: bytes) -> list[bytes]:
    """The elements of `buf`: bytes from the start of one element to the end of a later one (no
    surrounding brackets), cut at its depth-0 commas."""
    commas, close = _scan(buf, _State(depth=1))
    if close >= 0:
        raise JsonArrayError("a bracket closes the array inside a chunk (the file changed since planning?)")
    bounds = [-1] + commas.tolist() + [len(buf)]
    return [buf[a + 1:b] for a, b in zip(bounds[:-1], bounds[1:])]


def read_range(path: str, byte_start: int, byte_stop: int) -> list[bytes]:
    """The elements whose bytes lie in [byte_start, byte_stop) (a chunk of plan_array's cuts)."""
    with open(path, "rb") as f:
        f.seek(byte_start)
        buf = f.read(byte_stop - byte_start)
    return split_elements(buf) if buf.strip(_WS) else []


def iter_elements(path: str, limit: Optional[int] = None) -> Iterator[bytes]:
    """Every element's bytes in order, reading the file block by block (previews: only what is asked)."""
    with open(path, "rb") as f:
        start = _open_bracket(f, path)
        f.seek(start)
        st, pending, n = _State(depth=1), b"", 0
        while True:
            buf = f.read(BLOCK_BYTES)
            if not buf:
                raise JsonArrayError(f"{path}: the array is never closed (truncated file?)")
            commas, close = _scan(buf, st)
            cuts = [-1] + commas.tolist() + ([close] if close >= 0 else [])
            for a, b in zip(cuts[:-1], cuts[1:]):
                element = pending + buf[a + 1:b]
                pending = b""
                if b == close and not element.strip(_WS) and n == 0:
                    return  # "[ ]"
                yield element
                n += 1
                if limit is not None and n >= limit:
                    return
            if close >= 0:
                return
            pending += buf[cuts[-1] + 1:]
