"""What the throughput benches share (bench/sft_throughput.py, bench/dpo_throughput.py): their common
arguments and first line, the model they build, the interleaved best-of-rounds loop, running a child
process with its peak memory measured, the wrapper that runs llmtrain's real entry point in that
child, and the TRL child's step clock and result file. A bench imports from here, never from
another bench.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(REPO, "assets", "tokenizer")
WORDS = ("the model data train value result number answer question compute sum of and is a to in for "
          "with on that this as by from at be are was were can will should would list write code explain").split()


def add_shared_args(p: argparse.ArgumentParser) -> None:
    """Arguments every llmtrain-vs-TRL throughput bench takes (also bench/dpo_throughput.py)."""
    p.add_argument("--hidden", type=int, default=256, help="hidden size")
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--heads", type=int, default=4, help="attention heads (kv heads = heads / 2)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default="abcd", help="subset to run, e.g. bd")
    p.add_argument("--repeats", type=int, default=2,
                   help="rounds over all variants (interleaved a,b,c,d,a,b,...); the best tokens/s of each is kept, "
                        "so a burst of load from other processes does not decide the comparison")
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (0 = all cores)")
    p.add_argument("--workdir", default=None, help="where runs go (default: a temp dir)")
    p.add_argument("--child", choices=["trl"], help=argparse.SUPPRESS)
    p.add_argument("--child-args", help=argparse.SUPPRESS)


def setup_line(args) -> str:
    """The first line a throughput bench prints: device, threads, model size, precision, steps, lr."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    params = param_count(model_config(args))
    return (f"device={device} threads={args.threads or os.cpu_count()} model=llama hidden={args.hidden} "
            f"layers={args.layers} heads={args.heads} params={params / 1e6:.2f}M vocab=888 precision="
            f"{'bf16' if device == 'cuda' else 'fp32'} steps={args.steps} (timed: 2..{args.steps}) lr={args.lr}")


def best_of_rounds(args, names: dict[str, str], run_one) -> dict[str, dict]:
    """Run every variant args.repeats times, interleaved; keep each one's fastest run (real tokens/s).
    run_one(key) -> {"real_tokens", "seconds", ...} or {"skipped": reason}."""
    results: dict[str, dict] = {}
    for rnd in range(args.repeats):
        for key in args.variants:
            start = time.perf_counter()
            r = run_one(key)
            if "skipped" in r:
                print(f"  round {rnd + 1} ({key}) {names[key]}: skipped: {r['skipped']}", flush=True)
                continue
            rate = r["real_tokens"] / r["seconds"]
            print(f"  round {rnd + 1} ({key}) {names[key]}: {rate:,.0f} real tokens/s, "
                  f"{time.perf_counter() - start:.0f}s wall" + (f"; {r['cmd']}" if "cmd" in r else ""), flush=True)
            best = results.get(key)
            if best is None or rate > best["real_tokens"] / best["seconds"]:
                results[key] = r
    print(f"best of {args.repeats} round(s) per variant:")
    return results


def model_config(args) -> dict:
    return {"model_type": "llama", "hidden_size": args.hidden, "intermediate_size": int(args.hidden * 8 / 3) // 8 * 8,
            "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
            "num_key_value_heads": max(1, args.heads // 2), "max_position_embeddings": args.max_seq_len,
            "tie_word_embeddings": False}


def param_count(cfg: dict) -> int:
    h, L, i = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * i + 2 * h
    return L * per_layer + 2 * 888 * h + h


def child_env(args) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    threads = args.threads or os.cpu_count() or 1
    env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_measured(cmd: list[str], env: dict, log_path: str, peak_json: str) -> dict:
    """Run cmd; peak RSS of that process from wait4 (CPU); GPU peak from the JSON the child writes."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**env, "BENCH_PEAK_JSON": peak_json},
                                cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        with open(log_path) as f:
            tail = f.read()[-4000:]
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{tail}")
    out = {"peak_rss_bytes": usage.ru_maxrss * 1024}
    if os.path.exists(peak_json):
        with open(peak_json) as f:
            out.update(json.load(f))
    return out


def run_trl_child(script: str, spec: dict, spec_path: str, args) -> dict:
    """The bench's TRL side in its own process: `script --child trl --child-args spec_path` with `spec`
    written there; returns the child's <spec["out"]>.result.json with the peak memory measured."""
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    cmd = [sys.executable, script, "--child", "trl", "--child-args", spec_path]
    mem = run_measured(cmd, child_env(args), spec_path + ".log", spec_path + ".peak.json")
    with open(spec["out"] + ".result.json") as f:
        return {**json.load(f), **mem}


# run inside the llmtrain child: the real entry point (launch/sft.py) via runpy, plus a GPU peak report
LLMTRAIN_WRAPPER = """
import atexit, json, os, runpy, sys
def _peak():
    import torch
    if torch.cuda.is_available():
        with open(os.environ["BENCH_PEAK_JSON"], "w") as f:
            json.dump({"cuda_peak_bytes": torch.cuda.max_memory_allocated()}, f)
atexit.register(_peak)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def step_clock(trainer, cuda: bool) -> list[float]:
    """perf_counter() at the end of every optimizer step (after a CUDA sync), appended to the returned list."""
    import torch
    from transformers import TrainerCallback

    stamps: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    trainer.add_callback(StepClock())
    return stamps


def timed_train(trainer, cuda: bool, count) -> dict:
    """trainer.train() with every collated batch counted (count(features, batch) -> {name: number}):
    the counts summed over steps 2..N (step 1 is warmup), the seconds of those steps, the final
    loss and the number of steps."""
    collate, counts = trainer.data_collator, []

    def counting_collator(features):
        batch = collate(features)
        counts.append(count(features, batch))
        return batch

    trainer.data_collator = counting_collator
    times = step_clock(trainer, cuda)
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    n = len(times)
    sums = {k: sum(c[k] for c in counts[1:n]) for k in (counts[0] if counts else {})}  # steps 2..N
    return {**sums, "seconds": times[-1] - times[0], "final_loss": losses[-1] if losses else float("nan"), "steps": n}


def write_child_result(out: str, cuda: bool, result: dict) -> None:
    """A TRL child's figures for the parent: <out>.result.json, and the CUDA peak where there is one."""
    with open(out + ".result.json", "w") as f:
        json.dump(result, f)
    if cuda:
        import torch

        with open(os.environ["BENCH_PEAK_JSON"], "w") as f:
            json.dump({"cuda_peak_bytes": torch.cuda.max_memory_allocated()}, f)


def peak_flops_or_none() -> float | None:
    """The GPU's peak FLOP/s (for MFU), None on CPU."""
    sys.path.insert(0, REPO)
    import torch

    from llmtrain.train.flops import peak_flops

    return peak_flops(torch.device("cuda")) if torch.cuda.is_available() else None
