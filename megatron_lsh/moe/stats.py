"""Compression statistics of LSH dispatch, per MoE layer, for training loops to log.

Every dispatch of ours (LSH, or low-precision payloads) records its counts under its layer's name in the process-wide
tracker, as a
vector on the device (``CompressionStats.vector_of``): adding them up costs no wait for the host,
which comes once, when the loop takes them with ``take()``. Bytes are
those crossing between expert-parallel ranks (a rank's rows for its own experts never leave it),
as a bf16 run sends them whatever this run computes in, against megatron-core's dispatch with
bf16 payloads. Combine and backward bytes are counted at the rank whose rows they are, so a
rank's figures describe the same rows, and sums over ranks give the total traffic.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Dict, Optional, Union

import torch

from megatron_lsh.device import compute_device


@dataclass
class CompressionStats:
    lsh_dispatches: int = 0
    """Dispatches that clustered (0: low-precision payloads alone, whose stats are bytes only)."""
    tokens: int = 0
    """Token rows LSH may merge: all rows entering dispatch (tokens x top-k), or with
    lsh_scope 'inter-node' those bound for experts on other nodes."""
    centroids: int = 0
    """Rows LSH sent instead (one per cluster)."""
    exact_rows: int = 0
    """Rows sent as themselves: no cluster kept them within the error bound or the merge threshold."""
    relative_error_sum: float = 0.0
    """Sum over token rows of ||x - c|| / ||x||, the distance to the centroid that replaced x."""
    dispatch_bytes: int = 0
    """Bytes the dispatch all-to-all sent to other ranks."""
    dispatch_bytes_stock: int = 0
    """Bytes megatron-core's dispatcher would have sent: token rows and their routing probs."""
    combine_bytes: int = 0
    """Bytes the combine all-to-all returned from other ranks."""
    combine_bytes_stock: int = 0
    """Bytes megatron-core's combine would have returned."""
    backward_bytes: int = 0
    """Bytes the backwards of both all-to-alls send: the outputs' gradients to the experts and
    the rows' gradients back to their tokens."""
    backward_bytes_stock: int = 0
    """What megatron-core's backwards would have sent (the probs' gradients too)."""
    inter_node_bytes: int = 0
    """Of all the bytes above (forward and backward), those exchanged with ranks on other nodes."""
    inter_node_bytes_stock: int = 0
    """What megatron-core would have exchanged with ranks on other nodes."""

    @property
    def compression_rate(self) -> float:
        """Centroids / tokens: 1.0 is no compression, lower is better."""
        return self.centroids / self.tokens if self.tokens else 1.0

    @property
    def mean_relative_error(self) -> float:
        return self.relative_error_sum / self.tokens if self.tokens else 0.0

    @property
    def dispatch_bytes_ratio(self) -> float:
        return self.dispatch_bytes / self.dispatch_bytes_stock if self.dispatch_bytes_stock else 1.0

    @property
    def bytes_sent(self) -> int:
        """Every all-to-all, forward and backward."""
        return self.dispatch_bytes + self.combine_bytes + self.backward_bytes

    @property
    def bytes_stock(self) -> int:
        return self.dispatch_bytes_stock + self.combine_bytes_stock + self.backward_bytes_stock

    @property
    def bytes_ratio(self) -> float:
        """Bytes of all four all-to-alls against megatron-core's with bf16 payloads."""
        return self.bytes_sent / self.bytes_stock if self.bytes_stock else 1.0

    @property
    def inter_node_bytes_ratio(self) -> float:
        return self.inter_node_bytes / self.inter_node_bytes_stock if self.inter_node_bytes_stock else 1.0

    @property
    def combine_bytes_ratio(self) -> float:
        return self.combine_bytes / self.combine_bytes_stock if self.combine_bytes_stock else 1.0

    def __add__(self, other: "CompressionStats") -> "CompressionStats":
        return CompressionStats(
            **{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)}
        )

    @staticmethod
    def vector_of(**counts) -> torch.Tensor:
        """The counts (numbers or 0-d tensors, by field name; missing ones 0) as one float64
        vector on the compute device, in field order: what a dispatch records."""
        return torch.stack([torch.as_tensor(counts.get(f.name, 0), dtype=torch.float64, device=compute_device())
                            for f in fields(CompressionStats)])

    @classmethod
    def from_vector(cls, vector: torch.Tensor) -> "CompressionStats":
        return cls(**{f.name: _FIELD_TYPES[f.name](v) for f, v in zip(fields(cls), vector.tolist())})

    def as_dict(self) -> Dict[str, float]:
        """Counts and derived ratios, flat, ready for a logger."""
        return {
            **asdict(self),
            "compression_rate": self.compression_rate,
            "mean_relative_error": self.mean_relative_error,
            "dispatch_bytes_ratio": self.dispatch_bytes_ratio,
            "combine_bytes_ratio": self.combine_bytes_ratio,
            "bytes_ratio": self.bytes_ratio,
            "inter_node_bytes_ratio": self.inter_node_bytes_ratio,
        }


