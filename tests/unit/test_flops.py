"""FLOPs per token and MFU: the formula against parameters counted by hand from config dimensions."""
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from llmtrain.train.flops import (flops_per_token, non_embedding_parameters, peak_flops, peak_flops_for_name,
                            throughput_columns)

VOCAB, H, INTER, LAYERS, HEADS, KV_HEADS, SEQ = 888, 64, 128, 2, 4, 2, 128


def llama(tied: bool):
    cfg = AutoConfig.for_model("llama", vocab_size=VOCAB, hidden_size=H, intermediate_size=INTER,
                               num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                               max_position_embeddings=256, tie_word_embeddings=tied)
    return AutoModelForCausalLM.from_config(cfg)


def llama_non_embedding_by_hand(tied: bool) -> int:
    head_dim = H // HEADS  # 16
    kv = KV_HEADS * head_dim  # 32
    attention = H * H + H * kv + H * kv + H * H  # q, k, v, o projections (no biases in Llama)
    mlp = 3 * H * INTER  # gate, up, down
    norms = 2 * H  # input + post-attention RMSNorm weights
    per_layer = attention + mlp + norms  # 4096 + 2048 + 2048 + 4096 + 24576 + 128 = 36992
    head = 0 if tied else VOCAB * H  # untied lm_head counts; the token embedding never does
    return LAYERS * per_layer + H + head  # + final norm


@pytest.mark.parametrize("tied", [False, True])
def test_llama_flops_per_token_matches_hand_count(tied):
    n = llama_non_embedding_by_hand(tied)
    assert n == (130880 if not tied else 74048)  # the arithmetic above, written out
    model = llama(tied)
    assert non_embedding_parameters(model) == n
    # 6N + 12 * L * H * T
    assert flops_per_token(model, SEQ) == 6 * n + 12 * LAYERS * H * SEQ


def test_gpt2_learned_position_embeddings_are_not_counted():
    cfg = AutoConfig.for_model("gpt2", vocab_size=VOCAB, n_embd=H, n_layer=LAYERS, n_head=HEADS, n_positions=256)
    model = AutoModelForCausalLM.from_config(cfg)
    per_layer = (H * 3 * H + 3 * H) + (H * H + H) + (H * 4 * H + 4 * H) + (4 * H * H + H) + 2 * 2 * H
    assert non_embedding_parameters(model) == LAYERS * per_layer + 2 * H  # + ln_f; wte/wpe and tied head excluded


def test_zero3_partitioned_parameters_counted_by_ds_numel():
    model = llama(tied=False)
    expected = non_embedding_parameters(model)
    for p in model.parameters():  # what ZeRO-3 leaves locally: empty shards with the full size aside
        p.ds_numel = p.numel()
        p.data = torch.empty(0)
    assert non_embedding_parameters(model) == expected


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L40S", 362e12), ("NVIDIA A10G", 125e12),
    ("NVIDIA GeForce RTX 4090", 165e12), ("Some Future GPU", None),
])
def test_peak_flops_lookup_by_device_name(name, peak):
    assert peak_flops_for_name(name) == peak


def test_mfu_is_per_gpu_throughput_times_flops_over_peak_and_omitted_on_cpu():
    row = throughput_columns(tokens_per_sec=1000.0, world_size=2, model_flops_per_token=10**9, peak=989e12)
    assert row["tflops_per_gpu"] == pytest.approx(0.5)  # 500 tok/s per GPU x 1e9 FLOPs
    assert row["mfu"] == pytest.approx(5e11 / 989e12)
    assert peak_flops(torch.device("cpu")) is None
    assert "mfu" not in throughput_columns(1000.0, 1, 10**9, peak_flops("cpu"))
