"""Where numbers go: Megatron-style console lines, tensorboard and wandb.

Every metric is written three times, against iteration, consumed tokens and wall-clock seconds:
tensorboard tags NAME, "NAME vs tokens" and "NAME vs time"; wandb keys NAME, "by_tokens/NAME" and
"by_time/NAME" with those step metrics, so perplexity against wall time is a ready chart.

Beside ours, the metrics Megatron-LM logs go under its own names (megatron/training/training.py:
``learning-rate``, ``grad-norm``, ``lm loss validation``, ...), against iteration and, in
tensorboard, against consumed samples ("NAME vs samples"), behind the same flags as there
(--log-validation-ppl-to-tensorboard, --log-timers-to-tensorboard, ...), so dashboards built on
Megatron-LM runs find them.

wandb runs offline when no API key is configured (WANDB_API_KEY, or `wandb login`). Neither a
missing package nor a failing service ever stops training: the sink is switched off with one
warning.
"""

from __future__ import annotations

import datetime
import logging
import os
from typing import Dict, Optional

logger = logging.getLogger(__name__)


# Ours -> Megatron-LM's name, always written (Megatron-LM writes these by default).
MEGATRON_LM_NAMES = {
    "lm loss": "lm loss",
    "learning rate": "learning-rate",
    "global batch size": "batch-size",
    "grad norm": "grad-norm",
    "loss scale": "loss-scale",
    "validation lm loss": "lm loss validation",
}
# Ours -> (the Megatron-LM flag that asks for it, Megatron-LM's name, factor to its unit).
MEGATRON_LM_FLAGGED_NAMES = {
    "validation lm loss PPL": ("log_validation_ppl_to_tensorboard", "lm loss validation ppl", 1.0),
    "iteration time ms": ("log_timers_to_tensorboard", "iteration-time", 1e-3),  # seconds there
    "throughput per GPU (TFLOP/s/GPU)": ("log_timers_to_tensorboard", "throughput", 1.0),
    "world size": ("log_world_size_to_tensorboard", "world-size", 1.0),
}


def megatron_lm_metrics(metrics: Dict[str, float], args) -> Dict[str, float]:
    """The metrics of a row that Megatron-LM logs, under its names and units."""
    named = {theirs: metrics[ours] for ours, theirs in MEGATRON_LM_NAMES.items() if ours in metrics}
    for ours, (flag, theirs, factor) in MEGATRON_LM_FLAGGED_NAMES.items():
        if ours in metrics and getattr(args, flag, False):
            named[theirs] = metrics[ours] * factor
    return named


def _print(line: str) -> None:
    print(line, flush=True)


def _wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = os.path.expanduser("~/.netrc")
    return os.path.isfile(netrc) and "api.wandb.ai" in open(netrc).read()


class MetricsLogger:
    def __init__(self, args, enabled: bool, run_config: Optional[dict] = None):
        self.enabled = enabled
        self.tensorboard = None
        self.wandb = None
        if not enabled:
            return
        if args.tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(log_dir=args.tensorboard_dir, max_queue=10)
            except Exception as error:  # tensorboard is optional: say so and carry on
                _print(f"WARNING: tensorboard logging disabled ({error}); pip install tensorboard")
        if args.wandb_project:
            try:
                import wandb

                mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_has_credentials() else "offline")
                save_dir = args.wandb_save_dir or os.path.join(args.save or ".", "wandb")
                os.makedirs(save_dir, exist_ok=True)
                self.wandb = wandb.init(
                    project=args.wandb_project,
                    entity=getattr(args, "wandb_entity", None),
                    name=args.wandb_exp_name,
                    dir=save_dir,
                    config=run_config or {},
                    mode=mode,
                    settings=wandb.Settings(silent=True, console="off"),
                )
                self.wandb.define_metric("iteration")
                self.wandb.define_metric("consumed_tokens")
                self.wandb.define_metric("wall_clock_seconds")
                self.wandb.define_metric("*", step_metric="iteration")
                self.wandb.define_metric("by_tokens/*", step_metric="consumed_tokens")
                self.wandb.define_metric("by_time/*", step_metric="wall_clock_seconds")
                if mode == "offline":
                    _print(f"wandb: offline run in {self.wandb.dir}; upload later with `wandb sync`")
            except Exception as error:
                _print(f"WARNING: wandb logging disabled ({type(error).__name__}: {error})")
                self.wandb = None

    def console(self, line: str) -> None:
        if self.enabled:
            _print(line)

    def log(self, metrics: Dict[str, float], iteration: int, consumed_tokens: int, wall_seconds: float,
            consumed_samples: Optional[int] = None, megatron_lm: Optional[Dict[str, float]] = None) -> None:
        """``megatron_lm``: the same row under Megatron-LM's names (see megatron_lm_metrics), written
        against iteration and consumed samples."""
        if not self.enabled:
            return
        megatron_lm = megatron_lm or {}
        if self.tensorboard is not None:
            try:
                for name, value in metrics.items():
                    self.tensorboard.add_scalar(name, value, iteration)
                    self.tensorboard.add_scalar(f"{name} vs tokens", value, consumed_tokens)
                    self.tensorboard.add_scalar(f"{name} vs time", value, int(round(wall_seconds)))
                for name, value in megatron_lm.items():
                    if name not in metrics:  # "lm loss" is both ours and theirs
                        self.tensorboard.add_scalar(name, value, iteration)
                    if consumed_samples is not None:
                        self.tensorboard.add_scalar(f"{name} vs samples", value, consumed_samples)
                self.tensorboard.flush()
            except Exception as error:
                _print(f"WARNING: tensorboard logging disabled ({error})")
                self.tensorboard = None
        if self.wandb is not None:
            row = {"iteration": iteration, "consumed_tokens": consumed_tokens, "wall_clock_seconds": wall_seconds}
            for name, value in metrics.items():
                row[name] = value
                row[f"by_tokens/{name}"] = value
                row[f"by_time/{name}"] = value
            row.update({name: value for name, value in megatron_lm.items() if name not in metrics})
            try:
                self.wandb.log(row)
            except Exception as error:
                _print(f"WARNING: wandb logging disabled ({type(error).__name__}: {error})")
                self.wandb = None

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception as error:
                _print(f"WARNING: wandb did not finish cleanly ({error})")


def timestamp() -> str:
    return datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
