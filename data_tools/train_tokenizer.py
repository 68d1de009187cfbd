"""Train a SentencePiece tokenizer on jsonl documents.

    python data_tools/train_tokenizer.py --input data/corpus/train.jsonl --vocab-size 8000 \
        --output-prefix data/tokenizer/spm
    # T5: 100 sentinel pieces <extra_id_0> ... <extra_id_99>
    python data_tools/train_tokenizer.py --input data/corpus/train.jsonl --vocab-size 8000 \
        --vocab-extra-ids 100 --output-prefix data/tokenizer/spm_t5

Writes PREFIX.model (and PREFIX.vocab). Pieces 0-3 are <pad>, </s>, <unk>, <s>.
"""

import argparse
import json
import sys
import time

from megatron_lsh.data.tokenizer import SentencePieceTokenizer, train_sentencepiece


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="jsonl files")
    p.add_argument("--json-keys", nargs="+", default=["text"])
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--model-type", choices=["unigram", "bpe"], default="unigram")
    p.add_argument("--vocab-extra-ids", type=int, default=0, help="T5 sentinels to add")
    p.add_argument("--character-coverage", type=float, default=1.0)
    p.add_argument("--workers", type=int, default=2)
    return p.parse_args(argv)


def texts(paths, keys):
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                for key in keys:
                    if key not in record:
                        sys.exit(f"error: {path}:{line_number} has no key {key!r} (see --json-keys)")
                    yield record[key]


def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    try:
        model = train_sentencepiece(
            texts(args.input, args.json_keys),
            args.output_prefix,
            args.vocab_size,
            model_type=args.model_type,
            vocab_extra_ids=args.vocab_extra_ids,
            character_coverage=args.character_coverage,
            num_threads=args.workers,
        )
    except RuntimeError as error:  # SentencePiece reports bad settings as RuntimeError
        sys.exit(f"error: {error}")
    tokenizer = SentencePieceTokenizer(model)
    print(
        f"{model}: {tokenizer.vocab_size} pieces, {len(tokenizer.additional_special_tokens_ids)} "
        f"sentinels, trained in {time.time() - start:.0f}s"
    )


if __name__ == "__main__":
    main()
