"""DPO throughput: llmtrain (padded, packed) vs TRL DPOTrainer (defaults, padding-free) on the same work.

Same model (a Llama built from config and saved once, so every variant starts from the same weights;
size flags), same preference rows, same optimizer steps, same LR, beta 0.1, sigmoid loss, a frozen
copy of the initial model as the reference (its forward runs every step in all variants), fp32 on
CPU / bf16 on GPU, one process each, run one after another on this machine:

  (a) llmtrain padded    python launch/dpo.py --recipe <generated> data.packing=false
  (b) llmtrain packed    python launch/dpo.py --recipe <generated> data.packing=true
  (c) TRL defaults       DPOTrainer(DPOConfig(...), ref_model=None): pads chosen and rejected of the
                         batch to the longest of them; reference = the model loaded again from its path
  (d) TRL padding-free   DPOConfig(padding_free=True): in trl 1.16 the trainer warns and falls back to
                         padding ("temporarily unavailable since the DPO refactor"), so the variant is
                         skipped with that reason printed unless a future trl keeps the flag set

Global batch: --pairs preference pairs per optimizer step in every variant. llmtrain's DPO unit is a
pair: unpacked, train.micro_batch_size counts pairs (each pair becomes two padded rows, chosen and
rejected); packed, it counts rows of 2 * data.max_seq_len tokens holding whole pairs (next-fit), so
(b) takes rows = round(pairs / mean pairs per packed row), the mean measured by packing these very
pairs with llmtrain's own next-fit packer, and a step covers about --pairs pairs. TRL's
per_device_train_batch_size counts pairs. grad_accum is 1 everywhere.

Data (documented): synthetic rows {"prompt": str, "chosen": str, "rejected": str}. Pair lengths
(prompt + chosen, template included) are lognormal with median = max_seq_len / 6 and sigma = 1.0,
clipped to [16, max_seq_len], as in bench/sft_throughput.py; the prompt takes 20-50% of it (at most
40% of max_seq_len) and the rejected response is 0.5-1.5x the chosen one. llmtrain reads the JSONL
(strings become a user turn and an assistant turn; chat template = the tokenizer's ChatML). TRL gets
the same rows as a datasets.Dataset in conversational form ([{"role": "user", ...}] prompt,
[{"role": "assistant", ...}] responses) so it applies the same chat template itself. Both truncate
prompt + response from the right to max_seq_len. Each side tokenizes on its own; the tokens counted
are those each actually computed on (the table's tokens/pair column shows they agree).

Measured per variant (each in its own subprocess):
  tokens/s     real tokens per second over steps 2..N (step 1 is warmup): the non-padding tokens of
               prompt + chosen and of prompt + rejected (the prompt counted twice, as both forwards
               process it), summed over the step's pairs. llmtrain: tokens_seen of metrics.jsonl (sum
               of the pairs' sequence lengths); TRL: attention_mask.sum() of each collated batch.
  padding      share of computed token positions (rows x width of each batch) that are padding
  peak memory  CPU: peak RSS of the subprocess (os.wait4); GPU: torch.cuda.max_memory_allocated
  MFU          GPU only: 6 * params * tokens/s / peak FLOP/s (reference forward, attention not counted)

Not equalised on purpose: TRL's own defaults elsewhere (fused LM head log-probs, AdamW settings, data
order). TRL's gradient_checkpointing defaults to True; it is set False here, as in llmtrain's
default, so both do the same compute (--trl-gradient-checkpointing keeps TRL's default).

  python bench/dpo_throughput.py                                     # CPU defaults (~5 min on 2 cores)
  python bench/dpo_throughput.py --hidden 1024 --layers 12 --max-seq-len 2048 --steps 20 --pairs 32   # a GPU
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import (  # noqa: E402  (shared by the throughput benches)
    LLMTRAIN_WRAPPER, REPO, TOKENIZER, WORDS, add_shared_args, best_of_rounds, child_env, model_config, param_count,
    peak_flops_or_none, run_measured, run_trl_child, setup_line, timed_train, write_child_result)

sys.path.insert(0, REPO)

VARIANTS = {
    "a": "llmtrain padded",
    "b": "llmtrain packed",
    "c": "TRL DPOTrainer defaults",
    "d": "TRL padding_free=True",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shared_args(p)  # --hidden --layers --heads --lr --seed --variants --repeats --threads --workdir
    p.add_argument("--max-seq-len", type=int, default=512, help="data.max_seq_len / TRL max_length (per sequence)")
    p.add_argument("--pairs", type=int, default=16, help="preference pairs per optimizer step, every variant")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per variant (step 1 is warmup)")
    p.add_argument("--rows", type=int, default=0, help="preference rows generated (default: enough for every variant)")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--trl-gradient-checkpointing", action="store_true",
                   help="keep DPOConfig's default gradient_checkpointing=True (llmtrain runs without)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- data and model


def make_preference_jsonl(path: str, n: int, max_seq_len: int, seed: int) -> None:
    """n {"prompt", "chosen", "rejected"} rows; lognormal pair lengths (about 3 tokens per word)."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(mean=np.log(max_seq_len / 6), sigma=1.0, size=n), 16, max_seq_len)
    text = lambda k: " ".join(rng.choice(WORDS, size=max(1, int(k))))  # noqa: E731
    with open(path, "w") as f:
        for total in lengths:
            words = max(4, int(total / 3.1) - 6)  # the chat template adds a few tokens per turn
            prompt_words = max(1, min(int(words * rng.uniform(0.2, 0.5)), int(0.4 * max_seq_len / 3.1)))
            chosen_words = max(1, words - prompt_words)
            rejected_words = max(1, int(chosen_words * rng.uniform(0.5, 1.5)))
            f.write(json.dumps({"prompt": text(prompt_words), "chosen": text(chosen_words),
                                "rejected": text(rejected_words)}) + "\n")


