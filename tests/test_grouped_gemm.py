"""--moe-grouped-gemm: the local experts as grouped GEMMs compute what megatron-core's sequential
experts compute (outputs and every gradient), with their parameters and checkpoints."""

import pytest
import torch
import torch.nn.functional as F

from tests.distributed import run_distributed
from tests.moe_workers import grouped_gemm_vs_sequential_experts

# (rows per local expert, model settings), on 2 expert-parallel ranks of 2 local experts. An expert
# without rows only where the experts have no biases: megatron-core's own SequentialMLP fails its
# backward there with biases (an in-place add on a view), so it cannot be the reference for it.
CASES = [
    ([5, 0], {}),  # GELU, no biases (the tests' default model)
    ([5, 1], {"gated_linear_unit": True, "activation_func": F.silu, "add_bias_linear": True}),  # SwiGLU
    ([3, 7], {"moe_ffn_hidden_size": 96, "add_bias_linear": True}),
]


@pytest.mark.slow
def test_grouped_gemm_experts_equal_the_sequential_experts_outputs_and_gradients():
    for rank_results in run_distributed(grouped_gemm_vs_sequential_experts, 2, CASES):
        for sequential, grouped in rank_results:
            assert sequential.keys() == grouped.keys()
            for name in sequential:
                torch.testing.assert_close(grouped[name], sequential[name], rtol=1e-5, atol=1e-6, msg=name)
