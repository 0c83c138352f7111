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


MAX_FAILED_SINGLES = 3  # single-completion calls that may fail before a function that never succeeds is given up


def score(fns: list[RewardFn], prompts: list, completions: list[str], columns: dict,
          origins: Optional[list] = None, report: Optional[Callable[[str], None]] = None
          ) -> tuple[list[float], dict, dict]:
    """(weighted total per completion, {name: per-completion rewards}, {name: per-completion missing flags}).

    A value is missing where the function returned None for it (TRL's "does not apply"), a non-finite
    or non-numeric value, or raised (or returned the wrong number of values) on the call that held it.
    A failed call is split in halves and each half called again (bisection: about k log n batched calls
    for k bad completions, not n single ones), so a completion the verifier cannot parse costs that
    completion's value, not the run (DESIGN.md: one bad row never kills a run). Once MAX_FAILED_SINGLES
    single-completion calls failed and none succeeded, the rest is given up without calls (a broken
    function, or a device error, fails everything: no point in n retries).

    Missing values are 0 here; each is reported through `report` as "<prompt origin>: <fn>: <reason>"
    (origins: the prompts' file:line). Nothing here raises: a rank cannot decide alone that a function
    is broken while the others wait in a collective; the rollout decides on the all-gathered
    missing flags (RolloutData._gather_table) and imputes the group's mean (impute_group_means)."""
    n = len(completions)
    per_fn, missing, total = {}, {}, [0.0] * n
    for r in fns:
        values: list = [None] * n
        reasons: list = [None] * n
        state = {"ok": False, "failed_singles": 0, "first_error": None}
        _bisect(r, prompts, completions, columns, list(range(n)), values, reasons, state)
        ok = [isinstance(v, (int, float)) and math.isfinite(v) for v in values]
        for i, v in enumerate(values):
            if not ok[i] and reasons[i] is None:
                reasons[i] = "returned None" if v is None else f"returned {v!r}"[:120]
        per_fn[r.name] = [float(v) if good else 0.0 for v, good in zip(values, ok)]
        missing[r.name] = [not good for good in ok]
        if report is not None:
            for i in (i for i, good in enumerate(ok) if not good):
                where = origins[i] if origins else f"completion {i}"
                report(f"{where}: {r.name}: {reasons[i]} (completion {completions[i][:60]!r})")
        total = [t + r.weight * v for t, v in zip(total, per_fn[r.name])]
    return total, per_fn, missing


def _bisect(r: RewardFn, prompts, completions, columns, idx: list, values: list, reasons: list, state: dict) -> None:
    """Call r on the completions idx; on failure split in halves (see score). Fills values / reasons."""
    if not idx:
        return
    if not state["ok"] and state["failed_singles"] >= MAX_FAILED_SINGLES:  # never worked: stop calling it
        for i in idx:
            reasons[i] = f"not retried after {MAX_FAILED_SINGLES} failed single calls ({state['first_error']})"
        return
    sub = (prompts, completions, columns) if len(idx) == len(completions) else \
        ([prompts[i] for i in idx], [completions[i] for i in idx], {k: [v[i] for i in idx] for k, v in columns.items()})
    got, error = _call(r, *sub)
    if got is not None and len(got) != len(idx):
        got, error = None, f"returned {len(got)} values for {len(idx)} completions"
    if got is not None:
        state["ok"] = True
        for i, v in zip(idx, got):
            values[i] = v
        return
    state["first_error"] = state["first_error"] or error
    if len(idx) == 1:
        state["failed_singles"] += 1
        reasons[idx[0]] = error
        return
    half = len(idx) // 2
    _bisect(r, prompts, completions, columns, idx[:half], values, reasons, state)
    _bisect(r, prompts, completions, columns, idx[half:], values, reasons, state)


def _call(r: RewardFn, prompts, completions, columns) -> tuple[Optional[list], Optional[str]]:
    """(values, None), or (None, the exception as one line) when the function raised."""
    try:
        return list(r.fn(prompts=prompts, completions=completions, **columns)), None
    except Exception as e:  # noqa: BLE001 - a user's verifier failing on one completion is counted, not fatal
        return None, f"raised {type(e).__name__}: {waiting.one_line(e)}"[:200]


def impute_group_means(per_fn: dict, missing: dict, weights: dict, group: int) -> list[float]:
    """The weighted totals again, each missing value replaced by the mean of that function's values over
    the same prompt's other samples (0 where none has one): a completion the verifier could not score
    is neither rewarded nor punished against its group by that function (0 would reward a crash
    wherever the group's values are negative). per_fn is updated in place."""
    for name, flags in missing.items():
        if not any(flags):
            continue
        vals = per_fn[name]
        for g in range(0, len(vals), group):
            have = [vals[i] for i in range(g, min(g + group, len(vals))) if not flags[i]]
            fill = sum(have) / len(have) if have else 0.0
            for i in range(g, min(g + group, len(vals))):
                if flags[i]:
                    vals[i] = fill
    n = len(next(iter(per_fn.values()), []))
    return [sum(weights[name] * per_fn[name][i] for name in per_fn) for i in range(n)]


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