def llmtrain_pair_lengths(jsonl: str, max_seq_len: int, max_prompt_len: int) -> np.ndarray:
    """(pairs, 2) token counts of prompt+chosen, prompt+rejected as llmtrain's DPO pipeline builds them."""
    from transformers import AutoTokenizer

    from llmtrain.data.chat import ensure_chat_template
    from llmtrain.data.preference import encode_pair

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    ensure_chat_template(tok, None)
    with open(jsonl) as f:
        pairs = [encode_pair(tok, json.loads(line), max_seq_len, max_prompt_len) for line in f if line.strip()]
    return np.array([[len(c[0]), len(r[0])] for c, r in pairs])


def save_model(args, path: str) -> None:
    """The Llama from config (random weights, seed) saved with the tokenizer: every variant loads it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    mc = model_config(args)
    cfg = AutoConfig.for_model(mc.pop("model_type"), vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                               eos_token_id=tok.eos_token_id, **mc)
    torch.manual_seed(args.seed)
    AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").save_pretrained(path)
    tok.save_pretrained(path)


def packed_rows_for(pair_lengths: np.ndarray, pairs: int, max_seq_len: int, seed: int) -> tuple[int, float]:
    """Rows per step for llmtrain packing so a step holds about `pairs` pairs (next-fit into 2 * max_seq_len)."""
    from llmtrain.data.batching import pack_next_fit

    units = pair_lengths.sum(axis=1)
    order = np.random.default_rng([seed, 0]).permutation(len(units))
    per_row = len(units) / len(pack_next_fit(order, units, 2 * max_seq_len))
    return max(1, round(pairs / per_row)), per_row


# --------------------------------------------------------------------------- runs


def write_recipe(args, work: str, model_dir: str, jsonl: str) -> str:
    import yaml

    recipe = {
        "output_dir": os.path.join(work, "llmtrain"), "overwrite_output_dir": True,
        "model": {"name_or_path": model_dir},
        "data": {"train": [jsonl], "max_seq_len": args.max_seq_len, "max_prompt_len": args.max_seq_len // 2,
                 "packing": False},
        "train": {"max_steps": args.steps, "seed": args.seed, "micro_batch_size": args.pairs, "grad_accum": 1,
                  "lr": args.lr, "schedule": "constant", "log_every": 1, "save_every": 0, "resume": "never"},
        "dpo": {"beta": args.beta, "loss": "sigmoid", "nll_weight": 0.0, "precompute_ref": False},
        "deepspeed": {"config": os.path.join(REPO, "ds_configs/zero0.json")},
        "logging": {"progress": False},
    }
    path = os.path.join(work, "dpo.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(recipe, f, sort_keys=False)
    return path


def run_llmtrain(args, packing: bool, rows: int, recipe: str, pair_lengths: np.ndarray, work: str) -> dict:
    name = "packed" if packing else "padded"
    out_dir = os.path.join(work, f"llmtrain-{name}")
    overrides = [f"output_dir={out_dir}", f"data.packing={str(packing).lower()}", f"train.micro_batch_size={rows}"]
    cmd = [sys.executable, "-c", LLMTRAIN_WRAPPER, os.path.join(REPO, "launch/dpo.py"), "--recipe", recipe,
           *overrides]
    log = os.path.join(work, f"llmtrain-{name}")
    mem = run_measured(cmd, child_env(args), log + ".log", log + ".peak.json")
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        steps = [r for r in map(json.loads, filter(str.strip, f)) if "loss" in r]
    real = steps[-1]["tokens_seen"] - steps[0]["tokens_seen"]
    real_replayed, computed, n_pairs = _llmtrain_replay(out_dir, args, packing, rows)
    if real_replayed != real:  # the replay must plan the very batches the run trained on
        raise RuntimeError(f"llmtrain {name}: replayed {real_replayed} real tokens, metrics.jsonl says {real}")
    return {"real_tokens": real, "seconds": steps[-1]["elapsed_sec"] - steps[0]["elapsed_sec"],
            "padding": 1 - real / computed, "pairs": n_pairs, "final_loss": steps[-1]["loss"], "steps": len(steps),
            "cmd": " ".join(["python launch/dpo.py --recipe", recipe, *overrides]), **mem}


def _llmtrain_replay(out_dir: str, args, packing: bool, rows: int) -> tuple[int, int, int]:
    """Replays llmtrain's batch planning (same seed, its cached pairs): real and computed positions, pairs."""
    import glob

    from llmtrain.data.batching import RowStream
    from llmtrain.data.samples import SampleStore

    samples = SampleStore(sorted(glob.glob(os.path.join(out_dir, "cache", "dpo-*")))[-1])
    seq_lens = samples.seq_lengths().astype(np.int64).reshape(-1, 2)  # (pairs, 2): chosen, rejected
    stream = RowStream(seq_lens.sum(axis=1), seed=args.seed, packing=packing, max_len=2 * args.max_seq_len)
    real = computed = n_pairs = 0
    for s in range(1, args.steps):  # steps 2..N, as timed
        batch = stream.rows(s * rows, rows)
        if packing:  # one row per packed row, all padded to the widest
            widths = [int(seq_lens[row].sum()) for row in batch]
        else:  # one row per sequence, chosen and rejected of every pair
            widths = [int(n) for row in batch for u in row for n in seq_lens[u]]
        real += sum(widths)
        computed += len(widths) * max(widths)
        n_pairs += sum(len(row) for row in batch)
    return real, computed, n_pairs


