"""Deterministic synthetic data for the demos and tests: addition SFT, addition DPO, a toy pretraining corpus.

The task is two-operand addition ("What is 37 + 85?" -> "122"): a ~1-3M parameter model learns it in
minutes on CPU, and the answer is exact-match scorable. Every generator takes a seed and uses its own
`random.Random`, so the same arguments always give the same rows (pure python, no torch).

Train/eval disjointness: an unordered operand pair {a, b} belongs to the eval split iff a hash of it
falls in EVAL_PAIR_PERCENT of the buckets. The split depends on the pair alone (not on the seed, n
or max_operand), so no eval question, nor its commuted form b + a, appears in any train row of any
generator here (SFT, DPO or pretraining text).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections.abc import Iterable
from typing import Optional

EVAL_PAIR_PERCENT = 10  # share of unordered operand pairs reserved for eval, in percent
DEFAULT_MAX_OPERAND = 99  # operands are drawn from [0, max_operand]; 99 = up to two digits

QUESTION_TEMPLATES = ("What is {a} + {b}?", "Compute {a} + {b}.", "{a} + {b} = ?")
SYSTEM_PROMPTS = ("You are a calculator. Reply with the number only.", "Answer with the sum and nothing else.")
ALPACA_INSTRUCTION = "Add the two numbers."  # used with input "{a} + {b}" for half of the Alpaca rows

_QUESTION_RE = re.compile(r"(\d+)\s*\+\s*(\d+)")


# --- operand pairs and answers ---


def is_eval_pair(a: int, b: int) -> bool:
    """True iff {a, b} is reserved for eval; symmetric, so a + b and b + a share a split."""
    lo, hi = min(a, b), max(a, b)
    digest = hashlib.sha256(f"{lo}+{hi}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100 < EVAL_PAIR_PERCENT


def answer_of(question: str) -> str:
    """Gold answer for any question or prompt text these generators produce ("What is 3 + 4?" -> "7").

    Uses the last "a + b" in the text, so a whole rendered multi-turn prompt also works.
    """
    matches = _QUESTION_RE.findall(question)
    if not matches:
        raise ValueError(f"no 'a + b' in question {question!r}")
    a, b = matches[-1]
    return str(int(a) + int(b))


def _train_pair(rng: random.Random, max_operand: int) -> tuple[int, int]:
    # Rejection sampling: ~EVAL_PAIR_PERCENT of draws are rejected, so this ends quickly.
    while True:
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        if not is_eval_pair(a, b):
            return a, b


def _eval_pairs(n: int, rng: random.Random, max_operand: int) -> list[tuple[int, int]]:
    """n distinct eval pairs (ordered), sampled without replacement."""
    pool = [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1) if is_eval_pair(a, b)]
    if n > len(pool):
        raise ValueError(f"n={n} eval rows requested but only {len(pool)} eval pairs exist for max_operand={max_operand}")
    return rng.sample(pool, n)


def _pairs(n: int, rng: random.Random, max_operand: int, split: str) -> list[tuple[int, int]]:
    if split == "train":
        return [_train_pair(rng, max_operand) for _ in range(n)]
    if split == "eval":
        return _eval_pairs(n, rng, max_operand)
    raise ValueError(f"split={split!r} must be 'train' or 'eval'")


def _question(rng: random.Random, a: int, b: int) -> str:
    return rng.choice(QUESTION_TEMPLATES).format(a=a, b=b)


# --- SFT ---


def _openai_row(rng: random.Random, pairs: list[tuple[int, int]], system: bool) -> dict:
    messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if system else []
    for a, b in pairs:
        messages.append({"role": "user", "content": _question(rng, a, b)})
        messages.append({"role": "assistant", "content": str(a + b)})
    return {"messages": messages}


def _sharegpt_row(rng: random.Random, a: int, b: int, system: bool) -> dict:
    turns = [{"from": "system", "value": rng.choice(SYSTEM_PROMPTS)}] if system else []
    turns.append({"from": "human", "value": _question(rng, a, b)})
    turns.append({"from": "gpt", "value": str(a + b)})
    return {"conversations": turns}


def _alpaca_row(rng: random.Random, a: int, b: int) -> dict:
    if rng.random() < 0.5:
        return {"instruction": _question(rng, a, b), "input": "", "output": str(a + b)}
    return {"instruction": ALPACA_INSTRUCTION, "input": f"{a} + {b}", "output": str(a + b)}


def sft_addition(n: int, seed: int = 0, max_operand: int = DEFAULT_MAX_OPERAND) -> list[dict]:
    """n training chat rows for addition, mixing the three input formats the framework reads.

    Mix (by row): 50% OpenAI `messages` (a quarter of them with a system prompt, a quarter with two
    Q/A turns), 25% ShareGPT `conversations` (a fifth with a system turn), 25% Alpaca
    (`instruction`/`input`/`output`). Assistant answers are the bare sum, e.g. "122".
    Only train pairs are used (see module docstring).
    """
    rng = random.Random(f"sft-train-{seed}")
    rows = []
    for _ in range(n):
        a, b = _train_pair(rng, max_operand)
        kind = rng.random()
        if kind < 0.5:
            pairs = [(a, b), _train_pair(rng, max_operand)] if rng.random() < 0.25 else [(a, b)]
            rows.append(_openai_row(rng, pairs, system=rng.random() < 0.25))
        elif kind < 0.75:
            rows.append(_sharegpt_row(rng, a, b, system=rng.random() < 0.2))
        else:
            rows.append(_alpaca_row(rng, a, b))
    return rows


def sft_addition_eval(n: int, seed: int = 0, max_operand: int = DEFAULT_MAX_OPERAND) -> list[dict]:
    """n held-out rows `{"messages": [user, assistant], "answer": "122"}` on distinct eval-only pairs.

    `messages` gives eval_loss; generate from `messages[:-1]` with add_generation_prompt=True and
    compare the stripped completion (up to <|im_end|>) with `answer` (a string) for exact match.
    """
    rng = random.Random(f"sft-eval-{seed}")
    rows = []
    for a, b in _eval_pairs(n, rng, max_operand):
        question = _question(rng, a, b)
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": str(a + b)}]
        rows.append({"messages": messages, "answer": str(a + b)})
    return rows


# --- DPO ---


def wrong_answer(a: int, b: int, rng: random.Random) -> str:
    """A plausible wrong sum: off by 1, off by 10, or two digits swapped; never the right one, never < 0."""
    right = a + b
    kind = rng.choice(("off_by_1", "off_by_10", "swap"))
    if kind == "swap" and len(set(str(right))) > 1:
        digits = list(str(right))
        i = rng.randrange(len(digits) - 1)
        while digits[i] == digits[i + 1]:  # swapping equal digits changes nothing; terminates since not all equal
            i = (i + 1) % (len(digits) - 1)
        digits[i], digits[i + 1] = digits[i + 1], digits[i]
        wrong = int("".join(digits))  # a leading zero after the swap just makes it shorter ("105" -> "015" = 15)
    else:
        step = 10 if kind == "off_by_10" else 1
        wrong = right + step if right < step or rng.random() < 0.5 else right - step
    return str(wrong)


def dpo_pairs(n: int, seed: int = 0, max_operand: int = DEFAULT_MAX_OPERAND, split: str = "train") -> list[dict]:
    """n preference rows; chosen = the right sum, rejected = `wrong_answer`.

    Half are plain strings `{"prompt": "What is 3 + 4?", "chosen": "7", "rejected": "8"}`; half are
    conversational: `prompt` a message list (user turn, a third with a system turn first), `chosen` and
    `rejected` lists with one assistant message. split="eval" uses distinct eval-only pairs.
    """
    rng = random.Random(f"dpo-{split}-{seed}")
    rows = []
    for a, b in _pairs(n, rng, max_operand, split):
        question, right, wrong = _question(rng, a, b), str(a + b), wrong_answer(a, b, rng)
        if rng.random() < 0.5:
            rows.append({"prompt": question, "chosen": right, "rejected": wrong})
            continue
        prompt = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 1 / 3 else []
        prompt.append({"role": "user", "content": question})
        rows.append(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": right}],
                "rejected": [{"role": "assistant", "content": wrong}],
            }
        )
    return rows


# --- pretraining text ---

_NAMES = (
    "Tom", "Anna", "Sam", "Mia", "Ben", "Lily", "Max", "Zoe", "Leo", "Emma", "Jack", "Ruby", "Noah", "Ella",
    "Oscar", "Grace", "Henry", "Alice", "Felix", "Chloe", "Hugo", "Isla", "Oliver", "Nora",
)
_THINGS = (
    "apples", "books", "coins", "cards", "stones", "shells", "pens", "cups", "eggs", "toys", "pears", "plums",
    "marbles", "stickers", "buttons", "candles", "flowers", "pencils", "cookies", "balloons", "ribbons", "keys",
)
_ANIMALS = (
    "dog", "cat", "bird", "fox", "horse", "duck", "frog", "mouse", "rabbit", "sheep", "goat", "owl", "bear",
    "turtle", "squirrel", "donkey", "tiger", "monkey", "lion", "whale",
)
_ADJECTIVES = (
    "red", "blue", "green", "small", "big", "old", "young", "happy", "brown", "yellow", "quiet", "sleepy",
    "clever", "tiny", "friendly", "curious", "brave", "gentle", "hungry", "playful",
)
_PLACES = (
    "in the park", "by the river", "on the hill", "in the garden", "near the house", "under the tree",
    "in the forest", "at the farm", "on the beach", "behind the barn", "next to the lake", "in the meadow",
    "on the bridge", "inside the kitchen", "beside the school",
)
_VERBS = (
    "runs", "sleeps", "sits", "jumps", "plays", "eats", "waits", "sings", "walks", "swims", "hides", "rests",
    "climbs", "dances", "watches", "listens", "wanders", "looks around",
)
_JOBS = (
    "baker", "farmer", "teacher", "doctor", "painter", "builder", "driver", "gardener", "singer", "pilot",
    "writer", "nurse", "cook", "sailor", "fisher", "tailor",
)
_FOODS = (
    "bread", "soup", "cheese", "rice", "honey", "carrots", "oranges", "bananas", "potatoes", "tomatoes",
    "noodles", "pancakes", "strawberries", "chocolate", "lemonade", "porridge",
)
_TIMES = ("In the morning", "At noon", "In the evening", "Every day", "On Sunday", "After school", "Later")


def _arithmetic_sentence(rng: random.Random, max_operand: int) -> str:
    a, b = _train_pair(rng, max_operand)
    return rng.choice(
        (f"{a} plus {b} equals {a + b}.", f"The sum of {a} and {b} is {a + b}.", f"{a} + {b} = {a + b}.")
    )


def _number_sentence(rng: random.Random, max_operand: int) -> str:
    k = rng.randint(1, max_operand)
    return rng.choice(
        (
            f"The number {k} is {'even' if k % 2 == 0 else 'odd'}.",
            f"{k} comes after {k - 1} and before {k + 1}.",
            f"Two times {k} is {2 * k}.",
        )
    )


def _story(rng: random.Random) -> str:
    name, friend = rng.sample(_NAMES, 2)
    thing = rng.choice(_THINGS)
    have, change = rng.randint(2, 9), rng.randint(2, 9)  # >= 2 keeps the plural nouns grammatical
    if rng.random() < 0.5:
        return (
            f"{name} has {have} {thing}. {friend} gives {name} {change} more {thing}. "
            f"Now {name} has {have + change} {thing}."
        )
    total = have + change
    return f"{rng.choice(_TIMES)}, {name} had {total} {thing}. {name} gave {change} to {friend}. Then {name} had {have} left."


def _scene_sentence(rng: random.Random) -> str:
    animal, adjective = rng.choice(_ANIMALS), rng.choice(_ADJECTIVES)
    return rng.choice(
        (
            f"The {adjective} {animal} {rng.choice(_VERBS)} {rng.choice(_PLACES)}.",
            f"{rng.choice(_TIMES)}, the {animal} {rng.choice(_VERBS)} {rng.choice(_PLACES)}.",
            f"{rng.choice(_NAMES)} sees a {adjective} {animal} {rng.choice(_PLACES)}.",
        )
    )


def _person_sentence(rng: random.Random) -> str:
    name = rng.choice(_NAMES)
    return rng.choice(
        (
            f"{name} is a {rng.choice(_JOBS)}.",
            f"{name} likes {rng.choice(_FOODS)} and {rng.choice(_FOODS)}.",
            f"{rng.choice(_TIMES)}, {name} eats {rng.choice(_FOODS)} {rng.choice(_PLACES)}.",
            f"The {rng.choice(_JOBS)} gives {name} some {rng.choice(_FOODS)}.",
        )
    )


def pretrain_corpus(n_docs: int, seed: int = 0, max_operand: int = DEFAULT_MAX_OPERAND) -> list[str]:
    """n_docs one-paragraph documents (3-8 sentences, no blank lines) of arithmetic facts, number
    facts, tiny stories and scene sentences. Repetitive on purpose, so a tiny model's loss falls fast.
    Arithmetic facts use train pairs only."""
    rng = random.Random(f"pretrain-{seed}")
    makers = (
        lambda: _arithmetic_sentence(rng, max_operand),
        lambda: _number_sentence(rng, max_operand),
        lambda: _story(rng),
        lambda: _scene_sentence(rng),
        lambda: _person_sentence(rng),
    )
    docs = []
    for _ in range(n_docs):
        main = rng.choice(makers)  # most sentences of a doc share a topic, like a real document
        sentences = [main() if rng.random() < 0.7 else rng.choice(makers)() for _ in range(rng.randint(3, 8))]
        docs.append(" ".join(sentences))
    return docs


# --- writing ---


def write_jsonl(rows: Iterable[dict], path: str) -> int:
    """Write one JSON object per line (UTF-8, "\\n" endings); returns the row count.

    Written to a temporary file then renamed, so a reader never sees half a file.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp_path = f"{path}.tmp"
    count = 0
    with open(tmp_path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    os.replace(tmp_path, path)
    return count


# ---------------------------------------------------------------------------------------------
# Digit reversal: the demo's SFT/DPO task. A ~1M-parameter model learns it on 2 CPU cores in a
# few minutes (held-out exact match ~0% -> ~90% in 300 steps), where 2-digit addition stays
# under 10%: reversal needs attention to positions, addition needs carries.
# ---------------------------------------------------------------------------------------------

REVERSE_TEMPLATES = ("Reverse the digits of {x}.", "Write {x} backwards.", "Reverse {x}")
REVERSE_SYSTEM_PROMPTS = ("Reply with the reversed digits only.", "You reverse numbers.")
REVERSE_ALPACA_INSTRUCTION = "Reverse the digits."
_REVERSE_RE = re.compile(r"(\d+)")


def is_eval_number(x: str) -> bool:
    """A stable ~10% of digit strings are held out for eval (hash of the string)."""
    digest = hashlib.sha256(f"reverse:{x}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100 < EVAL_PAIR_PERCENT


def reverse_answer_of(question: str) -> str:
    """The gold answer of a reversal question: its (last) digit string, reversed."""
    found = _REVERSE_RE.findall(question)
    if not found:
        raise ValueError(f"no digits in {question!r}")
    return found[-1][::-1]


def _digit_string(rng: random.Random, split: str, min_len: int = 3, max_len: int = 7) -> str:
    while True:
        x = "".join(rng.choice("0123456789") for _ in range(rng.randint(min_len, max_len)))
        if is_eval_number(x) == (split == "eval"):
            return x


def sft_reverse(n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """Reversal chats mixing the three formats: OpenAI messages (some with a system prompt, some
    two-turn), ShareGPT conversations and Alpaca rows. Eval rows (split="eval") are single-turn
    OpenAI rows with the gold `answer`, on digit strings never seen in train."""
    rng = random.Random(f"sft_reverse:{seed}:{split}")
    rows = []
    for i in range(n):
        x = _digit_string(rng, split)
        question = rng.choice(REVERSE_TEMPLATES).format(x=x)
        if split == "eval":
            rows.append({"messages": [{"role": "user", "content": question},
                                      {"role": "assistant", "content": x[::-1]}], "answer": x[::-1]})
            continue
        kind = i % 10  # 10% Alpaca, 10% ShareGPT, 10% two-turn, 70% single-turn messages (learns fastest)
        if kind == 0:
            rows.append({"instruction": REVERSE_ALPACA_INSTRUCTION, "input": x, "output": x[::-1]})
        elif kind == 1:
            turns = [{"from": "human", "value": question}, {"from": "gpt", "value": x[::-1]}]
            if rng.random() < 0.3:
                turns.insert(0, {"from": "system", "value": rng.choice(REVERSE_SYSTEM_PROMPTS)})
            rows.append({"conversations": turns})
        else:
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": x[::-1]}]
            if kind == 2:  # two turns
                y = _digit_string(rng, split)
                messages += [{"role": "user", "content": rng.choice(REVERSE_TEMPLATES).format(x=y)},
                             {"role": "assistant", "content": y[::-1]}]
            if rng.random() < 0.3:
                messages.insert(0, {"role": "system", "content": rng.choice(REVERSE_SYSTEM_PROMPTS)})
            rows.append({"messages": messages})
    return rows


def rl_reverse_prompts(n: int, seed: int = 0) -> list[dict]:
    """Prompts for online RL on the reversal task: a single user turn on a *train* digit string and its
    gold `answer` (the exact-match verifier's column); never an eval number."""
    rng = random.Random(f"rl_reverse:{seed}")
    rows = []
    for _ in range(n):
        x = _digit_string(rng, "train")
        rows.append({"messages": [{"role": "user", "content": rng.choice(REVERSE_TEMPLATES).format(x=x)}],
                     "answer": x[::-1]})
    return rows


def wrong_reversal(x: str, rng: random.Random, kind_weights: Optional[tuple] = None) -> str:
    """A plausible mistake: the digits unreversed, two digits swapped, or one dropped (drawn with
    kind_weights, default equally)."""
    right = x[::-1]
    for _ in range(20):
        kind = rng.choices(range(3), weights=kind_weights)[0] if kind_weights else rng.randrange(3)
        if kind == 0:
            wrong = x
        elif kind == 1:
            i = rng.randrange(len(right) - 1)
            wrong = right[:i] + right[i + 1] + right[i] + right[i + 2:]
        else:
            i = rng.randrange(len(right))
            wrong = right[:i] + right[i + 1:]
        if wrong != right:
            return wrong
    return right + "0"


def dpo_reverse_pairs(n: int, seed: int = 0, split: str = "train", kind_weights: Optional[tuple] = None) -> list[dict]:
    """Preference rows: chosen = the correct reversal, rejected = a plausible wrong one (kinds drawn with
    kind_weights: unreversed, swapped, dropped); half as strings, half as message lists (some with a
    system prompt)."""
    rng = random.Random(f"dpo_reverse:{seed}:{split}")
    rows = []
    for i in range(n):
        x = _digit_string(rng, split)
        question = rng.choice(REVERSE_TEMPLATES).format(x=x)
        chosen, rejected = x[::-1], wrong_reversal(x, rng, kind_weights)
        if i % 2 == 0:
            rows.append({"prompt": question, "chosen": chosen, "rejected": rejected})
        else:
            prompt = [{"role": "user", "content": question}]
            if rng.random() < 0.3:
                prompt.insert(0, {"role": "system", "content": rng.choice(REVERSE_SYSTEM_PROMPTS)})
            rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
                         "rejected": [{"role": "assistant", "content": rejected}]})
    return rows
