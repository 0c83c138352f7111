#!/usr/bin/env bash
# Online RL demo (GRPO with an exact-match verifier, then PPO against a reward model) on 2 CPU cores:
# (1) the debug SFT recipe run longer (train.max_steps=SFT_STEPS) as the RL start, with held-out exact
# match before/after; (2) GRPO (recipes/debug/grpo.yaml) from it, with held-out exact match before
# (= the SFT model) and after. GRPO with a 0/1 verifier sharpens what the policy can already sample:
# its start needs pass@8 well above the target, hence the longer SFT. (3) PPO (recipes/debug/ppo.yaml) from
# the same start against the debug reward model (examples/demo.sh trains it; else this script does), then
# PPO with the verifier as reward and the critic from that reward model.
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
echo "== PPO against the debug reward model (the critic starts from it too) =="
if [ ! -d runs/debug-reward/final ]; then  # examples/demo.sh makes it; else: its SFT start, pairs, training
    [ -d runs/debug-sft/final ] || python launch/sft.py --recipe recipes/debug/sft.yaml train.resume=never overwrite_output_dir=true
    python examples/make_reward_pairs.py
    python launch/reward.py --recipe recipes/debug/reward.yaml train.resume=never overwrite_output_dir=true
fi
python launch/rl.py --recipe recipes/debug/ppo.yaml model.name_or_path=runs/debug-sft-rl/final \
    train.resume=never overwrite_output_dir=true
python examples/demo_eval.py --recipe recipes/debug/ppo.yaml model.name_or_path=runs/debug-sft-rl/final
echo "== PPO with the exact-match verifier as its reward (the critic still starts from the reward model) =="
PPO_VERIFIER=(model.name_or_path=runs/debug-sft-rl/final output_dir=runs/debug-ppo-verifier rl.reward_model=null
              rl.critic=runs/debug-reward/final "rl.reward_weights=[1.0]")
python launch/rl.py --recipe recipes/debug/ppo.yaml "${PPO_VERIFIER[@]}" train.resume=never overwrite_output_dir=true
python examples/demo_eval.py --recipe recipes/debug/ppo.yaml "${PPO_VERIFIER[@]}"
echo
echo "RL demo took $(( $(date +%s) - start ))s.  Curves: runs/debug-grpo/metrics.jsonl (reward, kl, clip_frac, entropy, ...)"