_FIELD_TYPES = {name: type(value) for name, value in asdict(CompressionStats()).items()}


class CompressionStatsTracker:
    """Per-layer accumulation of CompressionStats between two ``take()`` calls."""

    def __init__(self):
        self._layers: Dict[str, CompressionStats] = {}
        self._vectors: Dict[str, torch.Tensor] = {}  # device sums not yet read

    def record(self, layer: str, stats: Union[CompressionStats, torch.Tensor]) -> None:
        """Add a layer's counts: CompressionStats, or a vector from ``CompressionStats.vector_of``."""
        if isinstance(stats, torch.Tensor):
            self._vectors[layer] = self._vectors[layer] + stats if layer in self._vectors else stats
        else:
            self._layers[layer] = self._layers.get(layer, CompressionStats()) + stats

    def peek(self) -> Dict[str, CompressionStats]:
        self._read_vectors()
        return dict(self._layers)

    def _read_vectors(self) -> None:
        for layer, vector in self._vectors.items():
            self._layers[layer] = self._layers.get(layer, CompressionStats()) + CompressionStats.from_vector(vector)
        self._vectors = {}

    def take(self, group: Optional[torch.distributed.ProcessGroup] = None) -> Dict[str, CompressionStats]:
        """Return the accumulated stats and start over.

        With ``group``, counts are summed over its ranks (a collective: every rank of the group
        must call it) and every rank gets every layer any of them recorded: pipeline stages
        hold different layers.
        """
        self._read_vectors()
        layers, self._layers = self._layers, {}
        if group is None or not torch.distributed.is_initialized():
            return layers
        names = layer_names_of_group(layers, group)
        field_names = [f.name for f in fields(CompressionStats)]
        empty = CompressionStats()
        counts = torch.tensor(
            [[getattr(layers.get(n, empty), f) for f in field_names] for n in names],
            dtype=torch.float64,
            device=compute_device(),  # NCCL reduces CUDA tensors
        ).reshape(len(names), len(field_names))
        torch.distributed.all_reduce(counts, group=group)
        return {
            name: CompressionStats(**{f: _FIELD_TYPES[f](v) for f, v in zip(field_names, row.tolist())})
            for name, row in zip(names, counts)
        }

    def reset(self) -> None:
        self._layers, self._vectors = {}, {}


def layer_names_of_group(local_names, group=None) -> list:
    """Collective: the sorted union of every rank's layer names (pipeline stages differ)."""
    names = set(local_names)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size(group) > 1:
        gathered = [None] * torch.distributed.get_world_size(group)
        torch.distributed.all_gather_object(gathered, sorted(names), group=group)
        names = set().union(*gathered)
    return sorted(names)


_TRACKER = CompressionStatsTracker()


def get_compression_tracker() -> CompressionStatsTracker:
    """The process-wide tracker every LSH dispatcher records into."""
    return _TRACKER
