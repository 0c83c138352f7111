"""RL prompts at scale: preparing and opening N prompt rows (llmtrain.objectives.rl.prompts.load_prompts).

The prompts go through the shared SFT preparation (llmtrain.data.prepare_samples, kind "rl"): the
ranks of a launch tokenize the chunks together, once, into the content-keyed cache, and every rank
then opens the prepared split and reads a prompt when a rollout draws it.

  python bench/rl_prompts_scale.py [--rows 100000 1000000] [--workers 2] [--tokenizer assets/tokenizer]

Writes N generated digit-reversal prompts (JSONL, messages + answer, ~36 tokens each) under /tmp, then
per N, in a fresh process each: "cold" prepares them (one rank, --workers tokenizer processes) and
opens them; "warm" opens the prepared cache as every later rank/run does. Prints seconds, rows/s (per
tokenizer process for cold), the peak RSS growth (VmHWM) of the rank's process (its worker processes
are separate and exit after preparation) and the mean time to read one random prompt (ids + row).
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
import random, resource, sys, time
from types import SimpleNamespace
sys.path.insert(0, {repo!r})
from transformers import AutoTokenizer
from llmtrain.config import DataConfig, TrainConfig
from llmtrain.data.chat import ensure_chat_template
from llmtrain.data.protocol import DataContext
from llmtrain.data.tokenizer_id import tokenizer_hash
from llmtrain.objectives.rl.prompts import load_prompts
tok = AutoTokenizer.from_pretrained({tok!r})
ensure_chat_template(tok)
d = DataConfig(train=[{path!r}], max_prompt_len=128, prepare_workers={workers}, cache_dir={cache!r})
ctx = DataContext(d, TrainConfig(), SimpleNamespace(rank=0, world_size=1, local_world_size=1), tok, tokenizer_hash(tok), {out!r})
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
ps = load_prompts(ctx, "data.train")
dt = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rng = random.Random(0)
pick = [rng.randrange(len(ps)) for _ in range(2000)]
t = time.perf_counter()
for p in pick:
    ps.ids(p), ps.rows([p])
per = (time.perf_counter() - t) / len(pick)
rate = len(ps) / dt / ({workers} if {label!r} == "cold" else 1)
print(f"{label:<5} rows {{len(ps):>9,}}  {{dt:7.1f}} s  {{rate:9,.0f}} rows/s{{' per worker' if {label!r} == 'cold' else ''}}  "
      f"peak RSS +{{(peak - before) / 1024:.0f}} MiB ({{(peak - before) * 1024 / len(ps):.0f}} B/prompt)  "
      f"read one prompt {{per * 1e6:.0f}} us")
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
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--tokenizer", default=os.path.join(REPO, "assets/tokenizer"))
    a = p.parse_args()
    print(f"settings: tokenizer {a.tokenizer}, 1 rank, {a.workers} tokenizer process(es), "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        for n in a.rows:
            path = os.path.join(tmp, f"p{n}.jsonl")
            write(path, n)
            for label in ("cold", "warm"):
                code = CHILD.format(repo=REPO, tok=a.tokenizer, path=path, workers=a.workers, label=label,
                                    cache=os.path.join(tmp, f"cache{n}"), out=os.path.join(tmp, f"out{n}"))
                subprocess.run([sys.executable, "-c", code], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
