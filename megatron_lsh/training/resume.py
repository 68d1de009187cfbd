"""Where a run starts from, and what it keeps of a checkpoint's schedule and clock.

- A checkpoint Megatron-LM wrote (torch_dist) is loaded like ours where its tracker names it in
  --load: its weights with --finetune, or its weights, iteration, consumed samples and RNG streams
  with --no-load-optim (its optimizer state is in Megatron-LM's own layout, never read here).
- A resubmitted job continues its own work: when --save holds a complete checkpoint this training
  wrote, the job resumes from it, whatever --load or --finetune say (they only start a job whose
  --save is still empty). --finetune, or a --load other than --save, that finds no checkpoint is
  an error; so is a --save or --load holding checkpoints this project did not write.
- The learning-rate schedule on resume follows Megatron-LM: a schedule flag that differs from the
  checkpoint's is refused, unless --override-opt_param-scheduler (take the flags) or
  --use-checkpoint-opt_param-scheduler (take the checkpoint's) says which one wins.
- The run's clock: wall-clock seconds on the time axis continue across preemptions from where the
  checkpoint left them; the gap between a save and the next job's start (work lost after the save,
  time in the queue) is logged apart.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Optional

from megatron_lsh.training import megatron_lm_format as megatron_lm
from megatron_lsh.training.arguments import ArgumentError
from megatron_lsh.training.checkpointing import (
    common_state,
    find_latest_checkpoint,
    foreign_checkpoints,
    iteration_dir,
    megatron_lm_checkpoint,
)


@dataclass
class ResumePlan:
    directory: str
    finetune: bool
    step: Optional[int] = None
    note: Optional[str] = None  # said on the console when the plan is not what the flags read as


def _same_directory(first: Optional[str], second: Optional[str]) -> bool:
    return first is not None and second is not None and os.path.abspath(first) == os.path.abspath(second)


def _refuse_foreign(flag: str, directory: str) -> None:
    foreign = foreign_checkpoints(directory)
    if foreign and megatron_lm.is_legacy(os.path.join(directory, foreign[0])):
        raise ArgumentError(
            f"{flag} {directory} holds {foreign[0]} in Megatron-LM's legacy torch format (mp_rank_*/"
            "model_optim_rng.pt), which is not read here: re-save it from Megatron-LM with --ckpt-format torch_dist "
            "and pass that directory"
        )
    if foreign:
        raise ArgumentError(
            f"{flag} {directory} holds {foreign[0]}, which megatron-lsh did not write (it marks each complete "
            "checkpoint with a 'complete' file): it is never overwritten or loaded as ours; pass another directory"
        )


def _holds_training_state(directory: str, iteration: int) -> bool:
    """A checkpoint written by training (with its schedule), not by import_hf (weights only). One
    whose common state cannot be read counts as training's: loading it then names what is damaged."""
    try:
        return megatron_lm.scheduler_state(common_state(iteration_dir(directory, iteration))) is not None
    except Exception:  # noqa: BLE001 - megatron-core raises several kinds for a missing or broken file
        return True


def plan_resume(args) -> Optional[ResumePlan]:
    """Which checkpoint this job starts from (None: from scratch), from --save, --load,
    --finetune and --ckpt-step; ArgumentError when the flags ask for one that is not there."""
    save, load = args.save, args.load
    if save is not None:
        _refuse_foreign("--save", save)
        theirs = megatron_lm_checkpoint(save)
        if theirs is not None and not _same_directory(load, save):
            raise ArgumentError(
                f"--save {save} holds Megatron-LM's checkpoint {os.path.basename(theirs)}: pass --load {save} too to "
                "continue from it (this run's checkpoints then go beside it, in a layout Megatron-LM loads), or "
                "another --save"
            )
        own = find_latest_checkpoint(save) if theirs is None else None
        choosing_a_step_of_save = args.ckpt_step is not None and _same_directory(load, save)
        if own is not None and not choosing_a_step_of_save and _holds_training_state(save, own):
            note = None
            if args.finetune or (load is not None and not _same_directory(load, save)):
                asked = " ".join(part for part in (f"--load {load}" if load else "",
                                                   "--finetune" if args.finetune else "") if part)
                note = (f"--save {save} holds this job's own checkpoint (iteration {own}): resuming from it; "
                        f"{asked} only starts a job whose --save is empty")
            return ResumePlan(save, finetune=False, note=note)
    if load is None:
        if args.finetune:
            raise ArgumentError("--finetune needs --load DIR, the checkpoint whose weights to start from")
        return None
    _refuse_foreign("--load", load)
    theirs = megatron_lm_checkpoint(load, args.ckpt_step)
    if theirs is not None:
        return _megatron_lm_plan(load, theirs, args)
    if args.ckpt_step is None and find_latest_checkpoint(load) is None:
        if _same_directory(load, save) and not args.finetune:
            return None  # the first submission of a job that saves where it loads
        why = ("--finetune needs the weights to start from" if args.finetune else
               "pass the directory of a checkpoint, or leave --load out to train from scratch")
        raise ArgumentError(f"--load {load} holds no complete checkpoint; {why}")
    return ResumePlan(load, finetune=args.finetune, step=args.ckpt_step)


