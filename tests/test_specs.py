"""The specs put our MoE layer into megatron-core's models: LSHMoELayer on the training path,
GradientStudyMoELayer (its research variant) only when a gradient study is asked for, and the
grouped-GEMM experts only with --moe-grouped-gemm."""

from megatron.core.transformer.moe.experts import SequentialMLP

from megatron_lsh.moe.experts import GroupedGemmExperts
from megatron_lsh.moe.gradient_study import GradientStudyMoELayer
from megatron_lsh.moe.layer import LSHMoELayer
from megatron_lsh.moe.specs import get_gpt_lsh_layer_local_spec, get_lsh_moe_module_spec


def test_the_training_path_layer_unless_a_gradient_study_is_asked_for():
    assert get_lsh_moe_module_spec(4).module is LSHMoELayer
    assert get_lsh_moe_module_spec(4, gradient_study=True).module is GradientStudyMoELayer
    assert not hasattr(LSHMoELayer, "_split_gradients")  # the study's machinery lives in its own class


def test_grouped_gemm_experts_replace_the_sequential_ones_only_when_asked():
    assert get_lsh_moe_module_spec(4).submodules.experts.module is SequentialMLP
    assert get_lsh_moe_module_spec(4, moe_grouped_gemm=True).submodules.experts.module is GroupedGemmExperts
    layer = get_gpt_lsh_layer_local_spec(num_experts=4, moe_grouped_gemm=True)
    assert layer.submodules.mlp.module is LSHMoELayer
    assert layer.submodules.mlp.submodules.experts.module is GroupedGemmExperts
