"""The pretraining loop shared by GPT-MoE and T5-MoE: set-up, gradient accumulation over
megatron-core DDP, clipping, the LR schedule, periodic evaluation, logging and checkpoints."""

from __future__ import annotations

import gc
import itertools
import logging
import math
import os
import signal
import sys
import time
from functools import partial
from typing import Dict, List, Optional

import torch
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_lsh.data.gpt_data import DataError, data_iterator
from megatron_lsh.data.tokenizer import TokenizerError, tokenizer_from_args
from megatron_lsh.device import compute_device
from megatron_lsh.moe import get_compression_tracker, set_lsh_iteration
from megatron_lsh.moe.config import PAYLOAD_SETTINGS
from megatron_lsh.moe.controller import CompressionController
from megatron_lsh.moe.topology import nodes_of_group, ranks_per_node
from megatron_lsh.training import a2a_timer
from megatron_lsh.training.arguments import (
    ArgumentError,
    lsh_config_kwargs,
    satisfied_flag_notes,
    validate_args,
)
from megatron_lsh.training.batch_schedule import batch_calculator
from megatron_lsh.training.checkpointing import (
    CheckpointError,
    SaveFailedError,
    checkpoint_to_load,
    iteration_dir,
    load_checkpoint,
    save_checkpoint,
    vocabulary_rows,
)
from megatron_lsh.training.config import transformer_config_from_args
from megatron_lsh.training.flops import tflops_per_gpu
from megatron_lsh.training.initialize import destroy_distributed, initialize_distributed
from megatron_lsh.training.metrics import compression_metrics, moe_aux_loss_metrics
from megatron_lsh.training.metrics_logger import MetricsLogger, megatron_lm_metrics, timestamp
from megatron_lsh.training.nonfinite import NonFiniteWatch
from megatron_lsh.training.optimizer import TrainingOptimizer, grad_scaler_from_args
from megatron_lsh.training.resume import ResumePlan, RunClock, check_schedule, plan_resume
from megatron_lsh.training.task import ModelTask, masked_token_mean, padded_vocab_size, perplexity

logger = logging.getLogger(__name__)


def _loss_of_microbatch(loss_mask, per_token_loss):
    """megatron-core's loss_func: the micro-batch's mean loss, and (loss x tokens, tokens) to
    combine micro-batches by their tokens."""
    loss, tokens = masked_token_mean(per_token_loss, loss_mask)
    return loss, {"weighted loss": torch.stack([loss.detach() * tokens, tokens])}


def _schedule_step(task: ModelTask, data_iterator, model):
    """megatron-core's forward_step_func over a ModelTask."""
    output, loss_mask = task.forward(next(data_iterator), model)
    return output, partial(_loss_of_microbatch, loss_mask)


