"""SFT data at scale: time to the first optimizer step, preparation throughput and peak RSS per rank
of a 2-rank torchrun SFT run as the row count grows; a second run on the same data.cache_dir; and
TRL SFTTrainer's dataset preparation on the same rows with the same number of worker processes.

Data (generated here, nothing downloaded): ShareGPT-like chats with a long tail. Each row has a
system prompt with probability 0.5, 1 + Geometric(0.5) user/assistant exchanges (at most 8),
user turns of lognormal(median --user-words, sigma 1.0) words and assistant turns of
lognormal(median --assistant-words, sigma 0.9) words, clipped; about 1.4k tokens per row with the
project tokenizer at the defaults (truncated to --max-seq-len).

Per row count (--rows, default 20000 200000), one after another on this machine:
  cold   torchrun --nproc_per_node 2 launch/sft.py (tiny Llama built from config, max_steps=1,
         a fresh data.cache_dir): wall time from launch to the first optimizer step (its row in
         metrics.jsonl), peak RSS of each rank (VmHWM sampled from /proc every 0.1 s), and
         preparation throughput (rows and tokens per second per tokenizer process, from the
         manifest: rows / prepare seconds / (ranks x workers per rank)).
  warm   the same command with another output_dir and the same data.cache_dir: time to first step.
  TRL    SFTTrainer(train_dataset=load_dataset("json", ...), SFTConfig(dataset_num_proc=W,
         assistant_only_loss=True, max_length=--max-seq-len)): the time of its _prepare_dataset
         (apply the chat template with the assistant mask, tokenize, truncate), W = the total number
         of llmtrain tokenizer processes, with a fresh HF datasets cache; load_dataset's JSON -> Arrow
         conversion is reported beside it (llmtrain's preparation includes reading the JSON).

Goals (issue 13): preparation at least as fast as TRL's with the same workers; peak RSS per rank at
200k rows within 1.2x of that at 20k; the warm run's time to first step under 10% of the cold one.

  python bench/sft_data_scale.py                    # 20k and 200k rows (~40 min on 2 busy cores)
  python bench/sft_data_scale.py --rows 20000       # the small case only
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(REPO, "assets", "tokenizer")
_WORDS = np.array((
    "the model data train value result number answer question compute sum of and is a to in for with on that this "
    "as by from at be are was were can will should would list write code explain function variable python error "
    "because however therefore example following first second third finally important consider approach solution "
    "problem performance memory distributed gradient optimizer learning network transformer attention sequence "
    "token vocabulary embedding language translate summarize article paragraph history science mathematics "
    "physics chemistry biology economics market customer product service quality design system architecture").split())


def make_chats(path: str, n: int, seed: int, user_words: float, assistant_words: float) -> None:
    rng = np.random.default_rng(seed)

    def text(median: float, sigma: float, cap: int) -> str:
        return " ".join(rng.choice(_WORDS, size=int(np.clip(rng.lognormal(np.log(median), sigma), 3, cap))))

    with open(path, "w") as f:
        for _ in range(n):
            msgs = [{"role": "system", "content": text(25, 0.6, 300)}] if rng.random() < 0.5 else []
            for _ in range(min(8, int(rng.geometric(0.5)))):
                msgs.append({"role": "user", "content": text(user_words, 1.0, 1500)})
                msgs.append({"role": "assistant", "content": text(assistant_words, 0.9, 2500)})
            f.write(json.dumps({"messages": msgs}) + "\n")


# --------------------------------------------------------------------------- llmtrain under torchrun


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                kids = [int(x) for x in f.read().split()]
        except OSError:
            kids = []
        out += kids
        todo += kids
    return out


def _rank_of(pid: int):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
    except OSError:
        return None
    # a rank runs launch/sft.py; its spawned tokenizer workers run multiprocessing's spawn_main
    if b"launch/sft.py" in cmd and b"spawn_main" not in cmd and b"RANK" in env:
        return int(env[b"RANK"])
    return None


def _vm_hwm(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_llmtrain(args, jsonl: str, work: str, cache_dir: str, name: str) -> dict:
    """One torchrun launch; returns seconds to the first optimizer step and peak RSS per rank."""
    import yaml

    out_dir = os.path.join(work, name)
    recipe = {
        "output_dir": out_dir,
        "model": {"tokenizer": TOKENIZER, "config": {
            "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": args.max_seq_len}},
        "data": {"train": [jsonl], "max_seq_len": args.max_seq_len, "packing": True, "cache_dir": cache_dir,
                 "prepare_workers": args.workers_per_rank, "max_bad_fraction": 0.01},  # rows whose first prompt
        # is over max_seq_len have nothing to train: ~0.2% of these rows
        "train": {"max_steps": 1, "micro_batch_size": 1, "grad_accum": 1, "lr": 1e-4, "log_every": 1, "save_every": 0},
        "deepspeed": {"config": os.path.join(REPO, "ds_configs/zero0.json")},
        "logging": {"progress": False},
    }
    path = os.path.join(work, f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(recipe, f, sort_keys=False)
    cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node", "2", "--master_port",
           str(_free_port()), os.path.join(REPO, "launch/sft.py"), "--recipe", path]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled",
           "PYTHONPATH": REPO}
    metrics = os.path.join(out_dir, "metrics.jsonl")
    log = open(path + ".log", "w")
    start, start_wall = time.monotonic(), time.time()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    peak, first_step = {}, None
    while proc.poll() is None:
        for pid in _descendants(proc.pid):
            rank = _rank_of(pid)
            if rank is not None:
                peak[rank] = max(peak.get(rank, 0), _vm_hwm(pid))
        if first_step is None and os.path.exists(metrics) and '"loss"' in open(metrics).read():
            first_step = time.monotonic() - start
        time.sleep(0.1)
    log.close()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{open(path + '.log').read()[-4000:]}")
    if first_step is None:  # the run ended between two polls: when rank 0 wrote the row
        first_step = os.stat(metrics).st_mtime - start_wall
    return {"first_step_s": first_step, "peak_rss": [peak.get(r, 0) for r in range(2)],
            "cmd": " ".join(["torchrun --nproc_per_node 2 launch/sft.py --recipe", path])}


def manifest_of(cache_dir: str) -> dict:
    (split,) = [d for d in os.listdir(cache_dir) if d.startswith("sft-")]
    with open(os.path.join(cache_dir, split, "manifest.json")) as f:
        return json.load(f)


# --------------------------------------------------------------------------- TRL


def trl_child(spec_path: str) -> None:
    """Run in a subprocess: SFTTrainer's dataset preparation on the rows, timed."""
    with open(spec_path) as f:
        spec = json.load(f)
    import datasets
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    t0 = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=spec["jsonl"], split="train", num_proc=spec["workers"])
    load_s = time.perf_counter() - t0
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=spec["max_seq_len"]))
    timing = {}
    original = SFTTrainer._prepare_dataset

    def timed(self, *a, **k):
        t = time.perf_counter()
        out = original(self, *a, **k)
        timing["prepare_s"] = time.perf_counter() - t
        return out

    SFTTrainer._prepare_dataset = timed
    cfg = SFTConfig(output_dir=spec["out"], dataset_num_proc=spec["workers"], max_length=spec["max_seq_len"],
                    assistant_only_loss=True, packing=False, report_to=[], use_cpu=True, max_steps=1)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok)
    import pyarrow.compute as pc

    tokens = int(pc.sum(pc.list_value_length(trainer.train_dataset.data.column("input_ids"))).as_py())
    with open(spec["result"], "w") as f:
        json.dump({"load_s": load_s, "prepare_s": timing["prepare_s"], "rows": len(ds), "tokens": tokens}, f)


