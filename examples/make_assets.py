"""Generate the project's tokenizer and demo data into fixed paths. Deterministic and idempotent:
a re-run rewrites byte-identical files.

    python examples/make_assets.py

Writes:
  assets/tokenizer/                  byte-level BPE, vocab 1024, ChatML template (< 1 MB)
  data/demo/sft_train.jsonl          digit-reversal chat rows, OpenAI / ShareGPT / Alpaca formats mixed
  data/demo/sft_eval.jsonl           held-out digit strings: {"messages": [...], "answer": "4321"}
  data/demo/dpo_train.jsonl          preference rows, string and message-list forms mixed
  data/demo/dpo_eval.jsonl           same, on held-out pairs
  data/demo/pretrain/shard_00N.jsonl pretraining text, one {"text": document} per line
  data/demo/pretrain_eval.jsonl      held-out pretraining text (outside pretrain/ so a *.jsonl glob skips it)
"""

import os
import shutil
import sys
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # run from a checkout without install

import synth  # noqa: E402  (examples/synth.py, beside this script)
from llmtrain.data.tokenizer_id import tokenizer_hash  # noqa: E402
from llmtrain.tools.tokenizer_train import train_bpe_tokenizer  # noqa: E402

TOKENIZER_VOCAB_SIZE = 1024  # total ids incl. 3 special tokens and 256 byte symbols
SFT_TRAIN_ROWS = 10000
SFT_EVAL_ROWS = 200
DPO_TRAIN_ROWS = 2000
DPO_EVAL_ROWS = 200
RL_TRAIN_ROWS = 2000
PRETRAIN_SHARDS = 3
PRETRAIN_DOCS_PER_SHARD = 1500  # ~0.4 MB of text per shard
PRETRAIN_EVAL_DOCS = 200
SEED = 0  # one seed for every generator; the eval split is fixed by pair hashing, not by seed


def _sft_texts(rows: list[dict]):
    """Every string a chat template would render from SFT rows, for tokenizer training."""
    for row in rows:
        for m in row.get("messages", []):
            yield f"{m['role']}\n{m['content']}"
        for m in row.get("conversations", []):
            yield m["value"]
        for key in ("instruction", "input", "output"):
            if row.get(key):
                yield row[key]


def _train_tokenizer(texts, out_dir: str) -> str:
    # Train into a scratch dir, then swap, so stale files from an older layout never linger.
    with tempfile.TemporaryDirectory(dir=os.path.dirname(out_dir)) as scratch:
        tok = train_bpe_tokenizer(texts, TOKENIZER_VOCAB_SIZE, scratch)
        shutil.rmtree(out_dir, ignore_errors=True)
        shutil.copytree(scratch, out_dir)
    return tokenizer_hash(tok)


def main() -> None:
    demo = os.path.join(REPO_ROOT, "data", "demo")
    # the demo task is digit reversal (learnable in minutes on CPU); the tokenizer was trained on the
    # addition chats, which keeps it (and its hash) fixed
    sft_train = synth.sft_addition(4000, seed=SEED)  # tokenizer training text only (keeps its hash)
    synth.write_jsonl(synth.sft_reverse(SFT_TRAIN_ROWS, seed=SEED), os.path.join(demo, "sft_train.jsonl"))
    synth.write_jsonl(synth.sft_reverse(SFT_EVAL_ROWS, seed=SEED, split="eval"), os.path.join(demo, "sft_eval.jsonl"))
    synth.write_jsonl(synth.dpo_reverse_pairs(DPO_TRAIN_ROWS, seed=SEED), os.path.join(demo, "dpo_train.jsonl"))
    synth.write_jsonl(synth.rl_reverse_prompts(RL_TRAIN_ROWS, seed=SEED), os.path.join(demo, "rl_train.jsonl"))
    synth.write_jsonl(synth.dpo_reverse_pairs(DPO_EVAL_ROWS, seed=SEED, split="eval"),
                      os.path.join(demo, "dpo_eval.jsonl"))

    pretrain_docs = []
    for shard in range(PRETRAIN_SHARDS):
        docs = synth.pretrain_corpus(PRETRAIN_DOCS_PER_SHARD, seed=SEED + shard)
        synth.write_jsonl([{"text": d} for d in docs], os.path.join(demo, "pretrain", f"shard_{shard:03d}.jsonl"))
        pretrain_docs.extend(docs)
    synth.write_jsonl([{"text": d} for d in synth.pretrain_corpus(PRETRAIN_EVAL_DOCS, seed=SEED + 1000)],
                      os.path.join(demo, "pretrain_eval.jsonl"))

    tok_dir = os.path.join(REPO_ROOT, "assets", "tokenizer")
    os.makedirs(os.path.dirname(tok_dir), exist_ok=True)
    digest = _train_tokenizer(list(pretrain_docs) + list(_sft_texts(sft_train)), tok_dir)

    for root in (tok_dir, demo):
        for dirpath, _, names in sorted(os.walk(root)):
            for name in sorted(names):
                path = os.path.join(dirpath, name)
                print(f"{os.path.getsize(path):>9,d}  {os.path.relpath(path, REPO_ROOT)}")
    print(f"tokenizer_hash {digest}")


if __name__ == "__main__":
    main()
