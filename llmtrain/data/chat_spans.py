"""Where each assistant turn sits in a rendered conversation, verified; then token labels.

Definition. The trained text of an assistant turn is what the model produces at that point: the
text after the generation prompt up to and including the end-of-turn token(s), without trailing
layout whitespace. Two ways to find it:

  * the template has `{% generation %}` markers: their spans (one per assistant turn after
    merging adjacent blocks), as transformers' `return_assistant_tokens_mask` uses them;
  * otherwise, from renders of the conversation's prefixes. Turn i starts where the prompt
    P = render(messages[:i], add_generation_prompt=True) ends, and ends where
    R = render(messages[:i+1]) stops agreeing with the full render F. That is exact for
    prefix-stable templates (ChatML, Llama 3.x, Gemma, Phi-3, Qwen2.5) and for a generation
    prompt that ends inside the assistant text (DeepSeek-R1's "<think>\\n": F may part from P
    only inside the generation prompt). Templates that render history differently from a last
    turn (Qwen3 drops <think> from history turns, gpt-oss ends them with <|end|> instead of
    <|return|>, Mistral folds the system prompt into the last user turn) are anchored instead:
    the turn's (or the previous message's) data is replaced by a probe character, which shows
    exactly where that data ends in F, and the template's own closing (or prompt tail) is
    matched from there.

Then every turn is verified: its content (and tool-call names, and the final turn's reasoning
when trained) must lie inside its span, the span must end with an end-of-turn token (an added
token), spans must be ordered, and no system/user/tool message may have been dropped by the
template. Anything else is a RowError naming the turn: never a silent wrong mask.

Comparisons never cut an added token (<|im_end|>, <think>, ...) in half: common prefixes are
taken in units of whole added tokens, so a partial match cannot train half a header.
"""
from __future__ import annotations

import json
import weakref
from typing import Optional

import numpy as np

from .chat_base import RowError
from .labels import IGNORE_INDEX

_PROBES = ("\ue000", "\ue001", "\ue002")  # private-use characters: no template rewrites them
_ATOMS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> (len, Atoms)


class Atoms:
    """A tokenizer's added tokens as indivisible units of rendered text.

    Set look-ups filtered by first/last character, not one regex of alternatives: tokenizers carry up
    to thousands of added tokens (reserved and unused ones), and a regex of 6k alternatives costs ~1 ms
    a call, every turn of every row.
    """

    def __init__(self, tokens):
        self.tokens = frozenset(t for t in tokens if t)
        self.lengths = sorted({len(t) for t in self.tokens}, reverse=True)
        self.max_len = max(self.lengths, default=0)
        self.first_chars = {t[0] for t in self.tokens}
        self.last_chars = {t[-1] for t in self.tokens}

    def boundary(self, text: str, pos: int) -> int:
        """`pos`, moved back to the start of an added token it would cut."""
        if self.max_len < 2 or pos <= 0 or pos >= len(text):
            return pos
        for a in range(max(0, pos - self.max_len + 1), pos):  # leftmost first, as the tokenizer matches
            if text[a] in self.first_chars:
                for n in self.lengths:
                    if a + n > pos and text[a:a + n] in self.tokens:
                        return a
        return pos

    def common_prefix(self, a: str, b: str) -> int:
        n = _common_prefix_len(a, b)
        while True:
            cut = min(self.boundary(a, n), self.boundary(b, n))
            if cut == n:
                return n
            n = cut

    def ends_with_token(self, text: str, start: int, end: int) -> bool:
        if end <= start or text[end - 1] not in self.last_chars:
            return False
        return any(end - n >= start and text[end - n:end] in self.tokens for n in self.lengths)


def atoms_for(tokenizer) -> Atoms:
    """Cached per tokenizer object (listing added tokens costs ~1 ms for big vocabularies), renewed
    when tokens are added (len(tokenizer) changes)."""
    size = len(tokenizer)
    cached = _ATOMS.get(tokenizer)
    if cached is None or cached[0] != size:
        cached = _ATOMS[tokenizer] = (size, Atoms(tokenizer.added_tokens_encoder))
    return cached[1]


