"""Save and resume with megatron-core's dist_checkpointing.

Layout, Megatron-LM style:

    SAVE/latest_checkpointed_iteration.txt   the newest complete checkpoint's iteration
    SAVE/iter_0000100/                        model + optimizer (sharded, resumable on another
                                              expert-parallel layout), scheduler, iteration,
                                              consumed samples, arguments (common state)
    SAVE/iter_0000100/rng/rank_00000.pt       each rank's RNG streams
    SAVE/tokenizer.model                      the run's tokenizer (SAVE/tokenizer/: a Hugging Face one)

The common state and shards also follow Megatron-LM's conventions (training/megatron_lm_format.py):
Megatron-LM of the matching release loads our checkpoints, and we load its ``torch_dist`` ones
(weights, iteration, samples, RNG; not its optimizer state).

A checkpoint is written into ``iter_N.partial`` and renamed to ``iter_N`` only when every rank has
finished; the tracker is replaced atomically afterwards. A crash mid-save leaves the previous
checkpoint and tracker untouched; a leftover ``.partial`` directory is ignored and cleared. Every
file that decides what is complete (shards, RNG states, the ``complete`` marker, the tracker) is
fsynced before it counts. A save that fails on any rank (disk full, permissions) fails on every
rank with the same message, before anything of the previous checkpoint is touched.

A checkpoint directory is trusted input: megatron-core unpickles its common state.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import shutil
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from megatron.core import dist_checkpointing
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from torch.distributed.checkpoint.api import CheckpointException

from megatron_lsh.data.tokenizer import HF_TOKENIZER_FILES, SENTENCEPIECE_TYPES
from megatron_lsh.training import megatron_lm_format as megatron_lm
from megatron_lsh.training.megatron_lm_format import TRACKER_FILE, saved_arguments, scheduler_state

logger = logging.getLogger(__name__)

TOKENIZER_COPY = "tokenizer.model"
# A Hugging Face tokenizer (a directory of files) travels as a directory.
TOKENIZER_DIR_COPY = "tokenizer"
COMPLETE_MARKER = "complete"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded; the message says which and why."""


class SaveFailedError(CheckpointError):
    """A save that failed; raised alike on every rank (the message is the same everywhere)."""


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE_MARKER))


def find_latest_checkpoint(root: str) -> Optional[int]:
    """The iteration of the newest complete checkpoint under root, or None."""
    if not os.path.isdir(root):
        return None
    tracker = os.path.join(root, TRACKER_FILE)
    if os.path.isfile(tracker):
        with open(tracker) as f:
            text = f.read().strip()
        if text.isdigit() and _is_complete(iteration_dir(root, int(text))):
            return int(text)
        if megatron_lm_checkpoint(root) is None:  # Megatron-LM's newest is not ours to report
            logger.warning(f"{tracker} names {text!r}, which is not a complete checkpoint; scanning {root}")
    complete = complete_iterations(root)
    return complete[-1] if complete else None


def complete_iterations(root: str) -> list:
    if not os.path.isdir(root):
        return []
    return sorted(
        int(name[5:]) for name in os.listdir(root)
        if name.startswith("iter_") and name[5:].isdigit() and _is_complete(os.path.join(root, name))
    )


def megatron_lm_checkpoint(root: str, step: Optional[int] = None) -> Optional[str]:
    """The directory of the checkpoint Megatron-LM wrote under root that a load would read: the
    one its tracker names (or iteration ``step``), when it is a whole torch_dist checkpoint
    without our marker. Megatron-LM writes the tracker only after every rank has saved."""
    entry = str(step) if step is not None else megatron_lm.tracker_entry(root)
    if entry is None or not (entry.isdigit() or entry == megatron_lm.RELEASE):
        return None
    path = megatron_lm.checkpoint_dir(root, entry)
    return path if is_megatron_lm_checkpoint(path) else None


