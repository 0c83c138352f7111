"""The two identities of a tokenizer, one per question a run asks about it.

`vocab_hash`      do these token ids mean the same text? The vocabulary, merges, normalizer and
                  pre-tokenizer (the serialized backend): what pretraining shards record, since
                  they hold plain token streams that no chat template touches.
`tokenizer_hash`  does a row tokenize the same way? `vocab_hash` plus the chat template: what a
                  checkpoint records for an exact resume, what keys the prepared SFT/DPO data
                  cache, what preflight compares across ranks and what tokenizer training prints.

Both ignore the backend's `truncation`/`padding` entries: transformers toggles them on the backend
during calls (`tok(..., truncation=True)`), and they do not change the ids of an untruncated encode.
"""
from __future__ import annotations

import hashlib
import json


def vocab_hash(tokenizer) -> str:
    """sha256 hex of the tokenizer's serialized backend (an HF fast tokenizer or a `tokenizers.Tokenizer`)."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if not hasattr(backend, "to_str"):
        raise TypeError(f"{type(tokenizer).__name__} has no backend_tokenizer.to_str(); "
                        "pass a fast (Rust-backed) tokenizer")
    spec = json.loads(backend.to_str())
    spec["truncation"] = None
    spec["padding"] = None
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def tokenizer_hash(tokenizer) -> str:
    """16 hex digits over `vocab_hash` and the chat template (None and "" alike: no template)."""
    h = hashlib.sha256(vocab_hash(tokenizer).encode())
    h.update(b"\0" + (getattr(tokenizer, "chat_template", None) or "").encode())
    return h.hexdigest()[:16]
