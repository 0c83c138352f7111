"""Batch- and world-size-invariant sampling for HF generate: Gumbel-max with a per-row seed.

HF `generate(do_sample=True)` draws with `torch.multinomial` from the *global* RNG, so a sample
depends on every other row of the batch, on the rank and on every draw before it (measured: a batch
of 64 vs the same prompts in two batches of 32 agree on 15/64 completions). Rollouts here run
`generate` greedily with this logits processor, which adds Gumbel noise drawn from a generator
seeded by (seed, row key, token index):

    argmax_v (z_v / T + g_v),  g_v = -log(-log u_v),  u_v ~ U(0, 1)    is a draw from softmax(z / T)

(the Gumbel-max trick), restricted to the top-p nucleus. A completion is then a pure function of
(seed, row key, weights): the same on 1 or N ranks, in any batch, after a resume, with no RNG state
in the checkpoint. The row key is (rollout index, prompt position in the stream, sample index).

Cost: one small CPU generator per row per decoding step (V uniforms each); on a GPU with hundreds
of rows a counter-based hash on the device would replace it (not done here).
"""
from __future__ import annotations

import hashlib

import torch


def row_seed(seed: int, key: tuple, t: int) -> int:
    """A 63-bit seed for token t of the row with this key (blake2b: stable across processes and runs)."""
    h = hashlib.blake2b(repr((seed, key, t)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def top_p_mask(z: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches top_p (the most likely always kept)."""
    sorted_z, order = torch.sort(z, descending=True, dim=-1)
    probs = torch.softmax(sorted_z, dim=-1)
    drop_sorted = probs.cumsum(-1) - probs > top_p  # the mass before this token already reaches top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return z.masked_fill(drop, float("-inf"))


class GumbelSampler:
    """LogitsProcessor: (input_ids (B, L), scores (B, V)) -> scores whose argmax is the sample."""

    def __init__(self, seed: int, row_keys: list, prompt_width: int, temperature: float = 1.0, top_p: float = 1.0):
        self.seed, self.row_keys, self.prompt_width = seed, row_keys, prompt_width
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1] - self.prompt_width  # index of the token being drawn
        z = scores.float() / self.temperature
        if self.top_p < 1.0:
            z = top_p_mask(z, self.top_p)
        u = torch.stack([torch.rand(z.shape[-1], generator=torch.Generator().manual_seed(row_seed(self.seed, k, t)))
                         for k in self.row_keys]).to(z.device)  # (B, V)
        return z + -torch.log(-torch.log(u.clamp(min=1e-20)))
