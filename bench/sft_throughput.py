"""SFT throughput: llmtrain (padded, packed) vs TRL SFTTrainer (defaults, packing) on the same work.

Same model (a Llama built from config; size flags), same tokenized samples, same optimizer steps,
same LR, fp32 on CPU / bf16 on GPU, one process each, run one after another on this machine:

  (a) llmtrain padded    python launch/sft.py --recipe <generated> data.packing=false
  (b) llmtrain packed    python launch/sft.py --recipe <generated> data.packing=true
  (c) TRL defaults       SFTTrainer(SFTConfig(...)) with no packing / padding-free option
  (d) TRL packing        SFTConfig(packing=True, packing_strategy="bfd"): TRL's padding-free packing

Global batch: (a) and (c) take --global-batch samples per optimizer step (padded to the longest in
the batch). The packed variants take rows of max_seq_len tokens; (b) and (d) use
rows = ceil(global_batch * mean sample length / max_seq_len), so a step covers about the same
real tokens. All four train on the same token ids and loss masks: the samples are tokenized once
by llmtrain's own SFT pipeline (chat template, assistant-only labels) and TRL gets them as a
pre-tokenized dataset with a `labels` column (so TRL skips its own templating).

Length distribution (documented): chat SFT data has a long tail, most conversations short and a few
long (ShareGPT / UltraChat token counts are roughly lognormal). Sample lengths here are lognormal
with median = max_seq_len / 6 and sigma = 1.0, clipped to [16, max_seq_len]; the prompt (user turn)
takes 20-50% of each sample and only the assistant turn is trained on.

Measured per variant (each in its own subprocess):
  tokens/s       real (non-padding) tokens per second, steps 2..N (step 1 is warmup)
  padding        share of computed token positions that are padding
  peak memory    CPU: peak RSS of the subprocess (os.wait4); GPU: torch.cuda.max_memory_allocated
  MFU            GPU only: 6 * params * tokens/s / peak FLOP/s (attention FLOPs not counted)

  python bench/sft_throughput.py                                     # CPU defaults (~5 min on 2 cores)
  python bench/sft_throughput.py --hidden 1024 --layers 12 --max-seq-len 2048 --steps 30   # a GPU
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(REPO, "assets", "tokenizer")
VARIANTS = {
    "a": "llmtrain padded",
    "b": "llmtrain packed",
    "c": "TRL SFTTrainer defaults",
    "d": "TRL packing=True (bfd, padding-free)",
}
_WORDS = ("the model data train value result number answer question compute sum of and is a to in for "
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
    params = _param_count(model_config(args))
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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shared_args(p)
    p.add_argument("--max-seq-len", type=int, default=512, help="data.max_seq_len / TRL max_length")
    p.add_argument("--global-batch", type=int, default=16, help="samples per optimizer step, unpacked variants")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per variant (step 1 is warmup)")
    p.add_argument("--samples", type=int, default=0, help="samples generated (default: enough for every variant)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- data


def make_chat_jsonl(path: str, n: int, max_seq_len: int, seed: int) -> None:
    """n messages rows with lognormal target lengths (about 3 tokens per word with the project tokenizer)."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(mean=math.log(max_seq_len / 6), sigma=1.0, size=n), 16, max_seq_len)
    with open(path, "w") as f:
        for total in lengths:
            words = max(4, int(total / 3.1) - 4)  # chat template adds a few tokens
            prompt_words = max(1, int(words * rng.uniform(0.2, 0.5)))
            text = lambda k: " ".join(rng.choice(_WORDS, size=k))  # noqa: E731
            f.write(json.dumps({"messages": [{"role": "user", "content": text(prompt_words)},
                                             {"role": "assistant", "content": text(words - prompt_words)}]}) + "\n")


def tokenize_like_llmtrain(jsonl: str, max_seq_len: int):
    """(input_ids, labels) per sample exactly as llmtrain's SFT pipeline builds them."""
    sys.path.insert(0, REPO)
    from transformers import AutoTokenizer

    from llmtrain.config import SourceConfig
    from llmtrain.data.chat import ensure_chat_template
    from llmtrain.data.sft import build_sft_samples
    from llmtrain.data.sources import BadRowReport

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    ensure_chat_template(tok, None)
    samples = build_sft_samples(tok, [SourceConfig(path=jsonl, format="messages")], max_seq_len, "truncate",
                                "data.train", BadRowReport())
    return [samples.seq(j) for j in range(samples.num_seqs)]


# --------------------------------------------------------------------------- runs


