"""jsonl documents to megatron-core indexed datasets (.bin/.idx), as Megatron-LM's
tools/preprocess_data.py names them: PREFIX_KEY_document.{bin,idx} (PREFIX_KEY_sentence.* with
--split-sentences, each document then stored as a run of sentences, which T5's span-corruption
sampler packs into samples).

Beside each pair goes PREFIX_KEY_document.json naming the tokenizer (type, file fingerprint,
vocabulary size), so training can refuse data made with another tokenizer.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
from megatron.core.datasets.indexed_dataset import (
    DType,
    IndexedDatasetBuilder,
    get_bin_path,
    get_idx_path,
)

from megatron_lsh.data.tokenizer import build_tokenizer

_worker_state: dict = {}

# A sentence ends at . ! ? ; or : followed by space, or at a line break (a line of verse).
_SENTENCE_BREAK = re.compile(r"(?<=[.!?;:])[ \t]+|\n\s*")


def split_sentences(text: str) -> List[str]:
    return [part.strip() for part in _SENTENCE_BREAK.split(text) if part.strip()]


def _init_worker(tokenizer_type, tokenizer_model, vocab_size, tokenizer_options, json_keys, append_eod, sentences):
    _worker_state["tokenizer"] = build_tokenizer(tokenizer_type, tokenizer_model, vocab_size, **tokenizer_options)
    _worker_state["keys"] = json_keys
    _worker_state["append_eod"] = append_eod
    _worker_state["sentences"] = sentences


def _encode_line(line: str):
    """One jsonl line -> {key: [token ids of each sentence]} (one "sentence" per document unless
    splitting sentences; None for a blank line), and the line's size in bytes."""
    size = len(line.encode("utf-8"))
    if not line.strip():
        return None, size
    record = json.loads(line)
    tokenizer = _worker_state["tokenizer"]
    encoded = {}
    for key in _worker_state["keys"]:
        if key not in record:
            raise KeyError(f"a document has no key {key!r} (see --json-keys)")
        texts = split_sentences(record[key]) if _worker_state["sentences"] else [record[key]]
        pieces = [ids for ids in (tokenizer.tokenize(t) for t in texts) if ids]
        if _worker_state["append_eod"]:
            if not pieces:
                pieces = [[]]
            pieces[-1].append(tokenizer.eod)
        encoded[key] = pieces
    return encoded, size


def output_prefix_for(output_prefix: str, key: str, split_sentences: bool = False) -> str:
    return f"{output_prefix}_{key}_{'sentence' if split_sentences else 'document'}"


def data_sidecar_path(path_prefix: str) -> str:
    return f"{path_prefix}.json"


def preprocess_jsonl(
    inputs: Sequence[str],
    output_prefix: str,
    tokenizer_type: str,
    tokenizer_model: str | None,
    json_keys: Sequence[str] = ("text",),
    append_eod: bool = True,
    workers: int = 1,
    vocab_size: int | None = None,
    progress: bool = True,
    split_sentences: bool = False,
    tokenizer_options: dict | None = None,
) -> Dict[str, dict]:
    """Tokenize every document of the jsonl inputs with `workers` processes, in input order.

    Returns, per key, the output prefix and its document and token counts. Files appear under
    their final names only once complete. tokenizer_options: build_tokenizer's other arguments
    (vocab_file, merge_file, ...).
    """
    tokenizer_options = dict(tokenizer_options or {})
    tokenizer = build_tokenizer(tokenizer_type, tokenizer_model, vocab_size, **tokenizer_options)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    for path in inputs:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--input {path}: no such file")
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    prefixes = {key: output_prefix_for(output_prefix, key, split_sentences) for key in json_keys}
    partial = {key: prefix + ".partial" for key, prefix in prefixes.items()}
    builders = {key: IndexedDatasetBuilder(get_bin_path(partial[key]), dtype=dtype) for key in json_keys}
    counts = {key: {"documents": 0, "tokens": 0} for key in json_keys}

    initargs = (tokenizer_type, tokenizer_model, vocab_size, tokenizer_options, list(json_keys), append_eod,
                split_sentences)
    _tokenize(inputs, initargs, workers, builders, counts, dtype, progress)

    made_with = {
        "tokenizer_type": tokenizer_type,
        "tokenizer_model": os.path.abspath(tokenizer_model) if tokenizer_model else None,
        **{name: os.path.abspath(path) for name, path in tokenizer_options.items()
           if name in ("vocab_file", "merge_file") and path},
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "vocab_size": tokenizer.vocab_size,
        "append_eod": append_eod,
        "split_sentences": split_sentences,
    }
    return {key: _finish(builder, partial[key], prefixes[key], {**made_with, **counts[key]})
            for key, builder in builders.items()}


def _finish(builder, partial: str, prefix: str, sidecar: dict) -> dict:
    """One key's files under their final names, with the sidecar saying what made them."""
    builder.finalize(get_idx_path(partial))
    os.replace(get_bin_path(partial), get_bin_path(prefix))
    os.replace(get_idx_path(partial), get_idx_path(prefix))
    with open(data_sidecar_path(prefix), "w") as f:
        json.dump(sidecar, f, indent=2)
    return {"prefix": prefix, "documents": sidecar["documents"], "tokens": sidecar["tokens"]}


def _tokenize(inputs, initargs: tuple, workers: int, builders: dict, counts: dict, dtype, progress: bool) -> None:
    """Every line of the inputs encoded (by `workers` processes, in input order) into the builders."""
    total_bytes = sum(os.path.getsize(p) for p in inputs)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing")

    def lines():
        for path in inputs:
            with open(path, encoding="utf-8") as f:
                yield from f

    if workers > 1:
        context = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
        pool = context.Pool(workers, initializer=_init_worker, initargs=initargs)
        encoded_lines = pool.imap(_encode_line, lines(), chunksize=16)
    else:  # in this process: no fork (safe after process groups and threads exist)
        pool = None
        _init_worker(*initargs)
        encoded_lines = map(_encode_line, lines())
    try:
        for encoded, size in encoded_lines:
            if bar is not None:
                bar.update(size)
            if encoded is None:
                continue
            for key, pieces in encoded.items():
                if not pieces:  # an empty document without --append-eod has nothing to store
                    continue
                ids = np.concatenate([np.asarray(p, dtype=dtype) for p in pieces])
                builders[key].add_document(ids, [len(p) for p in pieces])
                counts[key]["documents"] += 1
                counts[key]["tokens"] += len(ids)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    if bar is not None:
        bar.close()
