"""Does DeepSpeed's engine.backward apply the fp16 loss scale under ZeRO-0? (0.19.8: no, see
deepspeedai/DeepSpeed#8393; llmtrain refuses fp16 + ZeRO-0 because of it.) Prints the gradient
of sum(w . x) w.r.t. w for x = 1 after engine.backward with a static loss scale of 1024: 1.0
unscaled, 1024.0 when DeepSpeed scales the loss as its optimizer's step() expects.

  MASTER_PORT=N python tests/scripts/ds_zero0_fp16_probe.py
"""
import os

os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", DS_ACCELERATOR="cpu")

import torch  # noqa: E402
from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator  # noqa: E402

CPU_Accelerator.is_fp16_supported = lambda self: True  # noqa: E731

import deepspeed  # noqa: E402

model = torch.nn.Linear(4, 1).half()
config = {"train_batch_size": 1, "zero_optimization": {"stage": 0},
          "fp16": {"enabled": True, "loss_scale": 1024},
          "optimizer": {"type": "AdamW", "params": {"lr": 0.0, "torch_adam": True}}}
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
engine.backward(engine(torch.ones(1, 4, dtype=torch.float16)).float().sum())
print(f"optimizer={type(engine.optimizer).__name__} grad={float(model.weight.grad[0, 0])}")