def run_trl(args, padding_free: bool, model_dir: str, jsonl: str, work: str) -> dict:
    name = "padding-free" if padding_free else "defaults"
    spec = {"padding_free": padding_free, "model_dir": model_dir, "data": jsonl, "out": os.path.join(work, f"trl-{name}"),
            "pairs": args.pairs, "max_seq_len": args.max_seq_len, "steps": args.steps, "lr": args.lr,
            "beta": args.beta, "seed": args.seed, "gradient_checkpointing": args.trl_gradient_checkpointing}
    res = run_trl_child(os.path.abspath(__file__), spec, spec["out"] + ".json", args)
    return {**res, "cmd": f"DPOTrainer(DPOConfig(padding_free={padding_free}), ref_model=None)"}


def trl_child(spec_path: str) -> None:
    """Child process: TRL DPOTrainer on the conversational rows; times steps 2..N."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    with open(spec_path) as f:
        spec = json.load(f)
    with open(spec["data"]) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    conv = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]
    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    cuda = torch.cuda.is_available()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], attn_implementation="sdpa",
                                                 dtype=torch.bfloat16 if cuda else torch.float32)
    config = DPOConfig(
        output_dir=spec["out"], max_steps=spec["steps"], per_device_train_batch_size=spec["pairs"],
        gradient_accumulation_steps=1, learning_rate=spec["lr"], lr_scheduler_type="constant", beta=spec["beta"],
        loss_type=["sigmoid"], max_length=spec["max_seq_len"], padding_free=spec["padding_free"],
        gradient_checkpointing=spec["gradient_checkpointing"], seed=spec["seed"], bf16=cuda, use_cpu=not cuda,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
    )
    trainer = DPOTrainer(model=model, ref_model=None, args=config, train_dataset=Dataset.from_list(conv),
                         processing_class=tok)
    result = {"padding_free_kept": bool(getattr(trainer, "padding_free", False))}
    if spec["padding_free"] and not result["padding_free_kept"]:
        result["skipped"] = "DPOTrainer turned padding_free off (trl falls back to padding)"
        return write_child_result(spec["out"], False, result)
    r = timed_train(trainer, cuda, lambda features, batch: {"real": int(batch["attention_mask"].sum()),
                                                            "computed": batch["input_ids"].numel(),
                                                            "pairs": len(features)})
    result.update({"real_tokens": r["real"], "seconds": r["seconds"], "padding": 1 - r["real"] / r["computed"],
                   "pairs": r["pairs"], "final_loss": r["final_loss"], "steps": r["steps"]})
    write_child_result(spec["out"], cuda, result)


# --------------------------------------------------------------------------- main


def main() -> None:
    args = parse_args()
    if args.child:  # --child trl: this is a variant's subprocess
        return trl_child(args.child_args)

    work = args.workdir or tempfile.mkdtemp(prefix="bench-dpo-")
    os.makedirs(work, exist_ok=True)
    jsonl = os.path.join(work, "pairs.jsonl")
    make_preference_jsonl(jsonl, args.rows or args.pairs * args.steps * 2, args.max_seq_len, args.seed)
    model_dir = os.path.join(work, "model")
    save_model(args, model_dir)
    recipe = write_recipe(args, work, model_dir, jsonl)
    lengths = llmtrain_pair_lengths(jsonl, args.max_seq_len, args.max_seq_len // 2)
    packed_rows, per_row = packed_rows_for(lengths, args.pairs, args.max_seq_len, args.seed)
    seqs = lengths.reshape(-1)
    params = param_count(model_config(args))
    print(f"{setup_line(args)} beta={args.beta} loss=sigmoid reference=frozen copy")
    print(f"pairs={len(lengths)}; sequence (prompt + response) lengths, llmtrain tokenization: lognormal pair "
          f"lengths, mean {seqs.mean():.0f}, median {np.median(seqs):.0f}, p90 {np.percentile(seqs, 90):.0f}, "
          f"max {seqs.max()} tokens; {lengths.sum(axis=1).mean():.0f} tokens per pair")
    print(f"global batch: (a),(c),(d) {args.pairs} pairs/step; (b) {packed_rows} rows x {2 * args.max_seq_len} "
          f"tokens/step (next-fit holds {per_row:.2f} pairs/row); workdir {work}")
    def run_one(key: str) -> dict:
        if key in "ab":
            return run_llmtrain(args, key == "b", packed_rows if key == "b" else args.pairs, recipe, lengths, work)
        return run_trl(args, key == "d", model_dir, jsonl, work)

    results = best_of_rounds(args, VARIANTS, run_one)
    print_table(results, params, peak_flops_or_none())


def print_table(results: dict, params: int, peak: float | None) -> None:
    rate = {k: r["real_tokens"] / r["seconds"] for k, r in results.items()}
    head = ["variant", "real tokens/s"] + (["MFU"] if peak else []) + [
        "padding", "pairs/step", "tokens/pair", "peak mem (GiB)", "final loss", "speedup vs (c)"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for k, r in results.items():
        timed = r["steps"] - 1
        row = [f"({k}) {VARIANTS[k]}", f"{rate[k]:,.0f}"] + ([f"{6 * params * rate[k] / peak:.1%}"] if peak else [])
        row += [f"{r['padding']:.1%}", f"{r['pairs'] / timed:.1f}", f"{r['real_tokens'] / r['pairs']:.0f}",
                f"{r.get('cuda_peak_bytes', r['peak_rss_bytes']) / 2**30:.2f}", f"{r['final_loss']:.4f}",
                f"{rate[k] / rate['c']:.2f}x" if "c" in rate else "-"]
        lines.append("| " + " | ".join(row) + " |")
    print("\n".join(lines))
    cuda = any("cuda_peak_bytes" in r for r in results.values())
    print("peak mem: " + ("torch.cuda.max_memory_allocated" if cuda else
                          "peak RSS of the run's process (policy, reference, optimizer, activations, libraries)"))


if __name__ == "__main__":
    main()