def _common_prefix_len(a: str, b: str) -> int:
    """Length of the common prefix: binary search over slice comparisons (C speed, O(n log n))."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _after_data(plain: str, probed: str) -> str:
    """What follows the probed data: the common suffix of a render and the same render with one data
    field replaced by the probe (whatever quoting the template puts around it, e.g. tojson)."""
    n = _common_prefix_len(plain[::-1], probed[::-1])
    n = min(n, len(plain) - _common_prefix_len(plain, probed))  # never past where the renders part
    return plain[len(plain) - n:]


def _rstrip_end(text: str, start: int, end: int) -> int:
    """`end` moved left over trailing whitespace (layout after the end-of-turn token), not below `start`."""
    return start + len(text[start:end].rstrip()) if end > start else start


# --------------------------------------------------------------------------- what a turn holds


def answer_text(m: dict) -> str:
    """The assistant's answer as templates render it: content minus an inline <think> block, stripped."""
    content = m.get("content") or ""
    head = content.lstrip()
    if head.startswith("<think>") and "</think>" in head:
        content = head.split("</think>", 1)[1]
    return content.strip()


def reasoning_text(m: dict) -> str:
    if m.get("reasoning_content"):
        return m["reasoning_content"].strip()
    head = (m.get("content") or "").lstrip()
    if head.startswith("<think>") and "</think>" in head:
        return head[len("<think>"):head.index("</think>")].strip()
    return ""


def _tool_names(m: dict) -> list[str]:
    return [c["function"]["name"] for c in m.get("tool_calls") or []]


def _missing(text: str, s: int, e: int, m: dict, turn: int) -> Optional[str]:
    """Why text[s:e] cannot be assistant turn `turn` (its content or a tool call is not in it), or None."""
    seg = text[s:e]
    answer = answer_text(m)
    if answer and answer not in seg:
        return (f"the content of assistant turn {turn} is not inside its trained span "
                "(the chat template drops or rewrites it)")
    for name in _tool_names(m):
        if name not in seg:
            return f"the chat template does not render tool call {name!r} of assistant turn {turn}"
    return None


# --------------------------------------------------------------------------- locating without markers


