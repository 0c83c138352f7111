"""Where a JSONL file can be cut into row ranges without reading it as rows: one numpy newline scan
(~GB/s, no Python object per line) gives the byte offset of every k-th line start. SFT/DPO
preparation (sources.SplitReader.plan) and pretraining shards (shards/prepare.py) both plan their
chunks from it; it imports nothing of llmtrain, so both can."""
from __future__ import annotations

import numpy as np


def jsonl_cuts(path: str, rows_per_unit: int) -> list[tuple[int, int]]:
    """[(row, byte offset)] at every rows_per_unit-th line start, plus (total_rows, size)."""
    cuts, line, pos, last = [(0, 0)], 0, 0, b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):  # 16 MiB reads: memory stays flat whatever the file size
            nl = np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10)
            first = (-(line + 1)) % rows_per_unit  # newline index ending a multiple-of-k row
            cuts += [(line + int(i) + 1, pos + int(nl[i]) + 1) for i in range(first, len(nl), rows_per_unit)]
            line, pos, last = line + len(nl), pos + len(chunk), chunk[-1:]
    total = line + (last != b"\n")  # a last line without a trailing newline is still a row
    if cuts[-1][0] != total:
        cuts.append((total, pos))
    return cuts
