"""Payload formats of the all-to-alls: what a row becomes on the wire and what comes back."""

import pytest
import torch

from megatron_lsh.moe import LSHConfigError, LSHTransformerConfig
from megatron_lsh.moe.payload import (
    MX_BLOCK,
    PayloadFormatError,
    check_payload_format,
    decode_mxfp8,
    encode_mxfp8,
    payload_all_to_all,
    round_trip,
    row_bytes,
)


def rows_of_many_magnitudes(n=64, width=128, seed=0):
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, width, generator=generator, dtype=torch.float64)
    # Blocks from 1e-30 to 1e30 and one with a single large element among small ones.
    scales = 10.0 ** torch.linspace(-30, 30, n, dtype=torch.float64)
    rows = rows * scales.unsqueeze(1)
    rows[0, :MX_BLOCK] = 1e-3
    rows[0, 5] = 1e3
    return rows.float()


def test_an_mxfp8_row_is_a_byte_an_element_then_a_scale_byte_per_32():
    rows = rows_of_many_magnitudes()
    wire = encode_mxfp8(rows)
    assert wire.dtype == torch.uint8
    assert wire.shape == (64, 128 + 128 // MX_BLOCK)
    assert row_bytes("mxfp8", 128) == 132
    assert row_bytes("bf16", 128) == 256
    # The scales are biased exponents: 2^(byte - 127), the smallest that fits the block in e4m3.
    exponents = wire[:, 128:].double() - 127
    amax = rows.double().abs().reshape(64, 4, MX_BLOCK).amax(dim=-1)
    assert torch.all(amax <= 448 * 2.0 ** exponents)
    assert torch.all(amax > 448 * 2.0 ** (exponents - 1))


def test_mxfp8_round_trip_rounds_each_element_to_three_mantissa_bits_of_its_block():
    rows = rows_of_many_magnitudes()
    back = decode_mxfp8(encode_mxfp8(rows), 128, torch.float32)
    exponents = (encode_mxfp8(rows)[:, 128:].double() - 127).repeat_interleave(MX_BLOCK, dim=1)
    error = (back.double() - rows.double()).abs()
    # e4m3 normals: half a unit in the last of 3 mantissa bits, 2^-4 relative; below the block's
    # normal range, half the subnormal step 2^-9 of the block's scale.
    bound = torch.maximum(2.0 ** -4 * rows.double().abs(), 2.0 ** (exponents - 10))
    assert torch.all(error <= bound * (1 + 1e-6))
    relative = error.sum() / rows.double().abs().sum()
    assert 1e-3 < relative < 2.0 ** -5  # it rounds, by about e4m3's mean error
    # The block's largest element comes back within 2^-4 (no saturation at 448).
    assert abs(back[0, 5].item() - 1e3) <= 1e3 * 2 ** -4


def test_mxfp8_keeps_zeros_and_signs_and_decodes_to_the_sender_dtype():
    rows = torch.zeros(3, 64, dtype=torch.bfloat16)
    rows[1] = -torch.arange(64, dtype=torch.bfloat16)
    back = round_trip(rows, "mxfp8")
    assert back.dtype == torch.bfloat16
    assert torch.equal(back[0], rows[0]) and torch.equal(back[2], rows[2])
    assert torch.all(back[1] <= 0)


def test_a_rank_with_no_rows_sends_an_empty_payload():
    wire = encode_mxfp8(torch.zeros(0, 64))
    assert wire.shape == (0, 66)
    assert decode_mxfp8(wire, 64, torch.float32).shape == (0, 64)


def test_bf16_payloads_are_sent_as_they_are():
    rows = rows_of_many_magnitudes()
    assert round_trip(rows, "bf16") is rows


class OneRankGroup:
    """A process group of one rank: the all-to-all keeps every row, so only the format acts."""

    def size(self):
        return 1


@pytest.mark.parametrize("forward_format, backward_format", [("mxfp8", "bf16"), ("bf16", "mxfp8"), ("mxfp8", "mxfp8")])
def test_each_direction_of_the_all_to_all_sends_its_own_format(forward_format, backward_format):
    rows = rows_of_many_magnitudes(n=8, width=64).requires_grad_()
    output_gradient = torch.randn(8, 64, generator=torch.Generator().manual_seed(5))
    sent = payload_all_to_all(OneRankGroup(), rows, [8], [8], forward_format, backward_format)
    sent.backward(output_gradient)
    assert torch.equal(sent.detach(), round_trip(rows.detach(), forward_format))
    assert torch.equal(rows.grad, round_trip(output_gradient, backward_format))


def test_a_format_that_cannot_be_sent_is_refused_with_the_reason():
    with pytest.raises(PayloadFormatError, match="'int4' is not a payload format"):
        check_payload_format("int4", 64)
    with pytest.raises(PayloadFormatError, match="do not divide the hidden size 80"):
        check_payload_format("mxfp8", 80)
    check_payload_format("bf16", 80)  # any width goes as it is


def test_mxfp8_needs_a_torch_with_float8(monkeypatch):
    monkeypatch.delattr(torch, "float8_e4m3fn")
    with pytest.raises(LSHConfigError) as error:
        LSHTransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_moe_experts=4,
                             moe_dispatch_fwd_dtype="mxfp8")
    assert error.value.setting == "moe_dispatch_fwd_dtype"
    assert "needs torch.float8_e4m3fn" in str(error.value)
