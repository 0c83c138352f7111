"""RL prompts at scale: time and peak RSS of loading N prompt rows (llmtrain.objectives.rl.prompts.load_prompts),
which every rank does at start (validation, max_prompt_len, the extra columns for the rewards).

  python bench/rl_prompts_scale.py [--rows 100000 1000000] [--tokenizer runs/debug-sft/final]

Writes N generated digit-reversal prompts (JSONL, messages + answer, ~30 tokens each) under /tmp, then
in a fresh process per N prints rows, seconds, rows/s and the peak RSS growth (VmHWM) of that process.
"""
import argparse
import json
import os
import random
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r'''
import resource, sys, time
sys.path.insert(0, {repo!r})
from transformers import AutoTokenizer
from llmtrain.config import DataConfig
from llmtrain.data.chat import ensure_chat_template
from llmtrain.objectives.rl.prompts import load_prompts
tok = AutoTokenizer.from_pretrained({tok!r})
ensure_chat_template(tok)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
ps = load_prompts(DataConfig(train=[{path!r}], max_prompt_len=128), "data.train", tok)
dt = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tokens = sum(len(x) for x in ps.token_ids)
print(f"rows {{len(ps):>8,}}  {{dt:6.1f}} s  {{len(ps) / dt:7,.0f}} rows/s  {{tokens / len(ps):.1f}} tokens/prompt  "
      f"peak RSS +{{(peak - before) / 1024:.0f}} MiB ({{(peak - before) * 1024 / len(ps):.0f}} B/prompt)")
'''


def write(path: str, n: int) -> None:
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(n):
            d = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 7)))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Reverse the digits of {d}. (item {i})"}],
                                "answer": d[::-1]}) + "\n")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--tokenizer", default=os.path.join(REPO, "assets/tokenizer"))
    a = p.parse_args()
    print(f"settings: tokenizer {a.tokenizer}, 1 process, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    with tempfile.TemporaryDirectory() as tmp:
        for n in a.rows:
            path = os.path.join(tmp, f"p{n}.jsonl")
            write(path, n)
            code = CHILD.format(repo=REPO, tok=a.tokenizer, path=path)
            subprocess.run([sys.executable, "-c", code], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
