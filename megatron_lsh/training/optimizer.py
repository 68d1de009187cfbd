"""AdamW over megatron-core DDP gradients, with fp32 master weights for bf16 and fp16 models (the
latter's loss scaled by megatron-core's grad scalers), global
gradient-norm clipping across the parallel layout, a sharded (dist_checkpointing) state, and
optionally the optimizer state itself sharded over data parallelism (--use-distributed-optimizer).

megatron-core's own optimizers allocate CUDA tensors unconditionally (``device='cuda'`` buffers,
``'torch.cuda.FloatTensor'`` type checks); this one is plain torch and runs on CPU and GPU alike.
It follows megatron-core's conventions: no weight decay on biases and norm weights, gradients
taken from ``param.main_grad``, one shared Adam step count.

Sharded state (ZeRO stage 1, as megatron-core's DistributedOptimizer): each data-parallel rank
owns whole parameters, balanced by size, and keeps Adam moments and fp32 master weights for its
own only; after each step the owners' new values are all-gathered into every replica. Dense
parameters are shared out over the data-parallel group, expert parameters over the
expert-data-parallel group (the ranks holding the same experts). Gradients are still all-reduced
(megatron-core's DDP); the memory saved is the optimizer state's.
"""

from __future__ import annotations

import math
from itertools import chain
from typing import Dict, List, Sequence

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.optimizer import (
    get_param_id_to_sharded_param_map,
    make_sharded_optimizer_tensor,
    optim_state_to_sharding_state,
)
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

from megatron_lsh.device import compute_device


def _is_expert(param: torch.nn.Parameter) -> bool:
    # megatron-core marks expert-parallel weights allreduce=False (reduced over expert-DP only).
    return not getattr(param, "allreduce", True)


def reduced_grad(param: torch.nn.Parameter):
    """The gradient DDP reduced (main_grad), else autograd's."""
    grad = getattr(param, "main_grad", None)
    return param.grad if grad is None else grad


def balanced_owners(sizes: Sequence[int], ranks: int) -> List[int]:
    """Owner rank of each of the parameters with these sizes: largest first, each to the least
    loaded rank (ties: the lowest), so every rank of a group computes the same split."""
    owners = [0] * len(sizes)
    loads = [0] * ranks
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(ranks), key=lambda r: (loads[r], r))
        owners[index] = rank
        loads[rank] += sizes[index]
    return owners


class _ShardDomain:
    """Parameters replicated over one process group, each owned by one of its ranks."""

    def __init__(self, params: List[torch.nn.Parameter], group):
        self.params, self.group = params, group
        self.size = torch.distributed.get_world_size(group)
        self.rank = torch.distributed.get_rank(group)
        self.owners = balanced_owners([p.numel() for p in params], self.size)

    def owned(self) -> List[torch.nn.Parameter]:
        return [p for p, owner in zip(self.params, self.owners) if owner == self.rank]

    @torch.no_grad()
    def all_gather_owned_values(self) -> None:
        """Every rank's copy of every parameter takes its owner's values: one all-gather per
        dtype, each rank's parameters packed flat and padded to the longest rank's."""
        if self.size == 1:
            return
        for dtype in sorted({p.dtype for p in self.params}, key=str):
            params = [(p, o) for p, o in zip(self.params, self.owners) if p.dtype == dtype]
            per_rank = [[p for p, o in params if o == r] for r in range(self.size)]
            longest = max(sum(p.numel() for p in mine) for mine in per_rank)
            if longest == 0:
                continue
            device = params[0][0].device
            send = torch.zeros(longest, dtype=dtype, device=device)
            mine = per_rank[self.rank]
            if mine:
                packed = torch.cat([p.detach().reshape(-1) for p in mine])
                send[: packed.numel()] = packed
            gathered = torch.empty(self.size * longest, dtype=dtype, device=device)
            torch.distributed.all_gather_into_tensor(gathered, send, group=self.group)
            for rank, theirs in enumerate(per_rank):
                if rank == self.rank or not theirs:
                    continue
                values = gathered[rank * longest: rank * longest + sum(p.numel() for p in theirs)]
                for param, value in zip(theirs, values.split([p.numel() for p in theirs])):
                    param.copy_(value.view_as(param))