def is_megatron_lm_checkpoint(path: str) -> bool:
    """A whole torch_dist checkpoint without our marker."""
    return megatron_lm.is_distributed(path) and not _is_complete(path)


def foreign_checkpoints(root: str) -> list:
    """Names under root that look like checkpoints neither we nor Megatron-LM's torch_dist format
    wrote: ``iter_N`` directories that are neither ours (with our ``complete`` marker) nor
    megatron-core distributed checkpoints (Megatron-LM's legacy torch format, a crashed save),
    or a tracker naming an iteration no checkpoint here holds. (Ours become ``iter_N`` only once
    complete.)"""
    if not os.path.isdir(root):
        return []
    foreign = sorted(
        name for name in os.listdir(root)
        if (name.startswith("iter_") and name[5:].isdigit() or name == megatron_lm.RELEASE)
        and not _is_complete(os.path.join(root, name)) and not megatron_lm.is_distributed(os.path.join(root, name))
    )
    tracker = os.path.join(root, TRACKER_FILE)
    if (not foreign and os.path.isfile(tracker) and not complete_iterations(root)
            and megatron_lm_checkpoint(root) is None):
        foreign.append(f"{TRACKER_FILE} ({megatron_lm.tracker_entry(root)!r})")
    return foreign


def vocabulary_rows(path: str) -> Optional[int]:
    """The padded vocabulary (rows of the word embedding) a checkpoint holds, from its index."""
    try:
        metadata = _tensor_index(path)
    except Exception:  # noqa: BLE001 - a damaged index is named by damaged_file before any load
        return None
    for key, item in metadata.items():
        if key.endswith("embedding.word_embeddings.weight") and getattr(item, "size", None) is not None:
            return int(item.size[0])
    return None


def common_state(path: str) -> dict:
    """A checkpoint's small common state (iteration, arguments, scheduler, ...), read without
    touching its shards."""
    return dist_checkpointing.load_common_state_dict(path)


def damaged_file(path: str) -> Optional[str]:
    """Why a checkpoint directory cannot be read whole: its first file that is missing or
    shorter than the checkpoint's own index says, or None when every file is there."""
    from torch.distributed.checkpoint import FileSystemReader

    for name in ("common.pt", ".metadata"):
        if not os.path.isfile(os.path.join(path, name)):
            return f"{name} is missing"
    try:
        metadata = FileSystemReader(path).read_metadata()
    except Exception as error:
        return f".metadata cannot be read ({type(error).__name__})"
    needed = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"{name} is missing"
        if os.path.getsize(file) < size:
            return f"{name} is truncated ({os.path.getsize(file)} of {size} bytes)"
    return None


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _rng_state() -> dict:
    """Every RNG stream of this process in types ``torch.load(weights_only=True)`` accepts
    (numpy's key array as a tensor)."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "random": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss),
                  float(cached_gaussian)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    kind, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), position, has_gauss,
                         cached_gaussian))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _chunks(model) -> list:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def _model_keys(model) -> list:
    """Megatron-LM's keys: "model", or "model0", "model1", ... for interleaved pipeline chunks.
    Tensors are matched by their global names, so any layout loads any other's."""
    chunks = _chunks(model)
    return ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]


def _sharded_state_dict(model, optimizer, is_loading: bool) -> dict:
    state = {key: chunk.sharded_state_dict(prefix="") for key, chunk in zip(_model_keys(model), _chunks(model))}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(dict(state), is_loading=is_loading)
    return state


