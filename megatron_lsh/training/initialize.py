"""Process-group and RNG initialisation, for torchrun launches on CPU (gloo) or GPUs (NCCL)."""

from __future__ import annotations

import datetime
import os
import random
import socket

import numpy as np
import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed


def initialize_distributed(
    expert_model_parallel_size: int = 1,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    expert_tensor_parallel_size: int | None = None,
    virtual_pipeline_model_parallel_size: int | None = None,
    seed: int = 1234,
    backend: str | None = None,
    timeout_minutes: int = 10,
) -> None:
    """Join the torchrun job (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT from the environment),
    build megatron-core's parallel groups and seed every RNG stream."""
    if not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.distributed.init_process_group(
            backend=backend or ("nccl" if torch.cuda.is_available() else "gloo"),
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    world_size = torch.distributed.get_world_size()
    dense = tensor_model_parallel_size * pipeline_model_parallel_size
    experts = (expert_tensor_parallel_size or tensor_model_parallel_size) * expert_model_parallel_size \
        * pipeline_model_parallel_size
    if world_size % dense or world_size % experts:
        raise ValueError(
            f"tensor ({tensor_model_parallel_size}) x pipeline ({pipeline_model_parallel_size}) "
            f"and expert-tensor x expert ({expert_tensor_parallel_size}, "
            f"{expert_model_parallel_size}) x pipeline parallel sizes must divide the world size "
            f"({world_size} processes)"
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_model_parallel_size,
            pipeline_model_parallel_size=pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
            expert_model_parallel_size=expert_model_parallel_size,
            expert_tensor_parallel_size=expert_tensor_parallel_size,
        )
    set_seed(seed)


def set_seed(seed: int) -> None:
    """Seed Python, numpy, torch and megatron-core's tracked (model/expert-parallel) streams."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy_distributed() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def free_port() -> int:
    """A TCP port nobody listens on now, for single-machine process groups."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
