"""llmtrain GRPO vs TRL GRPOTrainer on this machine, the same work: seconds per step, generation and
training tokens/s, and the reward (sample exact match) per step.

  python bench/rl_throughput.py --model runs/debug-sft-rl/final [--steps 10 --prompts 16 --gens 8]

Same model, prompts (data/demo/rl_train.jsonl in llmtrain's seeded order), exact-match reward, P
prompts x G samples per step, max new tokens, temperature 1, lr (constant), one optimizer step per
rollout, no reference model, token-mean loss, fp32, one process each (run one after the other).
TRL: per_device_train_batch_size = P*G (TRL counts completions), steps_per_generation=1,
num_iterations=1, beta=0, loss_type="dapo", gradient_checkpointing=False, bf16=False, and the stop ids
in generation_config.eos_token_id (else its completions run to the limit). TRL's generation time is
its `_generate` call (wrapped with a clock); training time = step time - generation time.
Seconds per step average steps 2..N (the first step pays warm-up). Timings on a shared machine are noisy.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = os.path.join(REPO, "data/demo/rl_train.jsonl")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=os.path.join(REPO, "runs/debug-sft-rl/final"))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--gens", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=10)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="/tmp/rl_throughput")
    p.add_argument("--only", choices=["llmtrain", "trl"], default=None)
    p.add_argument("--trl-child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def prompt_order(n: int, seed: int) -> np.ndarray:
    """llmtrain's prompt stream for epoch 0 (objectives/rl/rollout.py: seeded by (train.seed, epoch))."""
    return np.random.default_rng([seed, 0]).permutation(n)


def run_llmtrain(args) -> dict:
    import yaml

    out = os.path.join(args.work, "llmtrain")
    recipe = {"output_dir": out, "overwrite_output_dir": True, "model": {"name_or_path": args.model},
              "data": {"train": [PROMPTS], "max_prompt_len": 64},
              "train": {"max_steps": args.steps, "seed": args.seed, "micro_batch_size": args.prompts * args.gens,
                        "grad_accum": 1, "lr": args.lr, "schedule": "constant", "warmup_steps": 0,
                        "adam_beta2": 0.95, "max_grad_norm": 1.0, "log_every": 1, "resume": "never"},
              "rl": {"num_generations": args.gens, "prompts_per_step": args.prompts, "max_new_tokens": args.max_new_tokens,
                     "temperature": 1.0, "clip_low": 0.2, "clip_high": 0.28,
                     "reward_fns": ["llmtrain.objectives.rl.rewards:exact_match"], "generation_batch_size": 1024},
              "deepspeed": {"config": os.path.join(REPO, "ds_configs/zero0.json")}, "logging": {"progress": False}}
    os.makedirs(args.work, exist_ok=True)
    path = os.path.join(args.work, "llmtrain.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(recipe, f)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "launch/rl.py"), "--recipe", path],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO})
    if proc.returncode != 0:
        raise SystemExit(f"llmtrain run failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if '"loss"' in line]
    elapsed = [r["elapsed_sec"] for r in rows]
    step_s = np.diff(elapsed)  # steps 2..N
    gen_s = np.array([r["gen_sec"] for r in rows[1:]])
    gen_tokens = np.array([r["completion_len"] * args.prompts * args.gens for r in rows[1:]])
    train_tokens = np.array([r["tokens_seen"] for r in rows])
    train_tokens = np.diff(train_tokens)
    return {"sec_per_step": float(step_s.mean()), "gen_sec": float(gen_s.mean()),
            "gen_tokens_per_sec": float(gen_tokens.sum() / gen_s.sum()),
            "train_tokens_per_sec": float(train_tokens.sum() / (step_s - gen_s).sum()),
            "reward": [r["reward"] for r in rows]}


def run_trl(args) -> dict:
    spec = os.path.join(args.work, "trl.json")
    os.makedirs(args.work, exist_ok=True)
    with open(spec, "w") as f:
        json.dump(vars(args), f)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--trl-child", spec], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": REPO})
    if proc.returncode != 0:
        raise SystemExit(f"TRL run failed:\n{proc.stderr[-3000:]}")
    with open(spec + ".result.json") as f:
        return json.load(f)


