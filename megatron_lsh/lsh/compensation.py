"""Compensation fitted to what an expert does to its inputs.

The paper's compensation E(c) + (x - c) assumes an expert passes input deviations through
unchanged (Jacobian = identity); an expert MLP does not. Its expert rank sees many pairs
(c, E(c)), so it can fit how much of an input deviation survives to the output: the least-squares
gain g_e of the centred outputs on the centred inputs, per expert,

    g_e = sum_i <E(c_i) - mean E, c_i - mean c> / sum_i ||c_i - mean c||^2,

the isotropic part of the expert's average Jacobian along the directions its inputs vary in.
Tokens then get E(c) + g_e (x - c): a handful of floats per layer travel back instead of the
residuals, which stay on the source rank.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def fit_expert_gains(inputs: torch.Tensor, outputs: torch.Tensor, rows_per_expert: torch.Tensor) -> torch.Tensor:
    """[E] least-squares gains from [R, h] inputs and outputs sorted by expert ([E] row counts).

    Experts with fewer than two rows (or rows all alike) get gain 0: no evidence, no correction.
    """
    num_experts = rows_per_expert.numel()
    counts = rows_per_expert.to(device=inputs.device, dtype=torch.long)
    expert_of_row = torch.repeat_interleave(torch.arange(num_experts, device=inputs.device), counts,
                                            output_size=inputs.size(0))
    x, y = inputs.detach().float(), outputs.detach().float()
    denominator_rows = counts.clamp(min=1).to(torch.float32).unsqueeze(1)

    def centred(values):
        means = torch.zeros(num_experts, values.size(1), device=values.device).index_add_(0, expert_of_row, values)
        return values - (means / denominator_rows).index_select(0, expert_of_row)

    dx, dy = centred(x), centred(y)
    covariance = torch.zeros(num_experts, device=x.device).index_add_(0, expert_of_row, (dx * dy).sum(dim=1))
    variance = torch.zeros(num_experts, device=x.device).index_add_(0, expert_of_row, (dx * dx).sum(dim=1))
    usable = (counts >= 2) & (variance > 0)
    return torch.where(usable, covariance / variance.clamp(min=1e-30), torch.zeros_like(variance))
