#!/usr/bin/env bash
# Set up (idempotent) and run the test suite: real DeepSpeed over gloo, real mpirun and Slurm.
# Extra arguments go to pytest, e.g.  bash scripts/test.sh -k packed
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled
# CI must run the Slurm and MPI tests, not skip them
[ "${CI:-}" = true ] && export LLMTRAIN_REQUIRE_SLURM=1
exec python -m pytest -m "not slow and not gpu" --durations=15 "$@"