class Locator:
    """Finds assistant turns in the full render F from prefix renders (see the module docstring)."""

    def __init__(self, render, view: list[dict], text: str, atoms: Atoms, shift: int = 0):
        self.render, self.view, self.F, self.atoms = render, view, text, atoms
        self.shift = shift  # message index in the row = index in view + shift (system folded)
        self.probe = next((p for p in _PROBES if p not in text), None)
        self._gen_prompt: Optional[str] = None

    def turn(self, i: int) -> tuple[int, int]:
        s = self.start(i)
        return s, self.end(i, s)

    def start(self, i: int) -> int:
        try:
            prompt = self.render(self.view[:i], add_generation_prompt=True)
        except RowError as e:
            raise RowError(f"cannot render the prompt of assistant turn {i} ({e})") from None
        if self.F.startswith(prompt):
            return len(prompt)
        before = self.render(self.view[:i])
        cut = self.atoms.common_prefix(prompt, self.F)
        if prompt.startswith(before) and cut >= len(before):
            return cut  # F leaves the prompt inside the generation prompt (DeepSeek-R1's "<think>\n")
        # the prompt's history renders differently in F (Mistral: system prompt in the last user turn):
        # anchor on the end of the previous message's data and match the prompt's tail from there
        if i == 0:
            raise self._lost(i, "its prompt")
        body_end = self._data_end(self.view, i - 1)
        tail = _after_data(prompt, self.render(self._probed(self.view[:i], i - 1), add_generation_prompt=True))
        matched = self.atoms.common_prefix(tail, self.F[body_end:])
        if matched < len(tail) - len(self.generation_prompt()):
            raise self._lost(i, "its prompt")
        return body_end + matched

    def end(self, i: int, s: int) -> int:
        upto = self.render(self.view[: i + 1])
        e = _rstrip_end(self.F, s, self.atoms.common_prefix(upto, self.F))
        if e > s and self.atoms.ends_with_token(self.F, s, e) and _missing(self.F, s, e, self.view[i], i) is None:
            return e
        if (why := _missing(self.F, s, len(self.F), self.view[i], i + self.shift)) is not None:
            raise RowError(why)  # not rendered at all: say so rather than "cannot locate"
        # turn i renders differently in history (Qwen3 without <think>, gpt-oss with <|end|>): find where its
        # data ends in F, then match the template's closing as rendered for a last turn, else as rendered
        # before a new generation prompt (gpt-oss: <|return|> for a last turn, <|end|> otherwise)
        body_end = self._data_end(self.view, i)
        probed_view = self._probed(self.view[: i + 1], i)
        for add_prompt in (False, True):
            plain = upto if not add_prompt else self.render(self.view[: i + 1], add_generation_prompt=True)
            closing = _after_data(plain, self.render(probed_view, add_generation_prompt=add_prompt))
            gen = self.generation_prompt() if add_prompt else ""
            if gen and closing.endswith(gen):
                closing = closing[: -len(gen)]
            e = _rstrip_end(self.F, body_end, body_end + self.atoms.common_prefix(closing, self.F[body_end:]))
            if e > body_end and self.atoms.ends_with_token(self.F, s, e):
                return e
        raise self._lost(i, "its end-of-turn")

    def generation_prompt(self) -> str:
        """What add_generation_prompt appends after a conversation ending in a user turn (computed once a row)."""
        if self._gen_prompt is None:
            self._gen_prompt = ""
            for i, m in enumerate(self.view):
                if m["role"] == "assistant" and i > 0:
                    with_prompt, without = (self.render(self.view[:i], add_generation_prompt=True),
                                            self.render(self.view[:i]))
                    self._gen_prompt = with_prompt[len(without):] if with_prompt.startswith(without) else ""
                    break
        return self._gen_prompt

    def _data_end(self, view: list[dict], j: int) -> int:
        """Where message j's data ends in F: F and the render with that data probed differ only there."""
        probed = self.render(self._probed(view, j))
        if self.probe not in probed:
            raise self._lost(j, "its data")  # the template does not render that data in the conversation
        return len(self.F) - len(_after_data(self.F, probed))

    def _probed(self, view: list[dict], j: int) -> list[dict]:
        """view with message j's last data field (tool-call arguments, else content, else reasoning) probed."""
        if self.probe is None:
            raise self._lost(j, "a probe character")
        m = dict(view[j])
        if m.get("tool_calls"):
            calls = [dict(c) for c in m["tool_calls"]]
            calls[-1] = {**calls[-1], "function": {**calls[-1]["function"], "arguments": self.probe}}
            m["tool_calls"] = calls
        elif isinstance(m.get("content"), str) and m["content"].strip():
            m["content"] = self.probe
        elif m.get("reasoning_content"):
            m["reasoning_content"] = m["thinking"] = self.probe
        else:
            raise self._lost(j, "any data")
        return view[:j] + [m] + view[j + 1:]

    def _lost(self, i: int, what: str) -> RowError:
        return RowError(f"cannot locate {self.view[i]['role']} turn {i + self.shift} in the rendered conversation "
                        f"({what}): the chat template renders it in a way that cannot be masked exactly")


# --------------------------------------------------------------------------- locating with markers


def marker_spans(text: str, generation: list, n_turns: int) -> list[tuple[int, int]]:
    """{% generation %} spans merged where adjacent (Phi-3's separate EOS block), trailing layout dropped:
    exactly one per assistant turn."""
    merged: list[list[int]] = []
    for s, e in sorted(generation):
        if e <= s:
            continue
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    spans = [(s, _rstrip_end(text, s, e)) for s, e in merged]
    spans = [(s, e) for s, e in spans if e > s]
    if len(spans) != n_turns:
        raise RowError(f"the template's {{% generation %}} blocks ({len(spans)}) do not match the "
                       f"{n_turns} assistant turns")
    return spans


# --------------------------------------------------------------------------- verification


