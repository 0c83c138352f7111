"""Rewards of completions: Python functions named in rl.reward_fns (`module:function`), weighted.

A reward function is called once per rollout and rank with keyword arguments

    fn(prompts=[messages, ...], completions=[str, ...], **columns) -> list[float]

where `columns` holds each extra column of the prompt rows as a list (e.g. `answer=[...]`), one
entry per completion (a prompt's row repeated for each of its samples), as TRL passes them.
`exact_match` below is the verifier of the debug demo task.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Callable

from ...errors import ConfigError


def exact_match(prompts, completions, answer, **_) -> list[float]:
    """1.0 when the completion (stripped) is the row's gold `answer` (stripped), else 0.0."""
    return [float(c.strip() == str(a).strip()) for c, a in zip(completions, answer)]


def prefix_match(prompts, completions, answer, **_) -> list[float]:
    """Partial credit: the length of the completion's (stripped) common prefix with the gold `answer`,
    over the longer of the two (1.0 exactly when exact_match is; extra characters cost like missing ones).
    A denser signal than exact_match where the policy rarely samples a whole answer right."""
    out = []
    for c, a in zip(completions, answer):
        c, a = c.strip(), str(a).strip()
        n = next((i for i, (x, y) in enumerate(zip(c, a)) if x != y), min(len(c), len(a)))
        out.append(n / max(len(c), len(a), 1))
    return out


@dataclass
class RewardFn:
    name: str  # the function's own name: its metric is reward_<name>
    fn: Callable
    weight: float


def load_reward_fns(names: list, weights: list, where) -> list[RewardFn]:
    """Import each `module:function`; one error line naming the recipe key for a missing one."""
    out = []
    for i, spec in enumerate(names):
        module, _, attr = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"{where('rl.reward_fns')}: rl.reward_fns[{i}]={spec!r} cannot be imported ({e})") from None
        out.append(RewardFn(attr, fn, float(weights[i]) if weights else 1.0))
    return out


def score(fns: list[RewardFn], prompts: list, completions: list[str], columns: dict) -> tuple[list[float], dict]:
    """(weighted total per completion, {name: per-completion rewards}); a non-finite or missing value
    is one error line naming the function (a silent 0 would train on it)."""
    per_fn, total = {}, [0.0] * len(completions)
    for r in fns:
        values = list(r.fn(prompts=prompts, completions=completions, **columns))
        if len(values) != len(completions) or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            raise ConfigError(f"rl.reward_fns: {r.name} returned {len(values)} values for {len(completions)} "
                             "completions (or a non-finite one); it must return one float per completion")
        per_fn[r.name] = [float(v) for v in values]
        total = [t + r.weight * v for t, v in zip(total, per_fn[r.name])]
    return total, per_fn


class RewardModelFn:
    """rl.reward_model as a reward function: each (prompt, completion) re-encoded as a conversation by
    the chat path the reward model was trained on, scored by its head at the last token
    (objectives/reward_scoring.RewardScorer, from the reward-model task). The model is a full (unsharded) copy on
    each rank, in eval mode: fine for a reward model that fits one device next to the policy."""

    name = "reward_model"

    def __init__(self, path: str, device):
        try:
            from ..reward_scoring import RewardScorer
        except ImportError:
            raise ConfigError("rl.reward_model needs the reward-model task (llmtrain.objectives.reward_scoring), not in this build") from None
        self.scorer = RewardScorer.load(path, device=device)

    def __call__(self, prompts, completions, **_) -> list[float]:
        conversations = [list(p) + [{"role": "assistant", "content": c}] for p, c in zip(prompts, completions)]
        return self.scorer.score_conversations(conversations).tolist()
