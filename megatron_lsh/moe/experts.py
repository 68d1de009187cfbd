"""--moe-grouped-gemm without Transformer Engine: a rank's local experts as one grouped GEMM per
projection (``torch.nn.functional.grouped_mm``) instead of one GEMM per expert.

Shapes: T rows (tokens, or LSH centroids) sorted by local expert, H hidden, F the expert's
fc1 width (2x its FFN width with a gated linear unit), E local experts.

The parameters stay megatron-core's SequentialMLP's (``local_experts.N.linear_fc{1,2}``), so a
checkpoint, an export or an import does not depend on the flag; each forward stacks the experts'
weights ([E, F, H], a copy the size of the layer's expert weights) for the grouped kernel.
Megatron-LM's own grouped experts (GroupedMLP) need the ``grouped_gemm`` package, TEGroupedMLP
Transformer Engine: where TE is installed and --transformer-impl transformer_engine is asked for,
megatron-core's TE spec is used instead of this module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.experts import SequentialMLP


class _ContiguousGradient(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: grouped_mm's backward
    refuses the broadcast (stride-0) gradients that e.g. a sum produces."""

    @staticmethod
    def forward(ctx, tensor):
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, gradient):
        return gradient.contiguous()


def _grouped_linear(rows: torch.Tensor, weights: torch.Tensor, group_ends: torch.Tensor) -> torch.Tensor:
    """rows [T, in] (groups consecutive, group g ending at group_ends[g]) times weights [E, out, in]^T -> [T, out]."""
    # grouped_mm takes the right operand as [E, in, out]; its gradient path wants contiguous grads.
    return _ContiguousGradient.apply(F.grouped_mm(rows, weights.transpose(1, 2), offs=group_ends))


class GroupedGemmExperts(SequentialMLP):
    """SequentialMLP's experts and parameters, computed as grouped GEMMs."""

    def __init__(self, num_local_experts, config, submodules, pg_collection=None):
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection)
        if self.tp_group is not None and self.tp_group.size() > 1:
            raise ValueError("--moe-grouped-gemm runs each expert whole on its rank: use "
                             "--expert-tensor-parallel-size 1 with it")

    def _activation(self, fc1_output: torch.Tensor) -> torch.Tensor:
        """megatron-core MLP's unfused activation, gated linear units included."""
        config = self.config
        if not config.gated_linear_unit:
            return config.activation_func(fc1_output)
        gate, linear = torch.chunk(fc1_output, 2, dim=-1)
        if (clamp := config.activation_func_clamp_value) is not None:
            gate = gate.clamp(min=None, max=clamp)
            linear = linear.clamp(min=-clamp, max=clamp)
        return config.activation_func(gate) * (linear + config.glu_linear_offset)

    def _stacked(self, name: str, attribute: str):
        values = [getattr(getattr(expert, name), attribute, None) for expert in self.local_experts]
        return None if values[0] is None else torch.stack(values)

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor):
        hidden, probs = permuted_local_hidden_states, permuted_probs  # [T, H], [T]
        if self.config.moe_apply_probs_on_input:  # as SequentialMLP: top-1 routing scales the input
            hidden = (probs.unsqueeze(-1) * hidden).to(hidden.dtype)
            probs = torch.ones_like(probs)
        counts = torch.as_tensor(tokens_per_expert, device=hidden.device)
        group_ends = torch.cumsum(counts, 0).to(torch.int32)  # [E]; stays on the device: no host sync
        # Each row's local expert, for the biases ([T]); output_size keeps it sync-free.
        expert_of_row = torch.repeat_interleave(torch.arange(len(self.local_experts), device=hidden.device),
                                                counts, output_size=hidden.size(0))

        fc1 = _grouped_linear(hidden, self._stacked("linear_fc1", "weight"), group_ends)  # [T, F]
        if (bias := self._stacked("linear_fc1", "bias")) is not None:
            fc1 = fc1 + bias[expert_of_row]
        activated = self._activation(fc1)
        activated = (activated * probs.unsqueeze(-1)).to(activated.dtype)  # the router's weight, as MLP
        output = _grouped_linear(activated, self._stacked("linear_fc2", "weight"), group_ends)  # [T, H]
        if (bias := self._stacked("linear_fc2", "bias")) is not None:
            output = output + (bias[expert_of_row] * probs.unsqueeze(-1)).to(output.dtype)
        return output, None
