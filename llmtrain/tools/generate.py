"""Generation with a trained model's chat template: the chat CLI and the demo's exact-match eval."""
from __future__ import annotations

import os

import torch


def stop_token_ids(tokenizer) -> list[int]:
    """EOS plus the template's end-of-turn tokens that exist in this vocabulary."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for tok in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "</s>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.add(tid)
    return sorted(ids)


@torch.no_grad()
def complete(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 32) -> list[str]:
    """Assistant replies for each conversation (greedy when temperature == 0)."""
    tokenizer.padding_side = "left"  # generation continues from the right edge of every row
    replies = []
    for i in range(0, len(conversations), batch_size):
        texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                 for c in conversations[i: i + batch_size]]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, eos_token_id=stop_token_ids(tokenizer),
                             pad_token_id=tokenizer.pad_token_id, **sampling)
        for row in out[:, enc["input_ids"].shape[1]:]:
            replies.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return replies


def load_for_inference(path: str, device: str = "auto"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..data.chat import ensure_chat_template

    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    tok = AutoTokenizer.from_pretrained(path)
    ensure_chat_template(tok)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    if os.path.isfile(os.path.join(path, "adapter_config.json")) and not os.path.isfile(os.path.join(path, "config.json")):
        from peft import AutoPeftModelForCausalLM  # a LoRA final/: base from adapter_config.json + adapter

        model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=dtype).to(dev).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(dev).eval()
    return model, tok