def _pipeline_sum(values: List[float]) -> List[float]:
    """Values only the last pipeline stage holds (others pass zeros), on every stage."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return values
    return _all_reduce(values, group=parallel_state.get_pipeline_model_parallel_group())


class TrainingError(RuntimeError):
    pass


def _all_reduce(values, op=torch.distributed.ReduceOp.SUM, group=None) -> list:
    """Plain numbers reduced over a group (all ranks by default), in float64."""
    if not torch.distributed.is_initialized():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=compute_device())
    torch.distributed.all_reduce(tensor, op=op, group=group)
    return tensor.tolist()


def _all_reduce_mean(values, group=None) -> list:
    size = torch.distributed.get_world_size(group) if torch.distributed.is_initialized() else 1
    return [value / size for value in _all_reduce(values, group=group)]


class Trainer:
    def __init__(self, task: ModelTask, args):
        self.task = task
        self.args = args
        self.start_time = time.time()
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        # Model-specific defaults and presets first, then the checks every model shares.
        if task.validate is not None:
            task.validate(args)
        validate_args(args, world_size)
        # Built before any process group exists, so a bad model flag stops every rank alike.
        self.config = transformer_config_from_args(args)
        # Likewise which checkpoint this job starts from: a missing or foreign one stops every rank.
        resume_plan = plan_resume(args)
        self.clock = RunClock(self.start_time)
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        initialize_distributed(
            expert_model_parallel_size=args.expert_model_parallel_size,
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            pipeline_model_parallel_size=args.pipeline_model_parallel_size,
            expert_tensor_parallel_size=args.expert_tensor_parallel_size,
            virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
            seed=args.seed,
            backend=args.distributed_backend,
            timeout_minutes=args.distributed_timeout_minutes,
        )
        self.rank = torch.distributed.get_rank()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.num_microbatches = args.global_batch_size // (args.micro_batch_size * self.dp_size)
        # The batch of each step (--rampup-batch-size grows it; evaluation uses the full one).
        self.batches = batch_calculator(args, self.dp_size, self.rank)
        self.log = MetricsLogger(args, enabled=self.rank == 0, run_config=vars(args))
        self._say_settings()
        # Megatron-LM's stages: model and optimizer, the checkpoint, the data.
        self._setup_model_and_optimizer(resume_plan)
        self.lsh_controller = CompressionController.for_model(self.model, self.config)
        self.iteration = 0
        self.consumed_samples = 0
        self.loaded_iteration: Optional[int] = None  # the iteration of the checkpoint this run started from
        self.history: list = []  # every logged row of metrics, for callers and tests
        self.restart_gap_metrics: Optional[Dict[str, float]] = None  # logged once, at the first row
        if resume_plan is not None:
            self._resume(resume_plan)
        self._say_model()
        self._build_data_iterators()
        if args.timing_log_level >= a2a_timer.TIMING_LOG_LEVEL:
            a2a_timer.install()
        self._signal_received: Optional[int] = None
        if args.exit_signal_handler:
            signal.signal(signal.SIGTERM, self._note_signal)

    def _say_settings(self) -> None:
        """The first lines: flags accepted as satisfied, the LSH and payload settings."""
        args = self.args
        for line in satisfied_flag_notes(args) + [lsh_settings_line(args)]:
            self.log.console(line)
        if args.lsh_enabled and args.lsh_scope == "inter-node" and self.rank == 0:
            nodes = nodes_of_group(parallel_state.get_expert_model_parallel_group(), ranks_per_node())
            if len(set(nodes)) == 1:
                logger.warning("--lsh-scope inter-node: every expert-parallel rank is on one node "
                               "(LOCAL_WORLD_SIZE=%d), so LSH merges nothing; use --lsh-scope all "
                               "to compress intra-node traffic", ranks_per_node())

    def _setup_model_and_optimizer(self, resume_plan: Optional[ResumePlan]) -> None:
        """The tokenizer, the model chunks in megatron-core's DDP, the optimizer and its schedule."""
        args, task = self.args, self.task
        self.tokenizer = tokenizer_from_args(args)
        self.vocab = vocab = self._vocabulary_rows(resume_plan)
        # One chunk per virtual pipeline stage (one without interleaving), each in megatron-core's
        # DDP; its schedules run the micro-batches and its finalize_model_grads reduces gradients
        # over data parallel, sequence-parallel copies and tied embeddings across stages.
        self.model = build_model_chunks(task, args, self.config, vocab)
        self.flops_per_sample = task.flops_per_sample(args, vocab)
        # Gradients are all-reduced whole: --use-distributed-optimizer shards the optimizer state
        # by whole parameters (TrainingOptimizer), and every rank takes the global grad norm.
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=not args.grad_reduce_in_bf16, overlap_grad_reduce=args.overlap_grad_reduce,
            use_distributed_optimizer=False,
        )
        self.ddp = [
            DistributedDataParallel(config=self.config, ddp_config=ddp_config, module=chunk,
                                    disable_bucketing=index > 0)
            for index, chunk in enumerate(self.model)
        ]
        self.config.finalize_model_grads_func = finalize_model_grads
        self.nonfinite = NonFiniteWatch(self.model)
        if args.overlap_grad_reduce:
            # As Megatron-LM: no reduction before the last micro-batch, then each bucket's
            # reduction starts as soon as its gradients are complete.
            no_sync = [chunk.no_sync for chunk in self.ddp]
            start_sync = [chunk.start_grad_sync for chunk in self.ddp]
            self.config.no_sync_func = no_sync if len(no_sync) > 1 else no_sync[0]
            self.config.grad_sync_func = start_sync if len(start_sync) > 1 else start_sync[0]
        self.forward_backward = get_forward_backward_func()
        self.optimizer = TrainingOptimizer(
            torch.nn.ModuleList(self.model),
            lr=args.lr,
            weight_decay=args.weight_decay,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_eps,
            fp32_master_weights=args.bf16 or args.fp16,
            shard_over_data_parallel=args.use_distributed_optimizer,
            grad_scaler=grad_scaler_from_args(args),
        )
        if args.fp16:  # megatron-core's schedules scale each micro-batch's loss before its backward
            self.config.grad_scale_func = self.optimizer.scale_loss
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            # Steps of the schedule: iterations, or samples with --train-samples (set_schedule_steps).
            init_lr=0.0 if args.lr_warmup_steps else args.lr,
            max_lr=args.lr,
            min_lr=args.min_lr,
            lr_warmup_steps=args.lr_warmup_steps,
            lr_decay_steps=args.lr_decay_steps,
            lr_decay_style=args.lr_decay_style,
            start_wd=args.weight_decay,
            end_wd=args.weight_decay,
            wd_incr_steps=args.schedule_total_steps,
            wd_incr_style="constant",
            wsd_decay_steps=args.lr_wsd_decay_steps,
            lr_wsd_decay_style=args.lr_wsd_decay_style,
            # A changed schedule is refused or resolved by check_schedule before the state loads.
            use_checkpoint_opt_param_scheduler=not args.override_opt_param_scheduler,
            override_opt_param_scheduler=args.override_opt_param_scheduler,
        )

    def _say_model(self) -> None:
        args = self.args
        parameters = sum(p.numel() for chunk in self.model for p in chunk.parameters())
        self.log.console(
            f"{self.task.name}: {parameters / 1e6:.2f}M parameters on rank 0 ({self.layout()}; experts: "
            + (f"{args.num_experts // args.expert_model_parallel_size} of {args.num_experts} local), "
               if args.num_experts else "none: a dense model), ")
            + f"vocabulary {self.tokenizer.vocab_size} (padded {self.vocab}), "
            f"{self.num_microbatches} micro-batches of {args.micro_batch_size} x {self.dp_size} ranks "
            f"per step, LSH {'on' if args.lsh_enabled else 'off'}; optimizer state "
            + ("sharded over data parallel" if self.optimizer.sharded else "replicated")
        )

    def _build_data_iterators(self) -> None:
        """The datasets (megatron-core's) and the training iterator from the consumed samples on."""
        args = self.args
        eval_runs = args.train_iters // args.eval_interval + 1 if args.eval_iters else 0
        num_samples = [
            args.train_iters * args.global_batch_size,
            args.eval_iters * args.global_batch_size * max(eval_runs, 1),
            args.eval_iters * args.global_batch_size,
        ]
        self.train_ds, self.valid_ds, self.test_ds = self.task.build_datasets(args, self.tokenizer, num_samples)
        if self.train_ds is None:
            raise DataError("no training data: check --split or --train-data-path")
        self.train_iter = self._iterators(data_iterator(
            self.train_ds, self.consumed_samples, args.micro_batch_size, self.dp_rank, self.dp_size,
            args.num_workers,
        ))

    def _vocabulary_rows(self, plan: Optional[ResumePlan]) -> int:
        """The embedding's rows: the tokenizer's vocabulary padded by Megatron-LM's rule, or those
        of the checkpoint this run starts from (saved under another rule or tensor-parallel size)."""
        args = self.args
        vocab = padded_vocab_size(self.tokenizer.vocab_size, args.make_vocab_size_divisible_by,
                                  args.tensor_model_parallel_size)
        saved = vocabulary_rows(checkpoint_to_load(plan.directory, plan.step)) if plan is not None else None
        if saved is not None and saved != vocab:
            if saved < self.tokenizer.vocab_size or saved % args.tensor_model_parallel_size:
                raise CheckpointError(
                    f"{plan.directory}: its embedding has {saved} rows, which cannot hold this tokenizer's "
                    f"{self.tokenizer.vocab_size} tokens over {args.tensor_model_parallel_size} tensor-parallel ranks: "
                    "pass the run's own --tokenizer-type/--tokenizer-model and a tensor-parallel size dividing it"
                )
            vocab = saved
        args.padded_vocab_size = vocab
        return vocab

    def _resume(self, plan: ResumePlan) -> None:
        args = self.args
        if plan.note:
            self.log.console(plan.note)
        load_optim = not args.no_load_optim and not plan.finetune
        path = checkpoint_to_load(plan.directory, plan.step)  # a damaged one is named before anything else
        if path is not None and load_optim:
            said = check_schedule(path, self.scheduler, args)
            if said:
                self.log.console(said)
        loaded = load_checkpoint(
            plan.directory, self.model, self.optimizer, self.scheduler,
            load_optim=not args.no_load_optim, load_rng=not args.no_load_rng, finetune=plan.finetune,
            step=plan.step,
        )
        if not load_optim:
            self.optimizer.reload_model_params()
        self.iteration, self.consumed_samples = loaded.iteration, loaded.consumed_samples
        self.loaded_iteration = loaded.iteration
        if self.lsh_controller is not None and loaded.lsh_merge_thresholds:
            self.lsh_controller.load_state_dict(loaded.lsh_merge_thresholds)
        if plan.finetune:
            self.log.console(f"loaded the weights of {loaded.path}: fine-tuning from iteration 0")
            return
        self.log.console(f"loaded {loaded.path}: resuming at iteration {self.iteration}")
        gap = self.clock.resume(loaded.run_clock)
        if gap is not None:
            self.log.console(f"restart gap: {gap:.0f}s between that save and this job's start (work after the save, "
                             f"queueing; {self.clock.restart_gaps:.0f}s over all restarts) is not on the time axis, "
                             f"which resumes at {self.clock.seconds():.0f}s")
            self.restart_gap_metrics = {"restart gap seconds": gap,
                                        "restart gaps seconds total": self.clock.restart_gaps}

    def layout(self) -> str:
        args = self.args
        text = (f"data {self.dp_size} x tensor {args.tensor_model_parallel_size} x pipeline "
                f"{args.pipeline_model_parallel_size}")
        if args.virtual_pipeline_model_parallel_size:
            text += f" ({args.virtual_pipeline_model_parallel_size} chunks per rank)"
        text += f", experts {args.expert_model_parallel_size} x expert-tensor {args.expert_tensor_parallel_size}"
        return text + (", sequence parallel" if args.sequence_parallel else "")

    def _iterators(self, iterator):
        """The schedule's data iterator: one per model chunk, all yielding the same batches."""
        if len(self.model) == 1:
            return iterator
        return list(itertools.tee(iterator, len(self.model)))

    def _run_schedule(self, iterator, num_microbatches: int, forward_only: bool) -> List[Dict]:
        """megatron-core's schedule (1F1B, interleaved, or none without pipeline parallelism)
        over num_microbatches; each micro-batch's loss reductions, on the last stage only."""
        args = self.args
        return self.forward_backward(
            forward_step_func=partial(_schedule_step, self.task),
            data_iterator=iterator,
            model=self.ddp if len(self.ddp) > 1 else self.ddp[0],
            num_microbatches=num_microbatches,
            seq_length=args.seq_length,  # the shape pipeline stages exchange (GPT only)
            micro_batch_size=args.micro_batch_size,
            forward_only=forward_only,
        )

    # -- one optimiser step ------------------------------------------------------------------

    def train_step(self) -> Dict[str, float]:
        args = self.args
        set_lsh_iteration(self.model, self.iteration)
        for chunk in self.ddp:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.nonfinite.start_step()
        self.batches.update(self.consumed_samples, consistency_check=True)
        num_microbatches, batch = self.batches.get(), self.batches.get_current_global_batch_size()
        reductions = self._run_schedule(self.train_iter, num_microbatches, forward_only=False)
        overflow = self.optimizer.prepare_grads()
        # The mean of the micro-batches' mean losses (what the gradient is of), from the last
        # pipeline stage, over all data-parallel replicas as Megatron-LM logs it.
        loss = sum(float(r["weighted loss"][0] / r["weighted loss"][1].clamp(min=1)) for r in reductions)
        loss = _pipeline_sum([loss / num_microbatches])
        loss = _all_reduce_mean(loss, group=parallel_state.get_data_parallel_group())[0]
        if overflow:  # fp16: as Megatron-LM, the step is skipped (no update, no schedule step)
            self.iteration += 1
            self.consumed_samples += batch
            return {"lm loss": loss, "grad norm": float("nan"), "skipped": 1.0, "batch": batch}
        grad_norm = self.optimizer.clip_grads(args.clip_grad)
        if not math.isfinite(grad_norm) or not math.isfinite(loss):
            # Raised before the optimizer step: nothing non-finite is applied, and nothing saved.
            layer = self.nonfinite.first_bad_layer()
            gradient = self.nonfinite.first_bad_gradient(self.optimizer.all_params)
            where = f"; first non-finite output: {layer}" if layer else ""
            where += f"; first non-finite gradient: {gradient}" if gradient else ""
            raise TrainingError(
                f"loss {loss} / grad norm {grad_norm} is not finite at iteration {self.iteration + 1}"
                f"{where}; lower --lr or raise --lr-warmup-iters (resuming, with --override-opt_param-scheduler so "
                "that the checkpoint's schedule gives way), or resume from an earlier checkpoint"
            )
        self.optimizer.step()
        # Samples-based schedules advance by the step's batch (Megatron-LM's increment), else by one.
        self.scheduler.step(increment=batch if args.train_samples is not None else 1)
        if self.lsh_controller is not None:
            self.lsh_controller.update(group=torch.distributed.group.WORLD)
        self.iteration += 1
        self.consumed_samples += batch
        return {"lm loss": loss, "grad norm": grad_norm, "skipped": 0.0, "batch": batch}

    # -- evaluation --------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, dataset, name: str) -> Optional[Dict[str, float]]:
        args = self.args
        if dataset is None or args.eval_iters == 0:
            return None
        tracker = get_compression_tracker()
        pending_train_stats = tracker.take()
        for chunk in self.ddp:
            chunk.eval()
        # Always the same leading samples, so every evaluation is comparable.
        iterator = self._iterators(data_iterator(
            dataset, 0, args.micro_batch_size, self.dp_rank, self.dp_size, args.num_workers
        ))
        reductions = self._run_schedule(iterator, args.eval_iters * self.num_microbatches, forward_only=True)
        for chunk in self.ddp:
            chunk.train()
        loss_sum, token_count = _pipeline_sum([
            sum(float(r["weighted loss"][0]) for r in reductions),
            sum(float(r["weighted loss"][1]) for r in reductions),
        ])
        # Every rank of a pipeline now holds its data-parallel replica's sums; tensor-parallel
        # ranks hold equal copies, so the mean over all ranks is the mean over replicas.
        loss_sum, token_count = (v * self.dp_size for v in _all_reduce_mean([loss_sum, token_count]))
        eval_stats = tracker.take(group=torch.distributed.group.WORLD)
        for layer, stats in pending_train_stats.items():
            tracker.record(layer, stats)
        loss = loss_sum / max(token_count, 1.0)
        metrics = {f"{name} lm loss": loss, f"{name} lm loss PPL": perplexity(loss)}
        metrics.update(compression_metrics(eval_stats, prefix=f"{name} "))
        return metrics

    # -- the loop ----------------------------------------------------------------------------

    def tokens_seen(self) -> int:
        return self.consumed_samples * self.task.tokens_per_sample(self.args)

    def _note_signal(self, signum, frame) -> None:
        # Only noted here: every rank stops together after a whole step (see _stop_reason).
        self._signal_received = signum

    def _stop_reason(self) -> Optional[str]:
        """Collective when --exit-duration-in-mins or --exit-signal-handler is set: why every
        rank stops now (the time limit on any rank, or a signal any rank received), else None."""
        args = self.args
        if args.exit_duration_in_mins is None and not args.exit_signal_handler:
            return None
        over_time = args.exit_duration_in_mins is not None and \
            time.time() - self.start_time > 60 * args.exit_duration_in_mins
        over_time, signalled = _all_reduce(
            [float(over_time), float(self._signal_received is not None)], op=torch.distributed.ReduceOp.MAX
        )
        if signalled:
            return "received SIGTERM (--exit-signal-handler)"
        if over_time:
            return f"--exit-duration-in-mins {args.exit_duration_in_mins} reached"
        return None

    def train(self) -> None:
        args = self.args
        interval: Dict[str, list] = {"lm loss": [], "grad norm": [], "step seconds": [], "skipped": [], "batch": []}
        if args.manual_gc:  # Megatron-LM's: no collection pauses inside steps, one every interval
            gc.disable()
        a2a_timer.take_seconds()
        stop_at = min(args.train_iters, args.exit_interval or args.train_iters)
        if self.iteration == 0 and args.eval_interval:
            self._evaluate_and_log()
        stop_reason = None
        while self.iteration < stop_at and stop_reason is None:
            step_start = time.time()
            metrics = self.train_step()
            interval["step seconds"].append(time.time() - step_start)
            for key in ("lm loss", "grad norm", "skipped", "batch"):
                interval[key].append(metrics[key])
            if args.manual_gc and args.manual_gc_interval and self.iteration % args.manual_gc_interval == 0:
                gc.collect()
            if self.iteration % args.log_interval == 0 or self.iteration == stop_at:
                self._log_interval(interval)
                interval = {key: [] for key in interval}
            if args.eval_interval and self.iteration % args.eval_interval == 0 and self.iteration != stop_at:
                self._evaluate_and_log()
            if args.save and args.save_interval and self.iteration % args.save_interval == 0:
                self.save()
            stop_reason = self._stop_reason()
        if stop_reason is not None:
            # No evaluation: the time left before a kill is short, the checkpoint comes first.
            if interval["lm loss"]:
                self._log_interval(interval)
            self.log.console(f"[{timestamp()}] stopping at iteration {self.iteration}: {stop_reason}")
        elif self.iteration >= args.train_iters or args.eval_interval:
            self._evaluate_and_log()
        if stop_reason is None and self.iteration >= args.train_iters and self.test_ds is not None:
            self._evaluate_and_log(dataset=self.test_ds, name="test")
        if args.save and not (args.save_interval and self.iteration % args.save_interval == 0):
            self.save()
        self.log.console(f"[{timestamp()}] done: iteration {self.iteration}, {time.time() - self.start_time:.0f}s")
        self.log.close()

    def save(self) -> None:
        if self.iteration == self.loaded_iteration and os.path.isdir(iteration_dir(self.args.save, self.iteration)):
            self.log.console(f"nothing trained since iteration {self.iteration} was loaded: not saved again")
            return
        start = time.time()
        path = save_checkpoint(
            self.args.save, self.iteration, self.model, self.optimizer, self.scheduler,
            self.consumed_samples, self.args, self.task.name,
            lsh_merge_thresholds=self.lsh_controller.state_dict() if self.lsh_controller is not None else None,
            run_clock=self.clock.state(), keep_last=self.args.ckpt_keep_last,
            floating_point_operations=self.consumed_samples * self.flops_per_sample,
        )
        self.log.console(f"saved checkpoint {path} ({time.time() - start:.2f}s)")

    def _evaluate_and_log(self, dataset=None, name="validation") -> None:
        with a2a_timer.excluded():
            metrics = self.evaluate(self.valid_ds if dataset is None else dataset, name)
        if metrics is None:
            return
        loss, ppl = metrics[f"{name} lm loss"], metrics[f"{name} lm loss PPL"]
        line = f" {name} loss at iteration {self.iteration} | lm loss value: {loss:.6E} | lm loss PPL: {ppl:.6E} |"
        if f"{name} lsh compression rate" in metrics:
            line += f" lsh compression rate: {metrics[f'{name} lsh compression rate']:.3f} |"
        self.log.console("-" * len(line) + "\n" + line + "\n" + "-" * len(line))
        self._log_row(metrics)
        self.history.append({"iteration": self.iteration, **metrics})

    def _log_row(self, metrics: Dict[str, float]) -> None:
        """One row of metrics to tensorboard and wandb, against iteration, tokens and the run's clock."""
        if self.restart_gap_metrics is not None:
            metrics = {**metrics, **self.restart_gap_metrics}
            self.restart_gap_metrics = None
        self.log.log(metrics, self.iteration, self.tokens_seen(), self.clock.seconds(),
                     consumed_samples=self.consumed_samples, megatron_lm=megatron_lm_metrics(metrics, self.args))

    def _log_interval(self, interval: Dict[str, list]) -> None:
        args = self.args
        steps = len(interval["lm loss"])
        a2a_seconds = a2a_timer.take_seconds()
        lm_loss = sum(interval["lm loss"]) / steps
        applied = [norm for norm, skipped in zip(interval["grad norm"], interval["skipped"]) if not skipped]
        grad_norm = sum(applied) / len(applied) if applied else float("nan")  # skipped fp16 steps have none
        samples = sum(interval["batch"])
        # Training steps only (data, forward, backward, optimiser): evaluations and checkpoints
        # between them do not count, as in Megatron-LM's "elapsed time per iteration".
        step_seconds, a2a_seconds = _all_reduce_mean([sum(interval["step seconds"]), a2a_seconds])
        tokens = samples * self.task.tokens_per_sample(args)
        metrics = {
            "lm loss": lm_loss,
            "learning rate": self.optimizer.param_groups[0]["lr"],
            "grad norm": grad_norm,
            "iteration time ms": 1000 * step_seconds / steps,
            "tokens per second": tokens / step_seconds,
            "global batch size": interval["batch"][-1],
            # fp16's current scale; bf16 and fp32 do not scale the loss.
            "loss scale": float(self.optimizer.grad_scaler.scale) if self.optimizer.grad_scaler is not None else 1.0,
            "world size": torch.distributed.get_world_size(),
        }
        if args.log_throughput:
            metrics["throughput per GPU (TFLOP/s/GPU)"] = tflops_per_gpu(
                self.flops_per_sample, samples, step_seconds, torch.distributed.get_world_size())
        groups = self.task.router_loss_groups(args) if self.task.router_loss_groups else None
        metrics.update(moe_aux_loss_metrics(samples // (args.micro_batch_size * self.dp_size), groups))
        if args.timing_log_level >= a2a_timer.TIMING_LOG_LEVEL:
            metrics["a2a share of step time"] = a2a_seconds / step_seconds if step_seconds else 0.0
        metrics["optimizer state MB per rank (max)"] = \
            _all_reduce([self.optimizer.state_bytes()], op=torch.distributed.ReduceOp.MAX)[0] / 2**20
        metrics.update(compression_metrics(get_compression_tracker().take(group=torch.distributed.group.WORLD)))
        if self.lsh_controller is not None:
            metrics.update({f"lsh merge threshold/{layer}": threshold
                            for layer, threshold in self.lsh_controller.thresholds().items()})
        line = (
            f" [{timestamp()}] iteration {self.iteration:8d}/{args.train_iters:8d} |"
            f" consumed samples: {self.consumed_samples:12d} |"
            f" elapsed time per iteration (ms): {metrics['iteration time ms']:.1f} |"
            + (f" throughput per GPU (TFLOP/s/GPU): {metrics['throughput per GPU (TFLOP/s/GPU)']:.3g} |"
               if args.log_throughput else "")
            + f" learning rate: {metrics['learning rate']:.6E} |"
            f" global batch size: {interval['batch'][-1]:5d} |"
            f" lm loss: {lm_loss:.6E} |"
        )
        for name in ("load_balancing_loss", "z_loss"):
            if name in metrics:
                line += f" {name}: {metrics[name]:.6E} |"
        if args.fp16:
            metrics["skipped iterations"] = sum(interval["skipped"])
            line += f" loss scale: {metrics['loss scale']:.1f} |"
        line += f" grad norm: {grad_norm:.3f} | tokens per second: {metrics['tokens per second']:.0f} |"
        if args.fp16:
            line += f" number of skipped iterations: {int(metrics['skipped iterations']):3d} |"
        if "lsh compression rate" in metrics:
            line += f" lsh compression rate: {metrics['lsh compression rate']:.3f} |"
        if "a2a bytes ratio" in metrics:  # all four all-to-alls, against bf16 stock
            line += f" a2a bytes: {metrics['a2a bytes ratio']:.3f}x stock |"
        if "lsh relative error" in metrics:
            line += f" lsh relative error: {metrics['lsh relative error']:.3f} |"
        if "a2a share of step time" in metrics:
            line += f" a2a share: {100 * metrics['a2a share of step time']:.1f}% |"
        self.log.console(line)
        self._log_row(metrics)
        self.history.append({"iteration": self.iteration, **metrics})


def lsh_settings_line(args) -> str:
    """The first thing a log says: what this run sends its MoE all-to-alls with, and how to get
    megatron-core's stock dispatch."""
    if args.num_experts is None:
        return "a dense model (no --num-experts): no expert all-to-alls, so LSH and payload formats do not apply"
    settings = lsh_config_kwargs(args)
    payloads = ", ".join(f"{name[4:-6].replace('_', ' ')} {settings[name]}" for name in PAYLOAD_SETTINGS)
    if not settings["lsh_enabled"]:
        return f"LSH off (--no-lsh): megatron-core's all-to-all dispatch; payloads: {payloads}"
    shown = {key[4:]: value for key, value in settings.items()
             if key.startswith("lsh_") and key not in ("lsh_enabled", "lsh_gradient_study") and value is not None}
    return (f"LSH on: {', '.join(f'{key} {value}' for key, value in shown.items())}; payloads: {payloads}; "
            "--no-lsh gives megatron-core's stock dispatch (bf16 payloads)")


def build_model_chunks(task: ModelTask, args, config, vocab_size: int) -> list:
    """This rank's model chunks: the whole model, its pipeline stage, or with interleaving one
    chunk per virtual stage."""
    virtual_stages = args.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in (range(virtual_stages) if virtual_stages else [None]):
        chunks.append(task.build_model(
            args, config, vocab_size,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            vp_stage=vp_stage,
        ))
    return chunks


def _configure_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # megatron-core narrates every dataset index it builds at INFO; keep its warnings.
    logging.getLogger("megatron").setLevel(logging.WARNING)


def _write_error_line(line: str) -> None:
    """One write per line: ranks share torchrun's stderr pipe, and print() writes the text and
    its newline separately, so two ranks' messages could run together on one line."""
    sys.stderr.flush()
    os.write(sys.stderr.fileno(), (line + "\n").encode())


def pretrain(task: ModelTask, args) -> None:
    """Entry point of the pretrain_*.py scripts: clear one-line errors for bad input."""
    _configure_logging(int(os.environ.get("RANK", "0")))
    try:
        trainer = Trainer(task, args)
        trainer.train()
    except (ArgumentError, DataError, TokenizerError) as error:
        # Every rank sees the same flags and files: one message, from rank 0.
        if int(os.environ.get("RANK", "0")) == 0:
            _write_error_line(f"error: {error}")
        destroy_distributed()
        sys.exit(2)
    except SaveFailedError as error:
        # Raised alike on every rank, with the failing rank's reason: one line, from rank 0.
        if int(os.environ.get("RANK", "0")) == 0:
            _write_error_line(f"error: {error}")
        destroy_distributed()
        sys.exit(2)
    except (CheckpointError, TrainingError) as error:
        _write_error_line(f"error (rank {os.environ.get('RANK', '0')}): {error}")
        destroy_distributed()
        sys.exit(2)
    destroy_distributed()