def run_trl(jsonl: str, work: str, workers: int, max_seq_len: int) -> dict:
    spec = {"jsonl": jsonl, "workers": workers, "max_seq_len": max_seq_len, "out": os.path.join(work, "trl"),
            "result": os.path.join(work, "trl-result.json")}
    spec_path = os.path.join(work, "trl-spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled",
           "HF_DATASETS_CACHE": os.path.join(work, "hf-datasets-cache")}  # cold: no earlier map() result
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--trl-child", spec_path], env=env, cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"TRL child failed:\n{proc.stderr[-4000:]}")
    with open(spec["result"]) as f:
        return json.load(f)


# --------------------------------------------------------------------------- main


def bench_rows(args, n: int, work: str) -> dict:
    jsonl = os.path.join(work, f"chats-{n}.jsonl")
    t = time.perf_counter()
    make_chats(jsonl, n, args.seed, args.user_words, args.assistant_words)
    print(f"  generated {n:,} rows in {time.perf_counter() - t:.0f} s ({os.path.getsize(jsonl) / 1e6:.0f} MB)", flush=True)
    cache = os.path.join(work, f"cache-{n}")
    cold = run_llmtrain(args, jsonl, work, cache, f"cold-{n}")
    m = manifest_of(cache)
    procs = m["prepare"]["ranks"] * m["prepare"]["workers_per_rank"]
    warm = run_llmtrain(args, jsonl, work, cache, f"warm-{n}")
    trl = run_trl(jsonl, work, procs, args.max_seq_len) if not args.skip_trl else None
    return {"rows": n, "cold": cold, "warm": warm, "manifest": m, "procs": procs, "trl": trl, "jsonl": jsonl}


