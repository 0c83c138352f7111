"""Pure-PyTorch stand-ins for the two flash-attn 2 kernels transformers calls, and the switch that
installs them, so the flash_attention_2 path runs on a CPU.

Why: packing bugs on the flash path (samples attending to each other, padding joining a sample,
wrong max lengths) live in *our* collate/kwargs and in transformers' `_flash_attention_forward`,
not in the CUDA kernel. With these stand-ins every line of that path runs on CPU for real; only
the compiled kernel is replaced. They are slow (a Python loop over sequences, O(L^2) memory each)
and meant for tests and laptop debugging, never for training.

Installed at the one point where transformers imports a kernel:
`transformers.modeling_flash_attention_utils._lazy_imports`, which returns
(flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache, pad_input, unpad_input).
transformers then derives the kernel's supported keyword arguments from the signatures below
(same as flash-attn 2.8's), so the kwargs it passes are exactly those it would pass to the real
kernel. Loading a model with attn_implementation="flash_attention_2" also runs transformers'
environment check (flash-attn package present, CUDA device); `install()` skips only that check and
keeps the model-support one (`_supports_flash_attn`).

Runs use it through `LLMTRAIN_FLASH_REFERENCE=1` (see `models.choose_attention`); it never
replaces a real kernel: on CUDA with flash-attn installed the switch is ignored.

Kernel contracts checked here as the CUDA kernel checks or silently assumes them: cu_seqlens are
int32, start at 0, never decrease, and cover every token (a token outside every segment would be
left unwritten); max_seqlen is an int no smaller than the longest segment (the kernel sizes its
grid from it and would skip the rest). Unlike the kernel, fp32 inputs are accepted (for exact CPU
comparisons); `models.choose_attention` refuses flash_attention_2 with fp32 for that reason.
"""
from __future__ import annotations

import math
import os

import torch

