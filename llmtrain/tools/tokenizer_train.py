"""Train the project's own byte-level BPE tokenizer and save it as a Hugging Face tokenizer directory.

Models cannot be downloaded in CI or in the demo, so every debug recipe uses a tokenizer trained
here (shipped in ``assets/tokenizer/``). Design choices:

* byte-level BPE: any UTF-8 string encodes and decodes back exactly (no <unk>, no normalizer);
* digits are split one per pre-token *before* the byte-level split, so every digit is one token
  and no merge ever spans digits: a tiny model sees "122" as "1","2","2", which is what makes
  the arithmetic demo learnable;
* ``<|endoftext|>`` is eos and pad; ``<|im_start|>``/``<|im_end|>`` frame ChatML turns.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Iterator

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from ..data.chat import CHATML_TEMPLATE  # the template every ChatML tokenizer of this project carries
from ..errors import LlmtrainError

EOS_TOKEN = "<|endoftext|>"  # end of document / sample; also used as pad (masked via labels, not by id)
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"  # end of a chat turn: generation for chat should stop here too
SPECIAL_TOKENS = [EOS_TOKEN, IM_START, IM_END]  # trained first, so their ids are 0, 1, 2

class TokenizerInputError(LlmtrainError, ValueError):
    """Bad tokenizer-training input (missing file, empty corpus, missing field); message is one line."""


def _build_backend(vocab_size: int) -> tuple[Tokenizer, trainers.BpeTrainer]:
    tok = Tokenizer(models.BPE())  # no unk_token: byte-level covers every input byte
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            # add_prefix_space=False: a prefix space would not survive decode, breaking round trips
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps offsets exact (leading-space bytes included); adds no tokens
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,  # occurrences a pair needs before it may be merged
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even unseen ones
        show_progress=False,
    )
    return tok, trainer


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on `texts`, save a HF tokenizer directory to `out_dir`, return it loaded.

    vocab_size counts the 3 special tokens and the 256 byte symbols, so it must be > 259.
    """
    min_vocab = len(SPECIAL_TOKENS) + 256
    if vocab_size <= min_vocab:
        raise TokenizerInputError(f"vocab_size={vocab_size} must be > {min_vocab} (3 special tokens + 256 bytes)")
    n_texts = 0

    def counted(it: Iterable[str]) -> Iterator[str]:
        nonlocal n_texts
        for t in it:
            if t:
                n_texts += 1
                yield t

    backend, trainer = _build_backend(vocab_size)
    backend.train_from_iterator(counted(texts), trainer=trainer)
    if n_texts == 0:
        raise TokenizerInputError("no non-empty texts to train the tokenizer on")
    # Mark them special on the backend too, so they are never split and skip_special_tokens drops them.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        additional_special_tokens=[IM_START, IM_END],
        clean_up_tokenization_spaces=False,  # cleanup rewrites " ." -> "." and breaks exact round trips
        padding_side="right",
    )
    hf_tok.chat_template = CHATML_TEMPLATE
    os.makedirs(out_dir, exist_ok=True)
    hf_tok.save_pretrained(out_dir)
    _write_portable_config(out_dir)
    return hf_tok


def _write_portable_config(out_dir: str) -> None:
    """Rewrite the saved config in the form transformers 4.x and 5.x both load.

    transformers 5 writes tokenizer_class "TokenizersBackend" and a list under
    "extra_special_tokens", neither of which 4.x (allowed by pyproject) understands; 5.x reads
    the 4.x spelling. special_tokens_map.json is for older tools that read it directly.
    """
    config_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config.pop("extra_special_tokens", None)
    config.pop("backend", None)
    config["additional_special_tokens"] = [IM_START, IM_END]
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    special_map = {"eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN, "additional_special_tokens": [IM_START, IM_END]}
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special_map, f, indent=2, sort_keys=True)
        f.write("\n")


# --- reading training text from files (used by launch/train_tokenizer.py) ---


def expand_inputs(patterns: Iterable[str]) -> list[str]:
    """Expand files/globs to a sorted, de-duplicated file list; a pattern matching nothing is an error."""
    files: list[str] = []
    for pattern in patterns:
        matched = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        matched = [p for p in matched if os.path.isfile(p)]
        if not matched:
            raise TokenizerInputError(f"--input {pattern!r}: no such file (or glob matched no files)")
        files.extend(p for p in matched if p not in files)
    for path in files:
        if os.path.splitext(path)[1] not in (".txt", ".jsonl", ".parquet"):
            raise TokenizerInputError(f"{path}: unsupported extension; use .txt, .jsonl or .parquet")
    return files


def iter_texts(paths: Iterable[str], text_field: str = "text") -> Iterator[str]:
    """Yield documents from files.

    .txt: one document per blank-line-separated paragraph (a file without blank lines is one document);
    .jsonl: row[text_field] of each non-empty line; .parquet: the text_field column.
    """
    for path in paths:
        ext = os.path.splitext(path)[1]
        if ext == ".txt":
            with open(path, encoding="utf-8") as f:
                for para in f.read().split("\n\n"):
                    if para.strip():
                        yield para.strip("\n")
        elif ext == ".jsonl":
            yield from _iter_jsonl(path, text_field)
        elif ext == ".parquet":
            import pyarrow.parquet as pq  # imported lazily: only parquet inputs need it

            schema_names = pq.read_schema(path).names
            if text_field not in schema_names:
                raise TokenizerInputError(f"{path}: no column {text_field!r} (columns: {schema_names}); set --text-field")
            for value in pq.read_table(path, columns=[text_field]).column(text_field).to_pylist():
                if value:
                    yield str(value)


def _iter_jsonl(path: str, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TokenizerInputError(f"{path}:{line_no}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict) or text_field not in row:
                keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise TokenizerInputError(f"{path}:{line_no}: no field {text_field!r} (has {keys}); set --text-field")
            if row[text_field]:
                yield str(row[text_field])
