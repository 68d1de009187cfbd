"""Megatron-LM's checkpoint conventions, so checkpoints travel both ways between it and us.

As Megatron-LM's ``megatron/training/checkpointing.py`` of the release that goes with
megatron-core 0.16.1 writes and reads a ``torch_dist`` checkpoint:

    SAVE/latest_checkpointed_iteration.txt   N (or ``release``), written once the save is whole
    SAVE/iter_000000N/ (or SAVE/release/)    megatron-core dist_checkpointing: metadata.json,
                                             .metadata, *.distcp shards, common.pt

The common state holds ``args`` (an argparse Namespace: ``consumed_train_samples`` and
``consumed_valid_samples`` live there), ``checkpoint_version`` (3.0), ``iteration``,
``opt_param_scheduler``, ``num_floating_point_operations_so_far`` and ``content_metadata``; the
shards hold ``model`` (``model0``, ``model1``, ... for virtual pipeline chunks), ``optimizer`` and
``rng_state``, a ShardedObject over (pipeline, tensor) ranks, or (pipeline, tensor, data) ranks
with expert parallelism. The model's tensors are megatron-core's own sharded keys, the same for
its local and Transformer Engine layers and for sequential and grouped experts, so weights move
unchanged. What does not move: Megatron-LM's optimizer state (its distributed optimizer stores
flat per-bucket buffers of its own layout), read here never; a resume from a Megatron-LM
checkpoint asks for ``--no-load-optim`` (as Megatron-LM's Mixtral script passes) or
``--finetune``.
"""

from __future__ import annotations

import argparse
import enum
import os
import random
from typing import Optional

import numpy as np
import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.tensor_parallel import get_cuda_rng_tracker

CHECKPOINT_VERSION = 3.0
TRACKER_FILE = "latest_checkpointed_iteration.txt"
RELEASE = "release"
# Megatron-LM's pre-torch_dist format: one torch.save file per model-parallel rank.
LEGACY_PREFIX = "mp_rank_"


def tracker_entry(root: str) -> Optional[str]:
    """What the tracker under root names ('100', 'release', ...), or None without one."""
    tracker = os.path.join(root, TRACKER_FILE)
    if not os.path.isfile(tracker):
        return None
    with open(tracker) as f:
        return f.read().strip()


def checkpoint_dir(root: str, entry) -> str:
    """The directory of tracker entry ``entry`` (an iteration or 'release')."""
    return os.path.join(root, RELEASE if entry == RELEASE else f"iter_{int(entry):07d}")


def is_legacy(path: str) -> bool:
    """Megatron-LM's legacy torch format (``mp_rank_00/model_optim_rng.pt`` ...)."""
    return os.path.isdir(path) and any(name.startswith(LEGACY_PREFIX) for name in os.listdir(path))


def is_distributed(path: str) -> bool:
    return os.path.isdir(path) and dist_checkpointing.check_is_distributed_checkpoint(path)


# Flags both parsers take whose destination differs: (ours, Megatron-LM's, whether the value is
# negated). Megatron-LM's parser of core_v0.16.1 against ours, every option string compared.
RENAMED_FLAGS = (
    ("disable_bias_linear", "add_bias_linear", True),  # --disable-bias-linear
    ("norm_epsilon", "layernorm_epsilon", False),  # --norm-epsilon
    ("apply_layernorm_1p", "layernorm_zero_centered_gamma", False),  # --apply-layernorm-1p
)


def saved_arguments(common: dict) -> dict:
    """A checkpoint's saved arguments as a dict under our names: Megatron-LM (and we, since
    checkpoints travel) save a Namespace; checkpoints of ours from before saved a dict. Ours
    record their task, Megatron-LM's do not."""
    saved = common.get("args") or {}
    saved = dict(vars(saved)) if isinstance(saved, argparse.Namespace) else dict(saved)
    if "task" not in common and "checkpoint_version" in common:
        # Megatron-LM keeps some choices as megatron-core enums (AttnBackend, ...); ours are names.
        saved = {key: value.name if isinstance(value, enum.Enum) else value for key, value in saved.items()}
        for ours, theirs, negated in RENAMED_FLAGS:
            if theirs in saved:
                saved[ours] = (not saved[theirs]) if negated else saved[theirs]
    return saved


def scheduler_state(common: dict) -> Optional[dict]:
    """The learning-rate schedule's state: Megatron-LM's key, or ours before checkpoints travelled."""
    return common.get("opt_param_scheduler", common.get("scheduler"))


def arguments_to_save(args, consumed_samples: int, padded_vocab_size: Optional[int]) -> argparse.Namespace:
    """Our arguments with what Megatron-LM's loader reads of them besides the flags it shares:
    the samples consumed (its data position), the padded vocabulary, the layout and format."""
    saved = argparse.Namespace(**vars(args))
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    data_parallel = (parallel_state.get_data_parallel_world_size()
                     if parallel_state.model_parallel_is_initialized() else 1)
    saved.consumed_train_samples = consumed_samples
    saved.consumed_valid_samples = getattr(args, "consumed_valid_samples", 0)
    saved.skipped_train_samples = 0  # Megatron-LM's rerun machine skips samples; nothing here does
    saved.padded_vocab_size = padded_vocab_size
    saved.world_size, saved.data_parallel_size = world, data_parallel
    saved.ckpt_format, saved.use_dist_ckpt = "torch_dist", True
    saved.no_save_optim = saved.no_save_rng = False
    saved.use_distributed_optimizer = False  # our optimizer state is laid out like the model's
    for ours, theirs, negated in RENAMED_FLAGS:
        if hasattr(args, ours):
            setattr(saved, theirs, (not getattr(args, ours)) if negated else getattr(args, ours))
    return saved


def _rng_layout():
    """Megatron-LM's rng_state sharding for this rank: (global shape, offset, replica id)."""
    pipeline, tensor = (parallel_state.get_pipeline_model_parallel_world_size(),
                        parallel_state.get_tensor_model_parallel_world_size())
    at = (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank())
    data_rank = parallel_state.get_data_parallel_rank(with_context_parallel=True)
    if parallel_state.get_expert_model_parallel_world_size() > 1:
        data = parallel_state.get_data_parallel_world_size(with_context_parallel=True)
        return (pipeline, tensor, data), (*at, data_rank), 0
    return (pipeline, tensor), at, data_rank


def rng_state_object() -> ShardedObject:
    """This process's RNG streams as Megatron-LM saves them (a one-element list: no
    --data-parallel-random-init); the same object asks a checkpoint for them. On CPU there is no CUDA stream: None, so a
    GPU run of
    Megatron-LM loads such a checkpoint with --no-load-rng."""
    state = {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "rng_tracker_states": get_cuda_rng_tracker().get_states(),
    }
    shape, offset, replica = _rng_layout()
    return ShardedObject("rng_state", [state], shape, offset, replica_id=replica)


def restore_rng_state(loaded) -> Optional[str]:
    """Applies Megatron-LM's RNG streams; returns what was left out, if anything."""
    state = loaded[0] if isinstance(loaded, list) else loaded
    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    cuda, tracker = state.get("cuda_rng_state"), state.get("rng_tracker_states") or {}
    if torch.cuda.is_available():
        if cuda is None:
            return "CUDA RNG streams (the checkpoint was written on CPU)"
        torch.cuda.set_rng_state(cuda)
        get_cuda_rng_tracker().set_states(tracker)
        return None
    if cuda is not None:  # a GPU run's tracker holds CUDA generator states, which CPU cannot take
        return "CUDA RNG streams (the checkpoint was written on a GPU)"
    get_cuda_rng_tracker().set_states(tracker)
    return None
