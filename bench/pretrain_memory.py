"""Peak memory of the pretraining reader does not grow with corpus size.

Builds a synthetic corpus of S MB of text and one of scale*S MB, prepares both into token shards
(in a temp dir), then in a fresh subprocess per corpus reads the same number of PretrainRows rows
(touching every token of each row) and reports peak RSS and its ratio.

Peak RSS is the child's VmHWM (/proc/self/status). resource.getrusage(...).ru_maxrss is printed
too, but on Linux it carries the parent's high-water mark across fork+exec (the kernel folds the
old address space's peak into it at exec), so in a child of this ~100 MB parent it reads the
parent's peak, not the reader's.

    python bench/pretrain_memory.py                       # S=8 MB, 10x, 4000 rows of 1024
    python bench/pretrain_memory.py --size-mb 32 --rows 20000 --keep /tmp/bench_shards
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

EOS = "<|endoftext|>"


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _proc_status(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(data_dir: str, rows: int, seq_len: int, seed: int) -> None:
    """Runs in a fresh process: read `rows` rows and report memory as one JSON line."""
    from llmtrain.data.shards.store import PretrainRows, TokenShards

    base = _proc_status("VmHWM")
    sampler = PretrainRows(TokenShards(data_dir), seq_len=seq_len, seed=seed)
    checksum, t0 = 0, time.perf_counter()
    for k in range(rows):
        row = sampler[k]
        # touch every token of the row (inputs, labels, positions)
        checksum += int(row["input_ids"].sum() + row["labels"].sum() + row["position_ids"].sum())
    elapsed = time.perf_counter() - t0
    print(json.dumps({"base_mb": base, "peak_mb": _proc_status("VmHWM"), "ru_maxrss_mb": _maxrss_mb(),
                      "anon_mb": _proc_status("RssAnon"),
                      "file_mb": _proc_status("RssFile"), "rows_per_sec": rows / elapsed,
                      "checksum": checksum}))


def _make_corpus(path: str, size_mb: float, seed: int) -> int:
    """jsonl files of random-word documents, ~size_mb MB of text; returns the document count."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = ["".join(rng.choice(letters, size=int(rng.integers(2, 9)))) for _ in range(3000)]
    os.makedirs(path, exist_ok=True)
    target, written, docs, part = size_mb * 1e6, 0, 0, 0
    while written < target:
        with open(os.path.join(path, f"part{part:03d}.jsonl"), "w") as f:
            for _ in range(2000):
                words = rng.choice(len(vocab), size=int(rng.integers(50, 1500)))
                line = json.dumps({"text": " ".join(vocab[i] for i in words)}) + "\n"
                f.write(line)
                written, docs = written + len(line), docs + 1
                if written >= target:
                    break
        part += 1
    return docs


def _tokenizer(sample_file: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    with open(sample_file) as f:
        tok.train_from_iterator((json.loads(line)["text"] for line in f), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mb", type=float, default=8.0, help="text size S of the small corpus, MB")
    p.add_argument("--scale", type=float, default=10.0, help="the large corpus is scale * S")
    p.add_argument("--rows", type=int, default=4000, help="rows read per corpus")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per row (plus one label)")
    p.add_argument("--workers", type=int, default=2, help="tokenizer processes for prepare")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", default=None, help="build under this dir and keep it (default: temp)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a.child, a.rows, a.seq_len, a.seed)

    from llmtrain.data.shards.prepare import prepare_corpus

    root = a.keep or tempfile.mkdtemp(prefix="pretrain_memory_")
    results = []
    tok = None
    for label, size in (("S", a.size_mb), (f"{a.scale:g}xS", a.size_mb * a.scale)):
        src, out = os.path.join(root, f"text_{label}"), os.path.join(root, f"shards_{label}")
        docs = _make_corpus(src, size, a.seed)
        tok = tok or _tokenizer(os.path.join(src, "part000.jsonl"))
        t0 = time.perf_counter()
        m = prepare_corpus([os.path.join(src, "*.jsonl")], tok, out, num_workers=a.workers,
                           tokens_per_shard=1_000_000, progress=False)
        prep_s = time.perf_counter() - t0
        run = subprocess.run([sys.executable, __file__, "--child", out, "--rows", str(a.rows),
                              "--seq-len", str(a.seq_len), "--seed", str(a.seed)],
                             capture_output=True, text=True, check=True)
        r = json.loads(run.stdout.strip().splitlines()[-1])
        bin_mb = sum(os.path.getsize(os.path.join(out, s.name + ".bin")) for s in m.shards) / 2**20
        results.append((label, size, docs, m.total_tokens, len(m.shards), bin_mb, prep_s, r))

    print(f"\nsettings: rows={a.rows} seq_len={a.seq_len} seed={a.seed} workers={a.workers} "
          f"dtype={m.dtype} tokens_per_shard~1e6 peak RSS=VmHWM")
    print("| corpus | text MB | docs | tokens | shards | .bin MiB | prepare s | rows read "
          "| peak RSS after import MiB | peak RSS MiB | RssAnon MiB | RssFile MiB | ru_maxrss MiB "
          "| rows/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label, size, docs, tokens, n, bin_mb, prep_s, r in results:
        print(f"| {label} | {size:.0f} | {docs:,} | {tokens:,} | {n} | {bin_mb:.1f} | {prep_s:.1f} "
              f"| {a.rows} | {r['base_mb']:.1f} | {r['peak_mb']:.1f} | {r['anon_mb']:.1f} "
              f"| {r['file_mb']:.1f} | {r['ru_maxrss_mb']:.1f} | {r['rows_per_sec']:,.0f} |")
    small, large = results[0][-1], results[1][-1]
    print(f"\npeak RSS ratio {results[1][0]} / S: {large['peak_mb'] / small['peak_mb']:.3f} "
          f"(corpus tokens ratio {results[1][3] / results[0][3]:.1f}); "
          f"growth over import baseline: {small['peak_mb'] - small['base_mb']:.1f} MiB vs "
          f"{large['peak_mb'] - large['base_mb']:.1f} MiB")
    if not a.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
