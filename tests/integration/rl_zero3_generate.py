"""Run by tests/integration/test_rl.py under torchrun (2 ranks): rollout generation under ZeRO-3
(every parameter partitioned) equals the unsharded model's, greedy and keyed-sampled, in both the
gathered and the hooks (synced_gpus) path; the ranks' prompts differ in length and finish at
different steps. Prints "rl zero3 generate ok" on each rank.

  torchrun --nproc_per_node 2 --master_port P tests/integration/rl_zero3_generate.py MODEL_DIR
"""
import os
import sys

import torch


def main(model_dir: str) -> None:
    import deepspeed
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmtrain.config import LoraConfig, ModelConfig
    from llmtrain.models.loading import load_model
    from llmtrain.objectives.rl.generation import generate, generation_mode

    deepspeed.init_distributed(dist_backend="gloo")
    rank = int(os.environ["RANK"])
    tok = AutoTokenizer.from_pretrained(model_dir)
    # rank 0: short prompts; rank 1: longer ones -> the ranks' generate loops end at different steps
    prompts = [[7 + i, 20 + rank][: 1 + rank] * (1 + rank * 3) for i in range(5)]
    keys = [(0, 10 * rank + i, 0) for i in range(5)]
    kw = dict(seed=1, temperature=1.0, top_p=1.0, max_new_tokens=6 + 4 * rank, stop_ids=[tok.eos_token_id, 9],
              pad_id=tok.pad_token_id, batch_size=3, device="cpu")
    plain = AutoModelForCausalLM.from_pretrained(model_dir).eval()  # loaded before any ZeRO-3 config exists
    want_greedy = generate(plain, prompts, keys=None, synced_gpus=False, **kw)
    want_sampled = generate(plain, prompts, keys=keys, synced_gpus=False, **kw)

    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": 2,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
           "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    model = load_model(ModelConfig(name_or_path=model_dir), LoraConfig(), 0, tok, cfg, "fp32", torch.device("cpu"))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    assert all(p.ds_tensor.numel() < p.ds_numel for p in engine.module.parameters() if p.ds_numel > 1)
    for gather in (True, False):
        with generation_mode(engine, 3, gather) as synced:
            assert synced == (not gather)
            got_greedy = generate(engine.module, prompts, keys=None, synced_gpus=synced, **kw)
            got_sampled = generate(engine.module, prompts, keys=keys, synced_gpus=synced, **kw)
        assert got_greedy == want_greedy, (rank, gather, got_greedy, want_greedy)
        assert got_sampled == want_sampled, (rank, gather, got_sampled, want_sampled)
    # the hooks are back: a training step still runs and gives the unsharded loss
    ids = torch.tensor([prompts[0] + want_greedy[0][0]])
    loss = engine(input_ids=ids, labels=ids).loss
    with torch.no_grad():
        want = plain(input_ids=ids, labels=ids).loss
    assert torch.allclose(loss, want, atol=1e-6), (loss, want)
    engine.backward(loss)
    engine.step()
    deepspeed.comm.barrier()
    print(f"rank {rank}: rl zero3 generate ok", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
