#!/usr/bin/env bash
# Create .venv and install llmtrain with its dev/test extras. Idempotent: a second run is quick.
#   TORCH_SPEC  torch requirement to install first (default: torch==2.13.0, the CPU build this
#               project's CI machines carry, when no NVIDIA GPU is visible; plain "torch" when one is).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# System packages: OpenMPI (mpirun + headers for mpi4py). Installed only when missing and we are root.
if ! command -v mpicc >/dev/null 2>&1 || ! command -v mpirun >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing openmpi-bin libopenmpi-dev"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openmpi-bin libopenmpi-dev >/dev/null
  else
    echo "[setup] warning: OpenMPI not found and cannot apt-get it; mpirun tests will be skipped" >&2
  fi
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    spec=${TORCH_SPEC:-torch}
  else
    spec=${TORCH_SPEC:-torch==2.13.0}   # CPU machine: never pull a multi-GB CUDA build
  fi
  echo "[setup] installing $spec"
  pip install -q "$spec"
fi
if ! python -c "import deepspeed, llmtrain" >/dev/null 2>&1; then
  # DeepSpeed ships an sdist whose setup.py imports torch: build it against the torch above
  # (--no-build-isolation), or pip would fetch a second, CUDA torch into the build env.
  pip install -q numpy setuptools wheel packaging ninja psutil py-cpuinfo pydantic hjson msgpack
  pip install -q --no-build-isolation -e ".[dev]"
fi
echo "[setup] ready: $(python -c 'import torch, deepspeed, transformers; print("torch", torch.__version__, "deepspeed", deepspeed.__version__, "transformers", transformers.__version__)' 2>/dev/null | tail -1)"
