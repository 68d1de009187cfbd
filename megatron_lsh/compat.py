"""The few workarounds megatron-core 0.16.1 needs to run on a machine without CUDA.

Everything here is applied once, by ``apply()``, which ``import megatron_lsh`` calls. Each patch
says which megatron-core code it answers. With CUDA present only the first one (a library bug
that also hits GPUs without Transformer Engine) is applied; nothing else changes.
"""

from __future__ import annotations

import contextlib
import logging

import torch

logger = logging.getLogger(__name__)

_APPLIED = False


def apply() -> None:
    """Apply the workarounds; safe to call any number of times."""
    global _APPLIED
    if _APPLIED:
        return
    _APPLIED = True
    _define_missing_te_general_gemm()
    if torch.cuda.is_available():
        return
    _cpu_device_queries()
    _cpu_alltoall_dispatcher_sync()
    _cpu_causal_mask()
    _cpu_rng_tracker()
    _gloo_uneven_gather_and_reduce_scatter()
    _cpu_pipeline_schedules()
    _cpu_tied_embedding_sync()
    _cpu_grad_scalers()
    logger.debug("megatron-core CPU workarounds applied")


def _define_missing_te_general_gemm() -> None:
    # moe_utils.RouterGatingLinearFunction tests `te_general_gemm is not None`, but the name is
    # only imported when Transformer Engine is: without TE it raises NameError, GPU or not.
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _cpu_device_queries() -> None:
    # RoPE, TopKRouter.gating, tensor_parallel.mappings (all-to-all / all-gather output buffers),
    # GlobalMemoryBuffer and the linear layers allocate on `torch.cuda.current_device()`;
    # dist_checkpointing and parallel_state call `torch.cuda.synchronize()`.
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda device=None: None


def _cpu_alltoall_dispatcher_sync() -> None:
    # MoEAlltoAllTokenDispatcher.__init__ creates `torch.cuda.Stream()` unless the class attribute
    # is set, and `_maybe_dtoh_and_synchronize` moves split sizes to the host on that stream. On
    # CPU the split sizes only need to become numpy arrays (all_to_all_single rejects tensors).
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = "no-cuda-stream-on-cpu"

    def host_split_sizes(self, point, tokens_per_expert=None):
        if not self.drop_and_pad and point == self.cuda_dtoh_point:
            for name in ("input_splits", "output_splits", "output_splits_tp"):
                value = getattr(self, name)
                if torch.is_tensor(value):
                    setattr(self, name, value.numpy())  # NOTE: device-to-host sync (megatron-core's)
        return tokens_per_expert

    MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize = host_split_sizes


def _cpu_causal_mask() -> None:
    # transformer.utils.get_default_causal_mask hard-codes device="cuda"; fused_softmax imports it
    # by name, so both references are replaced.
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as transformer_utils

    def get_default_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    transformer_utils.get_default_causal_mask = get_default_causal_mask
    fused_softmax.get_default_causal_mask = get_default_causal_mask


def _cpu_rng_tracker() -> None:
    # tensor_parallel.random: model_parallel_cuda_manual_seed and CudaRNGStatesTracker.fork (used by
    # attention dropout and expert init) read and write CUDA generator states.
    from megatron.core.tensor_parallel import random as tp_random

    class CPURNGStatesTracker(tp_random.CudaRNGStatesTracker):
        """Named RNG streams over torch's default CPU generator.

        `fork(name)` swaps the named state in and back out, so expert weights initialised under
        the expert-parallel fork differ across expert-parallel ranks, as on GPUs.
        """

        def __init__(self, *args, **kwargs):
            super().__init__()

        def add(self, name, seed):
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self._is_initialized = True
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name=tp_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer_state = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer_state)

    original_initialize = tp_random.initialize_rng_tracker

    def initialize_rng_tracker(*args, **kwargs):
        original_initialize(*args, **kwargs)
        if not isinstance(tp_random._CUDA_RNG_STATE_TRACKER, CPURNGStatesTracker):
            tp_random._CUDA_RNG_STATE_TRACKER = CPURNGStatesTracker()

    tp_random.initialize_rng_tracker = initialize_rng_tracker
    # Activation recomputation (CheckpointFunction) saves and restores the CPU generator, the CUDA
    # one and the tracker's; without CUDA the CPU generator is the only device stream.
    tp_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    tp_random._set_cuda_rng_state = lambda *args, **kwargs: None


