"""Gradient reduction across data-parallel replicas, as megatron-core's DDP does it.

Dense parameters are summed over the data-parallel group; expert parameters (marked
``allreduce=False`` by megatron-core when expert parallel > 1) over the expert-data-parallel
group, since other expert-parallel ranks hold other experts. Both are then divided by the
data-parallel size: each rank's loss is a mean over its own micro-batches, and the expert
gradients already hold the contributions of every rank whose tokens they served.
"""

from __future__ import annotations

from typing import Iterable

import torch
from megatron.core import parallel_state
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def _reduce(grads, group, scale):
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    if torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(flat, group=group)
    flat.mul_(scale)
    for grad, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        grad.copy_(reduced)


def allreduce_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Reduce ``param.grad`` in place over the right group for each parameter."""
    dense, expert = {}, {}
    for p in params:
        if p.grad is None:
            continue
        bucket = dense if getattr(p, "allreduce", True) else expert
        bucket.setdefault(p.grad.dtype, []).append(p.grad)
    scale = 1.0 / parallel_state.get_data_parallel_world_size()
    for grads in dense.values():
        _reduce(grads, parallel_state.get_data_parallel_group(), scale)
    for grads in expert.values():
        _reduce(grads, parallel_state.get_expert_data_parallel_group(), scale)
