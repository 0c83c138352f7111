"""Tiled MLP (`parallel.tiled_mlp_shards`): every decoder MLP computes its rows in N tiles through
DeepSpeed's `TiledMLP` (ulysses_sp.py, part of Arctic Long Sequence Training), so the MLP's
intermediate activations (gate, up, act(gate) * up: ~3 x intermediate_size per token, 2.7-3.5x the
hidden size) exist for one tile at a time instead of the whole row. TiledMLP keeps only the MLP's
input for backward and recomputes each tile's forward there: one extra MLP forward per step.

What llmtrain adds to DeepSpeed's part, and why:
- per-instance patching after the model is loaded (the MLP instance's `forward`, not the transformers
  class), so other models of the process (DPO's frozen reference) are left alone;
- a fixed tile count on every rank. Under ZeRO-3 every tile's submodule call gathers the MLP's
  weights (a collective), so all ranks must make the same number of calls. TiledMLP splits with
  torch.chunk, which returns FEWER than N pieces for many lengths (6 rows in 4 -> 3 pieces of 2;
  fewer rows than N), and its backward then never marks the last tile (`ds_grad_is_ready` stays
  False: the gradient would not be reduced). DeepSpeed's example all-reduces the tile count (MAX),
  which neither fixes the chunk arithmetic nor comes free (a sync per MLP per forward). Instead the
  rows are zero-padded to a multiple of N (at least N): torch.chunk then returns exactly N equal
  tiles in forward (over the sequence) and in backward (over batch x sequence), on every rank,
  with no communication. The padded rows' outputs are sliced off, so their incoming gradient is 0
  and they add exactly nothing to any weight or input gradient (the backward is linear in it).
  Cost: a copy of the MLP input when the length is not a multiple of N.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from ..errors import ConfigError

MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def apply_tiled_mlp(model: torch.nn.Module, parallel) -> int:
    """Patch every `*.mlp` module of `model` (after loading, LoRA and fast paths; before
    deepspeed.initialize) to run in `parallel.tiled_mlp_shards` tiles. Returns the number patched;
    0 when the key is 0. One-line ConfigError when the MLPs are not gate/up/down MLPs."""
    shards = parallel.tiled_mlp_shards
    if shards <= 0:
        return 0
    mlps = [(name, m) for name, m in model.named_modules() if name.rsplit(".", 1)[-1] == "mlp"]
    bad = [name for name, m in mlps if not all(hasattr(m, a) for a in MLP_PROJECTIONS)]
    if not mlps or bad:
        model_type = getattr(getattr(model, "config", None), "model_type", "?")
        raise ConfigError(f"{parallel.where('parallel.tiled_mlp_shards')}: parallel.tiled_mlp_shards={shards} "
                          f"needs decoder MLPs with gate_proj/up_proj/down_proj (Llama, Qwen2, Mistral); "
                          f"the {model_type} model has {'none' if not mlps else bad[0]}")
    for _, mlp in mlps:
        tile_mlp(mlp, shards)
    return len(mlps)


def tile_mlp(mlp: torch.nn.Module, shards: int) -> None:
    """Replace this instance's forward by the tiled one (idempotent)."""
    if getattr(mlp, "_llmtrain_tiles", None) is not None:
        mlp._llmtrain_tiles = shards
        return
    untiled = mlp.forward  # bound method of the class (or of a fast path's replacement module)
    mlp._llmtrain_untiled_forward = untiled
    mlp._llmtrain_tiles = shards
    mlp.forward = types.MethodType(_tiled_forward, mlp)


def untile_mlp(mlp: torch.nn.Module) -> None:
    """Back to the untiled forward (a no-op on an untiled MLP)."""
    if getattr(mlp, "_llmtrain_tiles", None) is not None:
        mlp.forward = mlp._llmtrain_untiled_forward
        del mlp._llmtrain_untiled_forward, mlp._llmtrain_tiles


def _rows(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return mlp._llmtrain_untiled_forward(x)


def _tiled_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    shards = self._llmtrain_tiles
    seq = x.shape[-2]  # x: (B, S, H) or (S, H)
    padded = shards * max(1, -(-seq // shards))  # a multiple of N, at least N: exactly N tiles (module docstring)
    if padded != seq:
        x = F.pad(x, (0, 0, 0, padded - seq))  # (..., S, H) -> (..., padded, H), zero rows at the end
    # every parameter the tiles use (incl. LoRA's and biases): TiledMLP holds ZeRO's gradient
    # reduction back until the last tile's backward (ds_grad_is_ready), so it runs once per step
    compute_params = list(self.parameters())
    out = TiledMLP.apply(_rows, self, x, shards, compute_params)
    return out[..., :seq, :] if padded != seq else out
