"""Payload formats of the MoE all-to-alls, and the all-to-all that sends rows in them.

'bf16' sends rows as they are (megatron-core's all-to-all); its bytes are counted at 2 an
element whatever a run computes in, so a CPU run in fp32 reports what a GPU run in bf16 sends.
'mxfp8' is the OCP microscaling format: e4m3 elements and one power-of-two (e8m0) scale per
block of 32 elements along the row. The scale rounds up (2^ceil(log2(amax / 448))), so no
element saturates. 'mxfp4': e2m1 elements (0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives), two
a byte, with the same e8m0 scale per 32, rounded up alike (amax / 6). 'nvfp4': e2m1 elements,
two a byte, one e4m3 scale per 16 under one fp32 scale per row (NVIDIA's two-level scaling; per
row rather than per tensor, so a row's encoding never depends on the rows sent beside it); the
e4m3 scale rounds to nearest, so a block's largest element may saturate at 6. Elements round to
nearest (ties to even), or, for the backward directions if asked, stochastically (the NVFP4
training recipe's choice for gradients: unbiased, each element to one of its two neighbours).
Rows cross the wire as bytes (elements, then scales) and are decoded to the sender's dtype on
arrival: the experts compute in the run's dtype, on what the payload carried. A block holding a
non-finite element is sent with the formats' NaN scale: it arrives as NaN, never as a finite
value it was not, and training's non-finite check names the layer.

Rows are quantised whatever the expert-parallel size (a rank's rows for its own experts too),
so a model computes the same at every layout, as a fused quantise-and-send kernel would.

Shapes: rows [n, h] (n rows of hidden size h); wire [n, row_bytes(format, h)] uint8.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

PAYLOAD_FORMATS = ("bf16", "mxfp8", "mxfp4", "nvfp4")
ROUNDINGS = ("nearest", "stochastic")
MX_BLOCK = 32
NV_BLOCK = 16
_E4M3_MAX = 448.0
_E8M0_BIAS = 127
_E8M0_NAN = 255
_E4M3_NAN = 0x7F
_E2M1_MAX = 6.0
BF16_BYTES = 2  # an element of a stock payload, and a routing probability
_BLOCK = {"mxfp8": MX_BLOCK, "mxfp4": MX_BLOCK, "nvfp4": NV_BLOCK}


class PayloadFormatError(ValueError):
    """A payload format this torch build or this hidden size cannot carry."""


def float8_available() -> bool:
    return hasattr(torch, "float8_e4m3fn")


def check_payload_format(payload_format: str, row_width: int) -> None:
    """Raise PayloadFormatError naming what is wrong with sending rows of that width so."""
    if payload_format not in PAYLOAD_FORMATS:
        raise PayloadFormatError(
            f"{payload_format!r} is not a payload format; use one of {', '.join(map(repr, PAYLOAD_FORMATS))}")
    if payload_format in ("mxfp8", "nvfp4") and not float8_available():
        raise PayloadFormatError(f"{payload_format!r} needs torch.float8_e4m3fn, which torch {torch.__version__} lacks")
    block = _BLOCK.get(payload_format)
    if block is not None and row_width % block:
        raise PayloadFormatError(
            f"{payload_format!r} scales blocks of {block} elements, which do not divide the hidden size {row_width}")


def row_bytes(payload_format: str, row_width: int) -> int:
    """Bytes one row of ``row_width`` elements takes on the wire, scales included."""
    if payload_format == "mxfp8":
        return row_width + row_width // MX_BLOCK
    if payload_format == "mxfp4":
        return row_width // 2 + row_width // MX_BLOCK
    if payload_format == "nvfp4":
        return row_width // 2 + row_width // NV_BLOCK + 4
    return BF16_BYTES * row_width


def encode_mxfp8(rows: torch.Tensor) -> torch.Tensor:
    """[n, h] rows -> [n, h + h/32] uint8: e4m3 elements, then one e8m0 scale per block."""
    n, width = rows.shape
    blocks = rows.float().reshape(n, width // MX_BLOCK, MX_BLOCK)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    # Smallest power of two that brings the block's largest element within e4m3's range.
    exponent = _e8m0_exponent(amax, _E4M3_MAX)
    elements = (blocks * torch.exp2(-exponent)).to(torch.float8_e4m3fn).view(torch.uint8)
    return torch.cat([elements.reshape(n, width), _e8m0_bytes(exponent, amax).reshape(n, width // MX_BLOCK)], dim=1)


def decode_mxfp8(wire: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    n = wire.size(0)
    elements = wire[:, :width].contiguous().view(torch.float8_e4m3fn).float()
    blocks = elements.reshape(n, width // MX_BLOCK, MX_BLOCK) * _e8m0_values(wire[:, width:]).unsqueeze(-1)
    return blocks.reshape(n, width).to(dtype)


def _e8m0_exponent(amax: torch.Tensor, element_max: float) -> torch.Tensor:
    """The smallest power of two that brings each block's largest element within element_max."""
    exponent = torch.ceil(torch.log2(amax / element_max)).nan_to_num(0.0, posinf=0.0, neginf=-_E8M0_BIAS)
    return exponent.clamp(-_E8M0_BIAS, _E8M0_BIAS)


