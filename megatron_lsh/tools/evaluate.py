"""Validation loss and perplexity of a checkpoint on held-out text, one pass over all of it.

    python -m megatron_lsh.tools.evaluate --load checkpoints/gpt-moe --input held_out.jsonl
    python -m megatron_lsh.tools.evaluate --load checkpoints/t5-moe --data-path data/t5/valid_text_sentence

GPT: next-token perplexity over windows of the training sequence length. T5: span-corruption
loss and perplexity of the decoder targets. Runs on one process with every expert merged; the
exact MoE by default (bf16 payloads too), or as the run trained, with its LSH dispatch and payload
formats (--lsh), to see what compression costs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_lsh.data.gpt_data import DataError, data_iterator
from megatron_lsh.data.preprocess import preprocess_jsonl
from megatron_lsh.data.tokenizer import tokenizer_settings
from megatron_lsh.moe import CompressionStats, get_compression_tracker
from megatron_lsh.moe.config import added_settings
from megatron_lsh.tools.loading import load_for_inference, saved_run, task_of_run, tokenizer_model_path
from megatron_lsh.training.arguments import ArgumentError, add_setting_flag
from megatron_lsh.training.checkpointing import CheckpointError
from megatron_lsh.training.t5_task import T5_TASK
from megatron_lsh.training.task import perplexity, summed_token_loss


def evaluate(load_dir: str, data_path: str | None = None, input_jsonl: str | None = None,
             micro_batch_size: int = 8, max_samples: int | None = None, lsh: bool = False,
             lsh_overrides: dict | None = None) -> dict:
    """Loss and perplexity over held-out text; with lsh, also the compression rate LSH reached
    (``lsh_overrides`` such as {"lsh_num_hashes": 4} replace the run's LSH settings)."""
    saved, task_name, _ = saved_run(load_dir)
    task = task_of_run(task_name)
    with tempfile.TemporaryDirectory() as scratch:
        if input_jsonl is not None:  # tokenized before any process group exists
            data_path = preprocess_jsonl(
                [input_jsonl], f"{scratch}/held_out", saved["tokenizer_type"],
                tokenizer_model_path(load_dir, saved), vocab_size=saved.get("vocab_size"),
                workers=1, progress=False, split_sentences=task is T5_TASK,
                tokenizer_options={name: value for name, value in tokenizer_settings(saved).items()
                                   if name not in ("tokenizer_type", "tokenizer_model", "vocab_size")},
            )["text"]["prefix"]
        loaded = load_for_inference(load_dir, lsh=lsh, lsh_overrides=lsh_overrides)
        get_compression_tracker().reset()
        args = loaded.args
        args.data_path = None
        args.train_data_path, args.valid_data_path, args.test_data_path = None, [data_path], None
        args.data_cache_path = f"{scratch}/cache"
        args.mock_data = False
        # One pass: about as many samples as the text fills (megatron-core's T5 index needs a count).
        text = IndexedDataset(data_path)  # keep it alive: sequence_lengths views its memory map
        tokens_in_text = int(text.sequence_lengths.sum())
        one_pass = max(1, tokens_in_text // (args.seq_length - (2 if task is T5_TASK else 0)))
        wanted = one_pass if max_samples is None else min(max_samples, one_pass)
        _, dataset, _ = task.build_datasets(args, loaded.tokenizer, [0, wanted, 0])
        samples = min(wanted, len(dataset))
        iterator = data_iterator(dataset, 0, micro_batch_size, 0, 1, num_workers=0)
        start = time.time()
        with torch.no_grad():
            loss_sum, tokens = summed_token_loss(
                task.forward_step, loaded.model, iterator, max(1, samples // micro_batch_size)
            )
    loss = loss_sum / max(tokens, 1.0)
    compression = sum(get_compression_tracker().take().values(), CompressionStats())
    return {"loss": loss, "perplexity": perplexity(loss), "tokens": int(tokens),
            "samples": samples, "seconds": time.time() - start, "checkpoint": loaded.path,
            "compression_rate": compression.compression_rate if compression.tokens else None}


def parse_args(argv=None):
    """(arguments, the LSH settings given to replace the run's): an override flag left out keeps
    the run's setting; --lsh-error-bound off asks for no bound."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="Checkpoint directory (the --save of training).")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="Held-out jsonl documents ({\"text\": ...} per line).")
    source.add_argument("--data-path", help="A preprocessed prefix made with the run's tokenizer.")
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--max-samples", type=int, default=None, help="Stop after this many samples.")
    parser.add_argument("--lsh", action="store_true",
                        help="Evaluate with the run's LSH dispatch and payload formats (default: the exact MoE).")
    overridable = [f for f in added_settings() if f.metadata["evaluation_override"]]
    for config_field in overridable:
        # No default at all (SUPPRESS): a flag left out leaves no attribute, 'off' leaves None.
        if not config_field.name.startswith("lsh_"):  # payload formats act with or without LSH
            suffix = " Instead of the run's with --lsh, of bf16 without."
        else:
            suffix = " With --lsh: instead of the run's" + (
                " (and no controller)." if config_field.name == "lsh_error_bound" else ".")
        add_setting_flag(parser, config_field, default=argparse.SUPPRESS, help_suffix=suffix)
    args = parser.parse_args(argv)
    return args, {f.name: getattr(args, f.name) for f in overridable if hasattr(args, f.name)}


def main(argv=None) -> None:
    args, overrides = parse_args(argv)
    try:
        result = evaluate(args.load, args.data_path, args.input, args.micro_batch_size, args.max_samples, args.lsh,
                          overrides)
    except (CheckpointError, DataError, FileNotFoundError, ArgumentError) as error:
        sys.exit(f"error: {error}")
    compression = f", LSH compression rate {result['compression_rate']:.3f}" if result["compression_rate"] else ""
    print(
        f"{result['checkpoint']}: loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f} "
        f"over {result['tokens']:,} tokens ({result['samples']} samples, {result['seconds']:.0f}s){compression}"
    )


if __name__ == "__main__":
    main()
