"""flash_attention_2 with packed rows: samples never see each other, for any micro_batch_size.

On CPU these run transformers' real flash path (`flash_attention_forward` ->
`_flash_attention_forward`), our collate and our kwargs, with only the compiled kernels replaced
by the pure-PyTorch ones of llmtrain/models/flash_reference.py; on a CUDA machine with flash-attn
installed the same tests run the real kernels (bf16, looser tolerance). Every expected value is an
independent computation: each sequence run alone through sdpa, or plain masked softmax attention.
`pytest -k "flash and packed"` selects them all.
"""
from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

from conftest import (BIN, REPO, TINY, TOKENIZER, base_recipe, free_port, python_cmd, read_metrics, run_cmd,
                      write_recipe)
from llmtrain.models import flash_reference
from llmtrain.data.batching import collate_sequences, pack_next_fit
from llmtrain.data.labels import IGNORE_INDEX
from llmtrain.losses import causal_lm_loss
from llmtrain.objectives import lm_forward as tasks
from llmtrain.objectives.dpo import pair_logps
from llmtrain.objectives.lm_forward import lm_forward_logps

# tiny models whose attention differs: GQA everywhere; a sliding window shorter than the longer
# sequences on Mistral (every layer) and Qwen2 (the second layer); GPT-2 learned positions
ARCHS = {
    "llama": dict(TINY["llama"]),
    "qwen2": {**TINY["qwen2"], "use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1},
    "mistral": {**TINY["mistral"], "sliding_window": 6},
    "gpt2": dict(TINY["gpt2"]),
}


@pytest.fixture(scope="module")
def kernels():
    """(device, dtype, tolerance): the real kernels where they exist, else the reference on CPU."""
    if flash_reference.real_kernel_available():
        yield torch.device("cuda"), torch.bfloat16, 5e-3
        return
    flash_reference.install()
    yield torch.device("cpu"), torch.float32, 2e-5
    flash_reference.uninstall()


class _Engine:
    """What the loop hands the task: something with `.module` that forwards kwargs to it."""

    def __init__(self, model):
        self.module = model

    def __call__(self, **kw):
        return self.module(**kw)


def flash_and_sdpa_models(arch: str, device, dtype):
    """The same weights twice: flash_attention_2 (under test) and sdpa (the independent oracle)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    spec = dict(ARCHS[arch])
    config = AutoConfig.for_model(spec.pop("model_type"), vocab_size=len(tok), pad_token_id=tok.pad_token_id, **spec)
    torch.manual_seed(0)
    flash = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="flash_attention_2", dtype=dtype)
    sdpa = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa", dtype=dtype)
    sdpa.load_state_dict(flash.state_dict())
    assert flash.config._attn_implementation == "flash_attention_2"
    return flash.to(device).eval(), sdpa.to(device).eval(), tok


def random_sequences(n: int, vocab: int, seed: int, lengths=(3, 16)):
    """Sequences with a masked 'prompt' of 1-3 tokens; several longer than the sliding window."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(3, vocab, int(rng.integers(*lengths))).astype(np.int32)
        labels = ids.copy()
        labels[: int(rng.integers(1, 4))] = IGNORE_INDEX
        out.append((ids, labels))
    return out


def micro_batches(rows: list[list], mbs: int, pad_id: int) -> list[dict]:
    return [collate_sequences(rows[i:i + mbs], pad_id) for i in range(0, len(rows), mbs)]


def to(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def loss_and_grads(model, batches: list[dict], weight: int, device):
    """Sum of the micro-batch losses (each already divided by the global target count), and the
    accumulated gradients: what one optimizer step of the loop sees."""
    model.zero_grad(set_to_none=True)
    total = 0.0
    for batch in batches:
        token_logps, targets = lm_forward_logps(_Engine(model), to(batch, device))
        loss = causal_lm_loss(token_logps, targets, weight)[0]
        loss.backward()
        total += loss.item()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return total, grads


def each_alone(model, seqs, weight: int, device):
    """The oracle: every sequence in its own forward, no packing, no padding, sdpa attention."""
    return loss_and_grads(model, [collate_sequences([[s]], 0) for s in seqs], weight, device)


def assert_close_grads(got: dict, want: dict, tol: float, what: str):
    """Per parameter, the gradient's error relative to its norm (elementwise closeness is
    meaningless for bf16 gradients of near-zero entries). Measured on CPU: ~5e-7 in fp32 and
    ~1.3e-2 in bf16 when right; 0.47-1.0 when packed samples attend to each other."""
    assert got.keys() == want.keys()
    for name in want:
        err = (got[name] - want[name]).norm() / want[name].norm().clamp(min=1e-12)
        assert err < tol, f"{what}: {name}: relative gradient error {err:.2e} >= {tol:.0e}"


# --------------------------------------------------------------------------- the kernel itself


def _plain_attention(q, k, v, segments, scale, window, softcap):
    """Masked softmax attention over all tokens at once: one (T, T) mask from segment ids and
    positions (independent of the reference's per-segment loop). q (T, Hq, D), k/v (T, Hk, D)."""
    seg = torch.cat([torch.full((e - s,), i) for i, (s, e) in enumerate(segments)])
    pos = torch.cat([torch.arange(e - s) for s, e in segments])
    mask = (seg[:, None] == seg[None, :]) & (pos[None, :] <= pos[:, None])
    if window is not None:
        mask &= pos[:, None] - pos[None, :] < window
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = torch.einsum("ihd,jhd->hij", q.double(), k.double()) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("hij,jhd->ihd", probs, v.double())


@pytest.mark.parametrize("window,softcap", [(None, 0.0), (4, 0.0), (None, 5.0)])
def test_flash_reference_kernel_equals_plain_masked_attention_for_packed_segments(window, softcap):
    g = torch.Generator().manual_seed(0)
    lengths = [5, 1, 9, 3]
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
    T = sum(lengths)
    q = torch.randn(T, 4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(T, 2, 8, generator=g, dtype=torch.float64, requires_grad=True)  # GQA: 2 kv heads
    v = torch.randn(T, 2, 8, generator=g, dtype=torch.float64, requires_grad=True)
    segments = list(zip(cu.tolist(), cu.tolist()[1:]))
    flash_window = (window - 1, window - 1) if window else (-1, -1)  # how transformers passes a window
    got = flash_reference.flash_attn_varlen_func(q, k, v, cu, cu, max(lengths), max(lengths), softmax_scale=0.3,
                                                 causal=True, window_size=flash_window, softcap=softcap)
    want = _plain_attention(q, k, v, segments, 0.3, window, softcap)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    grad_out = torch.randn(got.shape, generator=g, dtype=torch.float64)
    got_grads = torch.autograd.grad(got, (q, k, v), grad_out)
    want_grads = torch.autograd.grad(want, (q, k, v), grad_out)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # dense = one segment per row; default scale is 1/sqrt(D)
    dense = flash_reference.flash_attn_func(q[None, :5], k[None, :5], v[None, :5], causal=True, window_size=flash_window,
                                            softcap=softcap)
    torch.testing.assert_close(dense[0], _plain_attention(q[:5], k[:5], v[:5], [(0, 5)], 8 ** -0.5, window, softcap))


def test_flash_reference_kernel_aligns_causal_bottom_right_and_zeroes_blind_queries():
    """flash-attn's documented mask for seqlen_q != seqlen_k (2 queries, 5 keys: rows 11110, 11111;
    5 queries, 2 keys: first three rows see nothing and output 0)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, 1, 4, generator=g) for n in (2, 5, 5))
    out = flash_reference.flash_attn_func(q, k, v, causal=True)
    scores = torch.einsum("qd,kd->qk", q[0, :, 0], k[0, :, 0]) / 2
    keep = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    want = scores.masked_fill(~keep, float("-inf")).softmax(-1) @ v[0, :, 0]
    torch.testing.assert_close(out[0, :, 0], want)
    out = flash_reference.flash_attn_func(torch.randn(1, 5, 1, 4, generator=g), k[:, :2], v[:, :2], causal=True)
    assert out[0, :3].abs().sum() == 0 and out[0, 3:].abs().sum() > 0


def test_flash_reference_kernel_enforces_the_cuda_kernel_contracts():
    q = torch.randn(6, 2, 8)
    good = torch.tensor([0, 2, 6], dtype=torch.int32)
    with pytest.raises(TypeError, match="int32"):
        flash_reference.flash_attn_varlen_func(q, q, q, good.long(), good.long(), 4, 4, causal=True)
    with pytest.raises(ValueError, match="token count"):  # a token outside every segment
        short = torch.tensor([0, 2, 5], dtype=torch.int32)
        flash_reference.flash_attn_varlen_func(q, q, q, short, short, 4, 4, causal=True)
    with pytest.raises(ValueError, match="below the longest segment"):
        flash_reference.flash_attn_varlen_func(q, q, q, good, good, 3, 3, causal=True)


def test_flash_attention_choice_needs_the_kernel_and_half_precision(monkeypatch):
    """auto never picks flash-attn for fp32 (the kernels take fp16/bf16 only: the run would fail on
    its first forward); an explicit flash_attention_2 says why it cannot run, in one line."""
    from llmtrain.config import ConfigError
    from llmtrain.models.attention import choose_attention

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv(flash_reference.ENV_SWITCH, raising=False)
    monkeypatch.setattr(flash_reference, "real_kernel_available", lambda device=None: False)
    assert choose_attention("auto", cpu, torch.bfloat16) == "sdpa"
    assert choose_attention("eager", cpu, torch.float32) == "eager"
    with pytest.raises(ConfigError, match="needs a CUDA GPU and `pip install flash-attn`"):
        choose_attention("flash_attention_2", cpu, torch.bfloat16)
    monkeypatch.setattr(flash_reference, "real_kernel_available", lambda device=None: device.type == "cuda")
    assert choose_attention("auto", cuda, torch.bfloat16) == "flash_attention_2"
    assert choose_attention("auto", cuda, torch.float32) == "sdpa"
    with pytest.raises(ConfigError, match="needs train.precision=bf16 or fp16") as e:
        choose_attention("flash_attention_2", cuda, torch.float32)
    assert "\n" not in str(e.value)
    # the test hook: the reference kernels where the real ones are missing
    was_installed = bool(flash_reference._saved)
    monkeypatch.setenv(flash_reference.ENV_SWITCH, "1")
    try:
        assert choose_attention("flash_attention_2", cpu, torch.bfloat16) == "flash_attention_2"
        from transformers import modeling_flash_attention_utils as fa_utils

        assert fa_utils._lazy_imports("flash_attention_2")[1] is flash_reference._VARLEN
        assert choose_attention("auto", cpu, torch.bfloat16) == "sdpa"  # the hook never changes auto
    finally:
        if not was_installed:
            flash_reference.uninstall()


# --------------------------------------------------------------------------- collate


def test_flash_packed_collate_gives_each_sample_and_each_padding_tail_its_own_segment():
    seqs = [(np.arange(3, 3 + n, dtype=np.int32), np.arange(3, 3 + n, dtype=np.int32)) for n in (4, 2, 5, 3)]
    batch = collate_sequences([seqs[:2], seqs[2:3], seqs[3:]], pad_id=0)  # rows of 6, 5, 3 tokens -> width 6
    assert batch["input_ids"].shape == (3, 6)
    # flattened row-major: [4, 2] | [5, pad 1] | [3, pad 3]
    assert batch["cu_seq_lens"].tolist() == [0, 4, 6, 11, 12, 15, 18]
    assert batch["cu_seq_lens"].dtype == torch.int32
    assert batch["max_segment_len"] == 5 and type(batch["max_segment_len"]) is int
    empty = collate_sequences([], pad_id=0)  # a short rank's padding micro-batch
    assert empty["cu_seq_lens"].tolist() == [0, 1] and empty["max_segment_len"] == 1


# --------------------------------------------------------------------------- SFT / pretraining forward


@pytest.mark.parametrize("mbs", [1, 2, 4])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2"])
def test_flash_packed_equals_unpacked_losses_and_grads(kernels, arch, mbs):
    device, dtype, tol = kernels
    if arch == "gpt2" and dtype == torch.float32:
        # transformers' flash wrapper looks for an nn.Linear to pick the dtype of fp32 queries and
        # GPT-2 has only Conv1D (StopIteration); real runs are bf16/fp16 (choose_attention insists)
        dtype, tol = torch.bfloat16, 5e-3
    flash, sdpa, tok = flash_and_sdpa_models(arch, device, dtype)
    seqs = random_sequences(12, len(tok), seed=mbs)
    weight = int(sum((lab[1:] != IGNORE_INDEX).sum() for _, lab in seqs))
    rows = pack_next_fit(np.arange(len(seqs)), np.array([len(i) for i, _ in seqs]), 24)
    assert max(len(r) for r in rows) >= 2  # rows really hold several samples
    packed = micro_batches([[seqs[u] for u in row] for row in rows], mbs, tok.pad_token_id)
    unpacked = micro_batches([[s] for s in seqs], mbs, tok.pad_token_id)
    want_loss, want_grads = each_alone(sdpa, seqs, weight, device)
    for name, batches in (("packed", packed), ("unpacked", unpacked)):
        loss, grads = loss_and_grads(flash, batches, weight, device)
        assert loss == pytest.approx(want_loss, rel=tol, abs=tol), name
        assert_close_grads(grads, want_grads, 10 * tol, f"{arch} {name} mbs={mbs}")


def test_flash_packed_pretraining_windows_equal_each_document_alone(kernels):
    """collate_windows (pretraining rows split at document starts) feeds the same boundaries;
    with gradient checkpointing, as the cluster recipes run (the kwargs reach recomputed layers)."""
    from llmtrain.data.shards.rows import collate_windows

    device, dtype, tol = kernels
    flash, sdpa, tok = flash_and_sdpa_models("llama", device, dtype)
    flash.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    flash.train()  # checkpointing is active in training mode only (this model has no dropout)
    rng = np.random.default_rng(0)
    windows = []
    for _ in range(4):  # rows of 20 tokens, documents starting at random places
        starts = np.sort(rng.choice(np.arange(1, 20), 2, replace=False))
        windows.append((rng.integers(3, len(tok), 20).astype(np.int64), np.concatenate([[0], starts])))
    docs = [(p, np.concatenate([[IGNORE_INDEX], p[1:]])) for t, s in windows for p in np.split(t, s[s > 0])]
    weight = int(sum(len(p) - 1 for p, _ in docs))
    want, want_grads = each_alone(sdpa, docs, weight, device)
    batches = [collate_windows(windows[i:i + 2], tok.pad_token_id) for i in (0, 2)]  # micro_batch_size 2
    got, grads = loss_and_grads(flash, batches, weight, device)
    assert got == pytest.approx(want, rel=tol, abs=tol)
    assert_close_grads(grads, want_grads, 10 * tol, "pretrain")


def test_flash_packed_boundaries_come_from_collate_without_position_id_detection(kernels, monkeypatch):
    """No per-layer scan of position_ids (each call costs host-device syncs), the kernel gets
    Python ints for the max lengths, and sdpa keeps its inputs unchanged."""
    from transformers import modeling_flash_attention_utils as fa_utils

    device, dtype, _ = kernels
    flash, sdpa, tok = flash_and_sdpa_models("llama", device, dtype)
    calls = {"detect": 0, "varlen": []}
    detect = fa_utils.prepare_fa_kwargs_from_position_ids

    def counting_detect(*a, **k):
        calls["detect"] += 1
        return detect(*a, **k)
    monkeypatch.setattr(fa_utils, "prepare_fa_kwargs_from_position_ids", counting_detect)
    (impls, procs) = fa_utils.lazy_import_flash_attention("flash_attention_2")
    varlen = impls[1]

    def spy_varlen(*a, **k):
        calls["varlen"].append((type(k["max_seqlen_q"]), k["cu_seqlens_q"].tolist()))
        return varlen(*a, **k)
    monkeypatch.setattr(fa_utils, "_flash_varlen_fn", spy_varlen)
    batch = collate_sequences([random_sequences(3, len(tok), 0), random_sequences(2, len(tok), 1)], tok.pad_token_id)
    with torch.no_grad():
        flash(**tasks.model_inputs(flash, to(batch, device)))
        assert calls["detect"] == 0
        assert calls["varlen"] == [(int, batch["cu_seq_lens"].tolist())] * flash.config.num_hidden_layers
        # the old inputs at B == 1: transformers scans position_ids in every layer
        one_row = collate_sequences([random_sequences(3, len(tok), 0)], tok.pad_token_id)
        flash(input_ids=one_row["input_ids"].to(device), position_ids=one_row["position_ids"].to(device), use_cache=False)
        assert calls["detect"] == flash.config.num_hidden_layers
    assert set(tasks.model_inputs(sdpa, batch)) == {"input_ids", "position_ids", "use_cache"}


def test_sdpa_packed_rows_get_a_block_diagonal_mask_for_any_micro_batch_size():
    """transformers 5.24 builds the block-diagonal causal mask from restarting position_ids for
    B > 1 too (sdpa and eager), so sdpa/eager need no varlen kwargs; padding joins the last sample
    of its row, which is harmless: it comes after it, and causal attention never looks ahead."""
    from transformers import AutoConfig
    from transformers.masking_utils import create_causal_mask

    seqs = [(np.arange(3, 3 + n, dtype=np.int32),) * 2 for n in (3, 2, 4, 1)]
    batch = collate_sequences([seqs[:2], seqs[2:]], pad_id=0)  # rows [3, 2] and [4, 1]: no padding
    batch2 = collate_sequences([seqs[:1], seqs[1:]], pad_id=0)  # rows [3] + 4 padding and [2, 4, 1]
    for b in (batch, batch2):
        seq_of = b["seq_index"].clone()
        for r in range(seq_of.shape[0]):  # padding: same block as the row's last sample
            last = seq_of[r][seq_of[r] >= 0][-1]
            seq_of[r][seq_of[r] < 0] = last
        idx = torch.arange(seq_of.shape[1])
        want = (seq_of[:, :, None] == seq_of[:, None, :]) & (idx[None, None, :] <= idx[None, :, None])
        for attn in ("sdpa", "eager"):
            config = AutoConfig.for_model("llama", **{k: v for k, v in TINY["llama"].items() if k != "model_type"})
            config._attn_implementation = attn
            embeds = torch.zeros(*b["input_ids"].shape, 8)
            mask = create_causal_mask(config=config, inputs_embeds=embeds, attention_mask=None, cache=None,
                                      position_ids=b["position_ids"])
            mask = mask[:, 0] if attn == "sdpa" else mask[:, 0] == 0  # eager: additive 0 / -inf
            assert torch.equal(mask, want), attn


# --------------------------------------------------------------------------- DPO forward


def random_pairs(n: int, vocab: int, seed: int):
    """(chosen, rejected) sharing a prompt; labels only on the responses."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        prompt = rng.integers(3, vocab, int(rng.integers(3, 9)))
        pair = []
        for _ in range(2):
            response = rng.integers(3, vocab, int(rng.integers(2, 8)))
            ids = np.concatenate([prompt, response]).astype(np.int32)
            pair.append((ids, np.concatenate([np.full(len(prompt), IGNORE_INDEX), response]).astype(np.int32)))
        pairs.append(tuple(pair))
    return pairs


def response_logp_alone(model, ids, labels, device) -> float:
    """Summed log-prob of the response tokens, the sequence run alone (sdpa, no padding)."""
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(ids[None], dtype=torch.long, device=device), use_cache=False).logits
    logps = torch.log_softmax(logits[0, :-1].double(), -1)
    targets = torch.as_tensor(labels[1:], dtype=torch.long, device=device)
    keep = targets != IGNORE_INDEX
    return logps[keep].gather(-1, targets[keep][:, None]).sum().item()


def dpo_batches(pairs, packed: bool, mbs: int, pad_id: int):
    if packed:  # whole pairs packed into rows: the rejected answer follows its chosen one in the row
        rows = pack_next_fit(np.arange(len(pairs)), np.array([len(c[0]) + len(r[0]) for c, r in pairs]), 40)
        seq_rows = [[s for u in row for s in pairs[u]] for row in rows]
        assert any(len(row) >= 4 for row in seq_rows)
        return micro_batches(seq_rows, mbs, pad_id)
    return micro_batches([[s] for p in pairs for s in p], 2 * mbs, pad_id)  # chosen, rejected: one row each


def all_pair_logps(engine, batches, device) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([torch.stack(pair_logps(engine, to(b, device)), dim=1) for b in batches]).double()


@pytest.mark.parametrize("mbs", [1, 2, 4])
@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_flash_packed_dpo_pair_logps_equal_unpacked_and_each_response_alone(kernels, arch, mbs):
    device, dtype, tol = kernels
    flash, sdpa, tok = flash_and_sdpa_models(arch, device, dtype)
    pairs = random_pairs(10, len(tok), seed=mbs)
    want = torch.tensor([[response_logp_alone(sdpa, *s, device) for s in pair] for pair in pairs], dtype=torch.float64)
    for packed in (True, False):
        got = all_pair_logps(_Engine(flash), dpo_batches(pairs, packed, mbs, tok.pad_token_id), device).cpu()
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * 10, msg=f"packed={packed}")


def test_flash_packed_dpo_reference_forward_with_adapters_disabled(kernels):
    """The LoRA policy's reference (adapters disabled) and the policy itself, both through PEFT's
    wrapper (whose config llmtrain reads to choose the kwargs), packed with micro_batch_size 2."""
    from peft import LoraConfig, get_peft_model

    from llmtrain.objectives import reference

    device, dtype, tol = kernels
    flash, sdpa, tok = flash_and_sdpa_models("llama", device, dtype)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(1)
    policy = get_peft_model(flash, lora)
    torch.manual_seed(1)
    policy_sdpa = get_peft_model(sdpa, lora)
    policy_sdpa.load_state_dict(policy.state_dict())
    engine = _Engine(policy)
    assert reference.has_adapters(engine)
    pairs = random_pairs(8, len(tok), seed=7)
    batches = dpo_batches(pairs, True, 2, tok.pad_token_id)
    with reference.adapters_disabled(engine):
        ref = all_pair_logps(engine, batches, device).cpu()
        with policy_sdpa.disable_adapter():
            want_ref = torch.tensor([[response_logp_alone(policy_sdpa, *s, device) for s in p] for p in pairs],
                                    dtype=torch.float64)
    pol = all_pair_logps(engine, batches, device).cpu()
    want_pol = torch.tensor([[response_logp_alone(policy_sdpa, *s, device) for s in p] for p in pairs],
                            dtype=torch.float64)
    torch.testing.assert_close(ref, want_ref, rtol=tol, atol=tol * 10)
    torch.testing.assert_close(pol, want_pol, rtol=tol, atol=tol * 10)
    assert (pol - ref).abs().max() > 1e-3  # the adapters matter: the two checks are not one


# --------------------------------------------------------------------------- real runs on the flash path


def _run(tmp_path, recipe: dict, script: str, ranks: int = 1) -> list[dict]:
    """A real launcher run; LLMTRAIN_FLASH_REFERENCE=1 lets flash_attention_2 run on this CPU (it
    is ignored where the real kernel exists)."""
    path = write_recipe(tmp_path / f"{os.path.basename(recipe['output_dir'])}.yaml", recipe)
    if ranks > 1:
        cmd = [os.path.join(BIN, "torchrun"), "--nproc_per_node", str(ranks), "--master_port", str(free_port()),
               os.path.join(REPO, script), "--recipe", path]
    else:
        cmd = python_cmd(script, "--recipe", path)
    proc = run_cmd(cmd, timeout=400, env={flash_reference.ENV_SWITCH: "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    if recipe["model"]["attn_implementation"] == "flash_attention_2" and not flash_reference.real_kernel_available():
        assert "flash_attention_2 on the pure-PyTorch reference kernels" in proc.stdout
    return read_metrics(recipe["output_dir"])


def _assert_same_curves(flash_rows: list[dict], sdpa_rows: list[dict], keys: tuple[str, ...], atol: float):
    """bf16 runs: flash vs sdpa differ by <= ~4e-4 in loss when right (measured); the leak moved
    the SFT losses by ~4e-3 and the DPO losses by ~1.4e-2 on these settings."""
    assert len(flash_rows) == len(sdpa_rows)
    for f, s in zip(flash_rows, sdpa_rows):
        for key in keys:
            if key in s:
                assert f[key] == pytest.approx(s[key], abs=atol), (key, f, s)


@pytest.mark.multiproc
def test_flash_packed_sft_run_on_two_ranks_matches_the_sdpa_run(tiny_model_dir, tmp_path):
    """launch/sft.py, packed rows, micro_batch_size 2: flash_attention_2 on 2 ranks x accumulation 2
    logs the losses of sdpa on 1 rank x accumulation 4 (the same global batch)."""
    runs = {}
    for attn, ranks in (("flash_attention_2", 2), ("sdpa", 1)):
        recipe = base_recipe(tmp_path, tiny_model_dir, max_steps=4, precision="bf16", grad_accum=4 // ranks)
        recipe["output_dir"] = str(tmp_path / attn)
        recipe["model"]["attn_implementation"] = attn
        runs[attn] = _run(tmp_path, recipe, "launch/sft.py", ranks=ranks)
    _assert_same_curves(runs["flash_attention_2"], runs["sdpa"], ("loss",), 1.5e-3)


def _dpo_recipe(tmp_path, model_dir: str, attn: str, **train) -> dict:
    pairs = tmp_path / "pairs.jsonl"
    if not pairs.exists():
        with open(os.path.join(REPO, "data/demo/dpo_train.jsonl")) as f:
            pairs.write_text("".join(f.readlines()[:48]))
    recipe = base_recipe(tmp_path, model_dir, max_steps=3, precision="bf16", lr=5e-3, **train)
    recipe["output_dir"] = str(tmp_path / f"{attn}-{train.get('grad_accum', 2)}")
    recipe["model"]["attn_implementation"] = attn
    recipe["data"] = {"train": [str(pairs)], "eval": [os.path.join(REPO, "data/demo/dpo_eval.jsonl")],
                      "max_seq_len": 64, "max_prompt_len": 48, "packing": True}
    recipe["dpo"] = {"beta": 0.1, "loss": "sigmoid"}
    return recipe


@pytest.mark.slow  # four DPO runs (two of two ranks), ~3 min on 2 cores
@pytest.mark.multiproc
@pytest.mark.parametrize("reference_mode", ["frozen_copy", "precompute"])
def test_flash_packed_dpo_run_matches_the_sdpa_run(tiny_model_dir, tmp_path, reference_mode):
    """launch/dpo.py with packed pairs, micro_batch_size 2, eval: frozen-copy reference on 2 ranks
    (ZeRO-2), precomputed reference log-probs on 1 rank; policy, reference and eval all take the
    flash path, and log the sdpa run's losses, eval loss and reward margins."""
    runs = {}
    for attn in ("flash_attention_2", "sdpa"):
        train = {"eval_every": 3, "eval_max_batches": 2}
        recipe = _dpo_recipe(tmp_path, tiny_model_dir, attn, **train)
        recipe["deepspeed"]["config"] = os.path.join(REPO, "ds_configs/zero2.json")
        recipe["dpo"]["precompute_ref"] = reference_mode == "precompute"
        runs[attn] = _run(tmp_path, recipe, "launch/dpo.py", ranks=2 if reference_mode == "frozen_copy" else 1)
    assert any("eval_loss" in r for r in runs["sdpa"])
    _assert_same_curves(runs["flash_attention_2"], runs["sdpa"], ("loss", "eval_loss", "reward_margin"), 2e-3)


# --------------------------------------------------------------------------- online RL rollouts


def _rl_collate(seqs, pack_len):
    """RolloutData.collate alone (what it reads of itself: the pad id, the packing length, which rollout
    tensors exist); pack_len None: one sequence per row."""
    from types import SimpleNamespace

    from llmtrain.objectives.rl.rollout import RolloutData

    data = object.__new__(RolloutData)
    data.tok, data.pack_len = SimpleNamespace(pad_token_id=0), pack_len
    data.critic_values, data.ref_logps, data.need_old = None, None, False
    return data.collate(seqs)


def test_flash_packed_rl_rollout_logps_and_critic_values_equal_each_sequence_alone(kernels):
    """RL micro-batches packed (data.packing) and padded through flash: the policy's log-prob of each
    completion token, and the critic's value at each position (a sequence-classification model read at
    every position, PPO), == each prompt + completion alone through sdpa."""
    from transformers import AutoModelForSequenceClassification

    from llmtrain.losses import shift_labels, token_logps_from_logits
    from llmtrain.objectives.lm_forward import model_inputs
    from llmtrain.objectives.reward import position_values

    device, dtype, tol = kernels
    flash, sdpa, tok = flash_and_sdpa_models("qwen2", device, dtype)  # GQA + a sliding window
    rng = np.random.default_rng(3)
    seqs = [{"prompt": rng.integers(3, len(tok), int(rng.integers(2, 9))).tolist(),
             "completion": rng.integers(3, len(tok), int(rng.integers(1, 8))).tolist(), "adv": 0.0}
            for _ in range(7)]

    def completion_logps(model, batch, seqs):
        logits = model(**model_inputs(_Engine(model), to(batch, device))).logits
        logps = token_logps_from_logits(logits, shift_labels(batch["labels"]).to(device))
        return [logps[b, o + len(s["prompt"]) - 1: o + len(s["prompt"]) - 1 + len(s["completion"])].double().cpu()
                for (b, o), s in zip(batch["seq_loc"], seqs)]

    def values(model, batch, seqs):
        v = position_values(_Engine(model), to(batch, device))
        return [v[b, o: o + len(s["prompt"]) + len(s["completion"])].double().cpu()
                for (b, o), s in zip(batch["seq_loc"], seqs)]

    critic_config = copy.deepcopy(flash.config)
    critic_config.num_labels = 1
    critics = {}
    for impl in ("flash_attention_2", "sdpa"):
        torch.manual_seed(1)
        critics[impl] = AutoModelForSequenceClassification.from_config(copy.deepcopy(critic_config),
                                                                        attn_implementation=impl, dtype=dtype)
    critics["sdpa"].load_state_dict(critics["flash_attention_2"].state_dict())
    critics = {k: c.to(device).eval() for k, c in critics.items()}

    alone = [_rl_collate([s], None) for s in seqs]
    want_logps = [completion_logps(sdpa, b, [s])[0] for b, s in zip(alone, seqs)]
    want_values = [values(critics["sdpa"], b, [s])[0] for b, s in zip(alone, seqs)]
    for pack_len in (None, 24):
        batch = _rl_collate(seqs, pack_len)
        if pack_len:
            assert batch["input_ids"].shape[0] < len(seqs)  # rows really hold several sequences
        with torch.no_grad():
            got_logps = completion_logps(flash, batch, seqs)
            got_values = values(critics["flash_attention_2"], batch, seqs)
        for g, w in zip(got_logps, want_logps):
            torch.testing.assert_close(g, w, rtol=tol, atol=tol * 10, msg=f"logps, pack_len={pack_len}")
        for g, w in zip(got_values, want_values):
            torch.testing.assert_close(g, w, rtol=tol, atol=tol * 10, msg=f"values, pack_len={pack_len}")