def _gloo_uneven_gather_and_reduce_scatter() -> None:
    # tensor_parallel.mappings gathers and reduce-scatters uneven row counts (the all-to-all
    # dispatcher's expert-tensor-parallel step) with list all_gather / reduce_scatter, which gloo
    # rejects (all_gather) or lacks (reduce_scatter). Over gloo, pad every rank's rows to the
    # largest count and use the equal-size collectives; the even-split path is untouched.
    from megatron.core.tensor_parallel import mappings

    original_gather = mappings._gather_along_first_dim
    original_reduce_scatter = mappings._reduce_scatter_along_first_dim

    def is_gloo(group) -> bool:
        return torch.distributed.get_backend(group) == "gloo"

    def padded(rows: torch.Tensor, length: int) -> torch.Tensor:
        return torch.nn.functional.pad(rows, (0, 0) * (rows.dim() - 1) + (0, length - rows.size(0)))

    def gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1 or not is_gloo(group):
            return original_gather(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(s) for s in output_split_sizes]
        longest = max(sizes)
        if longest == 0:
            return input_.new_empty((0, *input_.shape[1:]))
        gathered = torch.empty((group.size() * longest, *input_.shape[1:]), dtype=input_.dtype)
        torch.distributed.all_gather_into_tensor(gathered, padded(input_.contiguous(), longest), group=group)
        return torch.cat([chunk[:size] for chunk, size in zip(gathered.split(longest), sizes)])

    def reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1 or not is_gloo(group):
            return original_reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        sizes = [int(s) for s in input_split_sizes]
        longest = max(sizes)
        if longest == 0:
            return input_.new_empty((0, *input_.shape[1:]))
        chunks = [padded(chunk, longest) for chunk in input_.split(sizes)]
        output = torch.empty((longest, *input_.shape[1:]), dtype=input_.dtype)
        torch.distributed.reduce_scatter_tensor(output, torch.cat(chunks), group=group)
        return output[: sizes[group.rank()]]

    mappings._gather_along_first_dim = gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = reduce_scatter_along_first_dim


def _cpu_pipeline_schedules() -> None:
    # pipeline_parallel.schedules allocates its token counters with
    # torch.zeros([], dtype=torch.int, device="cuda"). Its module sees a torch whose zeros puts
    # "cuda" tensors on the CPU; every other name is torch's own.
    from megatron.core.pipeline_parallel import schedules

    schedules.torch = _TorchMakingCPUTensors("zeros")


class _TorchMakingCPUTensors:
    """torch, for one megatron-core module: the named tensor factories put the tensors asked for
    on "cuda" on the CPU; every other name is torch's own."""

    def __init__(self, *factories: str):
        self._factories = factories

    def __getattr__(self, name):
        attribute = getattr(torch, name)
        if name not in self._factories:
            return attribute

        def on_cpu(*args, device=None, **kwargs):
            return attribute(*args, device="cpu" if device == "cuda" else device, **kwargs)

        return on_cpu


def _cpu_tied_embedding_sync() -> None:
    # LanguageModule.setup_embeddings_and_output_layer moves the tied output weight of the last
    # pipeline stage with `weight.data.cuda()` before all-reducing it with the first stage's
    # embedding. Within that method only, `.cuda()` leaves tensors where they are.
    from megatron.core.models.common.language_module.language_module import LanguageModule

    original = LanguageModule.setup_embeddings_and_output_layer

    def setup_embeddings_and_output_layer(self, *args, **kwargs):
        to_cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda tensor, *a, **kw: tensor
        try:
            return original(self, *args, **kwargs)
        finally:
            torch.Tensor.cuda = to_cuda

    LanguageModule.setup_embeddings_and_output_layer = setup_embeddings_and_output_layer


def _cpu_grad_scalers() -> None:
    # optimizer.grad_scaler (--fp16's loss scaling) makes its scale and factors with
    # torch.tensor(..., device='cuda') and loads a saved scale with `.cuda(...)`. Its module sees
    # a torch whose tensor() puts "cuda" tensors on the CPU; loading keeps the scale on the CPU.
    from megatron.core.optimizer import grad_scaler

    grad_scaler.torch = _TorchMakingCPUTensors("tensor")
    original = grad_scaler.DynamicGradScaler.load_state_dict

    def load_state_dict(self, state_dict):
        to_cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda tensor, *a, **kw: tensor.cpu()
        try:
            return original(self, state_dict)
        finally:
            torch.Tensor.cuda = to_cuda

    grad_scaler.DynamicGradScaler.load_state_dict = load_state_dict
