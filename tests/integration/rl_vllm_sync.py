"""Run by tests/integration/test_rl.py under torchrun (2 ranks), with the pure-PyTorch vLLM stand-in
(tests/integration/fake_vllm) on PYTHONPATH: rl.generation_backend=vllm's weight sync and generation.

* ZeRO-3 (every parameter partitioned), after an optimizer step: the weights vLLM holds after a sync
  == the engine's parameters gathered independently (all at once), bitwise; no push without an update.
* greedy completions through the backend == the hf backend's greedy generation on the engine.
* LoRA (+ lm_head in modules_to_save) under ZeRO-3: vLLM gets W + (alpha/r) B @ A (hand formula) for
  every adapted linear, the trained lm_head copy, and the training weights stay unmerged.
Prints "rl vllm sync ok" on each rank.

  torchrun --nproc_per_node 2 --master_port P tests/integration/rl_vllm_sync.py MODEL_DIR
"""
import os
import sys
from types import SimpleNamespace

import torch


def engine_for(model_dir, lora, tok):
    import deepspeed

    from llmtrain.config import ModelConfig
    from llmtrain.models.loading import load_model

    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": 2,
           "optimizer": {"type": "AdamW", "params": {"lr": 5e-2, "torch_adam": True}},
           "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    model = load_model(ModelConfig(name_or_path=model_dir), lora, 0, tok, cfg, "fp32", torch.device("cpu"))
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=cfg)
    assert all(p.ds_tensor.numel() < p.ds_numel for p in engine.module.parameters() if p.ds_numel > 1)
    return engine


def step(engine, rank):
    ids = torch.tensor([[5 + rank, 17, 33, 9, 41, 12]])
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()


def gathered_state(engine):
    """Every parameter of the engine's model, gathered all at once (the independent reference)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        return {n: p.data.clone() for n, p in engine.module.named_parameters()}


def main(model_dir: str) -> None:
    import deepspeed
    from transformers import AutoTokenizer

    from llmtrain.config import LoraConfig, ModelConfig, RLConfig
    from llmtrain.objectives.rl import vllm_backend
    from llmtrain.objectives.rl.generation import generate, generation_mode

    deepspeed.init_distributed(dist_backend="gloo")
    rank = int(os.environ["RANK"])
    info = SimpleNamespace(rank=rank, local_rank=rank, world_size=2)
    tok = AutoTokenizer.from_pretrained(model_dir)
    stops = [tok.eos_token_id, 9]
    r = RLConfig(generation_backend="vllm", num_generations=2, max_new_tokens=6, vllm_sleep=False)
    m = ModelConfig(name_or_path=model_dir)

    # --- full weights, ZeRO-3 ---
    engine = engine_for(model_dir, LoraConfig(), tok)
    step(engine, rank)
    backend = vllm_backend.VLLMBackend(r, m, "float32", 3, info, max_model_len=64)
    fake = backend.llm.model.hf
    want = gathered_state(engine)
    assert any(not torch.equal(want[n], p) for n, p in fake.named_parameters())  # vLLM: the starting weights
    assert backend.sync(engine, 3) and not backend.sync(engine, 3)  # pushed once; no update, no push
    got = dict(fake.named_parameters())
    assert set(got) == set(want), (set(got) ^ set(want))
    for n in want:
        assert torch.equal(got[n], want[n]), n

    # --- greedy: backend == hf backend on the engine ---
    prompts = [[7 + i, 20 + rank][: 1 + (i + rank) % 2] * (1 + i) for i in range(5)]  # differing lengths
    with generation_mode(engine, 3, True):
        want_greedy = generate(engine.module, prompts, keys=None, seed=0, temperature=1.0, top_p=1.0,
                               max_new_tokens=6, stop_ids=stops, pad_id=tok.pad_token_id, batch_size=3,
                               synced_gpus=False, device="cpu")
    got_greedy = backend.greedy(engine, 3, prompts, 6, stops)
    assert got_greedy == want_greedy, (rank, got_greedy, want_greedy)
    # a rollout: one request per prompt (n = num_generations), generate's (ids, truncated) form, in order
    rep = [p for p in prompts[:2] for _ in range(2)]
    keys = [(0, 10 * rank + i, g) for i in range(2) for g in range(2)]
    outs = backend.rollout(engine, 3, rep, keys, stops)
    assert len(outs) == 4 and backend.syncs == 1
    for ids, truncated in outs:
        assert 1 <= len(ids) <= 6 and (truncated == (ids[-1] not in stops)) and not any(t in stops for t in ids[:-1])
    step(engine, rank)  # an update: the next generate pushes again
    backend.rollout(engine, 3, rep, keys, stops)
    assert backend.syncs == 2

    # --- LoRA (+ modules_to_save) under ZeRO-3: merged weights ---
    lo = LoraConfig(enabled=True, r=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                    modules_to_save=["lm_head"])
    engine = engine_for(model_dir, lo, tok)
    step(engine, rank)
    backend = vllm_backend.VLLMBackend(r, m, "float32", 3, info, max_model_len=64)
    assert backend.sync(engine, 3)
    state = gathered_state(engine)
    got = dict(backend.llm.model.hf.named_parameters())
    prefix = "base_model.model."
    seen = set()
    for n, p in got.items():
        stem = n.rsplit(".", 1)[0]
        a, b = state.get(f"{prefix}{stem}.lora_A.default.weight"), state.get(f"{prefix}{stem}.lora_B.default.weight")
        if a is not None:  # W + (alpha / r) B @ A
            assert b.abs().max() > 0  # the step moved B off zero: the merge is visible
            want_w = state[f"{prefix}{stem}.base_layer.weight"] + (8.0 / 4) * (b @ a)
            assert torch.allclose(p, want_w, rtol=1e-6, atol=1e-7), n
            seen.add("lora")
        elif stem == "lm_head":
            trained = state[f"{prefix}lm_head.modules_to_save.default.weight"]
            assert not torch.equal(trained, state[f"{prefix}lm_head.original_module.weight"])
            assert torch.equal(p, trained), n
            seen.add("saved")
        else:
            assert torch.equal(p, state[prefix + n]), n
    assert seen == {"lora", "saved"}
    assert torch.equal(gathered_state(engine)[f"{prefix}model.layers.0.self_attn.q_proj.base_layer.weight"],
                       state[f"{prefix}model.layers.0.self_attn.q_proj.base_layer.weight"])  # never merged in place
    deepspeed.comm.barrier()
    print(f"rank {rank}: rl vllm sync ok", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