def trl_child(spec_path: str) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from llmtrain.data.chat import ensure_chat_template
    from llmtrain.tools.generate import stop_token_ids

    with open(spec_path) as f:
        a = argparse.Namespace(**json.load(f))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    tok = AutoTokenizer.from_pretrained(a.model)
    ensure_chat_template(tok)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="sdpa")
    model.generation_config.eos_token_id = stop_token_ids(tok)
    with open(PROMPTS) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [rows[i] for i in prompt_order(len(rows), a.seed)][: a.steps * a.prompts]
    ds = Dataset.from_list([{"prompt": r["messages"], "answer": r["answer"]} for r in rows])

    def exact_match(prompts, completions, answer, **_):
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return [float(t.strip() == x.strip()) for t, x in zip(texts, answer)]

    cfg = GRPOConfig(output_dir=os.path.join(a.work, "trl"), max_steps=a.steps,
                     per_device_train_batch_size=a.prompts * a.gens, gradient_accumulation_steps=1,
                     steps_per_generation=1, num_generations=a.gens, max_completion_length=a.max_new_tokens,
                     temperature=1.0, top_p=1.0, learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0,
                     weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, beta=0.0, num_iterations=1,
                     loss_type="dapo", scale_rewards="group", epsilon=0.2, epsilon_high=0.28,
                     gradient_checkpointing=False, bf16=False, use_cpu=True, seed=a.seed, shuffle_dataset=False,
                     logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, log_completions=False)
    trainer = GRPOTrainer(model=model, reward_funcs=exact_match, args=cfg, train_dataset=ds, processing_class=tok)
    gen_times, stamps = [], []
    inner = trainer._generate

    def timed_generate(*x, **k):
        t = time.perf_counter()
        try:
            return inner(*x, **k)
        finally:
            gen_times.append(time.perf_counter() - t)

    trainer._generate = timed_generate

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            stamps.append(time.perf_counter())

    trainer.add_callback(Clock())
    trainer.train()
    logs = [r for r in trainer.state.log_history if "reward" in r]
    step_s = np.diff(stamps)  # steps 2..N
    gen_s = np.array(gen_times[1:len(stamps)])
    lengths = np.array([r["completions/mean_length"] for r in logs[1:]])
    ntok = np.diff([r["num_tokens"] for r in logs])  # prompt + completion tokens per step (cumulative in TRL)
    res = {"sec_per_step": float(step_s.mean()), "gen_sec": float(gen_s.mean()),
           "gen_tokens_per_sec": float((lengths * a.prompts * a.gens).sum() / gen_s.sum()),
           "train_tokens_per_sec": float(ntok.sum() / (step_s - gen_s).sum()),
           "reward": [r["reward"] for r in logs]}
    with open(spec_path + ".result.json", "w") as f:
        json.dump(res, f)


def main() -> None:
    args = parse_args()
    if args.trl_child:
        return trl_child(args.trl_child)
    print(f"settings: model {args.model}, {args.steps} steps, {args.prompts} prompts x {args.gens} samples, "
          f"max {args.max_new_tokens} new tokens, T=1, lr {args.lr} constant, fp32, one process, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, load average {os.getloadavg()[0]:.1f}")
    results = {}
    for name, fn in (("llmtrain", run_llmtrain), ("trl", run_trl)):
        if args.only in (None, name):
            results[name] = fn(args)
    print(f"{'':10} {'s/step':>8} {'gen s':>7} {'gen tok/s':>10} {'train tok/s':>12}  reward per step")
    for name, r in results.items():
        curve = " ".join(f"{x:.2f}" for x in r["reward"])
        print(f"{name:10} {r['sec_per_step']:8.2f} {r['gen_sec']:7.2f} {r['gen_tokens_per_sec']:10.0f} "
              f"{r['train_tokens_per_sec']:12.0f}  {curve}  (mean {np.mean(r['reward']):.3f})")


if __name__ == "__main__":
    main()
