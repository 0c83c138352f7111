#!/usr/bin/env bash
# Set up, then: (1) SFT a tiny Llama built from a config to reverse digit strings, and show
# held-out exact-match accuracy before and after; (2) make on-policy preference pairs (the correct
# reversal preferred to the SFT model's own wrong answers); (3) DPO on them, and show reward accuracy
# and exact match rising; (4) a reward model (scalar head on the SFT model, Bradley-Terry) on generated
# pairs, with its held-out pairwise accuracy (the reward and critic of recipes/debug/ppo.yaml).
# ~7 minutes on 2 CPU cores once set up.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export TOKENIZERS_PARALLELISM=false
start=$(date +%s)
echo "== mask preview (trained tokens in [[ ]]) =="
python launch/inspect_data.py --recipe recipes/debug/sft.yaml -n 1
echo "== SFT =="
python launch/sft.py --recipe recipes/debug/sft.yaml train.resume=never overwrite_output_dir=true
python examples/demo_eval.py --recipe recipes/debug/sft.yaml
echo "== preference pairs: the SFT model's own mistakes are the rejected answers =="
python examples/make_dpo_pairs.py --model runs/debug-sft/final --source data/demo/dpo_train.jsonl \
    --out runs/debug-sft/onpolicy_pairs.jsonl --overwrite
echo "== DPO (starts from runs/debug-sft/final) =="
python launch/dpo.py --recipe recipes/debug/dpo.yaml train.resume=never overwrite_output_dir=true
python examples/demo_eval.py --recipe recipes/debug/dpo.yaml
echo "== reward model (starts from runs/debug-sft/final; held-out pairs: data/demo/dpo_eval.jsonl) =="
python examples/make_reward_pairs.py
python launch/reward.py --recipe recipes/debug/reward.yaml train.resume=never overwrite_output_dir=true
python launch/score.py runs/debug-reward/final --data data/demo/dpo_eval.jsonl --max-seq-len 96 --quiet
echo
echo "demo took $(( $(date +%s) - start ))s.  Chat with the model:  . .venv/bin/activate && python launch/chat.py runs/debug-dpo/final"
