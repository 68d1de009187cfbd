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


# -- 4-bit payloads -------------------------------------------------------------------------------

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def test_e2m1_rounds_to_the_nearest_value_ties_to_even_and_saturates_at_6():
    from megatron_lsh.moe.payload import _e2m1_codes, _e2m1_values

    given = torch.tensor([0.0, 0.2, 0.25, 0.3, 0.5, 0.75, 1.25, 1.75, 2.5, 2.6, 3.5, 5.0, 5.1, 6.0, 7.0, 1e30,
                          -0.25, -0.3, -0.75, -5.0, -9.0])
    expected = [0.0, 0.0, 0.0, 0.5, 0.5, 1.0, 1.0, 2.0, 2.0, 3.0, 4.0, 4.0, 6.0, 6.0, 6.0, 6.0,
                0.0, -0.5, -1.0, -4.0, -6.0]
    codes = _e2m1_codes(given, stochastic=False)
    assert _e2m1_values(codes).tolist() == expected
    assert codes[16].item() == 0  # -0.25 rounds to +0: no negative zero on the wire
    assert sorted(set(_e2m1_values(torch.arange(16, dtype=torch.uint8)).abs().tolist())) == E2M1


def hand_block(scale):
    """32 elements whose e2m1 codes after dividing by ``scale`` are known: every value, the
    subnormal 0.5, the ties."""
    elements = [6.0, -6.0, 4.0, 3.0, 2.0, 1.5, 1.0, 0.5, 0.0, -0.5, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    elements += [0.0] * (32 - len(elements))
    rounded = [6.0, -6.0, 4.0, 3.0, 2.0, 1.5, 1.0, 0.5, 0.0, -0.5, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    rounded += [0.0] * (32 - len(rounded))
    return torch.tensor(elements) * scale, torch.tensor(rounded) * scale


def test_an_mxfp4_block_is_sixteen_bytes_of_element_pairs_and_its_power_of_two_scale():
    from megatron_lsh.moe.payload import decode_mxfp4, encode_mxfp4

    block, rounded = hand_block(2.0 ** -3)  # amax 6 x 2^-3: the scale is 2^-3 exactly
    zeros = torch.zeros(32)
    rows = torch.stack([torch.cat([block, zeros]), torch.cat([zeros, -block])])
    wire = encode_mxfp4(rows)
    assert wire.shape == (2, 64 // 2 + 64 // MX_BLOCK) and row_bytes("mxfp4", 64) == 34
    assert wire[0, 0].item() == 0x7 | (0xF << 4)  # +6 in the low nibble, -6 in the high
    assert wire[0, 32].item() == 127 - 3 and wire[1, 33].item() == 127 - 3
    assert wire[0, 33].item() == 0  # an all-zero block: the smallest scale, elements zero
    back = decode_mxfp4(wire, 64, torch.float32)
    assert torch.equal(back[0], torch.cat([rounded, zeros])) and torch.equal(back[1], torch.cat([zeros, -rounded]))
    # A block whose largest element needs the next power of two: 7 -> scale 2, elements halved.
    wire = encode_mxfp4(torch.cat([torch.tensor([7.0, 1.0]), torch.zeros(30)]).unsqueeze(0))
    assert wire[0, 16].item() == 127 + 1
    assert decode_mxfp4(wire, 32, torch.float32)[0, :2].tolist() == [8.0, 1.0]


def test_an_nvfp4_row_carries_e4m3_block_scales_under_its_fp32_row_scale():
    from megatron_lsh.moe.payload import decode_nvfp4, encode_nvfp4

    # Row amax 6 x 448: the row scale is 1 and a block of amax 6 gets the e4m3 scale 1 exactly.
    block, rounded = hand_block(1.0)
    row = torch.cat([block[:16], torch.full((16,), 6.0 * 448)])
    wire = encode_nvfp4(row.unsqueeze(0))
    assert wire.shape == (1, 16 + 2 + 4) and row_bytes("nvfp4", 32) == 22
    assert wire[0, 18:].clone().view(torch.float32).item() == 1.0
    assert wire[0, 16:18].view(torch.float8_e4m3fn).float().tolist() == [1.0, 448.0]
    back = decode_nvfp4(wire, 32, torch.float32)
    assert torch.equal(back[0, :16], rounded[:16]) and torch.all(back[0, 16:] == 6.0 * 448)
    # A block scale that e4m3 rounds down (6.2 / 6 -> 1.0): the block's largest element saturates.
    row = torch.cat([torch.tensor([6.2, 0.5]), torch.zeros(14), torch.full((16,), 6.0 * 448)])
    back = decode_nvfp4(encode_nvfp4(row.unsqueeze(0)), 32, torch.float32)
    assert back[0, :2].tolist() == [6.0, 0.5]
    # A block far below the row's largest: its e4m3 scale is subnormal (2^-9 is e4m3's smallest).
    row = torch.cat([torch.full((16,), 6.0 * 2.0 ** -9), torch.full((16,), 6.0 * 448)])
    wire = encode_nvfp4(row.unsqueeze(0))
    assert wire[0, 16].item() == 0x01  # the smallest subnormal e4m3
    assert torch.equal(decode_nvfp4(wire, 32, torch.float32)[0], row)


@pytest.mark.parametrize("payload_format", ["mxfp4", "nvfp4"])
def test_4bit_payloads_keep_zeros_and_mark_non_finite_blocks_as_nan(payload_format):
    rows = torch.zeros(3, 64)
    rows[1, 3] = float("inf")
    rows[1, 40] = 1.0
    rows[2, 0] = float("nan")
    back = round_trip(rows, payload_format)
    assert torch.equal(back[0], rows[0])
    block = MX_BLOCK if payload_format == "mxfp4" else 16
    assert torch.isnan(back[1, :block]).all() and not torch.isnan(back[1, block:]).any()
    assert back[1, 40].item() == 1.0 if payload_format == "mxfp4" else torch.isnan(back[1]).any()
    assert torch.isnan(back[2, :block]).all()


@pytest.mark.parametrize("payload_format", ["mxfp8", "mxfp4", "nvfp4"])
def test_a_rows_encoding_does_not_depend_on_the_rows_sent_with_it(payload_format):
    rows = rows_of_many_magnitudes(n=16, width=64)
    together = round_trip(rows, payload_format)
    alone = torch.cat([round_trip(rows[i:i + 1], payload_format) for i in range(16)])
    assert torch.equal(together, alone)
    assert torch.equal(round_trip(rows.flip(0), payload_format), together.flip(0))


@pytest.mark.parametrize("payload_format, bytes_ratio, error_range", [
    ("mxfp4", (128 + 8) / 512, (0.09, 0.13)), ("nvfp4", (128 + 16 + 4) / 512, (0.07, 0.11))])
def test_4bit_payloads_on_gaussian_rows_send_about_a_quarter_of_the_bytes_at_about_a_tenth_error(
        payload_format, bytes_ratio, error_range):
    rows = torch.randn(256, 256, generator=torch.Generator().manual_seed(1))
    back = round_trip(rows, payload_format)
    relative = ((back - rows).norm(dim=1) / rows.norm(dim=1)).mean().item()
    assert error_range[0] < relative < error_range[1]
    assert row_bytes(payload_format, 256) / row_bytes("bf16", 256) == pytest.approx(bytes_ratio, abs=0.01)


@pytest.mark.parametrize("payload_format", ["mxfp4", "nvfp4"])
def test_stochastic_rounding_picks_a_neighbour_and_is_unbiased(payload_format):
    torch.manual_seed(0)
    # 1.2 within a block of amax 6 (scale 1 for mxfp4): neighbours 1.0 and 1.5, up 40% of the time.
    row = torch.cat([torch.tensor([6.0]), torch.full((31,), 1.2)]).repeat(4000, 1)
    if payload_format == "nvfp4":
        row[:, 16] = 6.0  # the second block of 16 has the same amax
    back = round_trip(row, payload_format, stochastic=True)
    assert set(back[:, 1:16].unique().tolist()) == {1.0, 1.5}
    assert back[:, 1:16].mean().item() == pytest.approx(1.2, abs=0.01)
    nearest = round_trip(row, payload_format)
    assert set(nearest[:, 1:16].unique().tolist()) == {1.0}


def test_the_backward_directions_can_round_stochastically():
    rows = rows_of_many_magnitudes(n=8, width=64).requires_grad_()
    gradient = torch.randn(8, 64, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(3)
    sent = payload_all_to_all(OneRankGroup(), rows, [8], [8], "mxfp4", "mxfp4", "stochastic")
    sent.backward(gradient)
    assert torch.equal(sent.detach(), round_trip(rows.detach(), "mxfp4"))  # forward: nearest
    torch.manual_seed(3)
    assert torch.equal(rows.grad, round_trip(gradient, "mxfp4", stochastic=True))


def test_4bit_formats_need_their_block_to_divide_the_hidden_size():
    with pytest.raises(PayloadFormatError, match="'mxfp4' scales blocks of 32 elements, which do not divide"):
        check_payload_format("mxfp4", 48)
    check_payload_format("nvfp4", 48)
    with pytest.raises(PayloadFormatError, match="'nvfp4' scales blocks of 16 elements, which do not divide"):
        check_payload_format("nvfp4", 40)