def _megatron_lm_plan(load: str, path: str, args) -> ResumePlan:
    """Starting from a checkpoint Megatron-LM wrote: its weights (a release checkpoint, or
    --finetune), or with --no-load-optim everything but its optimizer state."""
    release = os.path.basename(os.path.normpath(path)) == megatron_lm.RELEASE
    finetune = args.finetune or release
    if not finetune and not getattr(args, "no_load_optim", False):
        raise ArgumentError(
            f"--load {load}: {os.path.basename(path)} is Megatron-LM's checkpoint, whose optimizer state is in "
            "Megatron-LM's own layout and not read here: pass --no-load-optim to resume its weights, iteration, "
            "consumed samples and RNG streams with a fresh optimizer and learning-rate schedule (as Megatron-LM does "
            "with that flag), or --finetune to start from its weights at iteration 0"
        )
    what = "its weights, from iteration 0" if finetune else "all but its optimizer state (--no-load-optim)"
    return ResumePlan(load, finetune=finetune, step=args.ckpt_step,
                      note=f"--load {load}: Megatron-LM's checkpoint {os.path.basename(path)}; loading {what}")


def _schedule_flags(args) -> dict:
    """megatron-core's OptimizerParamScheduler state -> the flag that sets it here (its steps are
    iterations, or samples with --train-samples)."""
    unit = "samples" if getattr(args, "train_samples", None) is not None else "iters"
    warmup = f"--lr-warmup-{unit}" if getattr(args, "lr_warmup_fraction", None) is None else "--lr-warmup-fraction"
    return {
        "max_lr": "--lr",
        "min_lr": "--min-lr",
        "lr_warmup_steps": warmup,
        "lr_decay_style": "--lr-decay-style",
        "lr_decay_steps": f"--lr-decay-{unit} (default: --train-{unit})",
        "start_wd": "--weight-decay",
        "end_wd": "--weight-decay",
    }


def _wsd_decay_steps(saved_or_current: dict):
    """WSD's decay steps as a run set them (runs saved before sample-based schedules: iterations)."""
    return saved_or_current.get("lr_wsd_decay_steps", saved_or_current.get("lr_wsd_decay_iters"))


def schedule_differences(saved_schedule: dict, saved_args: dict, schedule: dict, args) -> list:
    """(flag, this run's value, the checkpoint's) for every schedule setting that differs."""
    differences = [(flag, schedule[key], saved_schedule[key]) for key, flag in _schedule_flags(args).items()
                   if key in saved_schedule and schedule[key] != saved_schedule[key]]
    if args.lr_decay_style == "WSD":  # not in the scheduler's state: compared through the saved arguments
        unit = "samples" if getattr(args, "train_samples", None) is not None else "iters"
        current = _wsd_decay_steps(vars(args))
        if current != _wsd_decay_steps(saved_args):
            differences.append((f"--lr-wsd-decay-{unit}", current, _wsd_decay_steps(saved_args)))
        if args.lr_wsd_decay_style != saved_args.get("lr_wsd_decay_style"):
            differences.append(("--lr-wsd-decay-style", args.lr_wsd_decay_style, saved_args.get("lr_wsd_decay_style")))
    seen, unique = set(), []
    for difference in differences:  # --weight-decay sets two fields
        if difference[0] not in seen:
            seen.add(difference[0])
            unique.append(difference)
    return unique


def check_schedule(path: str, scheduler, args) -> Optional[str]:
    """Before a resume loads the scheduler: refuse a changed schedule flag (ArgumentError, one line)
    unless a flag says whose schedule wins; returns what to say when one did."""
    common = common_state(path)
    saved_schedule, saved_args = megatron_lm.scheduler_state(common), megatron_lm.saved_arguments(common)
    if saved_schedule is None:
        return None
    differences = schedule_differences(saved_schedule, saved_args, scheduler.state_dict(), args)
    if not differences:
        return None
    listed = "; ".join(f"{flag} {ours} (checkpoint: {theirs})" for flag, ours, theirs in differences)
    if args.override_opt_param_scheduler:
        return f"--override-opt_param-scheduler: the schedule follows the flags: {listed}"
    if args.use_checkpoint_opt_param_scheduler:
        if args.lr_decay_style == "WSD" or saved_schedule.get("lr_decay_style") == "WSD":
            scheduler.wsd_decay_steps = _wsd_decay_steps(saved_args)
            scheduler.lr_wsd_decay_style = saved_args.get("lr_wsd_decay_style")
        return f"--use-checkpoint-opt_param-scheduler: the schedule stays the checkpoint's, not the flags' {listed}"
    flag, ours, theirs = differences[0]
    more = f" (and {len(differences) - 1} more: {listed})" if len(differences) > 1 else ""
    raise ArgumentError(
        f"{flag} {ours} differs from the checkpoint's {theirs} ({path}){more}: pass "
        "--override-opt_param-scheduler to train with the flags' schedule, or --use-checkpoint-opt_param-scheduler "
        "to keep the checkpoint's"
    )


class RunClock:
    """The run's wall-clock axis: seconds of this job plus those of the jobs before it, up to the
    checkpoint each resume started from. Gaps between a save and the next job's start are kept
    apart (``restart_gap_seconds``), so perplexity against time is one line across preemptions."""

    def __init__(self, job_start: Optional[float] = None):
        self.job_start = time.time() if job_start is None else job_start
        self.before_this_job = 0.0
        self.restart_gaps = 0.0

    def seconds(self) -> float:
        return self.before_this_job + time.time() - self.job_start

    def state(self) -> dict:
        """What a checkpoint keeps."""
        return {"seconds": self.seconds(), "saved_at": time.time(), "restart_gap_seconds": self.restart_gaps}

    def resume(self, saved: Optional[dict]) -> Optional[float]:
        """Continue a checkpoint's clock; returns this restart's gap (None for a checkpoint saved
        before clocks were)."""
        if not saved:
            return None
        gap = max(self.job_start - saved["saved_at"], 0.0)
        self.before_this_job = saved["seconds"]
        self.restart_gaps = saved.get("restart_gap_seconds", 0.0) + gap
        return gap
