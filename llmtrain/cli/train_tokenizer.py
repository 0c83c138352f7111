"""`llmtrain train-tokenizer` (= launch/train_tokenizer.py): train a byte-level BPE tokenizer (digits split,
ChatML template) and save it as a HF tokenizer directory (tools/tokenizer_train.py).

    llmtrain train-tokenizer --input 'data/demo/pretrain/*.jsonl' --input data/demo/sft_train.jsonl \\
        --vocab-size 1024 --out assets/tokenizer

Inputs (repeat --input; globs allowed, quote them):
  .txt      one document per blank-line-separated paragraph (a file with no blank line is one document)
  .jsonl    one document per line: the --text-field value (default "text")
  .parquet  one document per row: the --text-field column
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from ..data.tokenizer_id import tokenizer_hash


def main(argv: Optional[list[str]] = None) -> int:
    from ..tools.tokenizer_train import TokenizerInputError, expand_inputs, iter_texts, train_bpe_tokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", action="append", required=True, help="file or glob; repeatable")
    parser.add_argument("--vocab-size", type=int, required=True, help="total vocab incl. 3 special tokens and 256 bytes")
    parser.add_argument("--out", required=True, help="output directory (HF tokenizer files)")
    parser.add_argument("--text-field", default="text", help="jsonl field / parquet column holding the text")
    args = parser.parse_args(argv)
    try:
        files = expand_inputs(args.input)
        tok = train_bpe_tokenizer(iter_texts(files, args.text_field), args.vocab_size, args.out)
    except (TokenizerInputError, OSError, UnicodeDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"trained on {len(files)} file(s): vocab {len(tok)} (eos=pad={tok.eos_token_id}), saved to {args.out}")
    print(f"tokenizer_hash {tokenizer_hash(tok)}")
    return 0