class TrainingOptimizer:
    def __init__(
        self,
        model: torch.nn.Module,
        lr: float,
        weight_decay: float,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        fp32_master_weights: bool = False,
        shard_over_data_parallel: bool = False,
        grad_scaler=None,
    ):
        # fp16: megatron-core's loss scaler (ConstantGradScaler / DynamicGradScaler); None otherwise.
        self.grad_scaler = grad_scaler
        decay, no_decay = [], []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.ndim == 1 or name.endswith(".bias") else decay).append(param)
        self.all_params: List[torch.nn.Parameter] = decay + no_decay
        self.fp32_master_weights = fp32_master_weights
        self.shard_domains: List[_ShardDomain] = []
        if shard_over_data_parallel:
            self.shard_domains = [
                _ShardDomain([p for p in self.all_params if not _is_expert(p)],
                             parallel_state.get_data_parallel_group()),
                _ShardDomain([p for p in self.all_params if _is_expert(p)],
                             parallel_state.get_expert_data_parallel_group()),
            ]
            owned = {id(p) for domain in self.shard_domains for p in domain.owned()}
            decay = [p for p in decay if id(p) in owned]
            no_decay = [p for p in no_decay if id(p) in owned]
            if not decay and not no_decay:
                raise ValueError(
                    "--use-distributed-optimizer: more data-parallel ranks than parameters to share out"
                )
        # The parameters this rank updates: all of them, or with sharding its own.
        self.model_groups: List[List[torch.nn.Parameter]] = [decay, no_decay]
        if fp32_master_weights:
            self.main_groups = [
                [p.detach().clone().float().requires_grad_(True) for p in group]
                for group in self.model_groups
            ]
        else:
            self.main_groups = self.model_groups
        self.optimizer = torch.optim.AdamW(
            [
                {"params": self.main_groups[0], "wd_mult": 1.0},
                {"params": self.main_groups[1], "wd_mult": 0.0},
            ],
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
        )

    @property
    def param_groups(self):
        """For megatron-core's OptimizerParamScheduler, which sets lr and weight decay."""
        return self.optimizer.param_groups

    def _pairs(self):
        return zip(chain.from_iterable(self.model_groups), chain.from_iterable(self.main_groups))

    def zero_grad(self) -> None:
        for _, main in self._pairs():
            main.grad = None

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss the backward starts from (megatron-core's config.grad_scale_func)."""
        return loss * self.grad_scaler.scale.to(loss.device)

    def prepare_grads(self) -> bool:
        """Point the optimizer's parameters at the reduced gradients (DDP's main_grad), unscaled
        under fp16. Returns whether they overflowed (fp16 only; then the step is to be skipped and
        the scale has been lowered), agreed by every rank."""
        for model_param, main_param in self._pairs():
            grad = reduced_grad(model_param)
            main_param.grad = None if grad is None else grad.to(main_param.dtype)
        if self.grad_scaler is None:
            return False
        # Unscaled and checked in one pass, as megatron-core's mixed-precision optimizer does.
        grads = [main.grad for _, main in self._pairs() if main.grad is not None]
        overflow = torch.zeros(1, device=compute_device())
        if grads:
            torch._amp_foreach_non_finite_check_and_unscale_(grads, overflow,
                                                              self.grad_scaler.inv_scale.to(overflow.device))
        torch.distributed.all_reduce(overflow, op=torch.distributed.ReduceOp.MAX)  # every rank skips alike
        found_inf = bool(overflow.item())  # host sync: whether this step applies
        self.grad_scaler.update(found_inf)
        return found_inf

    @property
    def sharded(self) -> bool:
        return bool(self.shard_domains)

    def state_bytes(self) -> int:
        """Bytes of optimizer state on this rank: Adam's moments, and fp32 master weights."""
        total = sum(t.numel() * t.element_size() for state in self.optimizer.state.values()
                    for t in state.values() if torch.is_tensor(t) and t.dim() > 0)
        if self.fp32_master_weights:
            total += sum(p.numel() * p.element_size() for p in chain.from_iterable(self.main_groups))
        return total

    def grad_norm(self) -> float:
        """L2 norm of the whole model's gradient, as megatron-core counts it: every parameter
        once. Tensor-parallel shards and pipeline stages are summed over the model-parallel
        group; copies (norms and routers under tensor parallelism, the tied output weight of
        the last stage) count on one rank only; experts sum over the expert-parallel layout.
        Every replica holds every reduced gradient, sharded optimizer or not."""
        dense_sq = torch.zeros((), dtype=torch.float32)
        expert_sq = torch.zeros((), dtype=torch.float32)
        expert_tp_group = parallel_state.get_expert_tensor_parallel_group()
        for model_param in self.all_params:
            grad = reduced_grad(model_param)
            if grad is None or getattr(model_param, "shared", False):
                continue
            expert = _is_expert(model_param)
            if not param_is_not_tensor_parallel_duplicate(model_param, expert_tp_group if expert else None):
                continue
            sq = grad.detach().float().pow(2).sum().cpu()
            if expert:
                expert_sq += sq
            else:
                dense_sq += sq
        for total, group in (
            (dense_sq, parallel_state.get_model_parallel_group()),
            (expert_sq, parallel_state.get_expert_tensor_model_pipeline_parallel_group()),
        ):
            if torch.distributed.get_world_size(group) > 1:
                reduced = total.to(compute_device())
                torch.distributed.all_reduce(reduced, group=group)
                total.copy_(reduced.cpu())
        return math.sqrt(float(dense_sq + expert_sq))

    def clip_grads(self, max_norm: float) -> float:
        """Scale gradients so their global norm is at most max_norm (0: no clipping); returns
        the norm before clipping."""
        norm = self.grad_norm()
        if max_norm > 0 and norm > max_norm:
            scale = max_norm / (norm + 1e-6)
            for _, main_param in self._pairs():
                if main_param.grad is not None:
                    main_param.grad.mul_(scale)
        return norm

    @torch.no_grad()
    def step(self) -> None:
        self.optimizer.step()
        if self.fp32_master_weights:
            for model_param, main_param in self._pairs():
                model_param.copy_(main_param)
        for domain in self.shard_domains:
            domain.all_gather_owned_values()

    @torch.no_grad()
    def reload_model_params(self) -> None:
        """Take the master weights from the model again (after loading weights only)."""
        if self.fp32_master_weights:
            for model_param, main_param in self._pairs():
                main_param.copy_(model_param)

    # -- checkpointing -----------------------------------------------------------------------

    def _init_state(self) -> None:
        """Adam state tensors before the first step, so a checkpoint has somewhere to load into."""
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                if not self.optimizer.state[param]:
                    self.optimizer.state[param] = {
                        "step": torch.tensor(0.0),
                        "exp_avg": torch.zeros_like(param),
                        "exp_avg_sq": torch.zeros_like(param),
                    }

    def sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False) -> Dict:
        """The optimizer state as ShardedTensors laid out like the model's parameters, so a
        checkpoint can be resumed on another expert-parallel layout."""
        # Before its first update (e.g. every fp16 step so far skipped) Adam has no state yet: its
        # zero state is saved then, as the loading side expects it.
        self._init_state()
        state = self.optimizer.state_dict()
        id_to_sharded = get_param_id_to_sharded_param_map(
            model_sharded_state_dict, chain.from_iterable(self.model_groups)
        )
        steps = {float(s["step"]) for s in state["state"].values() if "step" in s}
        if len(steps) > 1:
            raise RuntimeError(f"Adam step differs between parameters: {sorted(steps)}")
        optim_state_to_sharding_state(state, id_to_sharded, exclude_keys="step")
        if steps:
            state["state"]["common_step"] = torch.tensor(steps.pop())
        result = {"optimizer": state}
        if self.grad_scaler is not None:
            result["grad_scaler"] = self.grad_scaler.state_dict()
        if self.fp32_master_weights:
            result["fp32_params"] = [
                make_sharded_optimizer_tensor(id_to_sharded[i], main, prefix="optimizer.state.fp32_param")
                for i, (_, main) in enumerate(self._pairs())
            ]
        if self.sharded:
            # Only the owner holds a parameter's state: it writes it, whatever data-parallel
            # replica of the model it is (the model's replica ids name data-parallel rank 0).
            for item in nested_values(result):
                if isinstance(item, (ShardedTensor, ShardedTensorFactory)) and isinstance(item.replica_id, tuple):
                    item.replica_id = (*item.replica_id[:-1], 0)
        return result

    def load_sharded_state_dict(self, loaded: Dict) -> None:
        state = loaded["optimizer"]
        step = state["state"].pop("common_step", None)
        if step is not None:
            for param_state in state["state"].values():
                param_state["step"] = step.clone().float()
        self.optimizer.load_state_dict(state)
        if self.grad_scaler is not None and "grad_scaler" in loaded:
            self.grad_scaler.load_state_dict(loaded["grad_scaler"])
        if self.fp32_master_weights:
            with torch.no_grad():
                for (model_param, main_param), saved in zip(self._pairs(), loaded["fp32_params"]):
                    main_param.copy_(saved)
                    model_param.copy_(saved)


def grad_scaler_from_args(args):
    """--fp16's loss scaler, as Megatron-LM builds it: constant with --loss-scale, else dynamic
    (doubling after --loss-scale-window clean steps, halving after --hysteresis overflows)."""
    if not getattr(args, "fp16", False):
        return None
    from megatron.core.optimizer.grad_scaler import ConstantGradScaler, DynamicGradScaler

    if args.loss_scale:
        return ConstantGradScaler(args.loss_scale)
    return DynamicGradScaler(initial_scale=args.initial_loss_scale, min_scale=args.min_loss_scale, growth_factor=2.0,
                             backoff_factor=0.5, growth_interval=args.loss_scale_window, hysteresis=args.hysteresis)
