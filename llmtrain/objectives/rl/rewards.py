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
from typing import Callable, Optional

from ...distributed import waiting
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


def score(fns: list[RewardFn], prompts: list, completions: list[str], columns: dict,
          origins: Optional[list] = None, report: Optional[Callable[[str], None]] = None
          ) -> tuple[list[float], dict, dict]:
    """(weighted total per completion, {name: per-completion rewards}, {name: per-completion missing flags}).

    A value is missing where the function returned None for it (TRL's "does not apply"), a non-finite
    or non-numeric value, or raised: a batch call that raises is retried one completion at a time, so a
    completion the verifier cannot parse costs that completion's value, not the run (DESIGN.md: one bad
    row never kills a run). A missing value counts 0 in the total (TRL's nansum over the functions),
    is counted (the rollout's reward_<fn>_missing) and reported through `report` as
    "<prompt origin>: <fn>: <reason>" (origins: the prompts' file:line). A function that gives no value
    for any completion of a call is broken (a wrong column name, say): one error line with the first
    reason; so is a wrong number of values."""
    n = len(completions)
    per_fn, missing, total = {}, {}, [0.0] * n
    for r in fns:
        values, error = _call(r, prompts, completions, columns)
        reasons = [error] * n
        if values is None:  # the batch raised: find the completions it fails on
            values = []
            for i in range(n):
                one, reasons[i] = _call(r, prompts[i: i + 1], completions[i: i + 1],
                                        {k: v[i: i + 1] for k, v in columns.items()})
                values.append(one[0] if one is not None and len(one) == 1 else None)
                if one is not None and len(one) != 1:
                    reasons[i] = f"returned {len(one)} values for 1 completion"
        elif len(values) != n:
            raise ConfigError(f"rl.reward_fns: {r.name} returned {len(values)} values for {n} completions; "
                              "it must return one float (or None) per completion")
        ok = [isinstance(v, (int, float)) and math.isfinite(v) for v in values]
        for i, v in enumerate(values):
            if not ok[i] and reasons[i] is None:
                reasons[i] = "returned None" if v is None else f"returned {v!r}"[:120]
        if n and not any(ok):
            raise ConfigError(f"rl.reward_fns: {r.name} gave no value for any of {n} completions "
                              f"(first: {reasons[0]}); fix the function (one float, or None, per completion)")
        per_fn[r.name] = [float(v) if good else 0.0 for v, good in zip(values, ok)]
        missing[r.name] = [not good for good in ok]
        if report is not None:
            for i in (i for i, good in enumerate(ok) if not good):
                where = origins[i] if origins else f"completion {i}"
                report(f"{where}: {r.name}: {reasons[i]} (counted as 0; completion {completions[i][:60]!r})")
        total = [t + r.weight * v for t, v in zip(total, per_fn[r.name])]
    return total, per_fn, missing


def _call(r: RewardFn, prompts, completions, columns) -> tuple[Optional[list], Optional[str]]:
    """(values, None), or (None, the exception as one line) when the function raised."""
    try:
        return list(r.fn(prompts=prompts, completions=completions, **columns)), None
    except Exception as e:  # noqa: BLE001 - a user's verifier failing on one completion is counted, not fatal
        return None, f"raised {type(e).__name__}: {waiting.one_line(e)}"[:200]


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
