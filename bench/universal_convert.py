"""Universal-checkpoint conversion cost: seconds and bytes to convert a 2-rank ZeRO-2 checkpoint.

  python bench/universal_convert.py [--sizes 64x2,512x8,1024x8] [--workdir DIR]

For each size (hidden x layers of a Llama model with the project's tokenizer): trains one step on
2 ranks (torchrun, ZeRO-2, checkpoint at step 1), then converts that checkpoint exactly as a resume
at another world size does (universal._convert_once: DeepSpeed's converter in a subprocess with
weights-only loads, one extract and one merge worker) and prints parameters, checkpoint MiB,
universal-copy MiB, seconds and MiB/s written. Conversion time is a fixed start-up (imports) plus
a part linear in the checkpoint size; the table shows both.
"""
import argparse
import contextlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="64x2,512x8,1024x8", help="comma-separated hidden x layers")
    p.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one, removed)")
    args = p.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from llmtrain.train import checkpoint, universal
    from llmtrain.distributed.launchers import _free_port

    work = args.workdir or tempfile.mkdtemp(prefix="universal_bench_")
    print(f"settings: 2-rank ZeRO-2 fp32 checkpoint (CPU), converter with 1 extract + 1 merge worker, "
          f"cpus={os.cpu_count()}, workdir={work}")
    print(f"{'hidden x layers':>16} {'params':>12} {'ckpt MiB':>9} {'universal MiB':>14} {'seconds':>8} {'MiB/s':>7}")
    try:
        for spec in args.sizes.split(","):
            hidden, layers = (int(x) for x in spec.split("x"))
            case = os.path.join(work, spec)
            os.makedirs(case, exist_ok=True)
            params = build_model(os.path.join(case, "model"), hidden, layers)
            source = train_one_step(os.path.join(case, "model"), os.path.join(case, "run"), _free_port())
            out = source + "_universal"
            start = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):  # its own progress lines
                universal._convert_once(source, out)
            seconds = time.perf_counter() - start
            ckpt_mib, uni_mib = checkpoint.dir_bytes(source) / 2**20, checkpoint.dir_bytes(out) / 2**20
            print(f"{spec:>16} {params:>12,} {ckpt_mib:>9.1f} {uni_mib:>14.1f} {seconds:>8.1f} {uni_mib / seconds:>7.1f}",
                  flush=True)
            shutil.rmtree(case)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
