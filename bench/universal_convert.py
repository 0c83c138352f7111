"""Universal-checkpoint conversion cost: seconds and bytes to convert a 2-rank ZeRO-2 checkpoint.

  python bench/universal_convert.py [--sizes 64x2,512x8,1024x8] [--workers auto|E,M[;E,M...]] [--workdir DIR]

For each size (hidden x layers of a Llama model with the project's tokenizer): trains one step on
2 ranks (torchrun, ZeRO-2, checkpoint at step 1), then converts that checkpoint exactly as a resume
at another world size does (universal._convert_once: DeepSpeed's converter in a subprocess with
weights-only loads) once per worker setting: `auto` is what a resume picks (universal.converter_workers:
min(CPUs, 8) bounded by memory), `1,1` the serial converter llmtrain used before. Prints parameters,
checkpoint MiB, universal-copy MiB, workers, seconds, MiB/s written and the peak summed RSS of the
converter and its worker processes (sampled every 0.1 s). Conversion time is a fixed start-up
(imports) plus a part linear in the checkpoint size; the table shows both.
"""
import argparse
import contextlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def build_model(path: str, hidden: int, layers: int) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.join(REPO, "assets", "tokenizer"))
    cfg = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden,
                               num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                               max_position_embeddings=512, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def train_one_step(model_dir: str, out: str, port: int) -> str:
    recipe = {
        "output_dir": out,
        "model": {"name_or_path": model_dir},
        "data": {"train": [os.path.join(REPO, "data/demo/sft_train.jsonl")], "max_seq_len": 64, "packing": True},
        "train": {"max_steps": 1, "micro_batch_size": 1, "grad_accum": 1, "lr": 1e-4, "warmup_steps": 0},
        "deepspeed": {"config": os.path.join(REPO, "ds_configs/zero2.json")},
        "logging": {"progress": False},
    }
    path = os.path.join(os.path.dirname(out), "r.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(recipe, f)
    cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node", "2", "--master_port", str(port),
           os.path.join(REPO, "launch/sft.py"), "--recipe", path]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"training failed:\n{proc.stderr[-3000:]}")
    return os.path.join(out, "checkpoints", "step_00000001")


class TreeRss:
    """Peak of the summed RSS of this process's children (and theirs), sampled every 0.1 s."""

    def __init__(self):
        import psutil  # a DeepSpeed dependency

        self.me, self.peak, self.stop = psutil.Process(), 0, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.wait(0.1):
            total = 0
            for p in self.me.children(recursive=True):
                try:
                    total += p.memory_info().rss
                except Exception:  # noqa: BLE001 - a process that just ended
                    pass
            self.peak = max(self.peak, total)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="64x2,512x8,1024x8", help="comma-separated hidden x layers")
    p.add_argument("--workers", default="auto;1,1",
                   help="';'-separated converter settings: auto (what a resume picks) or EXTRACT,MERGE")
    p.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one, removed)")
    args = p.parse_args()
    settings = [None if w == "auto" else tuple(int(x) for x in w.split(",")) for w in args.workers.split(";")]
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from llmtrain.train import checkpoint, universal
    from llmtrain.distributed.launchers import _free_port

    work = args.workdir or tempfile.mkdtemp(prefix="universal_bench_")
    print(f"settings: 2-rank ZeRO-2 fp32 checkpoint (CPU), converter workers {args.workers}, "
          f"cpus={len(os.sched_getaffinity(0))}, MemAvailable={universal._available_memory() / 2**30:.1f} GiB, workdir={work}")
    print(f"{'hidden x layers':>16} {'params':>12} {'ckpt MiB':>9} {'universal MiB':>14} {'workers':>8} {'seconds':>8} "
          f"{'MiB/s':>7} {'peak RSS MiB':>13}")
    try:
        for spec in args.sizes.split(","):
            hidden, layers = (int(x) for x in spec.split("x"))
            case = os.path.join(work, spec)
            os.makedirs(case, exist_ok=True)
            params = build_model(os.path.join(case, "model"), hidden, layers)
            source = train_one_step(os.path.join(case, "model"), os.path.join(case, "run"), _free_port())
            out = source + "_universal"
            for workers in settings:
                shutil.rmtree(out, ignore_errors=True)
                chosen = workers or universal.converter_workers(source)[:2]
                start = time.perf_counter()
                with contextlib.redirect_stdout(io.StringIO()), TreeRss() as rss:  # its own progress lines
                    universal._convert_once(source, out, chosen)
                seconds = time.perf_counter() - start
                ckpt_mib, uni_mib = checkpoint.dir_bytes(source) / 2**20, checkpoint.dir_bytes(out) / 2**20
                label = f"{'auto ' if workers is None else ''}{chosen[0]}+{chosen[1]}"
                print(f"{spec:>16} {params:>12,} {ckpt_mib:>9.1f} {uni_mib:>14.1f} {label:>8} {seconds:>8.1f} "
                      f"{uni_mib / seconds:>7.1f} {rss.peak / 2**20:>13.0f}", flush=True)
            shutil.rmtree(case)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
