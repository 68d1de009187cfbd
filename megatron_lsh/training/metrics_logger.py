"""Where numbers go: Megatron-style console lines, tensorboard and wandb.

Every metric is written three times, against iteration, consumed tokens and wall-clock seconds:
tensorboard tags NAME, "NAME vs tokens" and "NAME vs time"; wandb keys NAME, "by_tokens/NAME" and
"by_time/NAME" with those step metrics, so perplexity against wall time is a ready chart.

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

    def log(self, metrics: Dict[str, float], iteration: int, consumed_tokens: int, wall_seconds: float) -> None:
        if not self.enabled:
            return
        if self.tensorboard is not None:
            try:
                for name, value in metrics.items():
                    self.tensorboard.add_scalar(name, value, iteration)
                    self.tensorboard.add_scalar(f"{name} vs tokens", value, consumed_tokens)
                    self.tensorboard.add_scalar(f"{name} vs time", value, int(round(wall_seconds)))
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
