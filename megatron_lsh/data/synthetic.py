"""A synthetic language for smoke tests and demonstrations: no files, learnable in seconds."""

from __future__ import annotations

import torch


def counting_sequences(
    batch_size: int, length: int, vocab_size: int, generator: torch.Generator
) -> torch.Tensor:
    """[batch, length] token ids counting up modulo the vocabulary from a random start in a
    random stride of 1 to 3: the next token follows from the two before it."""
    start = torch.randint(0, vocab_size, (batch_size, 1), generator=generator)
    stride = torch.randint(1, 4, (batch_size, 1), generator=generator)
    return (start + stride * torch.arange(length)) % vocab_size


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
