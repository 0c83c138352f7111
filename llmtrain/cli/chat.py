"""`llmtrain chat` (= launch/chat.py): chat with a trained model in the terminal, using its chat template.

  llmtrain chat runs/debug-sft/final [--temperature 0.7] [--system "..."] [--prompt "one-shot question"]
Greedy decoding by default; an empty line or Ctrl-D quits; /reset starts a new conversation.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir", help="a Hugging Face model directory, e.g. <output_dir>/final")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--prompt", default=None, help="answer this one message and exit")
    args = p.parse_args(argv)
    if not any(os.path.isfile(os.path.join(args.model_dir, f)) for f in ("config.json", "adapter_config.json")):
        print(f"error: {args.model_dir} is not a model directory (no config.json); pass <output_dir>/final", file=sys.stderr)
        return 2
    from ..tools.generate import complete, load_for_inference

    model, tok = load_for_inference(args.model_dir)
    history = [{"role": "system", "content": args.system}] if args.system else []
    prompts = [args.prompt] if args.prompt is not None else None
    while True:
        if prompts is not None:
            if not prompts:
                return 0
            text = prompts.pop()
        else:
            try:
                text = input("you> ").strip()
            except EOFError:
                return 0
            if not text:
                return 0
            if text == "/reset":
                history = history[:1] if args.system else []
                continue
        history.append({"role": "user", "content": text})
        reply = complete(model, tok, [history], args.max_new_tokens, args.temperature, args.top_p)[0]
        history.append({"role": "assistant", "content": reply})
        print(reply if prompts is not None else f"model> {reply}", flush=True)
