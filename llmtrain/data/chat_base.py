"""What the chat modules share (chat.py reads rows into messages, chat_render.py renders them,
chat_spans.py locates the trained spans): the per-row error and the options that shape masks.
chat.py re-exports both; this module exists so the renderer and the span locator need not import
chat.py, which uses them."""
from __future__ import annotations

from dataclasses import dataclass


class RowError(ValueError):
    """This one row is malformed: skipped and counted with its file:line."""


@dataclass(frozen=True)
class ChatOptions:
    """How conversations are rendered and masked (DataConfig.train_reasoning / template_date)."""

    train_reasoning: bool = True  # train an assistant turn's reasoning (where the template renders it)
    template_date: str = "2024-07-26"  # the "today" that date-printing templates render (Llama 3.x, gpt-oss)


DEFAULT_OPTIONS = ChatOptions()
