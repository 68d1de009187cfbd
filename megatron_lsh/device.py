"""Where tensors of this process live: its CUDA device, or the CPU on machines without CUDA."""

import torch


def compute_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
