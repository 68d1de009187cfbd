"""megatron-lsh: Megatron-style MoE pretraining with LSH-compressed expert-parallel all-to-all."""

import warnings

# Notices megatron-core and torch print once per process on every machine without Transformer
# Engine or Apex (our CPU and plain-PyTorch GPU setups): nothing a user can act on.
for _notice in (
    "Transformer Engine and Apex are not installed",
    "Apex is not installed",
    "full scope is deprecated",
    r"`torch.distributed.all_gather_into_tensor` is deprecated",
    r"`torch.distributed._all_gather_base` is a private function",
    r"`torch.distributed._reduce_scatter_base` is a private function",
):
    warnings.filterwarnings("ignore", message=_notice)

from megatron_lsh import compat as _compat  # noqa: E402

# Makes megatron-core usable without CUDA; changes nothing on a CUDA machine (see compat.py).
_compat.apply()

__version__ = "0.1.0"
