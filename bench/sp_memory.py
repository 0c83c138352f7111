"""Activation memory per rank vs sequence length with Ulysses sequence parallelism 1 and 2 (CPU, gloo).

    python bench/sp_memory.py [--lens 1024,2048,4096] [--packed 4] [--hidden 256 --layers 4 --vocab 8192]
                              [--tiled-mlp N]

Starts `torchrun --nproc_per_node 1 ... --sp 1` and `torchrun --nproc_per_node 2 ... --sp 2` itself
(one thread per rank) and prints one line per (SP, rank, sequence length, gradient checkpointing, MLP tiles).
Each measurement is one forward + backward of a small Llama through llmtrain's own SP path: a packed
row collated by `collate_sequences` (`--packed` samples per row; 1 = one sample), sliced by
`models.sequence_parallel.shard_batch`, DeepSpeed's Ulysses attention installed by
`models.sequence_parallel.register` (core: llmtrain's packed sdpa), log-probs by
`objectives.lm_forward.lm_forward_logps` (full logits, fp32), summed CE. No optimizer (activation
memory does not depend on it), no DeepSpeed engine (ZeRO does not change activations).
`--tiled-mlp N` measures every setting also with N MLP tiles (`parallel.tiled_mlp_shards`, through
`models.tiled_mlp.tile_mlp`); the `tiles` column says which (0 = untiled).

  saved_MiB  bytes autograd keeps for backward (saved_tensors_hooks, each storage counted once): the
             activation memory proper, independent of the allocator
  peak_MiB   peak RSS during forward+backward minus RSS before (VmHWM after /proc/self/clear_refs):
             with transient buffers (logits, the S x S sdpa mask, attention workspace)
The sdpa mask under SP is S x S for the whole row (the CPU path); GPUs run flash-attn, which keeps
no S x S state. Timings on a shared CPU machine are noise; memory figures are not.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sp", type=int, default=0, help="(set by the launcher) sequence-parallel size of this run")
    p.add_argument("--lens", default="1024,2048,4096", help="global row lengths, tokens")
    p.add_argument("--packed", type=int, default=1, help="samples per row")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--tiled-mlp", type=int, default=0, help="also measure with N MLP tiles (0: untiled only)")
    return p.parse_args(argv)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


class SavedBytes:
    """saved_tensors_hooks pack hook: the bytes of every storage autograd keeps, each counted once."""

    def __init__(self):
        self.seen, self.total = set(), 0

    def pack(self, t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.seen:
            self.seen.add(storage.data_ptr())
            self.total += storage.nbytes()
        return t

    def unpack(self, t):
        return t


def _row(length: int, samples: int, vocab: int, seed: int):
    import numpy as np

    from llmtrain.data.batching import collate_sequences

    rng = np.random.default_rng(seed)
    bounds = np.linspace(0, length, samples + 1).astype(int)
    seqs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        ids = rng.integers(3, vocab, b - a)
        seqs.append((ids, ids.copy()))
    return collate_sequences([seqs], pad_id=0)  # one row (1, length)


def measure(args) -> None:
    import torch
    import torch.distributed as tdist
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmtrain.losses import causal_lm_loss
    from llmtrain.models import sequence_parallel
    from llmtrain.models.tiled_mlp import tile_mlp, untile_mlp
    from llmtrain.objectives.lm_forward import lm_forward_logps

    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)  # DeepSpeed's comm layer (Ulysses needs it)
    rank, sp = tdist.get_rank(), args.sp
    cfg = AutoConfig.for_model("llama", hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                               num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                               vocab_size=args.vocab, max_position_embeddings=65536, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    if sp > 1:
        sequence_parallel.register(model, sp)
    lines = []
    tile_counts = (0, args.tiled_mlp) if args.tiled_mlp > 0 else (0,)
    settings = [(length, gc, tiles) for length in [int(x) for x in args.lens.split(",")] for gc in (False, True)
                for tiles in tile_counts]
    for length, gc, tiles in settings:
        for layer in model.model.layers:
            if tiles:
                tile_mlp(layer.mlp, tiles)
            else:
                untile_mlp(layer.mlp)
        if gc:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()
        batch = _row(length, args.packed, args.vocab, seed=length)
        model.zero_grad(set_to_none=True)
        tdist.barrier()
        before = _rss_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := current RSS (Linux >= 4.0)
        saved, t0 = SavedBytes(), time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            token_logps, targets = lm_forward_logps(model, batch)
            loss, _ = causal_lm_loss(token_logps, targets, length)
        loss.backward()
        sec = time.perf_counter() - t0
        peak = (_rss_kib("VmHWM") - before) / 1024
        lines.append(f"sp={sp} rank={rank} seq_len={length:6d} local_len={-(-length // sp):6d} gc={int(gc)} "
                     f"tiles={tiles:2d} saved_MiB={saved.total / 2**20:8.1f} peak_MiB={peak:8.1f} fwd+bwd_s={sec:.2f}")
        tdist.barrier()
    for r in range(tdist.get_world_size()):
        if r == rank:
            print("\n".join(lines), flush=True)
        tdist.barrier()
    tdist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args) -> None:
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
           "PYTHONPATH": REPO, "TOKENIZERS_PARALLELISM": "false"}
    print(f"settings: llama hidden={args.hidden} layers={args.layers} heads=8 kv_heads=4 vocab={args.vocab} fp32, "
          f"batch 1, {args.packed} sample(s) per row, sdpa (SP: llmtrain's packed sdpa under DeepSpeed Ulysses), "
          f"full fp32 logits + CE, no optimizer; 1 thread per rank; lens {args.lens}; "
          f"MLP tiles {'0 and %d' % args.tiled_mlp if args.tiled_mlp else '0'}", flush=True)
    for sp in (1, 2):
        cmd = [torchrun, "--nproc_per_node", str(sp), "--master_port", str(_free_port()), os.path.abspath(__file__),
               "--sp", str(sp), "--lens", args.lens, "--packed", str(args.packed), "--hidden", str(args.hidden),
               "--layers", str(args.layers), "--vocab", str(args.vocab), "--tiled-mlp", str(args.tiled_mlp)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        out = [line for line in proc.stdout.splitlines() if line.startswith("sp=")]
        print("\n".join(out) if out else proc.stdout[-2000:] + proc.stderr[-2000:], flush=True)


if __name__ == "__main__":
    a = _args()
    measure(a) if a.sp else launch(a)
