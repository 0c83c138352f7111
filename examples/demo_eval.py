"""Demo scoring: held-out exact-match accuracy of the untrained vs the trained model.

  python examples/demo_eval.py --recipe recipes/debug/sft.yaml [--limit 200]
"Before" is the model training started from: the recipe's model at initialisation (same seed)
when it is built from `model.config`, else `model.name_or_path` (e.g. the SFT model a DPO run
starts from); "after" is <output_dir>/final. For DPO runs the held-out reward accuracy at the
first and last eval is printed too. Each eval row holds a conversation and its gold `answer`; the model sees the
conversation without its last assistant turn and must produce the answer exactly (greedy).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))



def main() -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmtrain.config import load_config
    from llmtrain.data.chat import to_messages
    from llmtrain.tools.generate import complete, load_for_inference
    from llmtrain.models.loading import init_weights_by_name

    p = argparse.ArgumentParser()
    p.add_argument("--recipe", required=True)
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cfg = load_config(args.recipe, args.overrides)
    final = os.path.join(cfg.output_dir, "final")
    model, tok = load_for_inference(final, "cpu")
    eval_file = cfg.data.eval[0] if cfg.data.eval else cfg.data.train[0]
    with open(eval_file) as f:
        rows = [json.loads(line) for line in f if line.strip()][: args.limit]
    if "answer" not in rows[0]:  # preference rows: the prompt and the chosen answer
        from llmtrain.data.preference import to_pair

        pairs = [to_pair(r)[0] for r in rows]
        prompts, gold = [p[:-1] for p in pairs], [p[-1]["content"] for p in pairs]
    else:
        prompts = [to_messages(r)[:-1] for r in rows]
        gold = [r["answer"] for r in rows]

    if cfg.model.config is not None:
        spec = dict(cfg.model.config)
        hf_config = AutoConfig.for_model(spec.pop("model_type"), vocab_size=len(tok), **spec)
        start, start_name = AutoModelForCausalLM.from_config(hf_config).eval(), "before (init)"
        init_weights_by_name(start, cfg.train.seed, zero3=False)  # the weights training started from
    else:
        start, start_name = load_for_inference(cfg.model.name_or_path, "cpu")[0], "before (start)"

    results = {}
    for name, m in ((start_name, start), ("after (final/)", model)):
        replies = complete(m, tok, prompts, max_new_tokens=8)
        results[name] = (sum(r == g for r, g in zip(replies, gold)) / len(gold), replies)
    print(f"\nheld-out exact match on {len(gold)} questions from {eval_file}")
    print(f"{'model':<16} {'accuracy':>9}")
    for name, (acc, _) in results.items():
        print(f"{name:<16} {acc:>9.1%}")
    metrics = os.path.join(cfg.output_dir, "metrics.jsonl")
    evals = [json.loads(line) for line in open(metrics) if "eval_reward_accuracy" in line] if os.path.exists(metrics) else []
    if evals:
        print(f"held-out reward accuracy (DPO): {evals[0]['eval_reward_accuracy']:.1%} at step {evals[0]['step']} "
              f"-> {evals[-1]['eval_reward_accuracy']:.1%} at step {evals[-1]['step']}")
    print("\nexamples (question -> before | after | gold):")
    for i in range(5):
        q = prompts[i][-1]["content"]
        print(f"  {q!r:<30} -> {results[start_name][1][i][:12]!r:>14} | {results['after (final/)'][1][i]!r:>10} | {gold[i]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
