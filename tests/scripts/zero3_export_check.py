"""torchrun helper for test_zero3_export_equals_in_memory_model: train under ZeRO-3, export, compare logits.

The engine's own (sharded, gathered-on-the-fly) forward is the reference; the exported final/
directory is loaded independently with AutoModelForCausalLM.from_pretrained on rank 0.
"""
import os
import sys


import torch  # noqa: E402

from llmtrain import distributed as dist
from llmtrain.train import export  # noqa: E402
from llmtrain.config import load_config  # noqa: E402
from llmtrain.train.loop import train_loop  # noqa: E402
from llmtrain.train.runner import setup  # noqa: E402
from llmtrain.objectives import SFT  # noqa: E402

# spawned data-preparation workers re-import this file: the work runs only in the launched process
if __name__ == "__main__":
    cfg = load_config(sys.argv[1], [])
    run = setup(cfg, SFT.from_config(cfg))
    assert run.stage == 3
    # ZeRO-3: built under zero.Init, every parameter is a partition; this rank holds about 1/world of it
    params = list(run.engine.module.parameters())
    assert all(hasattr(p, "ds_id") for p in params)
    local, full = sum(p.ds_tensor.numel() for p in params), sum(p.ds_numel for p in params)
    assert local <= full // 2 + 1024 * len(params), (local, full)
    train_loop(run)
    probe = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    run.engine.eval()
    with torch.no_grad():
        live = run.engine(input_ids=probe, use_cache=False).logits.float()
    final = os.path.join(cfg.output_dir, "final")
    export.export_hf(run.engine, run.tokenizer, final, run.stage)
    if dist.is_main():
        from transformers import AutoModelForCausalLM

        loaded = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
        with torch.no_grad():
            exported = loaded(input_ids=probe, use_cache=False).logits.float()
        diff = (live - exported).abs().max().item()
        print(f"EXPORT_MATCH max_abs_diff={diff:.3g}" if diff < 1e-4 else f"EXPORT_MISMATCH {diff}", flush=True)
        if diff >= 1e-4:
            sys.exit(1)
    run.logger.close()
    dist.shutdown()