ENV_SWITCH = "LLMTRAIN_FLASH_REFERENCE"


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, causal: bool,
            window_size: tuple[int, int], softcap: float, dropout_p: float) -> torch.Tensor:
    """One sequence: q (Lq, Hq, D), k/v (Lk, Hk, D) -> (Lq, Hq, D), computed in fp32 (or fp64).

    flash-attn semantics: causal and window are aligned to the bottom-right corner (query i sits at
    key position i + Lk - Lq), key j is visible when i' - left <= j <= i' + right with i' that
    position (-1 = unbounded; causal forces right = 0), GQA head h reads kv head h // (Hq // Hk),
    and a query that sees no key outputs zeros.
    """
    lq, hq, _ = q.shape
    lk, hk, _ = k.shape
    if hq % hk:
        raise ValueError(f"flash reference: {hq} query heads are not a multiple of {hk} key/value heads")
    k = k.repeat_interleave(hq // hk, dim=1)  # (Lk, Hk, D) -> (Lk, Hq, D)
    v = v.repeat_interleave(hq // hk, dim=1)
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32 accumulation, as the kernel's (fp64 stays fp64)
    scores = torch.einsum("qhd,khd->hqk", q.to(acc), k.to(acc)) * softmax_scale  # (Hq, Lq, Lk)
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    left, right = window_size
    if causal:
        right = 0
    query_pos = torch.arange(lq, device=q.device)[:, None] + (lk - lq)  # (Lq, 1)
    key_pos = torch.arange(lk, device=q.device)[None, :]  # (1, Lk)
    visible = torch.ones((lq, lk), dtype=torch.bool, device=q.device)
    if left >= 0:
        visible &= key_pos >= query_pos - left
    if right >= 0:
        visible &= key_pos <= query_pos + right
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with no visible key -> zeros
    if dropout_p > 0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p)
    return torch.einsum("hqk,khd->qhd", probs, v.to(acc)).to(q.dtype)


def _check_unsupported(alibi_slopes, return_attn_probs, block_table=None) -> None:
    if alibi_slopes is not None or return_attn_probs or block_table is not None:
        raise NotImplementedError("flash reference: alibi_slopes, return_attn_probs and block_table are not implemented")


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """Dense: q (B, Lq, Hq, D), k/v (B, Lk, Hk, D) -> (B, Lq, Hq, D); every row is one sequence."""
    _check_unsupported(alibi_slopes, return_attn_probs)
    if q.dim() != 4:
        raise ValueError(f"flash reference: flash_attn_func takes (batch, seqlen, heads, dim), got {tuple(q.shape)}")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    rows = [_attend(q[b], k[b], v[b], scale, causal, tuple(window_size), softcap, dropout_p) for b in range(q.shape[0])]
    return torch.stack(rows)


def _segments(cu_seqlens: torch.Tensor, total: int, max_seqlen, name: str) -> list[tuple[int, int]]:
    """The contracts the CUDA kernel relies on; returns (start, end) of every segment."""
    if not torch.is_tensor(cu_seqlens) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
        raise TypeError(f"flash reference: cu_seqlens_{name} must be a 1-D int32 tensor, got "
                        f"{getattr(cu_seqlens, 'dtype', type(cu_seqlens))}")
    bounds = cu_seqlens.tolist()  # a device sync, fine for a CPU stand-in
    lengths = [e - s for s, e in zip(bounds, bounds[1:])]
    if bounds[0] != 0 or any(n < 0 for n in lengths) or bounds[-1] != total:
        raise ValueError(f"flash reference: cu_seqlens_{name}={bounds} must rise from 0 to the token count {total}")
    if isinstance(max_seqlen, torch.Tensor):
        max_seqlen = int(max_seqlen)  # the real kernel takes an int: a tensor costs a sync there
    if lengths and max_seqlen < max(lengths):
        raise ValueError(f"flash reference: max_seqlen_{name}={max_seqlen} is below the longest segment {max(lengths)}")
    return list(zip(bounds, bounds[1:]))


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """Varlen: q (Tq, Hq, D), k/v (Tk, Hk, D), sequence s = tokens [cu[s], cu[s+1]) -> (Tq, Hq, D)."""
    _check_unsupported(alibi_slopes, return_attn_probs, block_table)
    if q.dim() != 3:
        raise ValueError(f"flash reference: flash_attn_varlen_func takes (tokens, heads, dim), got {tuple(q.shape)}")
    seg_q = _segments(cu_seqlens_q, q.shape[0], max_seqlen_q, "q")
    seg_k = _segments(cu_seqlens_k, k.shape[0], max_seqlen_k, "k")
    if len(seg_q) != len(seg_k):
        raise ValueError(f"flash reference: {len(seg_q)} query segments but {len(seg_k)} key segments")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    outs = [_attend(q[qs:qe], k[ks:ke], v[ks:ke], scale, causal, tuple(window_size), softcap, dropout_p)
            for (qs, qe), (ks, ke) in zip(seg_q, seg_k)]
    return torch.cat(outs) if outs else q.new_zeros(q.shape)


# --------------------------------------------------------------------------- installation

_saved: dict = {}  # what install() replaced, for uninstall()


def real_kernel_available(device: torch.device | None = None) -> bool:
    """flash-attn installed and (the given device, else this machine) is CUDA."""
    import importlib.util

    cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
    return cuda and importlib.util.find_spec("flash_attn") is not None


def _lazy_imports(implementation, attention_wrapper=None, allow_all_kernels=False):
    """Stands in for transformers' `_lazy_imports`: same return tuple, reference kernels, no KV-cache kernel."""
    from transformers import modeling_flash_attention_utils as fa_utils

    if implementation not in (None, "flash_attention_2"):
        raise ValueError(f"flash reference: only flash_attention_2 is stood in for, not {implementation}")
    # opaque to torch.compile, as the CUDA kernel (a custom op) is: dynamo does not trace the loop
    return _DENSE, _VARLEN, None, fa_utils._pad_input, fa_utils._unpad_input


_DENSE = torch.compiler.disable(flash_attn_func)  # signatures kept (functools.wraps): transformers reads them
_VARLEN = torch.compiler.disable(flash_attn_varlen_func)


def _flash_attn_can_dispatch(self, flash_attn_version: int, is_init_check: bool = False) -> bool:
    """transformers' model-support check stays; the flash-attn package / GPU presence check is what goes."""
    if not self._supports_flash_attn:
        raise ValueError(f"{type(self).__name__} does not support Flash Attention {flash_attn_version}")
    if flash_attn_version != 2:
        raise ValueError(f"flash reference: only Flash Attention 2 is stood in for, not {flash_attn_version}")
    return True


def install() -> None:
    """Route transformers' flash_attention_2 kernel import to the functions above (idempotent)."""
    from transformers import modeling_flash_attention_utils as fa_utils
    from transformers.modeling_utils import PreTrainedModel

    if _saved:
        return
    _saved.update(lazy_imports=fa_utils._lazy_imports, can_dispatch=PreTrainedModel._flash_attn_can_dispatch)
    fa_utils._lazy_imports = _lazy_imports
    fa_utils._loaded_implementation = None  # a kernel loaded earlier is looked up again, through _lazy_imports
    PreTrainedModel._flash_attn_can_dispatch = _flash_attn_can_dispatch


def uninstall() -> None:
    """Undo install() (tests): models built meanwhile keep flash_attention_2 but find no kernel."""
    from transformers import modeling_flash_attention_utils as fa_utils
    from transformers.modeling_utils import PreTrainedModel

    if not _saved:
        return
    fa_utils._lazy_imports = _saved.pop("lazy_imports")
    PreTrainedModel._flash_attn_can_dispatch = _saved.pop("can_dispatch")
    fa_utils._loaded_implementation = None


def install_if_requested(device: torch.device | None = None) -> bool:
    """LLMTRAIN_FLASH_REFERENCE=1 and no real kernel for `device`: install the stand-ins; True if installed."""
    if os.environ.get(ENV_SWITCH) != "1" or real_kernel_available(device):
        return False
    install()
    return True