def print_table(results: list[dict]) -> None:
    head = ("rows", "tokens", "procs", "cold: 1st step s", "warm: 1st step s", "warm/cold", "prep s",
            "rows/s/proc", "tok/s/proc", "TRL prep s", "TRL load s", "peak RSS r0 MB", "peak RSS r1 MB")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in results:
        m, p = r["manifest"], r["manifest"]["prepare"]["seconds"]
        trl = r["trl"] or {}
        cells = (f"{r['rows']:,}", f"{m['num_tokens']:,}", r["procs"], f"{r['cold']['first_step_s']:.1f}",
                 f"{r['warm']['first_step_s']:.1f}", f"{r['warm']['first_step_s'] / r['cold']['first_step_s']:.1%}",
                 f"{p:.1f}", f"{m['rows'] / p / r['procs']:.0f}", f"{m['num_tokens'] / p / r['procs']:,.0f}",
                 f"{trl.get('prepare_s', float('nan')):.1f}", f"{trl.get('load_s', float('nan')):.1f}",
                 *(f"{x / 2**20:.0f}" for x in r["cold"]["peak_rss"]))
        print("| " + " | ".join(map(str, cells)) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[20000, 200000])
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--workers-per-rank", type=int, default=0, help="data.prepare_workers (0: CPUs / 2 ranks)")
    p.add_argument("--user-words", type=float, default=30.0, help="median words of a user turn")
    p.add_argument("--assistant-words", type=float, default=80.0, help="median words of an assistant turn")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-trl", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--out-json", help="also write the results here")
    p.add_argument("--trl-child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.trl_child:
        return trl_child(args.trl_child)
    work = tempfile.mkdtemp(prefix="sft_data_scale-", dir="/tmp")
    print(f"settings: rows={args.rows} max_seq_len={args.max_seq_len} ranks=2 (torchrun, gloo, CPU) "
          f"data.prepare_workers={args.workers_per_rank or 'auto'} cpus={os.cpu_count()} "
          f"user_words={args.user_words} assistant_words={args.assistant_words} seed={args.seed} work={work}",
          flush=True)
    results = []
    try:
        for n in args.rows:
            print(f"{n:,} rows:", flush=True)
            results.append(bench_rows(args, n, work))
            r = results[-1]
            print(f"  cold {r['cold']['first_step_s']:.1f} s, warm {r['warm']['first_step_s']:.1f} s, "
                  f"prep {r['manifest']['prepare']['seconds']:.1f} s, TRL {(r['trl'] or {}).get('prepare_s')}", flush=True)
        print_table(results)
        if len(results) >= 2:
            a, b = results[0]["cold"]["peak_rss"], results[-1]["cold"]["peak_rss"]
            print(f"peak RSS per rank, {results[-1]['rows']:,} vs {results[0]['rows']:,} rows: "
                  + ", ".join(f"rank {i} {y / x:.2f}x" for i, (x, y) in enumerate(zip(a, b))))
        print(f"command: {results[0]['cold']['cmd']} (recipe in {work})")
        if args.out_json:
            with open(args.out_json, "w") as f:
                json.dump(results, f, indent=1, default=str)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
