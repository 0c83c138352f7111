"""Preference pairs for the debug reward model: chosen = the correct reversal, rejected = a hand-made
wrong one: two digits swapped three times as often as the digits unreversed or one dropped.

  python examples/make_reward_pairs.py [--rows 26000] [--out runs/demo-data/reward_train.jsonl]

Deterministic (the same file every run); train digit strings only (never a held-out one of
data/demo/*_eval.jsonl). Why swap-heavy: a reward model trained on pairs with the three kinds equally
often ranks shortened answers right every time and unreversed ones ~96% of the time, but swapped
digits only ~73%: that is the kind a last-token score has to learn to check digit by digit, so the
training pairs show it most (hard negatives). recipes/debug/reward.yaml has the figures.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import synth  # noqa: E402  (examples/synth.py, beside this script)

KIND_WEIGHTS = (1, 3, 1)  # unreversed, two digits swapped, one dropped


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=26000)
    p.add_argument("--out", default="runs/demo-data/reward_train.jsonl")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    n = synth.write_jsonl(synth.dpo_reverse_pairs(args.rows, seed=args.seed, kind_weights=KIND_WEIGHTS), args.out)
    print(f"{args.out}: {n} preference pairs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
