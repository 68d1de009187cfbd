"""Where a step went non-finite: the first layer (in forward order) whose output held NaN or
inf, and the first parameter whose gradient did.

Forward hooks keep one flag tensor per layer and step, reduced on the device: no host sync
unless a step has already failed and its error message asks where."""

from __future__ import annotations

from typing import Dict, Optional

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_lsh.training.optimizer import reduced_grad


class NonFiniteWatch:
    def __init__(self, chunks):
        self._flags: Dict[str, torch.Tensor] = {}
        self._param_names = {}
        for index, chunk in enumerate(chunks):
            prefix = f"chunk {index}: " if len(chunks) > 1 else ""
            for name, module in chunk.named_modules():
                # An MoE layer's hook fires before its transformer layer's: the finer name first.
                if isinstance(module, (TransformerLayer, MoELayer)):
                    kind = "MoE layer" if isinstance(module, MoELayer) else "transformer layer"
                    module.register_forward_hook(self._recorder(f"{prefix}{name} ({kind})"))
            for name, param in chunk.named_parameters():
                self._param_names[id(param)] = prefix + name

    def _recorder(self, name: str):
        def record(module, inputs, output):
            tensor = output[0] if isinstance(output, (tuple, list)) else output
            if not module.training or not torch.is_tensor(tensor):  # only training steps fail
                return
            bad = ~torch.isfinite(tensor.detach()).all()
            self._flags[name] = bad if name not in self._flags else self._flags[name] | bad
        return record

    def start_step(self) -> None:
        self._flags.clear()

    def first_bad_layer(self) -> Optional[str]:
        return next((name for name, bad in self._flags.items() if bool(bad)), None)

    def first_bad_gradient(self, params) -> Optional[str]:
        for param in params:
            grad = reduced_grad(param)
            if grad is not None and not bool(torch.isfinite(grad).all()):
                return self._param_names.get(id(param), "an unnamed parameter")
        return None
