"""Render one row's conversation with the tokenizer's chat template, as `apply_chat_template` would.

Differences from calling `tokenizer.apply_chat_template` per render, each on purpose:
  * one fixed "today" (`ChatOptions.template_date`) for templates that print the date (Llama 3.x
    via `strftime_now`, gpt-oss): every render of a row, on any day, gives the same text, so a
    row rendered across midnight still masks and a finished preparation stays valid;
  * a template exception (Gemma's "System role not supported", an unsupported tool call, ...)
    is that row's RowError, never a traceback;
  * a template that rejects a system message gets it folded into the first user turn
    ("{system}\\n\\n{user}", what Gemma 3's own template and Google's Gemma docs do); whether a
    template rejects one is probed once per template on a fixed conversation, never learned from
    earlier rows (which would make a row's mask depend on the rows its process saw before);
  * the compiled template is called directly: `apply_chat_template` costs ~5x the render itself
    in input normalisation, and a row needs 1 + 2 x turns renders.
Messages reach the template as transformers passes them: None-valued keys dropped, reasoning under
both `reasoning_content` (Qwen3, ...) and `thinking` (gpt-oss).
"""
from __future__ import annotations

import datetime
import re
from functools import partial
from typing import Optional

from .chat_base import ChatOptions, RowError

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
_FOLDS_SYSTEM: dict[str, bool] = {}  # template -> it rejects a system message (probed once, see _folds_system)
_PROBE = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]
_HAS_MARKERS: dict[str, bool] = {}  # template -> it has {% generation %} blocks


def _strftime_at(date: datetime.datetime, fmt: str) -> str:
    return date.strftime(fmt)


def template_view(messages: list[dict]) -> list[dict]:
    """Our messages -> what the template sees (a fresh list of fresh dicts)."""
    out = []
    for m in messages:
        v = {k: val for k, val in m.items() if val is not None}
        if "reasoning_content" in v:
            v["thinking"] = v["reasoning_content"]
        out.append(v)
    return out


def fold_system(messages: list[dict]) -> Optional[list[dict]]:
    """[system, user, ...] -> [user with "{system}\\n\\n{user}", ...]; None when there is nothing to fold."""
    if len(messages) < 2 or messages[0]["role"] != "system" or messages[1]["role"] != "user":
        return None
    first = dict(messages[1])
    first["content"] = f"{messages[0]['content']}\n\n{messages[1]['content']}"
    return [first] + list(messages[2:])


class Renderer:
    """Renders conversations of one row: the tokenizer's template and special tokens, the row's tools,
    one fixed date. Template errors raise RowError."""

    def __init__(self, tokenizer, tools: Optional[list], options: ChatOptions):
        from transformers.utils.chat_template_utils import _compile_jinja_template

        self.tokenizer = tokenizer
        self.options = options
        self.template = tokenizer.chat_template
        self.compiled = _compile_jinja_template(self.template)
        if self.template not in _HAS_MARKERS:
            _HAS_MARKERS[self.template] = bool(_GENERATION_TAG.search(self.template))
        self.has_generation_markers = _HAS_MARKERS[self.template]
        date = datetime.datetime.fromisoformat(options.template_date)
        # template variables shadow the environment's globals: this replaces strftime_now for this render
        self.kwargs = {**tokenizer.special_tokens_map, "strftime_now": partial(_strftime_at, date)}
        self.tools = tools

    def __call__(self, view: list[dict], add_generation_prompt: bool = False) -> str:
        try:
            return self.compiled.render(messages=view, tools=self.tools, documents=None,
                                        add_generation_prompt=add_generation_prompt, **self.kwargs)
        except Exception as e:  # jinja's TemplateError, or a TypeError/... from the row's values inside the template
            raise RowError(f"chat template error: {_one_line(e)}") from None

    def with_generation_spans(self, view: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """Full render and the [start, end) character spans of its {% generation %} blocks."""
        blocks, spans = [], []
        try:
            with self.compiled.environment.activate_tracker(blocks, spans):
                for block in self.compiled.generate(messages=view, tools=self.tools, documents=None,
                                                    add_generation_prompt=False, **self.kwargs):
                    blocks.append(block)
        except Exception as e:
            raise RowError(f"chat template error: {_one_line(e)}") from None
        return "".join(blocks), spans

    def conversation(self, messages: list[dict]) -> tuple[list[dict], str, Optional[list]]:
        """The messages as rendered (system folded where the template rejects it), their full render, and
        the template's {% generation %} spans (None for a template without markers)."""
        view = template_view(messages)
        if self._folds_system() and (folded := fold_system(view)) is not None:
            return (folded, *self._full(folded))
        try:
            return (view, *self._full(view))
        except RowError as first_error:  # this row's own content: folding is tried for this row alone
            folded = fold_system(view)
            if folded is None:
                raise
            try:
                rendered = self._full(folded)
            except RowError:
                raise first_error from None
            return (folded, *rendered)

    def _folds_system(self) -> bool:
        """The template rejects [system, user, assistant] and renders it folded (Gemma 2): fold every
        row's system message. A pure function of the template, so any worker decides alike."""
        if self.template not in _FOLDS_SYSTEM:
            try:
                self._full(template_view(_PROBE))
                folds = False
            except RowError:
                try:
                    self._full(fold_system(template_view(_PROBE)))
                    folds = True
                except RowError:
                    folds = False
            _FOLDS_SYSTEM[self.template] = folds
        return _FOLDS_SYSTEM[self.template]

    def _full(self, view: list[dict]) -> tuple[str, Optional[list]]:
        if self.has_generation_markers:
            return self.with_generation_spans(view)
        return self(view), None


def _one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__
