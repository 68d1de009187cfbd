"""jsonl documents to megatron-core .bin/.idx files (Megatron-LM's flags).

    python data_tools/preprocess_data.py --input data/corpus/train.jsonl \
        --output-prefix data/gpt/train --tokenizer-type SentencePieceTokenizer \
        --tokenizer-model data/tokenizer/spm.model --json-keys text --append-eod --workers 2

Writes OUTPUT_PREFIX_text_document.{bin,idx,json}; pass OUTPUT_PREFIX_text_document to --data-path.
For T5 add --split-sentences (and a tokenizer with sentinels): OUTPUT_PREFIX_text_sentence.
"""

import argparse
import sys
import time

from megatron_lsh.data.preprocess import preprocess_jsonl
from megatron_lsh.data.tokenizer import TOKENIZER_TYPES, TokenizerError


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="jsonl files, one document per line")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, required=True)
    p.add_argument("--tokenizer-model", default=None)
    p.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer, TikTokenizer")
    p.add_argument("--vocab-file", default=None, help="GPT2BPETokenizer's vocab.json, BertWordPiece*'s vocab.txt")
    p.add_argument("--merge-file", default=None, help="GPT2BPETokenizer's merges")
    p.add_argument("--tiktoken-pattern", choices=("v1", "v2"), default=None)
    p.add_argument("--tiktoken-num-special-tokens", type=int, default=1000)
    p.add_argument("--tokenizer-special-tokens", nargs="+", default=None)
    p.add_argument("--json-keys", nargs="+", default=["text"])
    p.add_argument("--append-eod", action="store_true", help="end every document with the EOD token")
    p.add_argument("--split-sentences", action="store_true",
                   help="store each document as sentences (for T5 span corruption); output PREFIX_KEY_sentence")
    p.add_argument("--workers", type=int, default=1)
    # Megatron-LM's tools/preprocess_data.py flags that change nothing here: one input file is one
    # stream in input order already, and sentence splitting keeps line breaks as breaks.
    p.add_argument("--partitions", type=int, default=1, help="accepted (Megatron-LM's); inputs are read in order")
    p.add_argument("--keep-sequential-samples", action="store_true", help="accepted: order is always kept")
    p.add_argument("--log-interval", type=int, default=1000, help="accepted; progress is a bar")
    p.add_argument("--keep-newlines", action="store_true", help="accepted; a line break always ends a sentence")
    p.add_argument("--lang", default="english", help="accepted; sentences split on punctuation, any language")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    try:
        results = preprocess_jsonl(
            args.input, args.output_prefix, args.tokenizer_type, args.tokenizer_model,
            json_keys=args.json_keys, append_eod=args.append_eod, workers=args.workers,
            vocab_size=args.vocab_size, progress=args.progress, split_sentences=args.split_sentences,
            tokenizer_options=dict(vocab_file=args.vocab_file, merge_file=args.merge_file,
                                   tiktoken_pattern=args.tiktoken_pattern,
                                   tiktoken_num_special_tokens=args.tiktoken_num_special_tokens,
                                   tokenizer_special_tokens=args.tokenizer_special_tokens),
        )
    except (TokenizerError, FileNotFoundError, KeyError) as error:
        sys.exit(f"error: {error}")
    for key, r in results.items():
        print(f"{r['prefix']}: {r['documents']} documents, {r['tokens']:,} tokens ({time.time() - start:.0f}s)")


if __name__ == "__main__":
    main()