def parallel_layout() -> dict:
    """This process's place in the parallel layout: RNG states only carry over to the same one."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return {"world_size": 1}
    return {
        "world_size": torch.distributed.get_world_size(),
        "tensor": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline": parallel_state.get_pipeline_model_parallel_world_size(),
        "expert": parallel_state.get_expert_model_parallel_world_size(),
        "expert_tensor": parallel_state.get_expert_tensor_parallel_world_size(),
    }


def _write_results_in_process() -> None:
    """megatron-core's torch_dist writer hands each rank's write results over a queue that lives in
    a helper process (a spawn-context Manager, filesystem_async._get_write_results_queue), meant
    for asynchronous saves. Our saves are synchronous: the results are written and read by this
    very process, so a plain in-process queue does. Without it the first save pays for starting
    that helper (a fresh interpreter importing torch: seconds), and a SIGTERM to every process of
    the job (SLURM, torchrun) kills the helper, so the stop-save that follows fails with
    BrokenPipeError."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not isinstance(filesystem_async._results_queue, queue.Queue):
        filesystem_async._results_queue = queue.Queue()


def _fsync_dir(path: str) -> None:
    """A rename or a new file in ``path`` survives a power loss only once the directory is synced."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_durably(path: str, text: str) -> None:
    """``text`` into ``path`` atomically (a temporary file renamed over it) and on disk."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    _fsync_dir(os.path.dirname(path) or ".")


def _save_durably(obj, path: str) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _one_line_reason(error: BaseException) -> str:
    """The root of a failure in one line: torch's CheckpointException carries each failed rank's
    exception with its traceback; megatron-core's writer wraps the worker's error in another."""
    if isinstance(error, CheckpointException) and error.failures:
        wrapped = next(iter(error.failures.values()))
        error = wrapped[0] if isinstance(wrapped, tuple) else wrapped
    while error.__cause__ is not None:
        error = error.__cause__
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _agree(error: Optional[BaseException], path: str, previous: Optional[int], root: str) -> None:
    """Collective: raises SaveFailedError on every rank when the save failed on any, with the
    first failing rank's reason, so no rank goes on to wait for the others at a barrier."""
    reason = None if error is None else _one_line_reason(error)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        reasons = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(reasons, reason)
    else:
        reasons = [reason]
    failed = [(rank, text) for rank, text in enumerate(reasons) if text is not None]
    if not failed:
        return
    rank, text = failed[0]
    kept = f"{iteration_dir(root, previous)} is intact" if previous is not None else "there is no earlier checkpoint"
    try:
        text += f"; {shutil.disk_usage(root).free / 2**20:.0f} MiB free there"
    except OSError:
        pass
    raise SaveFailedError(f"saving checkpoint {path} failed (rank {rank}: {text}); the newest complete "
                          f"checkpoint {kept}: free space or fix the permissions of --save {root} and resume")


