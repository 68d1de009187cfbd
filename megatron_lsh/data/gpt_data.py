"""GPT training data: megatron-core's GPTDataset through BlendedMegatronDatasetBuilder, checks that
the files are whole and match the tokenizer, and a resumable data-parallel sampler."""

from __future__ import annotations

import atexit
import json
import logging
import os
import signal
import weakref
from typing import Iterator, List, Optional, Sequence

import numpy as np
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import (
    GPTDataset,
    GPTDatasetConfig,
    MockGPTDataset,
    _get_ltor_masks_and_position_ids,
)
from megatron.core.datasets.indexed_dataset import IndexedDataset, get_bin_path, get_idx_path
from megatron.core.datasets.utils import get_blend_from_list

from megatron_lsh.data.preprocess import data_sidecar_path

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """Data files that cannot be trained on; the message names the file and the fix."""


def check_indexed_dataset(prefix: str, tokenizer, flag: str) -> None:
    """Refuse truncated files and data made with another tokenizer, before training starts."""
    bin_path, idx_path = get_bin_path(prefix), get_idx_path(prefix)
    try:
        dataset = IndexedDataset(prefix, mmap=True)
    except Exception as error:
        raise DataError(
            f"{flag} {prefix}: cannot read {idx_path} ({type(error).__name__}: {error}); "
            "re-run data_tools/preprocess_data.py"
        ) from None
    index = dataset.index
    itemsize = np.dtype(index.dtype).itemsize
    expected = int(index.sequence_pointers[-1] + index.sequence_lengths[-1] * itemsize) if len(index) else 0
    actual = os.path.getsize(bin_path)
    if actual != expected:
        raise DataError(
            f"{flag} {prefix}: {bin_path} holds {actual} bytes but {idx_path} describes "
            f"{expected}; the file is {'truncated' if actual < expected else 'not the one indexed'} "
            "- re-run data_tools/preprocess_data.py"
        )
    sidecar = data_sidecar_path(prefix)
    if os.path.isfile(sidecar):
        with open(sidecar) as f:
            made_with = json.load(f)
        if made_with.get("tokenizer_fingerprint") != tokenizer.fingerprint:
            raise DataError(
                f"{flag} {prefix} was tokenized with "
                f"{made_with.get('tokenizer_model') or made_with.get('tokenizer_type')} "
                f"(vocabulary {made_with.get('vocab_size')}), not with this --tokenizer-model "
                f"(vocabulary {tokenizer.vocab_size}); pass the tokenizer the data was made with, "
                "or re-run data_tools/preprocess_data.py with this one"
            )
        return
    # No record of the tokenizer: at least every id must exist in its vocabulary.
    tokens = np.memmap(bin_path, dtype=index.dtype, mode="r")
    largest = int(tokens.max()) if tokens.size else -1
    if largest >= tokenizer.vocab_size:
        raise DataError(
            f"{flag} {prefix} holds token id {largest}, beyond this tokenizer's vocabulary of "
            f"{tokenizer.vocab_size}; pass the tokenizer the data was made with"
        )


def _blend(paths: Optional[Sequence[str]]):
    return get_blend_from_list(list(paths)) if paths else None


def blends_from_args(args, tokenizer):
    """(blend, blend_per_split, split) for megatron-core's dataset config, after checking every
    data file named by --data-path or --train/valid/test-data-path."""
    per_split = [args.train_data_path, args.valid_data_path, args.test_data_path]
    for flag, paths in zip(
        ("--data-path", "--train-data-path", "--valid-data-path", "--test-data-path"),
        [args.data_path] + per_split,
    ):
        blend = _blend(paths)
        for prefix in blend[0] if blend else []:
            check_indexed_dataset(prefix, tokenizer, flag)
    if args.data_path:
        return _blend(args.data_path), None, args.split
    return None, [_blend(p) for p in per_split], None


SPLIT_NAMES = ("training", "validation", "test")


