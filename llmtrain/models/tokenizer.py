"""The tokenizer a run trains with: the model's own (or model.tokenizer), with a pad token and a chat template.

Its identity (data/tokenizer_id.py: tokenizer_hash, vocab_hash) is what resume, preflight and the
prepared-data cache compare.
"""
from __future__ import annotations

from ..config import ModelConfig
from ..data.chat import ensure_chat_template
from ..errors import ConfigError
from .hub import load_error


def load_tokenizer(m: ModelConfig):
    from transformers import AutoTokenizer

    path = m.tokenizer or m.name_or_path
    key = "model.tokenizer" if m.tokenizer else "model.name_or_path"
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=m.revision, trust_remote_code=m.trust_remote_code)
    except Exception as e:  # transformers raises OSError/ValueError/EnvironmentError variants
        raise load_error(key, path, e) from None
    if not tok.is_fast:
        raise ConfigError(f"{key}: {path!r} has no fast (Rust) tokenizer; assistant masking needs character offsets")
    if tok.pad_token_id is None:
        # padded positions carry IGNORE_INDEX labels and sit after real tokens: any id will do
        tok.pad_token = tok.eos_token
    ensure_chat_template(tok, m.chat_template)
    return tok