def save_checkpoint(root: str, iteration: int, model, optimizer, scheduler, consumed_samples: int, args,
                    task_name: str, lsh_merge_thresholds: Optional[dict] = None, run_clock: Optional[dict] = None,
                    keep_last: Optional[int] = None, floating_point_operations: float = 0.0) -> str:
    """Collective: every rank calls it. Returns the checkpoint directory. ``run_clock``: the run's
    time axis at this save (training/resume.py: RunClock). ``keep_last``: afterwards delete all but the
    newest ``keep_last`` complete checkpoints. ``floating_point_operations``: the run's so far."""
    final = iteration_dir(root, iteration)
    partial = final + ".partial"
    previous = find_latest_checkpoint(root)
    if os.path.exists(final) and not _is_complete(final):  # Megatron-LM's, say: never replaced
        raise SaveFailedError(f"saving checkpoint {final} would replace a directory megatron-lsh did not write; "
                              f"move it away or pass another --save than {root}")
    error = None
    if _rank() == 0:
        try:
            os.makedirs(root, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
            os.makedirs(partial)  # dist_checkpointing writes into an existing, empty directory
            _copy_run_tokenizer(args, root)
        except OSError as failure:
            error = failure
    _agree(error, final, previous, root)

    if run_clock is not None and torch.distributed.is_initialized():
        # Rank 0's reading: the common state must be the same on every rank.
        shared = [run_clock]
        torch.distributed.broadcast_object_list(shared, src=0)
        run_clock = shared[0]
    state = _sharded_state_dict(model, optimizer, is_loading=False)
    state.update(
        iteration=iteration,
        consumed_samples=consumed_samples,
        # What Megatron-LM's loader reads (training/megatron_lm_format.py), under its names.
        checkpoint_version=megatron_lm.CHECKPOINT_VERSION,
        opt_param_scheduler=scheduler.state_dict() if scheduler is not None else None,
        args=megatron_lm.arguments_to_save(args, consumed_samples, getattr(args, "padded_vocab_size", None)),
        num_floating_point_operations_so_far=floating_point_operations,
        rng_state=megatron_lm.rng_state_object(),
        task=task_name,
        # The compression controller's state: each LSH layer's merge threshold.
        lsh_merge_thresholds=lsh_merge_thresholds,
        run_clock=run_clock,
        world_size=torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
        parallel_layout=parallel_layout(),
    )
    try:
        _write_results_in_process()
        # Collective inside; a rank's failed write reaches every rank as an exception.
        dist_checkpointing.save(state, partial)
        os.makedirs(os.path.join(partial, "rng"), exist_ok=True)
        _save_durably(_rng_state(), os.path.join(partial, "rng", f"rank_{_rank():05d}.pt"))
    except (Exception, CheckpointException) as failure:  # noqa: BLE001 - reported on every rank by _agree
        # (torch's CheckpointException, which gathers every rank's write failure, is a BaseException)
        error = failure
    if error is not None and _rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)  # frees what a full disk took
    _agree(error, final, previous, root)

    if _rank() == 0:
        try:
            _fsync_dir(partial)
            _write_durably(os.path.join(partial, COMPLETE_MARKER), f"{iteration}\n")
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(partial, final)
            _fsync_dir(root)
            _write_durably(os.path.join(root, TRACKER_FILE), f"{iteration}\n")
        except OSError as failure:
            error = failure
    _agree(error, final, previous, root)
    if keep_last is not None and _rank() == 0:
        prune_checkpoints(root, keep_last)
    _barrier()
    return final


def prune_checkpoints(root: str, keep_last: int) -> list:
    """Deletes every complete checkpoint but the newest ``keep_last`` (at least one is always kept),
    oldest first; returns the iterations deleted."""
    complete = complete_iterations(root)
    doomed = complete[:-max(keep_last, 1)]
    for iteration in doomed:
        path = iteration_dir(root, iteration)
        # Renamed first, so a crash mid-delete leaves a directory nobody mistakes for a checkpoint.
        trash = path + ".deleting"
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


def _copy_run_tokenizer(args, root: str) -> None:
    """The run's tokenizer travels with its checkpoints (once), for conversion and evaluation."""
    tokenizer = getattr(args, "tokenizer_model", None)
    if tokenizer and os.path.isdir(tokenizer):
        _copy_tokenizer_dir(tokenizer, os.path.join(root, TOKENIZER_DIR_COPY))
    elif (tokenizer and getattr(args, "tokenizer_type", None) in SENTENCEPIECE_TYPES
          and not os.path.isfile(os.path.join(root, TOKENIZER_COPY))):
        shutil.copy(tokenizer, os.path.join(root, TOKENIZER_COPY + ".tmp"))
        os.replace(os.path.join(root, TOKENIZER_COPY + ".tmp"), os.path.join(root, TOKENIZER_COPY))


def _copy_tokenizer_dir(source: str, target: str) -> None:
    """A Hugging Face tokenizer's files (only those; not the model's weights) into target, once."""
    if os.path.isdir(target) or os.path.abspath(source) == os.path.abspath(target):
        return
    partial = target + ".tmp"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    for name in HF_TOKENIZER_FILES:
        if os.path.isfile(os.path.join(source, name)):
            shutil.copy(os.path.join(source, name), os.path.join(partial, name))
    os.replace(partial, target)


