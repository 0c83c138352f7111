"""Run by tests/integration/test_rl.py (marked gpu) with the real vllm package on one CUDA GPU: after an
optimizer step and a sync, the tensors vLLM keeps under their checkpoint names (embeddings, norms,
o_proj, down_proj, lm_head; q/k/v and gate/up are fused in vLLM) equal the engine's; greedy completions
through vLLM mostly agree with the engine's HF greedy ones (different kernels: not required bitwise).
Prints "rl vllm gpu ok".

  python tests/integration/rl_vllm_gpu.py MODEL_DIR [MASTER_PORT]
"""
import os
import sys
from types import SimpleNamespace

import torch


def main(model_dir: str) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", sys.argv[2] if len(sys.argv) > 2 else "29517")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    import deepspeed
    from transformers import AutoTokenizer

    from llmtrain.config import LoraConfig, ModelConfig, RLConfig
    from llmtrain.models.loading import load_model
    from llmtrain.objectives.rl import vllm_backend
    from llmtrain.objectives.rl.generation import generate, generation_mode

    deepspeed.init_distributed()
    dev = torch.device("cuda", 0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": 1,
           "optimizer": {"type": "AdamW", "params": {"lr": 5e-2, "torch_adam": True}},
           "zero_optimization": {"stage": 0}}
    model = load_model(ModelConfig(name_or_path=model_dir), LoraConfig(), 0, tok, cfg, "fp32", dev)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    ids = torch.tensor([[5, 17, 33, 9, 41, 12]], device=dev)
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()

    r = RLConfig(generation_backend="vllm", num_generations=2, max_new_tokens=8, vllm_gpu_memory_utilization=0.2)
    info = SimpleNamespace(rank=0, local_rank=0, world_size=1)
    backend = vllm_backend.VLLMBackend(r, ModelConfig(name_or_path=model_dir), "float32", 3, info, max_model_len=64)
    assert backend.sync(engine, 0) and not backend.sync(engine, 0)
    held = dict(vllm_backend._vllm_model(backend.llm).named_parameters())
    mine = dict(engine.module.named_parameters())
    common = [n for n in mine if n in held]
    assert len(common) >= 5, sorted(held)[:20]
    for n in common:
        want = mine[n].detach()
        got = held[n].detach()[: want.shape[0]]  # vLLM pads the vocabulary dimension
        assert torch.equal(got.to(want.dtype), want), n

    prompts = [[7 + i, 20][: 1 + i % 2] * (1 + i) for i in range(6)]
    stops = [tok.eos_token_id]
    with generation_mode(engine, 0, True):
        want = generate(engine.module, prompts, keys=None, seed=0, temperature=1.0, top_p=1.0, max_new_tokens=8,
                        stop_ids=stops, pad_id=tok.pad_token_id, batch_size=6, synced_gpus=False, device=dev)
    got = backend.greedy(engine, 0, prompts, 8, stops)
    same = sum(a == b for a, b in zip(got, want))
    print(f"greedy rows equal to hf: {same}/{len(want)}")
    assert same >= len(want) // 2, (got, want)
    outs = backend.rollout(engine, 0, [p for p in prompts[:3] for _ in range(2)],
                           [(0, i, g) for i in range(3) for g in range(2)], stops)
    assert len(outs) == 6 and all(1 <= len(c) <= 8 for c, _ in outs)
    print("rl vllm gpu ok", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