def check_rendered(view: list[dict], text: str, shift: int) -> None:
    """Every system/user/tool message with content must be in the render (Phi-3 drops tool messages)."""
    for i, m in enumerate(view):
        content = m.get("content")
        if m["role"] == "assistant" or not isinstance(content, str) or not content.strip():
            continue
        c = content.strip()
        if c not in text and json.dumps(c, ensure_ascii=False)[1:-1] not in text:
            raise RowError(f"the chat template drops the {m['role']} message of turn {i + shift}")


def verify_turn(text: str, span: tuple[int, int], m: dict, turn: int, final: bool, train_reasoning: bool,
                atoms: Atoms) -> None:
    s, e = span
    if (why := _missing(text, s, e, m, turn)) is not None:
        raise RowError(why)
    reasoning = reasoning_text(m)
    if final and train_reasoning and reasoning and reasoning not in text[s:e]:
        raise RowError(f"the chat template drops the reasoning of the final assistant turn {turn}; use a template "
                       "that renders it or set data.train_reasoning=false")
    if not atoms.ends_with_token(text, s, e):
        raise RowError(f"assistant turn {turn} does not end with an end-of-turn token")


def skip_reasoning(text: str, span: tuple[int, int], m: dict) -> tuple[int, int]:
    """data.train_reasoning=false: the turn is trained from right after its reasoning text."""
    reasoning = reasoning_text(m)
    s, e = span
    k = text.find(reasoning, s, e) if reasoning else -1
    return (k + len(reasoning), e) if k >= 0 else span


def assistant_spans(renderer, messages: list[dict], last_turn_only: bool = False):
    """-> (full text, sorted [start, end) character spans to train). RowError if not exactly maskable."""
    view, text, generation = renderer.conversation(messages)
    shift = len(messages) - len(view)  # 1 when the system prompt was folded into the first user turn
    atoms = atoms_for(renderer.tokenizer)
    check_rendered(view, text, shift)
    turns = [i for i, m in enumerate(view) if m["role"] == "assistant"]
    wanted = turns[-1:] if last_turn_only else turns
    if generation is not None:
        spans = dict(zip(turns, marker_spans(text, generation, len(turns))))
    else:
        locator = Locator(renderer, view, text, atoms, shift)
        spans = {i: locator.turn(i) for i in wanted}
    out, prev_end = [], 0
    for i in wanted:
        verify_turn(text, spans[i], view[i], i + shift, i == turns[-1], renderer.options.train_reasoning, atoms)
        if spans[i][0] < prev_end:
            raise RowError(f"assistant turn {i + shift} overlaps the turn before it in the rendered conversation")
        prev_end = spans[i][1]
        out.append(spans[i] if renderer.options.train_reasoning else skip_reasoning(text, spans[i], view[i]))
    return text, out


# --------------------------------------------------------------------------- token labels


def labels_from_spans(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize once; a token is trained when it overlaps a span. Per span two char->token look-ups
    and one slice assignment: no per-token Python loop."""
    enc = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    ids = np.asarray(enc.ids, dtype=np.int32)
    labels = np.full_like(ids, IGNORE_INDEX)
    for s, e in spans:
        first, last = enc.char_to_token(s), enc.char_to_token(e - 1)
        if first is None or last is None:  # a character no token covers (a normalizer removed it)
            return ids, _labels_by_offsets(ids, np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2), spans)
        labels[first:last + 1] = ids[first:last + 1]
    return ids, labels


def _labels_by_offsets(ids: np.ndarray, offsets: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """Vectorised overlap test: token [a, b) is trained when some span [s, e) has s < max(b, a+1) and a < e."""
    starts, ends = np.array([s for s, _ in spans]), np.array([e for _, e in spans])
    a, b = offsets[:, 0], np.maximum(offsets[:, 1], offsets[:, 0] + 1)  # (T,), (T,)
    j = np.searchsorted(ends, a, side="right")  # first span ending after the token starts
    jc = np.minimum(j, len(spans) - 1)
    trained = (j < len(spans)) & (starts[jc] < b)
    return np.where(trained, ids, IGNORE_INDEX).astype(np.int32)