def checkpoint_to_load(root: str, step: Optional[int] = None) -> Optional[str]:
    """The directory a load of root would read (the newest complete checkpoint, or iteration
    ``step``), None when there is none yet; CheckpointError when it is not there or damaged.
    A checkpoint of Megatron-LM's that its tracker (or ``step``) names is the one to read."""
    complete = complete_iterations(root)
    theirs = megatron_lm_checkpoint(root, step)
    if theirs is not None:
        problem = damaged_file(theirs)
        if problem is not None:
            raise CheckpointError(f"Megatron-LM's checkpoint {theirs} is damaged: {problem}")
        return theirs
    if step is not None:
        if step not in complete:
            raise CheckpointError(
                f"--ckpt-step {step}: {iteration_dir(root, step)} is not a complete checkpoint; "
                f"complete ones under {root}: {complete or 'none'}"
            )
        iteration = step
    else:
        iteration = find_latest_checkpoint(root)
        if iteration is None:
            return None
    path = iteration_dir(root, iteration)
    problem = damaged_file(path)
    if problem is not None:
        earlier = [i for i in complete if i < iteration]
        hint = (f"resume from an earlier one with --ckpt-step {earlier[-1]} (complete: {earlier})"
                if earlier else "there is no earlier complete checkpoint to resume from")
        raise CheckpointError(f"checkpoint {path} is damaged: {problem}; {hint}")
    return path


@dataclass
class LoadedCheckpoint:
    iteration: int
    consumed_samples: int
    path: str
    args: dict
    lsh_merge_thresholds: Optional[dict] = None
    run_clock: Optional[dict] = None


def load_checkpoint(
    root: str, model, optimizer, scheduler, load_optim: bool = True, load_rng: bool = True,
    finetune: bool = False, step: Optional[int] = None,
) -> Optional[LoadedCheckpoint]:
    """Collective. Restores the newest complete checkpoint under root (or the one of iteration
    ``step``) into model (and optimizer, scheduler, RNG states); None when there is none yet."""
    path = checkpoint_to_load(root, step)
    if path is None:
        return None
    common = dist_checkpointing.load_common_state_dict(path)
    if is_megatron_lm_checkpoint(path):
        return _load_megatron_lm(path, common, model, load_rng=load_rng, finetune=finetune)
    saved_args = saved_arguments(common)
    optimizer = optimizer if (load_optim and not finetune) else None
    saved_master = bool(saved_args.get("bf16") or saved_args.get("fp16"))  # fp32 master weights
    if optimizer is not None and saved_master != bool(optimizer.fp32_master_weights):
        raise CheckpointError(
            f"{path} was saved {'with' if saved_master else 'without'} --bf16/--fp16 (fp32 master weights); "
            "resume with a 16-bit setting again, or pass --no-load-optim to start a fresh optimizer"
        )
    request = _sharded_state_dict(model, optimizer, is_loading=True)
    _check_shapes(request, path, _tensor_index(path))
    try:
        state = dist_checkpointing.load(request, path)
    except Exception as error:
        raise CheckpointError(
            f"cannot load {path} into this model ({type(error).__name__}: {error}); the model "
            "flags (--num-layers, --hidden-size, --num-experts, ...) must match the saved run"
        ) from None
    for key, chunk in zip(_model_keys(model), _chunks(model)):
        chunk.load_state_dict(state[key])
    if optimizer is not None:
        optimizer.load_sharded_state_dict(state["optimizer"])
        if scheduler is not None and scheduler_state(state) is not None:
            scheduler.load_state_dict(scheduler_state(state))
    if finetune:
        return LoadedCheckpoint(0, 0, path, saved_args)
    if load_rng:
        rng_file = os.path.join(path, "rng", f"rank_{_rank():05d}.pt")
        saved_layout = state.get("parallel_layout")
        if saved_layout is None:  # saved before layouts were recorded: data and experts only
            saved_layout = {"world_size": state.get("world_size")}
            same_layout = saved_layout["world_size"] == parallel_layout()["world_size"]
        else:
            same_layout = saved_layout == parallel_layout()
        if same_layout and os.path.isfile(rng_file):
            try:
                rng_state = torch.load(rng_file, weights_only=True)
            except pickle.UnpicklingError:  # written before RNG files held plain types only
                logger.warning(f"{rng_file}: an older format that only a full unpickling reads; RNG states "
                               "not restored (dropout after the resume differs from an uninterrupted run)")
            else:
                _set_rng_state(rng_state)
        else:
            logger.warning(f"{path}: RNG states not restored (saved with another parallel layout: {saved_layout})")
    return LoadedCheckpoint(state["iteration"], state["consumed_samples"], path, saved_args,
                            common.get("lsh_merge_thresholds"), common.get("run_clock"))