def _e8m0_bytes(exponent: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """Biased exponents as bytes; a block with a non-finite element gets e8m0's NaN."""
    return torch.where(torch.isfinite(amax), exponent + _E8M0_BIAS, float(_E8M0_NAN)).to(torch.uint8)


def _e8m0_values(scale_bytes: torch.Tensor) -> torch.Tensor:
    values = torch.exp2(scale_bytes.float() - _E8M0_BIAS)
    return torch.where(scale_bytes == _E8M0_NAN, float("nan"), values)


_MANTISSA_DROPPED = 22  # float32's 23 mantissa bits down to e2m1's one
# float32 1.0's biased exponent and kept bit, (127 << 1) | 0, is e2m1 code 2.
_E2M1_CODE_OFFSET = (127 << 1) - 2
# e2m1 values by code (sign in bit 3), one copy per device (no host-to-device copy per decode).
_E2M1_VALUES = {}


def _e2m1_codes(scaled: torch.Tensor, stochastic: bool) -> torch.Tensor:
    """e2m1 codes (uint8, sign in bit 3) of values already scaled to the format's range; larger
    magnitudes saturate at 6. Nearest: ties go to the even code. Stochastic: up with probability
    the distance from the lower neighbour over the gap, so the expected value is the input.

    On float32's bits rather than by a table search: from 1 up, e2m1 is float32 with one mantissa
    bit, so rounding drops 22 bits (adding just under half of them plus the kept bit, for ties to
    even, or a random amount below them, for stochastic rounding; a carry moves into the
    exponent), and what is left, exponent and kept bit, is the code plus a constant. Below 1 the
    values are the multiples of 0.5: codes 0, 1 (and 2, for 1)."""
    magnitude = scaled.float().abs().clamp_(max=_E2M1_MAX)
    bits = magnitude.view(torch.int32)
    if stochastic:
        carry = torch.randint(0, 1 << _MANTISSA_DROPPED, bits.shape, dtype=torch.int32, device=bits.device)
        below_one = torch.floor_(magnitude * 2 + torch.rand_like(magnitude))
    else:
        carry = ((bits >> _MANTISSA_DROPPED) & 1).add_((1 << (_MANTISSA_DROPPED - 1)) - 1)
        below_one = torch.round(magnitude * 2)  # half to even: 0.25 -> 0, 0.75 -> 1
    from_one = (bits + carry).bitwise_right_shift_(_MANTISSA_DROPPED).sub_(_E2M1_CODE_OFFSET)
    code = torch.where(magnitude < 1, below_one.to(torch.int32), from_one).to(torch.uint8)
    negative = (scaled < 0) & (code > 0)
    return code.bitwise_or_(negative.to(torch.uint8) << 3)


def _e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    table = _E2M1_VALUES.get(codes.device)
    if table is None:
        table = _E2M1_VALUES[codes.device] = torch.tensor(
            [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
            device=codes.device)
    return table[codes.long()]


def _pack_pairs(codes: torch.Tensor) -> torch.Tensor:
    """[n, h] 4-bit codes -> [n, h/2] bytes: element 2i in the low nibble, 2i+1 in the high."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def _unpack_pairs(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.size(0), -1)


def encode_mxfp4(rows: torch.Tensor, stochastic: bool = False) -> torch.Tensor:
    """[n, h] rows -> [n, h/2 + h/32] uint8: e2m1 element pairs, then one e8m0 scale per 32."""
    n, width = rows.shape
    blocks = rows.float().reshape(n, width // MX_BLOCK, MX_BLOCK)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    exponent = _e8m0_exponent(amax, _E2M1_MAX)
    codes = _e2m1_codes((blocks * torch.exp2(-exponent)).reshape(n, width), stochastic)
    return torch.cat([_pack_pairs(codes), _e8m0_bytes(exponent, amax).reshape(n, width // MX_BLOCK)], dim=1)


def decode_mxfp4(wire: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    n = wire.size(0)
    elements = _e2m1_values(_unpack_pairs(wire[:, :width // 2])).reshape(n, width // MX_BLOCK, MX_BLOCK)
    blocks = elements * _e8m0_values(wire[:, width // 2:]).unsqueeze(-1)
    return blocks.reshape(n, width).to(dtype)


def encode_nvfp4(rows: torch.Tensor, stochastic: bool = False) -> torch.Tensor:
    """[n, h] rows -> [n, h/2 + h/16 + 4] uint8: e2m1 element pairs, one e4m3 scale per 16, and
    the row's fp32 scale (amax / (6 x 448), so the block scales use e4m3's whole range)."""
    n, width = rows.shape
    blocks = rows.float().reshape(n, width // NV_BLOCK, NV_BLOCK)
    block_amax = blocks.abs().amax(dim=-1, keepdim=True)
    row_amax = block_amax.amax(dim=1, keepdim=True)
    finite = torch.isfinite(row_amax)
    row_scale = torch.where(finite & (row_amax > 0), row_amax / (_E2M1_MAX * _E4M3_MAX), 1.0)
    block_scale = (block_amax / _E2M1_MAX / row_scale).to(torch.float8_e4m3fn)
    divisor = block_scale.float() * row_scale
    scaled = torch.where(divisor > 0, blocks / divisor.clamp(min=torch.finfo(torch.float32).tiny), 0.0)
    codes = _e2m1_codes(scaled.reshape(n, width), stochastic)
    scale_bytes = torch.where(torch.isfinite(block_amax), block_scale.view(torch.uint8), _E4M3_NAN)
    return torch.cat([_pack_pairs(codes), scale_bytes.reshape(n, width // NV_BLOCK),
                      row_scale.reshape(n, 1).contiguous().view(torch.uint8)], dim=1)


def decode_nvfp4(wire: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    n = wire.size(0)
    elements = _e2m1_values(_unpack_pairs(wire[:, :width // 2])).reshape(n, width // NV_BLOCK, NV_BLOCK)
    scales_end = width // 2 + width // NV_BLOCK
    block_scale = wire[:, width // 2:scales_end].contiguous().view(torch.float8_e4m3fn).float()
    # Copied into fresh storage: viewing bytes as float32 needs aligned offsets and strides.
    row_scale = torch.empty((n, 4), dtype=torch.uint8, device=wire.device).copy_(wire[:, scales_end:])
    row_scale = row_scale.view(torch.float32)
    blocks = elements * (block_scale * row_scale).unsqueeze(-1)
    return blocks.reshape(n, width).to(dtype)


_CODECS = {
    "mxfp8": (lambda rows, stochastic: encode_mxfp8(rows), decode_mxfp8),
    "mxfp4": (encode_mxfp4, decode_mxfp4),
    "nvfp4": (encode_nvfp4, decode_nvfp4),
}


def encode(rows: torch.Tensor, payload_format: str, stochastic: bool = False) -> torch.Tensor:
    """Rows as the wire carries them in a low-precision format (mxfp8 always rounds to nearest)."""
    return _CODECS[payload_format][0](rows, stochastic)


def decode(wire: torch.Tensor, payload_format: str, width: int, dtype: torch.dtype) -> torch.Tensor:
    return _CODECS[payload_format][1](wire, width, dtype)


def round_trip(rows: torch.Tensor, payload_format: str, stochastic: bool = False) -> torch.Tensor:
    """What arrives when ``rows`` are sent in ``payload_format`` (no communication)."""
    if payload_format == "bf16":
        return rows
    return decode(encode(rows, payload_format, stochastic), payload_format, rows.size(-1), rows.dtype)


def _all_to_all_rows(group, rows: torch.Tensor, output_splits, input_splits) -> torch.Tensor:
    if group.size() == 1:
        return rows
    rows = rows.contiguous()
    received = rows.new_empty((sum(output_splits), *rows.shape[1:]))
    torch.distributed.all_to_all_single(
        received, rows, output_split_sizes=output_splits, input_split_sizes=input_splits, group=group)
    return received


def _send(group, rows: torch.Tensor, output_splits, input_splits, payload_format: str,
          stochastic: bool = False) -> torch.Tensor:
    if payload_format == "bf16":
        return _all_to_all_rows(group, rows, output_splits, input_splits)
    received = _all_to_all_rows(group, encode(rows, payload_format, stochastic), output_splits, input_splits)
    return decode(received, payload_format, rows.size(-1), rows.dtype)


class PayloadAllToAll(torch.autograd.Function):
    """All-to-all of rows, the forward in one format and the gradient's way back in another
    (rounded to nearest or stochastically)."""

    @staticmethod
    def forward(ctx, group, rows, output_splits, input_splits, forward_format, backward_format, backward_rounding):
        ctx.group, ctx.splits, ctx.backward_format = group, (output_splits, input_splits), backward_format
        ctx.stochastic = backward_rounding == "stochastic"
        return _send(group, rows, output_splits, input_splits, forward_format)

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits = ctx.splits
        sent = _send(ctx.group, grad, input_splits, output_splits, ctx.backward_format, ctx.stochastic)
        return None, sent, None, None, None, None, None


def payload_all_to_all(group, rows: torch.Tensor, output_splits: Optional[Sequence[int]],
                       input_splits: Optional[Sequence[int]], forward_format: str,
                       backward_format: str, backward_rounding: str = "nearest") -> torch.Tensor:
    """megatron-core's ``all_to_all`` (same split arguments), rows sent in ``forward_format`` and
    their gradient returned in ``backward_format``, rounded by ``backward_rounding``."""
    if output_splits is None or input_splits is None:  # equal splits
        rows_each = rows.size(0) // group.size()
        output_splits = input_splits = [rows_each] * group.size()
    output_splits, input_splits = [int(s) for s in output_splits], [int(s) for s in input_splits]
    return PayloadAllToAll.apply(group, rows, output_splits, input_splits, forward_format, backward_format,
                                 backward_rounding)
