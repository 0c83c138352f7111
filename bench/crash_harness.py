"""Crash consistency: SIGKILL a training run at random moments (checkpoint writes included),
resume with train.resume=auto each time, and check the end result equals an uninterrupted run.

  python bench/crash_harness.py [--kills 20] [--ranks 1|2] [--seed 0] [--workdir DIR]

Prints one line per restart and a summary: restarts, failed restarts, incomplete checkpoints
loaded (must be 0), whether losses (bitwise) and final weights equal the uninterrupted run's.
Exit status 0 only if everything held.
"""
import argparse
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))


def recipe(model_dir: str, out: str) -> dict:
    return {
        "output_dir": out,
        "model": {"name_or_path": model_dir},
        "data": {"train": [os.path.join(REPO, "data/demo/sft_train.jsonl")], "max_seq_len": 64, "packing": True},
        "train": {"max_steps": 100, "seed": 3, "micro_batch_size": 2, "grad_accum": 2, "lr": 1e-3, "warmup_steps": 2,
                  "save_every": 1, "keep_last": 2, "log_every": 1},
        "deepspeed": {"config": os.path.join(REPO, "ds_configs/zero2.json")},
        "logging": {"progress": False},
    }


def command(path: str, ranks: int, port: int) -> list[str]:
    bin_dir = os.path.dirname(sys.executable)
    if ranks == 1:
        return [sys.executable, os.path.join(REPO, "launch/sft.py"), "--recipe", path]
    return [os.path.join(bin_dir, "torchrun"), "--nproc_per_node", str(ranks), "--master_port", str(port),
            os.path.join(REPO, "launch/sft.py"), "--recipe", path]


def losses(out: str) -> list:
    import json

    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(l)["loss"] for l in f if '"loss"' in l]


def weights(out: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(out, "final", "model.safetensors"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = args.workdir or tempfile.mkdtemp(prefix="llmtrain-crash-")
    # unbuffered: a log line reaches the harness when it is written, so the kill lands where intended
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    from conftest import build_tiny

    model_dir = os.path.join(work, "model")
    if not os.path.isdir(model_dir):
        m, t = build_tiny("llama")
        m.save_pretrained(model_dir)
        t.save_pretrained(model_dir)

    def write(name):
        out = os.path.join(work, name)
        shutil.rmtree(out, ignore_errors=True)
        path = os.path.join(work, f"{name}.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(recipe(model_dir, out), f)
        return out, path

    def start(path, port, kill_after_step=None):
        """Run once; with kill_after_step, SIGKILL the process group a random 0-0.3 s after the log
        shows that step (with save_every=1 that is while its checkpoint is being written)."""
        p = subprocess.Popen(command(path, args.ranks, port), env=env, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, start_new_session=True)
        lines, killed, at = [], threading.Event(), []

        def pump():
            for line in p.stdout:
                lines.append(line)
                m = re.match(r"step (\d+)", line)
                if kill_after_step is not None and m and int(m.group(1)) >= kill_after_step and not killed.is_set():
                    time.sleep(rng.uniform(0.0, 0.3))
                    at.append(int(m.group(1)))
                    killed.set()
                    os.killpg(p.pid, signal.SIGKILL)

        threading.Thread(target=pump, daemon=True).start()
        return p, lines, killed, at

    ref_out, ref_path = write("reference")
    p, lines, _, _ = start(ref_path, 29801)
    p.wait()
    assert p.returncode == 0, "".join(lines)[-3000:]
    max_steps = len(losses(ref_out))
    print(f"uninterrupted run: {max_steps} steps")

    out, path = write("crashed")
    restarts = failures = incomplete_loads = kills = 0
    step = 0
    while True:
        target = min(max_steps, step + rng.randint(1, max(1, max_steps // max(1, 2 * args.kills))))
        ckpts = os.path.join(out, "checkpoints")
        complete_before = {os.path.join(ckpts, d) for d in (os.listdir(ckpts) if os.path.isdir(ckpts) else [])
                           if os.path.isfile(os.path.join(ckpts, d, "COMPLETE"))}
        p, lines, killed, at = start(path, 29802 + restarts % 50, target if kills < args.kills else None)
        restarts += 1
        p.wait()
        time.sleep(0.2)
        kills += killed.is_set()
        log = "".join(lines)
        resumed = re.search(r"resumed from (\S+) at step (\d+)", log)
        if resumed and resumed.group(1) not in complete_before:  # it must have been complete when we started
            incomplete_loads += 1
        if p.returncode not in (0, -signal.SIGKILL):
            failures += 1
            print(f"restart {restarts}: FAILED rc={p.returncode}\n{log[-2000:]}")
        done = [int(m) for m in re.findall(r"^step (\d+) loss", log, flags=re.M)]
        step = max(done, default=int(resumed.group(2)) if resumed else step)
        state = f"killed after step {at[0]} was logged" if killed.is_set() else f"exit {p.returncode}"
        print(f"restart {restarts:>2}: resumed at step {resumed.group(2) if resumed else '-':>2}, {state}", flush=True)
        if p.returncode == 0 or restarts > 3 * args.kills:
            break
    same_losses = losses(out) == losses(ref_out)
    a, b = weights(ref_out), weights(out)
    same_weights = a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    print(f"\nkills={kills} restarts={restarts} failed_restarts={failures} incomplete_checkpoints_loaded={incomplete_loads} "
          f"losses_bitwise_equal={same_losses} final_weights_bitwise_equal={same_weights} (ranks={args.ranks}, workdir={work})")
    ok = failures == 0 and incomplete_loads == 0 and same_losses and same_weights and kills >= args.kills
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
