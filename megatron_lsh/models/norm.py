"""megatron-core's torch LayerNorm / RMSNorm, usable under sequence parallelism.

Without Transformer Engine or Apex the local specs build norms with ``WrappedTorchNorm``, which
refuses ``sequence_parallel``. Nothing in a norm needs the whole sequence: each tensor-parallel
rank normalises its own sequence shard with replicated weights, and the weights' gradients are
summed over tensor parallelism by megatron-core's ``finalize_model_grads``, which looks for the
``sequence_parallel`` attribute that TE's and Apex's norms set and this one sets too.
"""

from __future__ import annotations

import copy

from megatron.core.transformer.torch_norm import WrappedTorchNorm

from megatron_lsh.moe.specs import replace_modules


class SequenceParallelTorchNorm:
    """``WrappedTorchNorm``'s norm, with its parameters marked for sequence parallelism."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        shard_local = copy.copy(config)
        shard_local.sequence_parallel = False
        norm = WrappedTorchNorm(shard_local, hidden_size, eps, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def with_sequence_parallel_norms(spec):
    """A copy of a layer or block spec whose torch norms accept sequence parallelism."""
    return replace_modules(spec, {WrappedTorchNorm: SequenceParallelTorchNorm})
