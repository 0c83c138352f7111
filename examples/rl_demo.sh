#!/usr/bin/env bash
# Online RL demo (GRPO with an exact-match verifier) on 2 CPU cores, a few minutes once set up:
# (1) the debug SFT recipe run longer (train.max_steps=SFT_STEPS) as the RL start, with held-out exact
# match before/after; (2) GRPO (recipes/debug/grpo.yaml) from it, with held-out exact match before
# (= the SFT model) and after. GRPO with a 0/1 verifier sharpens what the policy can already sample:
# its start needs pass@8 well above the target, hence the longer SFT.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SFT_STEPS=${SFT_STEPS:-600}
start=$(date +%s)
echo "== SFT ($SFT_STEPS steps) =="
python launch/sft.py --recipe recipes/debug/sft.yaml output_dir=runs/debug-sft-rl train.max_steps="$SFT_STEPS" \
    train.resume=never overwrite_output_dir=true
echo "== GRPO (starts from runs/debug-sft-rl/final) =="
python launch/rl.py --recipe recipes/debug/grpo.yaml train.resume=never overwrite_output_dir=true
python examples/demo_eval.py --recipe recipes/debug/grpo.yaml
echo
echo "RL demo took $(( $(date +%s) - start ))s.  Curves: runs/debug-grpo/metrics.jsonl (reward, kl, clip_frac, entropy, ...)"
