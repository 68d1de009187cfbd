"""--lsh-gradient-study: train on one path's values and the other's gradients (research only).

GradientStudyMoELayer is LSHMoELayer with megatron-core's exact dispatcher beside the LSH one;
the spec names it only when ``config.lsh_gradient_study`` is set (moe/specs.py), so the training
path (moe/layer.py) carries none of it. The modes (moe/config.py: GRADIENT_STUDIES):

- exact_gradients: LSH's values, the exact MoE's gradients;
- exact_values: the exact MoE's values, LSH's gradients;
- lsh_input_gradients / lsh_expert_gradients: exact values, LSH's gradients on the layer's input
  alone or on the experts' weights alone.

Evaluation sees the values the study trains with.
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

from megatron_lsh.moe.layer import LSHMoELayer


class GradientStudyMoELayer(LSHMoELayer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._exact_dispatcher = MoEAlltoAllTokenDispatcher(
            self.num_local_experts, self.local_expert_indices, config=self.config, pg_collection=self.pg_collection,
        )

    def forward(self, hidden_states: torch.Tensor, intermediate_tensors=None, padding_mask=None):
        study = self.config.lsh_gradient_study
        if self.lsh_dispatcher is None or study is None or intermediate_tensors is not None:
            return super().forward(hidden_states, intermediate_tensors, padding_mask)
        self.lsh_dispatcher.training = self.training
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


@contextlib.contextmanager
def _detached(root: torch.nn.Module, parameters):
    """Within: each of ``parameters`` reads, in the modules of ``root`` that hold it, as a
    detached view of itself (same values, no gradient)."""
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
