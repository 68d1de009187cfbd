"""Payload formats of the MoE all-to-alls, and the all-to-all that sends rows in them.

'bf16' sends rows as they are (megatron-core's all-to-all); its bytes are counted at 2 an
element whatever a run computes in, so a CPU run in fp32 reports what a GPU run in bf16 sends.
'mxfp8' is the OCP microscaling format: e4m3 elements and one power-of-two (e8m0) scale per
block of 32 elements along the row. The scale rounds up (2^ceil(log2(amax / 448))), so no
element saturates. Rows cross the wire as bytes, elements then scales, and are decoded to the
sender's dtype on arrival: the experts compute in the run's dtype, on what 8 bits carried.

Rows are quantised whatever the expert-parallel size (a rank's rows for its own experts too),
so a model computes the same at every layout, as a fused quantise-and-send kernel would.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

PAYLOAD_FORMATS = ("bf16", "mxfp8")
MX_BLOCK = 32
_E4M3_MAX = 448.0
_E8M0_BIAS = 127
BF16_BYTES = 2  # an element of a stock payload, and a routing probability


class PayloadFormatError(ValueError):
    """A payload format this torch build or this hidden size cannot carry."""


def float8_available() -> bool:
    return hasattr(torch, "float8_e4m3fn")


def check_payload_format(payload_format: str, row_width: int) -> None:
    """Raise PayloadFormatError naming what is wrong with sending rows of that width so."""
    if payload_format not in PAYLOAD_FORMATS:
        raise PayloadFormatError(
            f"{payload_format!r} is not a payload format; use one of {', '.join(map(repr, PAYLOAD_FORMATS))}")
    if payload_format == "mxfp8":
        if not float8_available():
            raise PayloadFormatError(f"'mxfp8' needs torch.float8_e4m3fn, which torch {torch.__version__} lacks")
        if row_width % MX_BLOCK:
            raise PayloadFormatError(
                f"'mxfp8' scales blocks of {MX_BLOCK} elements, which do not divide the hidden size {row_width}")


def row_bytes(payload_format: str, row_width: int) -> int:
    """Bytes one row of ``row_width`` elements takes on the wire, scales included."""
    if payload_format == "mxfp8":
        return row_width + row_width // MX_BLOCK
    return BF16_BYTES * row_width


def encode_mxfp8(rows: torch.Tensor) -> torch.Tensor:
    """[n, h] rows -> [n, h + h/32] uint8: e4m3 elements, then one e8m0 scale per block."""
    n, width = rows.shape
    blocks = rows.float().reshape(n, width // MX_BLOCK, MX_BLOCK)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    # Smallest power of two that brings the block's largest element within e4m3's range.
    exponent = torch.ceil(torch.log2(amax / _E4M3_MAX)).nan_to_num(0.0, posinf=0.0, neginf=-_E8M0_BIAS)
    exponent = exponent.clamp(-_E8M0_BIAS, _E8M0_BIAS)
    elements = (blocks * torch.exp2(-exponent)).to(torch.float8_e4m3fn).view(torch.uint8)
    scales = (exponent + _E8M0_BIAS).to(torch.uint8)
    return torch.cat([elements.reshape(n, width), scales.reshape(n, width // MX_BLOCK)], dim=1)


def decode_mxfp8(wire: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    n = wire.size(0)
    elements = wire[:, :width].contiguous().view(torch.float8_e4m3fn).float()
    exponent = wire[:, width:].float() - _E8M0_BIAS
    blocks = elements.reshape(n, width // MX_BLOCK, MX_BLOCK) * torch.exp2(exponent).unsqueeze(-1)
    return blocks.reshape(n, width).to(dtype)


def round_trip(rows: torch.Tensor, payload_format: str) -> torch.Tensor:
    """What arrives when ``rows`` are sent in ``payload_format`` (no communication)."""
    if payload_format == "bf16":
        return rows
    return decode_mxfp8(encode_mxfp8(rows), rows.size(-1), rows.dtype)


def _all_to_all_rows(group, rows: torch.Tensor, output_splits, input_splits) -> torch.Tensor:
    if group.size() == 1:
        return rows
    rows = rows.contiguous()
    received = rows.new_empty((sum(output_splits), *rows.shape[1:]))
    torch.distributed.all_to_all_single(
        received, rows, output_split_sizes=output_splits, input_split_sizes=input_splits, group=group)
    return received


def _send(group, rows: torch.Tensor, output_splits, input_splits, payload_format: str) -> torch.Tensor:
    if payload_format == "bf16":
        return _all_to_all_rows(group, rows, output_splits, input_splits)
    received = _all_to_all_rows(group, encode_mxfp8(rows), output_splits, input_splits)
    return decode_mxfp8(received, rows.size(-1), rows.dtype)


class PayloadAllToAll(torch.autograd.Function):
    """All-to-all of rows, the forward in one format and the gradient's way back in another."""

    @staticmethod
    def forward(ctx, group, rows, output_splits, input_splits, forward_format, backward_format):
        ctx.group, ctx.splits, ctx.backward_format = group, (output_splits, input_splits), backward_format
        return _send(group, rows, output_splits, input_splits, forward_format)

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits = ctx.splits
        return None, _send(ctx.group, grad, input_splits, output_splits, ctx.backward_format), None, None, None, None


def payload_all_to_all(group, rows: torch.Tensor, output_splits: Optional[Sequence[int]],
                       input_splits: Optional[Sequence[int]], forward_format: str,
                       backward_format: str) -> torch.Tensor:
    """megatron-core's ``all_to_all`` (same split arguments), rows sent in ``forward_format`` and
    their gradient returned in ``backward_format``."""
    if output_splits is None or input_splits is None:  # equal splits
        rows_each = rows.size(0) // group.size()
        output_splits = input_splits = [rows_each] * group.size()
    output_splits, input_splits = [int(s) for s in output_splits], [int(s) for s in input_splits]
    return PayloadAllToAll.apply(group, rows, output_splits, input_splits, forward_format, backward_format)
