"""Run a task with train.precision=fp16 on a CPU whose DeepSpeed accelerator reports no fp16
support: the only CUDA-specific part, DeepSpeed's device capability probe, is replaced; every
other line (DeepSpeed's fp16 ZeRO optimizers and loss scaler, our loop) runs as on a GPU, on
CPU fp16 tensors.

  python tests/scripts/fp16_on_cpu.py TASK --recipe R [key=value ...]
"""
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator  # noqa: E402

CPU_Accelerator.is_fp16_supported = lambda self: True  # noqa: E731  (torch runs fp16 on any CPU, slowly)

from llmtrain.cli import run  # noqa: E402

# spawned data-preparation workers re-import this file: the work runs only in the launched process
if __name__ == "__main__":
    sys.exit(run(sys.argv[1], sys.argv[2:]))
