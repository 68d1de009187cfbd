"""LSHMoELayer: megatron-core's MoELayer with our dispatchers (the training path; the specs that
place it are moe/specs.py, the gradient-study variant moe/gradient_study.py)."""

from __future__ import annotations

import logging
from typing import Optional

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import RowParallelLinear
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_lsh.moe.dispatcher import LSHAlltoAllTokenDispatcher, PayloadAlltoAllTokenDispatcher


def _skip_expert_reduce_without_expert_parallelism(experts, pg_collection) -> None:
    """megatron-core 0.16.1 bug (any device): with expert and expert-tensor parallel both 1, an
    expert's fc2 returns the no-op tensor-parallel reduce's input as the autograd function's view,
    and MLP.forward adds the expert bias to it in place, so training with biases fails ("Output 0
    of _ReduceFromModelParallelRegion is a view and is being modified inplace"). One rank holds the
    whole expert, so no reduce is due: take the explicit-communication path expert parallelism
    takes, whose fc2 output is the matmul's own tensor."""
    if pg_collection.expt_tp.size() != 1:
        return
    for module in experts.modules():
        if isinstance(module, RowParallelLinear) and module.is_expert and module.skip_bias_add:
            module.explicit_expert_comm = True


class LSHMoELayer(MoELayer):
    """megatron-core's MoELayer with the LSH dispatcher when ``config.lsh_enabled``, else with
    megatron-core's dispatcher sending low-precision payloads when the config asks for them.

    With neither (or a plain TransformerConfig) it is exactly MoELayer.
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: Optional[MoESubmodules] = None,
        layer_number: Optional[int] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        # TransformerLayer passes pg_collection only to exactly MoELayer, not to subclasses.
        if pg_collection is None:
            pg_collection = get_default_pg_collection()
        super().__init__(config, submodules, layer_number, pg_collection)
        self.pg_collection = pg_collection
        _skip_expert_reduce_without_expert_parallelism(self.experts, pg_collection)
        if getattr(config, "lsh_enabled", False):
            self.token_dispatcher = LSHAlltoAllTokenDispatcher(
                self.num_local_experts,
                self.local_expert_indices,
                config=self.config,
                pg_collection=pg_collection,
            )
            if self.use_shared_expert and self.shared_expert_overlap:
                self.token_dispatcher.set_shared_experts(self.shared_experts)
        elif hasattr(config, "sends_low_precision") and config.sends_low_precision():
            self.token_dispatcher = PayloadAlltoAllTokenDispatcher(
                self.num_local_experts, self.local_expert_indices, config=self.config,
                pg_collection=pg_collection,
            )
            if self.use_shared_expert and self.shared_expert_overlap:
                self.token_dispatcher.set_shared_experts(self.shared_experts)

    def forward(self, hidden_states: torch.Tensor, intermediate_tensors=None, padding_mask=None):
        if self.lsh_dispatcher is not None:
            self.lsh_dispatcher.training = self.training
        return super().forward(hidden_states, intermediate_tensors, padding_mask)

    @property
    def lsh_dispatcher(self) -> Optional[LSHAlltoAllTokenDispatcher]:
        dispatcher = self.token_dispatcher
        return dispatcher if isinstance(dispatcher, LSHAlltoAllTokenDispatcher) else None

    def set_layer_number(self, layer_number: int, layer_name: Optional[str] = None):
        super().set_layer_number(layer_number)
        if isinstance(self.token_dispatcher, PayloadAlltoAllTokenDispatcher):
            self.token_dispatcher.set_layer_number(layer_number, layer_name)


def lsh_moe_layers(model: torch.nn.Module):
    """The LSH MoE layers of a model (of a list of model chunks too), in module order."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    return [m for chunk in chunks for m in chunk.modules() if isinstance(m, LSHMoELayer)]


def set_lsh_iteration(model: torch.nn.Module, iteration: int) -> None:
    """Tell every LSH layer the training iteration (it picks redrawn projections)."""
    for layer in lsh_moe_layers(model):
        if layer.lsh_dispatcher is not None:
            layer.lsh_dispatcher.set_iteration(iteration)


class _LSHMoELayerMLPFilter(logging.Filter):
    """TransformerLayer logs 'Unknown MLP type: <class ...ModuleSpec>' for every MoELayer
    subclass, ours included; it names the spec's type, not the module's, so it says nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(
            "Unknown MLP type: <class 'megatron.core.transformer.spec_utils.ModuleSpec'>"
        )


logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(_LSHMoELayerMLPFilter())