def model_config(args) -> dict:
    return {"model_type": "llama", "hidden_size": args.hidden, "intermediate_size": int(args.hidden * 8 / 3) // 8 * 8,
            "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
            "num_key_value_heads": max(1, args.heads // 2), "max_position_embeddings": args.max_seq_len,
            "tie_word_embeddings": False}


def _child_env(args) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    threads = args.threads or os.cpu_count() or 1
    env["OMP_NUM_THREADS"] = str(threads)
    return env


def _run_measured(cmd: list[str], env: dict, log_path: str, peak_json: str) -> dict:
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


# run inside the llmtrain child: the real entry point (launch/sft.py) via runpy, plus a GPU peak report
_LLMTRAIN_WRAPPER = """
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


def run_llmtrain(args, packing: bool, rows: int, jsonl: str, work: str) -> dict:
    import yaml

    name = "packed" if packing else "padded"
    out_dir = os.path.join(work, f"llmtrain-{name}")
    recipe = {
        "output_dir": out_dir, "overwrite_output_dir": True,
        "model": {"tokenizer": TOKENIZER, "config": model_config(args)},
        "data": {"train": [jsonl], "max_seq_len": args.max_seq_len, "packing": packing},
        "train": {"max_steps": args.steps, "seed": args.seed, "micro_batch_size": rows, "grad_accum": 1,
                  "lr": args.lr, "schedule": "constant", "log_every": 1, "save_every": 0, "resume": "never"},
        "deepspeed": {"config": os.path.join(REPO, "ds_configs/zero0.json")},
        "logging": {"progress": False},
    }
    path = os.path.join(work, f"llmtrain-{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(recipe, f, sort_keys=False)
    cmd = [sys.executable, "-c", _LLMTRAIN_WRAPPER, os.path.join(REPO, "launch/sft.py"), "--recipe", path]
    mem = _run_measured(cmd, _child_env(args), path + ".log", path + ".peak.json")
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f if line.strip()]
    steps = [r for r in metrics if "loss" in r]
    first, last = steps[0], steps[-1]
    real = last["tokens_seen"] - first["tokens_seen"]
    seconds = last["elapsed_sec"] - first["elapsed_sec"]
    computed = _llmtrain_computed_tokens(out_dir, args, packing, rows)
    return {"real_tokens": real, "seconds": seconds, "padding": 1 - computed["real"] / computed["computed"],
            "final_loss": last["loss"], "steps": len(steps), "cmd": f"python launch/sft.py --recipe {path}", **mem}


def _llmtrain_computed_tokens(out_dir: str, args, packing: bool, rows: int) -> dict:
    """Replays llmtrain's own batch planning (same seed, same cached samples) to count computed positions."""
    import glob

    from llmtrain.data.batching import RowStream
    from llmtrain.data.samples import SampleStore

    cache = sorted(glob.glob(os.path.join(out_dir, "cache", "sft-*")))[-1]
    lengths = SampleStore(cache).unit_lengths()
    stream = RowStream(lengths, seed=args.seed, packing=packing, max_len=args.max_seq_len)
    real = computed = 0
    for s in range(1, args.steps):  # steps 2..N, as timed
        batch = stream.rows(s * rows, rows)
        widths = [int(sum(lengths[u] for u in row)) for row in batch]
        real += sum(widths)
        computed += len(batch) * max(widths)  # collate pads every row to the longest in the micro-batch
    return {"real": real, "computed": computed}


def run_trl(args, packing: bool, rows: int, samples_path: str, work: str) -> dict:
    name = "packing" if packing else "defaults"
    spec = {"packing": packing, "rows": rows, "samples": samples_path, "out": os.path.join(work, f"trl-{name}"),
            "hidden": args.hidden, "layers": args.layers, "heads": args.heads, "max_seq_len": args.max_seq_len,
            "steps": args.steps, "lr": args.lr, "seed": args.seed}
    spec_path = os.path.join(work, f"trl-{name}.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    result_path = spec["out"] + ".result.json"
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "trl", "--child-args", spec_path]
    mem = _run_measured(cmd, _child_env(args), spec_path + ".log", spec_path + ".peak.json")
    with open(result_path) as f:
        res = json.load(f)
    return {**res, **mem, "cmd": f"SFTTrainer(SFTConfig(packing={packing}{', packing_strategy=bfd' if packing else ''}))"}


def trl_child(spec_path: str) -> None:
    """Child process: TRL SFTTrainer on the pre-tokenized samples; times steps 2..N."""
    import torch
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    with open(spec_path) as f:
        spec = json.load(f)
    with open(spec["samples"]) as f:
        rows = [json.loads(line) for line in f]
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    dataset = Dataset.from_list(rows)  # input_ids + labels: TRL skips templating and keeps our labels
    ns = argparse.Namespace(hidden=spec["hidden"], layers=spec["layers"], heads=spec["heads"],
                            max_seq_len=spec["max_seq_len"])
    mc = model_config(ns)
    hf_config = AutoConfig.for_model(mc.pop("model_type"), vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                     eos_token_id=tok.eos_token_id, **mc)
    torch.manual_seed(spec["seed"])
    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa",
                                             dtype=torch.bfloat16 if cuda else torch.float32)
    config = SFTConfig(
        output_dir=spec["out"], max_steps=spec["steps"], per_device_train_batch_size=spec["rows"],
        gradient_accumulation_steps=1, learning_rate=spec["lr"], lr_scheduler_type="constant",
        max_length=spec["max_seq_len"], packing=spec["packing"], seed=spec["seed"], bf16=cuda,
        use_cpu=not cuda, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tok)
    counts = {"real": [], "computed": []}
    collate = trainer.data_collator

    def counting_collator(features):
        batch = collate(features)
        counts["real"].append(sum(len(f["input_ids"]) for f in features))
        counts["computed"].append(batch["input_ids"].numel())
        return batch

    trainer.data_collator = counting_collator
    times = step_clock(trainer, cuda)
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    n = len(times)
    real, computed = sum(counts["real"][1:n]), sum(counts["computed"][1:n])  # steps 2..N
    write_child_result(spec["out"], cuda, {"real_tokens": real, "seconds": times[-1] - times[0],
                                           "padding": 1 - real / computed,
                                           "final_loss": losses[-1] if losses else float("nan"), "steps": n})


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


