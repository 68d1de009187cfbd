"""What a model family gives the training loop (ModelTask), and the token-weighted loss
arithmetic the loop, evaluation and the checkpoint tools share."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass
class ModelTask:
    """What differs between model families."""

    name: str
    # (args, config, padded_vocab_size, pre_process, post_process, vp_stage) -> megatron module
    build_model: Callable
    build_datasets: Callable  # (args, tokenizer, [n_train, n_valid, n_test]) -> (train, valid, test)
    # (batch, model) -> (per-token losses, or hidden states before the last pipeline stage; loss mask)
    forward: Callable
    tokens_per_sample: Callable  # (args) -> tokens one sample contributes to throughput
    flops_per_sample: Callable  # (args, padded vocabulary) -> training FLOPs of one sample (training/flops.py)
    validate: Optional[Callable] = None  # (args) -> None, raising ArgumentError
    # (args) -> {group name: 0-based router-loss slots}, to log router losses per group too
    router_loss_groups: Optional[Callable] = None

    def forward_step(self, batch, model):
        """(mean loss over the tokens that count, their number) of one micro-batch through a
        whole (single-stage) model."""
        return masked_token_mean(*self.forward(batch, model))


def masked_token_mean(per_token_loss: torch.Tensor, loss_mask: torch.Tensor):
    """A forward step's (mean loss over the tokens loss_mask keeps, number of those tokens),
    computed in fp32 whatever the model's precision."""
    loss_mask = loss_mask.float()
    tokens_counted = loss_mask.sum()
    return (per_token_loss.float() * loss_mask).sum() / tokens_counted.clamp(min=1), tokens_counted


def summed_token_loss(forward_step: Callable, model, iterator, micro_batches: int):
    """(loss summed over tokens, tokens) over micro_batches batches, so that batches holding
    different numbers of loss tokens weigh by their tokens, not equally."""
    loss_sum, token_count = 0.0, 0.0
    for _ in range(micro_batches):
        loss, tokens = forward_step(next(iterator), model)
        loss_sum += loss.item() * float(tokens)
        token_count += float(tokens)
    return loss_sum, token_count


def perplexity(mean_loss: float) -> float:
    # Capped so an early or diverged model logs a huge number, not an overflow.
    return math.exp(min(mean_loss, 50.0))


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel: int = 1) -> int:
    """Megatron-LM's rule: the embedding table padded to a multiple of --make-vocab-size-divisible-by
    times the tensor-parallel size (so a checkpoint's vocabulary is Megatron-LM's; a resume keeps
    the rows of the checkpoint it starts from, whatever its layout)."""
    multiple = divisible_by * tensor_parallel
    return int(math.ceil(vocab_size / multiple) * multiple)
