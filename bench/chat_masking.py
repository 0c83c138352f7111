"""Chat tokenization + assistant masking speed: rows/s of `data.sft.encode_row` on a fixed set.

One process, one thread, the project tokenizer (byte-level BPE, 888 tokens: ~2 characters per
token, so a row has more tokens than with a 128k vocabulary), rows made here from a fixed seed:
multi-turn chats (1-4 user/assistant turns, a system prompt on half of them), turn lengths
lognormal in words (median 40, sigma 1, clipped to [3, 600]: the long tail of ShareGPT-like data).

Templates (--template; the family's special tokens are added to a copy of the project tokenizer):
  chatml   the project's shipped ChatML template (it has {% generation %} markers)
  llama3   trl's stock Llama 3 template (no markers: spans found from the template's renders)
  qwen3    trl's stock Qwen3 template (rewrites history: the history turns lose their <think>)

  python bench/chat_masking.py                        # 2000 rows, chatml and llama3
  python bench/chat_masking.py --template qwen3 --rows 500

Prints its settings, then rows/s and tokens/s per template (best of --repeat passes, after one
warm-up pass over 50 rows), by wall clock and per CPU-second of this process (the CPU figure is
the steadier one on a shared machine; both are noisy there).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
TOKENIZER = os.path.join(REPO, "assets", "tokenizer")
_WORDS = ("the model data train value result number answer question compute sum of and is a to in for "
          "with on that this as by from at be are was were can will should would list write code explain").split()
_FAMILY_TOKENS = {
    "chatml": [],
    "llama3": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "qwen3": ["<think>", "</think>"],
}


def tokenizer_for(template: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    tok.add_special_tokens({"additional_special_tokens": _FAMILY_TOKENS[template]})
    if template == "llama3":
        tok.bos_token = "<|begin_of_text|>"
    if template != "chatml":
        import trl

        path = os.path.join(os.path.dirname(trl.__file__), "chat_templates", f"{template}.jinja")
        with open(path) as f:
            tok.chat_template = f.read()
    return tok


def make_rows(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)

    def text() -> str:
        n_words = int(np.clip(rng.lognormal(np.log(40), 1.0), 3, 600))
        return " ".join(rng.choice(_WORDS, n_words))

    rows = []
    for _ in range(n):
        messages = [{"role": "system", "content": text()}] if rng.random() < 0.5 else []
        for _ in range(int(rng.integers(1, 5))):
            messages += [{"role": "user", "content": text()}, {"role": "assistant", "content": text()}]
        rows.append({"messages": messages})
    return rows


def run(template: str, rows: list[dict], max_seq_len: int, repeat: int) -> tuple[float, float, float]:
    """-> (rows/s wall, tokens/s wall, rows per CPU-second)."""
    from llmtrain.data.sft import encode_row

    tok = tokenizer_for(template)
    for r in rows[:50]:  # warm-up: template compilation, tokenizer caches
        encode_row(tok, r, "auto", max_seq_len, "truncate")
    best_wall = best_cpu = float("inf")
    n_tokens = 0
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        n_tokens = 0
        for r in rows:
            out = encode_row(tok, r, "auto", max_seq_len, "truncate")
            n_tokens += len(out[0]) if out is not None else 0
        best_wall, best_cpu = min(best_wall, time.perf_counter() - t0), min(best_cpu, time.process_time() - c0)
    return len(rows) / best_wall, n_tokens / best_wall, len(rows) / best_cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seq-len", type=int, default=100_000, help="high: measure masking, not truncation")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--template", action="append", choices=sorted(_FAMILY_TOKENS))
    args = p.parse_args()
    templates = args.template or ["chatml", "llama3"]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    rows = make_rows(args.rows, args.seed)
    n_turns = sum(sum(m["role"] == "assistant" for m in r["messages"]) for r in rows)
    print(f"rows={args.rows} assistant_turns={n_turns} seed={args.seed} repeat={args.repeat} "
          f"max_seq_len={args.max_seq_len} threads=1 (tokenizer: {TOKENIZER})")
    print(f"{'template':10s} {'rows/s':>10s} {'tokens/s':>12s} {'tokens/row':>11s} {'rows/cpu-s':>11s}")
    for template in templates:
        rows_s, tokens_s, rows_cpu = run(template, rows, args.max_seq_len, args.repeat)
        print(f"{template:10s} {rows_s:10.1f} {tokens_s:12.0f} {tokens_s / rows_s:11.1f} {rows_cpu:11.1f}")


if __name__ == "__main__":
    main()
