"""One optimiser step of a language model on one batch, data-parallel over all ranks."""

from __future__ import annotations

import torch

from megatron_lsh.training.gradients import allreduce_gradients


def lm_train_step(model, optimizer: torch.optim.Optimizer, tokens: torch.Tensor) -> float:
    """Next-token loss on [batch, length + 1] tokens, averaged over data-parallel ranks."""
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    positions = torch.arange(inputs.size(1), device=inputs.device).expand_as(inputs)
    loss = model(inputs, positions, attention_mask=None, labels=labels).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    allreduce_gradients(model.parameters())
    optimizer.step()
    mean_loss = loss.detach().clone()
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(mean_loss)
        mean_loss /= torch.distributed.get_world_size()
    return mean_loss.item()
