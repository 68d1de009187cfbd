"""Layer specs that put LSHMoELayer (GradientStudyMoELayer under --lsh-gradient-study) and the
grouped-GEMM experts into megatron-core models."""

from __future__ import annotations

import copy
import dataclasses
from typing import Optional

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_lsh.moe.experts import GroupedGemmExperts
from megatron_lsh.moe.gradient_study import GradientStudyMoELayer
from megatron_lsh.moe.layer import LSHMoELayer


def with_lsh_moe(spec, grouped_gemm: bool = False, gradient_study: bool = False):
    """A copy of any layer or block spec with every MoELayer replaced by LSHMoELayer (by
    GradientStudyMoELayer with gradient_study, --lsh-gradient-study), and with grouped_gemm
    (--moe-grouped-gemm) megatron-core's local SequentialMLP experts by grouped GEMMs."""
    replacements = {MoELayer: GradientStudyMoELayer if gradient_study else LSHMoELayer}
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
    num_experts: int, use_te: bool = False, moe_grouped_gemm: bool = False, gradient_study: bool = False
) -> ModuleSpec:
    """megatron-core's MoE module spec, with LSHMoELayer (and grouped GEMM experts: TE's with
    use_te, else ours)."""
    spec = get_moe_module_spec(use_te=use_te, num_experts=num_experts, moe_grouped_gemm=moe_grouped_gemm and use_te)
    return with_lsh_moe(spec, grouped_gemm=moe_grouped_gemm and not use_te, gradient_study=gradient_study)


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
