"""`llmtrain export` (= launch/export.py): merge a LoRA/DoRA adapter into its base model and write a full
safetensors model directory.

  llmtrain export --adapter runs/my-lora/final --out runs/my-lora/merged [--base PATH] [--dtype auto]
                  [--revision REV] [--trust-remote-code]
The base (and its hub revision) is read from the adapter's adapter_config.json unless --base
(--revision) is given; --trust-remote-code runs model code shipped with the base. The result loads
with AutoModelForCausalLM.from_pretrained and gives the base+adapter logits. One process, CPU is fine.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from ..errors import LlmtrainError
from .common import report

_DTYPES = ("auto", "fp32", "bf16", "fp16")


def main(argv: Optional[list[str]] = None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapter", required=True, help="PEFT adapter directory, e.g. <output_dir>/final of a LoRA run")
    p.add_argument("--out", required=True, help="directory to write the merged model to (replaced if it exists)")
    p.add_argument("--base", default=None, help="base model directory or hub id (default: from adapter_config.json)")
    p.add_argument("--dtype", default="auto", choices=_DTYPES, help="dtype of the merged weights (auto: the base's)")
    p.add_argument("--revision", default=None, help="hub revision of the base (default: the one adapter_config.json records)")
    p.add_argument("--trust-remote-code", action="store_true", help="run model code shipped with the base (only if you trust it)")
    args = p.parse_args(argv)
    dtype = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if os.path.abspath(args.out) == os.path.abspath(args.adapter):
        print("error: --out must differ from --adapter (the adapter would be replaced)", file=sys.stderr)
        return 2
    from ..models.lora import merge_into_base

    try:
        out = merge_into_base(args.adapter, args.out, base=args.base, dtype=dtype, revision=args.revision,
                              trust_remote_code=args.trust_remote_code)
    except LlmtrainError as e:
        return report(e)
    print(f"merged model written to {out}")
    return 0
