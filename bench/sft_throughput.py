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
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import (  # noqa: E402  (shared by the throughput benches)
    LLMTRAIN_WRAPPER, REPO, TOKENIZER, WORDS, add_shared_args, best_of_rounds, child_env, model_config, param_count,
    peak_flops_or_none, run_measured, run_trl_child, setup_line, timed_train, write_child_result)

VARIANTS = {
    "a": "llmtrain padded",
    "b": "llmtrain packed",
    "c": "TRL SFTTrainer defaults",
    "d": "TRL packing=True (bfd, padding-free)",
}


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
            text = lambda k: " ".join(rng.choice(WORDS, size=k))  # noqa: E731
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
    cmd = [sys.executable, "-c", LLMTRAIN_WRAPPER, os.path.join(REPO, "launch/sft.py"), "--recipe", path]
    mem = run_measured(cmd, child_env(args), path + ".log", path + ".peak.json")
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
    res = run_trl_child(os.path.abspath(__file__), spec, os.path.join(work, f"trl-{name}.json"), args)
    return {**res, "cmd": f"SFTTrainer(SFTConfig(packing={packing}{', packing_strategy=bfd' if packing else ''}))"}


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
    r = timed_train(trainer, cuda, lambda features, batch: {"real": sum(len(f["input_ids"]) for f in features),
                                                            "computed": batch["input_ids"].numel()})
    write_child_result(spec["out"], cuda, {"real_tokens": r["real"], "seconds": r["seconds"],
                                           "padding": 1 - r["real"] / r["computed"], "final_loss": r["final_loss"],
                                           "steps": r["steps"]})


# --------------------------------------------------------------------------- main


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
    params = param_count(model_config(args))
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

    _print_table(best_of_rounds(args, VARIANTS, run_one), params, peak_flops_or_none())


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
