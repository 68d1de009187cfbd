"""Synthetic data for benchmarks: no files needed."""

from __future__ import annotations

import torch


def clustered_hidden_states(
    num_tokens: int,
    hidden_size: int,
    num_prototypes: int,
    relative_noise: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """[num_tokens, hidden] vectors scattered around a few random prototypes: each is a
    prototype plus Gaussian noise whose norm is about ``relative_noise`` times the prototype's.
    A stand-in for the strongly clustered hidden states of trained transformers."""
    prototypes = torch.randn(num_prototypes, hidden_size, generator=generator)
    choice = torch.randint(0, num_prototypes, (num_tokens,), generator=generator)
    noise = torch.randn(num_tokens, hidden_size, generator=generator)
    return prototypes[choice] + relative_noise * noise