def _tensor_index(path: str) -> dict:
    """The checkpoint's index (.metadata): each saved key and, for tensors, its global size."""
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(path).read_metadata().state_dict_metadata


def _check_shapes(request: dict, path: str, saved: dict) -> None:
    """One line naming the first model tensor whose shape differs from the checkpoint's (``saved``:
    its index) or that it lacks, before megatron-core's loader would fail deep inside."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    for key in [k for k in request if k.startswith("model")]:
        for item in nested_values(request[key]):
            if not isinstance(item, dist_checkpointing.ShardedTensor):
                continue
            shape = getattr(saved.get(item.key), "size", None)
            if shape is None:
                raise CheckpointError(f"{path} has no tensor {item.key}: the model flags (--num-layers, --num-experts, "
                                      "--swiglu, --normalization, ...) must match the saved run")
            if tuple(shape) != tuple(item.global_shape):
                raise CheckpointError(
                    f"{path}: tensor {item.key} is {list(shape)} in the checkpoint but {list(item.global_shape)} in "
                    "this model: the model flags (--hidden-size, --ffn-hidden-size, --num-experts, vocabulary, ...) "
                    "must match the saved run"
                )


def _load_megatron_lm(path: str, common: dict, model, load_rng: bool, finetune: bool) -> LoadedCheckpoint:
    """A checkpoint Megatron-LM wrote (torch_dist): its weights, and unless fine-tuning its
    iteration, consumed samples and RNG streams. Its optimizer state is never read (its own
    layout): the resume rules ask for --no-load-optim or --finetune before anything starts."""
    saved = saved_arguments(common)
    release = os.path.basename(os.path.normpath(path)) == megatron_lm.RELEASE
    index = _tensor_index(path)
    request = _sharded_state_dict(model, None, is_loading=True)
    _check_shapes(request, path, index)
    rng = megatron_lm.rng_state_object()
    keep_rng = load_rng and not (finetune or release)
    # Its RNG streams carry over only to the layout that wrote them (as in Megatron-LM).
    rng_saved = rng.unique_key in index
    if keep_rng and rng_saved:
        request["rng_state"] = rng
    try:
        state = dist_checkpointing.load(request, path)
    except Exception as error:
        raise CheckpointError(
            f"cannot load Megatron-LM's checkpoint {path} ({type(error).__name__}: {error})") from None
    for key, chunk in zip(_model_keys(model), _chunks(model)):
        chunk.load_state_dict(state[key])
    if finetune or release:
        return LoadedCheckpoint(0, 0, path, saved)
    if keep_rng:
        left_out = megatron_lm.restore_rng_state(state["rng_state"]) if rng_saved else (
            f"none saved for this layout ({saved.get('tensor_model_parallel_size', 1)} tensor x "
            f"{saved.get('pipeline_model_parallel_size', 1)} pipeline ranks wrote it)")
        if left_out:
            logger.warning(f"{path}: RNG streams not restored: {left_out}")
    return LoadedCheckpoint(int(common["iteration"]), int(saved.get("consumed_train_samples", 0)), path, saved)