def write_child_result(out: str, cuda: bool, result: dict) -> None:
    """A TRL child's figures for the parent: <out>.result.json, and the CUDA peak where there is one."""
    with open(out + ".result.json", "w") as f:
        json.dump(result, f)
    if cuda:
        import torch

        with open(os.environ["BENCH_PEAK_JSON"], "w") as f:
            json.dump({"cuda_peak_bytes": torch.cuda.max_memory_allocated()}, f)


# --------------------------------------------------------------------------- main


def _peak_flops() -> float | None:
    sys.path.insert(0, REPO)
    import torch

    from llmtrain.train.flops import peak_flops

    return peak_flops(torch.device("cuda")) if torch.cuda.is_available() else None


def main() -> None:
    args = parse_args()
    if args.child == "trl":
        trl_child(args.child_args)
        return

    work = args.workdir or tempfile.mkdtemp(prefix="bench-sft-")
    os.makedirs(work, exist_ok=True)
    jsonl = os.path.join(work, "chat.jsonl")
    n = args.samples or args.global_batch * args.steps * 3
    make_chat_jsonl(jsonl, n, args.max_seq_len, args.seed)
    seqs = tokenize_like_llmtrain(jsonl, args.max_seq_len)
    lengths = np.array([len(ids) for ids, _ in seqs])
    samples_path = os.path.join(work, "tokenized.jsonl")
    with open(samples_path, "w") as f:
        for ids, labels in seqs:
            f.write(json.dumps({"input_ids": ids.tolist(), "labels": labels.tolist()}) + "\n")
    packed_rows = max(1, math.ceil(args.global_batch * lengths.mean() / args.max_seq_len))
    params = _param_count(model_config(args))
    print(setup_line(args))
    print(f"samples={len(seqs)} lengths: lognormal(median={args.max_seq_len // 6}, sigma=1.0) clipped to "
          f"[16, {args.max_seq_len}] -> mean {lengths.mean():.0f}, median {np.median(lengths):.0f}, "
          f"p90 {np.percentile(lengths, 90):.0f}, max {lengths.max()} tokens")
    print(f"global batch: (a),(c) {args.global_batch} samples/step; (b),(d) {packed_rows} rows x "
          f"{args.max_seq_len} tokens/step; workdir {work}")
    def run_one(key: str) -> dict:
        if key == "a":
            return run_llmtrain(args, False, args.global_batch, jsonl, work)
        if key == "b":
            return run_llmtrain(args, True, packed_rows, jsonl, work)
        if key == "c":
            return run_trl(args, False, args.global_batch, samples_path, work)
        return run_trl(args, True, packed_rows, samples_path, work)

    _print_table(best_of_rounds(args, VARIANTS, run_one), params, _peak_flops())


def _param_count(cfg: dict) -> int:
    h, L, i = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * i + 2 * h
    return L * per_layer + 2 * 888 * h + h


def _print_table(results: dict, params: int, peak: float | None) -> None:
    gib = 1024**3
    rate = {k: r["real_tokens"] / r["seconds"] for k, r in results.items()}
    cols = ["variant", "real tokens/s", "padding", "peak mem (GiB)", "final loss", "vs (c)", "vs (d)"]
    if peak:
        cols.insert(2, "MFU")
    print("| " + " | ".join(cols) + " |")
    print("|" + " --- |" * len(cols))
    for k, r in results.items():
        mem = r.get("cuda_peak_bytes", r["peak_rss_bytes"])
        cells = [f"({k}) {VARIANTS[k]}", f"{rate[k]:,.0f}", f"{r['padding']:.1%}", f"{mem / gib:.2f}",
                 f"{r['final_loss']:.3f}",
                 f"{rate[k] / rate['c']:.2f}x" if "c" in rate else "-",
                 f"{rate[k] / rate['d']:.2f}x" if "d" in rate else "-"]
        if peak:
            cells.insert(2, f"{6 * params * rate[k] / peak:.1%}")
        print("| " + " | ".join(cells) + " |")
    print("peak mem: " + ("torch.cuda.max_memory_allocated" if any("cuda_peak_bytes" in r for r in results.values())
                          else "peak RSS of the run's process (model, optimizer, activations, Python, libraries)"))


if __name__ == "__main__":
    main()
