"""Demo scoring: held-out exact-match accuracy of the untrained vs the trained model.

  python scripts/demo_eval.py --recipe recipes/debug/sft.yaml [--limit 200]
"Before" is the recipe's model at initialisation (same seed as training); "after" is
<output_dir>/final. Each eval row holds a conversation and its gold `answer`; the model sees the
conversation without its last assistant turn and must produce the answer exactly (greedy).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def main() -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmtrain.config import load_config
    from llmtrain.data.chat import to_messages
    from llmtrain.generate import complete, load_for_inference

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
    prompts = [to_messages(r)[:-1] for r in rows]
    gold = [r["answer"] for r in rows]

    spec = dict(cfg.model.config)
    hf_config = AutoConfig.for_model(spec.pop("model_type"), vocab_size=len(tok), **spec)
    torch.manual_seed(cfg.train.seed)  # the weights training started from
    untrained = AutoModelForCausalLM.from_config(hf_config).eval()

    results = {}
    for name, m in (("before (init)", untrained), ("after (final/)", model)):
        replies = complete(m, tok, prompts, max_new_tokens=8)
        results[name] = (sum(r == g for r, g in zip(replies, gold)) / len(gold), replies)
    print(f"\nheld-out exact match on {len(gold)} questions from {eval_file}")
    print(f"{'model':<16} {'accuracy':>9}")
    for name, (acc, _) in results.items():
        print(f"{name:<16} {acc:>9.1%}")
    print("\nexamples (question -> before | after | gold):")
    for i in range(5):
        q = prompts[i][-1]["content"]
        print(f"  {q!r:<28} -> {results['before (init)'][1][i]!r:>10} | {results['after (final/)'][1][i]!r:>6} | {gold[i]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
