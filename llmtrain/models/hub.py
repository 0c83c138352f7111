"""Where a model or tokenizer comes from (a hub id or a local directory), and the one-line error when it cannot be loaded."""
from __future__ import annotations

import os

from ..errors import ConfigError


def looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or os.path.exists(path) or path.count("/") > 1


def load_error(key: str, path: str, err: Exception, remote_code_switch: str = "model.trust_remote_code=true") -> ConfigError:
    if looks_local(path) and not os.path.exists(os.path.expanduser(path)):
        return ConfigError(f"{key}: directory {path!r} not found (give a local model directory or a hub id)")
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "contains custom code" in first:  # transformers' refusal names no switch
        first = f"it ships its own model code; set {remote_code_switch} if you trust that code"
    return ConfigError(f"{key}: cannot load {path!r}: {first}")
