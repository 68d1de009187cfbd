"""LSHMoELayer and the layer specs that put it into megatron-core models."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
from typing import Optional

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import RowParallelLinear
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_lsh.moe.dispatcher import LSHAlltoAllTokenDispatcher, PayloadAlltoAllTokenDispatcher
from megatron_lsh.moe.experts import GroupedGemmExperts


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
            # Study only: the stock dispatcher beside ours, to train on one path's values and the
            # other's gradients.
            self._exact_dispatcher = None
            if getattr(config, "lsh_gradient_study", None):
                self._exact_dispatcher = MoEAlltoAllTokenDispatcher(
                    self.num_local_experts, self.local_expert_indices, config=self.config,
                    pg_collection=pg_collection,
                )
        elif hasattr(config, "sends_low_precision") and config.sends_low_precision():
            self.token_dispatcher = PayloadAlltoAllTokenDispatcher(
                self.num_local_experts, self.local_expert_indices, config=self.config,
                pg_collection=pg_collection,
            )
            if self.use_shared_expert and self.shared_expert_overlap:
                self.token_dispatcher.set_shared_experts(self.shared_experts)

    def forward(self, hidden_states: torch.Tensor, intermediate_tensors=None, padding_mask=None):
        dispatcher = self.lsh_dispatcher
        if dispatcher is None:
            return super().forward(hidden_states, intermediate_tensors, padding_mask)
        dispatcher.training = self.training
        study = self.config.lsh_gradient_study
        if study is None or intermediate_tensors is not None:
            return super().forward(hidden_states, intermediate_tensors, padding_mask)
        if not self.training:  # evaluation sees the values the study trains with
            return self._with_dispatcher(self._exact_dispatcher, hidden_states, padding_mask) \
                if study != "exact_gradients" else super().forward(hidden_states, None, padding_mask)
        if study in ("lsh_input_gradients", "lsh_expert_gradients"):
            return self._split_gradients(hidden_states, padding_mask, lsh_for_inputs=study == "lsh_input_gradients")
        lsh_output, bias = super().forward(hidden_states, None, padding_mask)
        exact_output, _ = self._with_dispatcher(self._exact_dispatcher, hidden_states, padding_mask)
        if study == "exact_gradients":  # LSH values, the exact MoE's gradients
            return exact_output + (lsh_output - exact_output).detach(), bias
        return lsh_output + (exact_output - lsh_output).detach(), bias  # exact values, LSH gradients

    def _split_gradients(self, hidden_states, padding_mask, lsh_for_inputs: bool):
        """Exact values; LSH's gradients either on the layer's input alone (every weight gets the
        exact MoE's) or on the experts' weights alone (the input, router and shared experts get
        the exact MoE's). Each path runs with what it must not train detached."""
        experts = list(self.experts.parameters())
        expert_ids = {id(p) for p in experts}
        everything = list(self.parameters())
        if lsh_for_inputs:
            with _detached(self, everything):
                lsh_output, _ = super().forward(hidden_states, None, padding_mask)
            exact_output, bias = self._with_dispatcher(self._exact_dispatcher, hidden_states.detach(), padding_mask)
        else:
            with _detached(self, [p for p in everything if id(p) not in expert_ids]):
                lsh_output, _ = super().forward(hidden_states.detach(), None, padding_mask)
            with _detached(self, experts):
                exact_output, bias = self._with_dispatcher(self._exact_dispatcher, hidden_states, padding_mask)
        return exact_output + (lsh_output - lsh_output.detach()), bias

    def _with_dispatcher(self, dispatcher, hidden_states, padding_mask):
        lsh_dispatcher, self.token_dispatcher = self.token_dispatcher, dispatcher
        try:
            return super().forward(hidden_states, None, padding_mask)
        finally:
            self.token_dispatcher = lsh_dispatcher

    @property
    def lsh_dispatcher(self) -> Optional[LSHAlltoAllTokenDispatcher]:
        dispatcher = self.token_dispatcher
        return dispatcher if isinstance(dispatcher, LSHAlltoAllTokenDispatcher) else None

    def set_layer_number(self, layer_number: int, layer_name: Optional[str] = None):
        super().set_layer_number(layer_number)
        if isinstance(self.token_dispatcher, PayloadAlltoAllTokenDispatcher):
            self.token_dispatcher.set_layer_number(layer_number, layer_name)


@contextlib.contextmanager
def _detached(root: torch.nn.Module, parameters):
    """Within: each of ``parameters`` reads, in the modules of ``root`` that hold it, as a
    detached view of itself (same values, no gradient). Study only."""
    wanted = {id(p) for p in parameters}
    swapped = []
    for owner in root.modules():
        for name, parameter in list(owner._parameters.items()):
            if parameter is not None and id(parameter) in wanted:
                swapped.append((owner, name, parameter))
                owner._parameters[name] = parameter.detach()
    try:
        yield
    finally:
        for owner, name, parameter in swapped:
            owner._parameters[name] = parameter


def lsh_moe_layers(model: torch.nn.Module):
    """The LSH MoE layers of a model (of a list of model chunks too), in module order."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    return [m for chunk in chunks for m in chunk.modules() if isinstance(m, LSHMoELayer)]


def set_lsh_iteration(model: torch.nn.Module, iteration: int) -> None:
    """Tell every LSH layer the training iteration (it picks redrawn projections)."""
    for layer in lsh_moe_layers(model):
        if layer.lsh_dispatcher is not None:
            layer.lsh_dispatcher.set_iteration(iteration)


def with_lsh_moe(spec, grouped_gemm: bool = False):
    """A copy of any layer or block spec with every MoELayer replaced by LSHMoELayer, and with
    grouped_gemm (--moe-grouped-gemm) megatron-core's local SequentialMLP experts by grouped GEMMs."""
    replacements = {MoELayer: LSHMoELayer}
    if grouped_gemm:
        replacements[SequentialMLP] = GroupedGemmExperts
    return replace_modules(spec, replacements)


def replace_modules(spec, replacements: dict):
    """A copy of a layer or block spec (or a list of them) in which every module (or submodule
    class) that is a key of ``replacements`` becomes its value."""
    return _replace_modules(copy.deepcopy(spec), replacements)


def _replace_modules(node, replacements):
    if isinstance(node, ModuleSpec):
        node.module = replacements.get(node.module, node.module)
        node.submodules = _replace_modules(node.submodules, replacements)
    elif isinstance(node, type):
        return replacements.get(node, node)
    elif isinstance(node, (list, tuple)):
        node = type(node)(_replace_modules(item, replacements) for item in node)
    elif dataclasses.is_dataclass(node):
        for field in dataclasses.fields(node):
            setattr(node, field.name, _replace_modules(getattr(node, field.name), replacements))
    return node


def get_lsh_moe_module_spec(
    num_experts: int, use_te: bool = False, moe_grouped_gemm: bool = False
) -> ModuleSpec:
    """megatron-core's MoE module spec, with LSHMoELayer (and grouped GEMM experts: TE's with
    use_te, else ours)."""
    spec = get_moe_module_spec(use_te=use_te, num_experts=num_experts, moe_grouped_gemm=moe_grouped_gemm and use_te)
    return with_lsh_moe(spec, grouped_gemm=moe_grouped_gemm and not use_te)


def get_gpt_lsh_layer_local_spec(
    num_experts: Optional[int] = None,
    moe_grouped_gemm: bool = False,
    qk_layernorm: bool = False,
    normalization: Optional[str] = None,
) -> ModuleSpec:
    """megatron-core's local (no Transformer Engine) GPT layer spec, with LSHMoELayer."""
    return with_lsh_moe(
        get_gpt_layer_local_spec(
            num_experts=num_experts,
            moe_grouped_gemm=False,  # megatron-core's local GroupedMLP needs the grouped_gemm package
            qk_layernorm=qk_layernorm,
            normalization=normalization,
        ),
        grouped_gemm=moe_grouped_gemm,
    )


class _LSHMoELayerMLPFilter(logging.Filter):
    """TransformerLayer logs 'Unknown MLP type: <class ...ModuleSpec>' for every MoELayer
    subclass, ours included; it names the spec's type, not the module's, so it says nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(
            "Unknown MLP type: <class 'megatron.core.transformer.spec_utils.ModuleSpec'>"
        )


logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(_LSHMoELayerMLPFilter())
