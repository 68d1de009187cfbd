"""Holds each LSH layer's compression rate at a target through training.

As hidden states spread out during training, fewer tokens share a bucket and the rate of fixed
hashing drifts up (0.23 to 0.48 over the quickstart). The knob here is each layer's merge
threshold: the relative squared error up to which a cluster is kept whole rather than split by
the next hash (``adaptive_bucket_ids`` in megatron_lsh/lsh/clustering.py); a larger threshold
merges more. After every training step the controller all-reduces each layer's rows and
centroids over all ranks and moves the layer's log-threshold against the log of the rate's
error, damped and with a dead band, so noise from batch to batch leaves it alone and every rank
takes the same decision from the same integers. lsh_error_bound holds whatever the threshold:
when the target would need more error than the bound allows, the rate stays above the target.

No windup: the threshold moves only in a direction in which it still acts. The dispatchers count
the clusters the threshold split that the bound would have kept, and the clusters of distinct
members it kept whole; with none of the first, raising it changes nothing (every cluster is as
coarse as the bound or the first hash allows), with none of the second, lowering it changes
nothing. So it never drifts beyond the point of effect while a layer cannot follow, and answers
at once when the data change. Each such layer is named once in the log.
"""

from __future__ import annotations

import logging
import math
from typing import Dict, List, Optional

import torch

from megatron_lsh.device import compute_device
from megatron_lsh.moe.dispatcher import INITIAL_MERGE_THRESHOLD
from megatron_lsh.moe.layer import lsh_moe_layers
from megatron_lsh.moe.stats import layer_names_of_group

logger = logging.getLogger(__name__)

# log(rate / target) within this band leaves the threshold alone (hysteresis against batch noise).
DEAD_BAND = 0.03
# Fraction of the log-rate error corrected per step, and the largest log-threshold move per step
# (the rate changes more slowly than the threshold: a cluster's error grows with its size).
GAIN = 0.5
MAX_STEP = 0.2
# The threshold stays in [MIN_THRESHOLD, MAX_THRESHOLD]: below, nearly every row travels as
# itself; above, every cluster stays at the first level (a guard: the counts stop it sooner).
MIN_THRESHOLD = 1e-4
MAX_THRESHOLD = 1e4


# A dispatcher's counts since the controller last looked, in the order update() reads them.
_WINDOWS = ("window_rows", "window_centroids", "window_threshold_splits", "window_threshold_kept")


def _window(dispatcher) -> tuple:
    return tuple(getattr(dispatcher, window) for window in _WINDOWS)


class CompressionController:
    def __init__(self, dispatchers, target: float, bound: Optional[float], layer_names=None):
        """dispatchers: this rank's LSH dispatchers (anything with layer_name, merge_threshold and
        the window counts window_rows, window_centroids, window_threshold_splits and
        window_threshold_kept) whose rates to hold at target. layer_names: every
        layer of the model, this rank's and other pipeline stages' (default: this rank's).
        bound: the error bound in force, named when it keeps the rate above the target.

        Every rank follows every layer's threshold: the update is a function of all-reduced
        counts only, so all ranks agree on all layers and any rank can save them."""
        self.dispatchers = list(dispatchers)
        self.target = target
        self.bound = bound
        start = self.dispatchers[0].merge_threshold if self.dispatchers else INITIAL_MERGE_THRESHOLD
        names = set(layer_names or ()) | {d.layer_name for d in self.dispatchers}
        self._thresholds: Dict[str, float] = {name: start for name in sorted(names)}
        for dispatcher in self.dispatchers:
            self._thresholds[dispatcher.layer_name] = dispatcher.merge_threshold
        self._warned_at_limit = set()

    @classmethod
    def for_model(cls, model, config, group=None) -> Optional["CompressionController"]:
        """A controller when the config asks for a target rate and LSH is on, else None.
        Collective over ``group`` (default: all ranks), which gathers the layer names."""
        if not getattr(config, "lsh_enabled", False) or config.lsh_target_compression is None:
            return None
        dispatchers = [layer.lsh_dispatcher for layer in lsh_moe_layers(model) if layer.lsh_dispatcher is not None]
        names = layer_names_of_group([d.layer_name for d in dispatchers], group)
        return cls(dispatchers, config.lsh_target_compression, config.lsh_error_bound, names)

    def update(self, group=None) -> None:
        """Collective over ``group`` (default: all ranks): one step of every layer's control."""
        local = {d.layer_name: d for d in self.dispatchers}
        names = list(self._thresholds)
        # Windows are numbers or device tensors (a dispatch does not wait for the host to count).
        device = compute_device()
        counts = torch.stack([
            torch.stack([torch.as_tensor(count, dtype=torch.float64, device=device)
                         for count in (_window(local[n]) if n in local else (0, 0, 0, 0))])
            for n in names
        ]) if names else torch.zeros(0, len(_WINDOWS), dtype=torch.float64, device=device)
        for dispatcher in self.dispatchers:
            for window in _WINDOWS:
                setattr(dispatcher, window, 0)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts, group=group)
        for name, (rows, centroids, splits, kept) in zip(names, counts.tolist()):
            if rows == 0 or centroids == 0:
                continue
            rate = centroids / rows
            error = math.log(rate) - math.log(self.target)
            if abs(error) <= DEAD_BAND:
                continue
            if error > 0 and splits == 0:
                self._cannot_reach(name, local, rate, "every cluster is as coarse as " + (
                    f"--lsh-error-bound {self.bound} allows" if self.bound is not None else "the first hash allows"))
                continue
            if error < 0 and kept == 0:
                self._cannot_reach(name, local, rate, "its merged rows are identical, which no threshold splits")
                continue
            step = max(-MAX_STEP, min(MAX_STEP, GAIN * error))
            threshold = math.exp(math.log(self._thresholds[name]) + step)
            self._thresholds[name] = min(MAX_THRESHOLD, max(MIN_THRESHOLD, threshold))
        self._apply()

    def _cannot_reach(self, name: str, local, rate: float, why: str) -> None:
        if name in local and name not in self._warned_at_limit:
            self._warned_at_limit.add(name)
            logger.warning(f"{name}: compression {rate:.3f} cannot reach its target {self.target}: {why}")

    def _apply(self) -> None:
        for dispatcher in self.dispatchers:
            dispatcher.merge_threshold = self._thresholds[dispatcher.layer_name]

    def thresholds(self) -> Dict[str, float]:
        """Every layer's threshold, other pipeline stages' included."""
        return dict(self._thresholds)

    def state_dict(self) -> Dict[str, float]:
        """Plain floats per layer name, for the checkpoint's common state."""
        return self.thresholds()

    def load_state_dict(self, state: Dict[str, float]) -> None:
        missing: List[str] = [name for name in self._thresholds if name not in state]
        if missing:
            raise KeyError(f"no merge threshold saved for {', '.join(missing)}")
        for name in self._thresholds:
            self._thresholds[name] = float(state[name])
        self._apply()
