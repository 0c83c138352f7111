"""Scoring with a trained reward model: load a reward directory, score token sequences, conversations
or a preference file. The public API for other stages (e.g. PPO's reward):

    rm = RewardScorer.load("runs/debug-reward/final", device="cpu")
    rewards = rm.score_tokens([ids_a, ids_b, ...])        # (N,) fp32, one reward per token sequence
    rewards = rm.score_conversations([[{"role": "user", ...}, {"role": "assistant", ...}], ...])

Sequences are scored exactly as training read them: each sequence's reward is the head's output
at its last token (objectives.reward.sequence_rewards), sequences packed into rows with restarting
position ids (or padded). A conversation is encoded by the same chat path as the training pairs
(data.chat.tokenize_chat, ending in the template's end of turn, e.g. `<|im_end|>\\n` for ChatML):
score a rollout by re-encoding (prompt, completion) this way, not by its raw generated ids.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch

from ..data.batching import collate_sequences, next_fit_bounds
from ..data.chat import DEFAULT_OPTIONS, ChatOptions, ensure_chat_template, tokenize_chat
from ..errors import ConfigError
from ..objectives.reward import sequence_rewards


def load_reward_model(path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of a reward directory: final/ of `llmtrain reward` (a sequence-classification
    model), its merged/ subdirectory, or a LoRA final/ (a SEQ_CLS adapter, merged in memory)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if not os.path.isdir(path):
        raise ConfigError(f"{path}: no such reward model directory")
    adapter = os.path.isfile(os.path.join(path, "adapter_config.json"))
    try:
        if adapter:
            from peft import AutoPeftModelForSequenceClassification

            model = AutoPeftModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype)
            model = model.merge_and_unload()
        else:
            model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a reward model directory ({str(e).splitlines()[0]})") from None
    if getattr(model.config, "num_labels", 1) != 1:
        raise ConfigError(f"{path}: the model has num_labels={model.config.num_labels}; a reward model has 1")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    ensure_chat_template(tokenizer)
    model.config.use_cache = False  # a cache would let packed sequences attend to each other
    return model.to(device).eval(), tokenizer


@dataclass
class RewardScorer:
    model: Any  # a sequence-classification model with a `score` head (or a DeepSpeed engine around one)
    tokenizer: Any
    batch_tokens: int = 4096  # tokens per forward (sequences packed into rows of at most this many)
    chat: ChatOptions = DEFAULT_OPTIONS

    @classmethod
    def load(cls, path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             **options) -> "RewardScorer":
        model, tokenizer = load_reward_model(path, device, dtype)
        return cls(model, tokenizer, **options)

    @property
    def device(self) -> torch.device:
        return next(getattr(self.model, "module", self.model).parameters()).device

    @torch.no_grad()
    def score_tokens(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """One reward per token sequence, (N,) fp32 on the CPU, in the order given. Sequences are packed
        next-fit into rows of <= batch_tokens tokens (a longer one gets a row of its own)."""
        arrays = [np.asarray(s, dtype=np.int64) for s in sequences]
        if not arrays:
            return torch.zeros(0)
        bounds = next_fit_bounds(np.array([len(a) for a in arrays]), self.batch_tokens)
        out = []
        for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            row = [(ids, ids) for ids in arrays[a:b]]  # labels unused: the reward reads no targets
            batch = collate_sequences([row], self.tokenizer.pad_token_id)
            batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            out.append(sequence_rewards(self.model, batch).cpu())
        return torch.cat(out)

    def encode(self, conversation: list[dict], tools: Optional[list] = None) -> np.ndarray:
        ids, _ = tokenize_chat(self.tokenizer, conversation, last_turn_only=True, tools=tools, options=self.chat)
        return ids

    def score_conversations(self, conversations: Iterable[list[dict]]) -> torch.Tensor:
        """One reward per conversation (ending with the assistant turn to judge), (N,) fp32."""
        return self.score_tokens([self.encode(c) for c in conversations])


def score_file(scorer: RewardScorer, path: str, max_seq_len: int = 0, rows_per_forward: int = 64) -> Iterable[dict]:
    """Rows of a preference file ({chosen, rejected}[, prompt]) or a conversation file ({messages}) ->
    {"line", "chosen", "rejected"} or {"line", "reward"}; a row that cannot be encoded -> {"line", "bad"}.
    max_seq_len > 0 cuts each sequence as training did (data.max_seq_len)."""
    from ..config import SourceConfig
    from ..data.chat import RowError, row_tools
    from ..data.preference import to_pair
    from ..data.sft import iter_rows
    from ..data.sources import BadRow

    pending: list[tuple[str, list[np.ndarray]]] = []  # (line, its sequences) waiting for one forward

    def flush():
        rewards = scorer.score_tokens([ids for _, seqs in pending for ids in seqs]).tolist()
        k = 0
        for line, seqs in pending:
            r = rewards[k: k + len(seqs)]
            k += len(seqs)
            yield {"line": line, "chosen": r[0], "rejected": r[1]} if len(r) == 2 else {"line": line, "reward": r[0]}
        pending.clear()

    for row, _src in iter_rows([SourceConfig(path=path)], "--data"):
        if isinstance(row, BadRow):
            yield from flush()
            yield {"line": row.origin, "bad": row.reason}
            continue
        record = row.record
        try:
            if "chosen" in record:
                convs = list(to_pair(record))
            elif "messages" in record:
                convs = [record["messages"]]
            else:
                raise RowError("a row needs 'chosen' and 'rejected' (preference) or 'messages' (conversation)")
            seqs = [scorer.encode(c, tools=row_tools(record)) for c in convs]
        except RowError as e:
            yield from flush()
            yield {"line": row.origin, "bad": str(e)}
            continue
        pending.append((row.origin, [ids[:max_seq_len] if max_seq_len else ids for ids in seqs]))
        if len(pending) >= rows_per_forward:
            yield from flush()
    yield from flush()


def summary(rows: list[dict]) -> dict:
    pairs = [r for r in rows if "chosen" in r]
    out = {"rows": len(rows), "bad": sum("bad" in r for r in rows)}
    if pairs:
        out["pairs"] = len(pairs)
        out["accuracy"] = sum(r["chosen"] > r["rejected"] for r in pairs) / len(pairs)
        out["mean_margin"] = sum(r["chosen"] - r["rejected"] for r in pairs) / len(pairs)
    singles = [r["reward"] for r in rows if "reward" in r]
    if singles:
        out["mean_reward"] = sum(singles) / len(singles)
    return out
