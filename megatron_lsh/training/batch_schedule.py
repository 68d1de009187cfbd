"""The global batch of each step: constant, or with --rampup-batch-size START INCREMENT SAMPLES
growing from START by INCREMENT over SAMPLES consumed samples (megatron-core's micro-batch
calculator, as Megatron-LM runs it)."""

from __future__ import annotations

from megatron.core.num_microbatches_calculator import (
    ConstantNumMicroBatchesCalculator,
    RampupBatchsizeNumMicroBatchesCalculator,
)


class BatchScheduleError(ValueError):
    """A ramp-up the batch layout cannot follow; the message names the flags."""


def batch_calculator(args, data_parallel: int, rank: int = 0):
    """megatron-core's calculator for these flags; call .update(consumed_samples, True) before each
    step, then .get() micro-batches make .get_current_global_batch_size() samples."""
    per_step = args.micro_batch_size * data_parallel
    if args.rampup_batch_size is None:
        return ConstantNumMicroBatchesCalculator(args.global_batch_size, args.micro_batch_size, data_parallel,
                                                 False, rank)
    start, increment, samples = args.rampup_batch_size
    if start < 1 or increment < 1 or samples < 0:
        raise BatchScheduleError(f"--rampup-batch-size {start} {increment} {samples}: the start and increment must be "
                                 "positive, the samples at least 0")
    for name, value in (("start", start), ("increment", increment)):
        if value % per_step:
            raise BatchScheduleError(
                f"--rampup-batch-size: its {name} {value} must be a multiple of --micro-batch-size "
                f"{args.micro_batch_size} x data-parallel size {data_parallel} = {per_step}, so every step's batch "
                "splits into whole micro-batches")
    if start > args.global_batch_size or (args.global_batch_size - start) % increment:
        raise BatchScheduleError(
            f"--rampup-batch-size {start} {increment} {samples}: --global-batch-size {args.global_batch_size} must be "
            f"the start plus a whole number of increments")
    return RampupBatchsizeNumMicroBatchesCalculator(args.global_batch_size, args.micro_batch_size, data_parallel,
                                                    False, rank, start, increment, samples)


def iterations_for_samples(calculator, train_samples: int) -> int:
    """Steps that train_samples make, the ramp-up's smaller batches included (Megatron-LM's
    count: a last partial batch is dropped)."""
    if not isinstance(calculator, RampupBatchsizeNumMicroBatchesCalculator):
        return train_samples // calculator.get_current_global_batch_size()
    consumed = steps = 0
    while consumed <= calculator.ramup_samples and consumed <= train_samples:
        calculator.update(consumed, consistency_check=False)
        consumed += calculator.get_current_global_batch_size()
        steps += 1
    calculator.update(0, consistency_check=False)
    if train_samples > consumed:
        steps += (train_samples - consumed) // calculator.global_batch_size
    return steps