def build_splits(dataset_class, config, num_samples: Sequence[int], split_flag: Optional[str]):
    """megatron-core's builder over ``config``, after checking that every split it will draw
    samples from holds at least one document of every file it blends: the builder loops forever
    on an empty one. ``split_flag``: the --split value (None with per-split paths)."""
    if config.blend is not None and config.split_matrix is not None:
        for prefix in config.blend[0]:
            documents = dataset_class.numel_low_level_dataset(
                dataset_class.build_low_level_dataset(prefix, config))
            for index, (share, wanted) in enumerate(zip(config.split_matrix, num_samples)):
                if share is None or not wanted:
                    continue
                # megatron-core's own rounding of the split into document ranges
                count = int(round(share[1] * documents)) - int(round(share[0] * documents))
                if count == 0 and SPLIT_NAMES[index] == "test":
                    # Only the end of a run evaluates on it: the run goes on without, said once (the
                    # example scripts' 99990,8,2 leave small corpora no test document).
                    logger.warning("--split %s: the test split of %s gets none of its %d documents; the run "
                                   "ends without a test evaluation", split_flag, prefix, documents)
                    config.split_matrix[index] = None  # megatron-core then builds no test dataset
                elif count == 0:
                    raise DataError(
                        f"--split {split_flag}: the {SPLIT_NAMES[index]} split of {prefix} gets none of its "
                        f"{documents} documents; give it a larger share (e.g. --split 90,5,5), add documents, "
                        f"or set --eval-iters 0 if no evaluation is wanted"
                    )
    return BlendedMegatronDatasetBuilder(dataset_class, list(num_samples), lambda: True, config).build()


class _SampleIndependentLossMask:
    """megatron-core's GPTDataset caches the loss mask of the first sample a process reads, then
    zeroes that sample's padding positions in the cached tensor itself: every later sample of the
    process (each data-loader worker has its own) loses the same positions. Masks then depend on
    which sample a worker read first, so a resumed run trained on other masks than an
    uninterrupted one. Here the cache holds the mask megatron-core computes, before any sample's
    padding is applied."""

    def __getitem__(self, idx):
        caching_now = self.masks_and_position_ids_are_cacheable and not self.masks_and_position_ids_are_cached
        sample = super().__getitem__(idx)
        if caching_now:
            config = self.config
            _, self.cached_loss_mask, _ = _get_ltor_masks_and_position_ids(
                sample["tokens"], config.tokenizer.eod, config.reset_position_ids,
                config.reset_attention_mask, config.eod_mask_loss, config.create_attention_mask,
            )
        return sample


class PretrainingGPTDataset(_SampleIndependentLossMask, GPTDataset):
    pass


class PretrainingMockGPTDataset(_SampleIndependentLossMask, MockGPTDataset):
    pass


def build_gpt_datasets(args, tokenizer, num_samples: Sequence[int]):
    """(train, valid, test) datasets holding at least num_samples samples each (None when a
    split has no data)."""
    if args.mock_data:
        blend, blend_per_split, split = None, None, "1,1,1"
        dataset_class = PretrainingMockGPTDataset
    else:
        blend, blend_per_split, split = blends_from_args(args, tokenizer)
        dataset_class = PretrainingGPTDataset
    config = GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=split,
        path_to_cache=args.data_cache_path,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # the local attention builds the causal mask itself
        mmap_bin_files=getattr(args, "mmap_bin_files", True),
    )
    return build_splits(dataset_class, config, num_samples, split)


class DataParallelSampler(torch.utils.data.Sampler):
    """Megatron's pretraining order: global batches of consecutive sample indices, starting
    after `consumed_samples`; each data-parallel rank takes its micro-batch slice of them."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int):
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size

    def __len__(self):
        return (self.total_samples - self.consumed_samples) // (self.micro_batch_size * self.dp_size)

    def __iter__(self) -> Iterator[List[int]]:
        step = self.micro_batch_size * self.dp_size
        first = self.dp_rank * self.micro_batch_size
        for start in range(self.consumed_samples, self.total_samples - step + 1, step):
            yield list(range(start + first, start + first + self.micro_batch_size))


def _ignore_sigterm(worker_id: int) -> None:
    # A job's SIGTERM (SLURM before its time limit, preemption) reaches every process, loader
    # workers included: they must keep serving the step the trainer finishes before it saves.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


_LOADER_ITERATORS = weakref.WeakSet()


@atexit.register  # registered after multiprocessing's own exit handler, so it runs before it
def _stop_loader_workers() -> None:
    # multiprocessing's exit handler stops leftover daemonic workers with SIGTERM, which they
    # ignore; ask them to stop the loader's own way first (a private method of torch's iterator).
    for iterator in list(_LOADER_ITERATORS):
        iterator._shutdown_workers()


def data_iterator(dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int,
                  dp_size: int, num_workers: int) -> Iterator[dict]:
    sampler = DataParallelSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        worker_init_fn=_ignore_sigterm,
        # Its own generator: creating an iterator must not advance the global RNG, or dropout
        # after a resume (or after an evaluation) would differ from an uninterrupted run.
        generator=torch.Generator().manual_seed(consumed_samples + dp_rank),
    )
    iterator = iter(loader)
    if num_workers:
        _LOADER_ITERATORS.add(iterator)
    return iterator
