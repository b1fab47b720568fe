"""Low-precision formats, bit-exact: fp8 against torch's float8 dtypes, e2m1 against its table of 16
values, the MXFP4 and NVFP4 scale rules against plain-Python references; per-token scaling, ragged
blocks, zeros, inf and NaN. Schemes and their trajectory labels."""

from __future__ import annotations

import math

import pytest
import torch

from aisrl.models.quant.formats import (
    E2M1_VALUES,
    FP8_DTYPES,
    FP8_MAX,
    fake_quant_fp8_per_token,
    fake_quant_fp8_weight,
    fake_quant_mxfp4,
    fake_quant_nvfp4,
    round_e2m1,
    round_fp8,
)
from aisrl.models.quant.schemes import PRECISIONS, SCHEMES, fake_quant_activations, resolve
from aisrl.services.rollout.labels import kv_cache_enum, precision_enum
from aisrl.v1 import common_pb2

# Every e2m1 code (sign, 2 exponent bits, 1 mantissa bit) and its value, per OCP MX v1.0 Table 5.
E2M1_TABLE = {
    0b0000: 0.0, 0b0001: 0.5, 0b0010: 1.0, 0b0011: 1.5, 0b0100: 2.0, 0b0101: 3.0, 0b0110: 4.0, 0b0111: 6.0,
    0b1000: -0.0, 0b1001: -0.5, 0b1010: -1.0, 0b1011: -1.5, 0b1100: -2.0, 0b1101: -3.0, 0b1110: -4.0, 0b1111: -6.0,
}  # fmt: skip


def _rand(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def e2m1_reference(v: float) -> float:
    """Nearest e2m1 value, ties to the even code, saturating: by brute force over the table."""
    if math.isnan(v):
        return v
    a = min(abs(v), 6.0)
    codes = sorted(range(8), key=lambda c: (abs(E2M1_TABLE[c] - a), c % 2))  # nearest, then even mantissa
    return math.copysign(E2M1_TABLE[codes[0]], v)


# --- e2m1 ------------------------------------------------------------------------------------------


def test_e2m1_table_values_come_back_exactly():
    values = torch.tensor(list(E2M1_TABLE.values()))
    out = round_e2m1(values)
    assert torch.equal(out, values) and torch.equal(torch.signbit(out), torch.signbit(values))
    assert sorted({abs(v) for v in E2M1_TABLE.values()}) == list(E2M1_VALUES)


def test_e2m1_ties_go_to_the_even_code_and_values_saturate():
    ties = {0.25: 0.0, 0.75: 1.0, 1.25: 1.0, 1.75: 2.0, 2.5: 2.0, 3.5: 4.0, 5.0: 4.0}
    x = torch.tensor([*ties, *(-t for t in ties), 6.5, 7.0, 1e30, -1e30])
    expected = torch.tensor([*ties.values(), *(-v for v in ties.values()), 6.0, 6.0, 6.0, -6.0])
    assert torch.equal(round_e2m1(x), expected)


def test_e2m1_matches_brute_force_on_random_values():
    x = torch.cat([_rand(5000, scale=3.0), torch.linspace(-7, 7, 2801)])
    assert round_e2m1(x).tolist() == [e2m1_reference(v) for v in x.tolist()]


# --- fp8 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_rounding_is_torchs_cast_and_saturates(fmt):
    fmax = FP8_MAX[fmt]
    x = torch.cat([_rand(4000, scale=fmax / 8), torch.tensor([fmax, -fmax, 2 * fmax, -1e30, 0.0])])
    ref = x.clamp(-fmax, fmax).to(FP8_DTYPES[fmt]).float()
    assert torch.equal(round_fp8(x, fmt), ref)
    assert round_fp8(torch.tensor([1e30]), fmt).item() == fmax


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_per_token_fp8_scale_rule(fmt):
    fmax = FP8_MAX[fmt]
    x = _rand(6, 64, seed=1) * torch.logspace(-6, 2, 6)[:, None]
    x[5] = 0.0
    out = fake_quant_fp8_per_token(x, fmt)
    for row, got in zip(x, out, strict=True):
        scale = max(row.abs().max().item() / fmax, 1.0 / (fmax * 512))
        s = torch.tensor(scale, dtype=torch.float32)
        assert torch.equal(got, (row / s).to(FP8_DTYPES[fmt]).float() * s)
    assert torch.equal(out[5], torch.zeros(64))


def test_fp8_weight_formats_differ_and_e5m2_is_coarser():
    w = _rand(64, 96, seed=2)
    e4 = (fake_quant_fp8_weight(w, "e4m3") - w).norm() / w.norm()
    e5 = (fake_quant_fp8_weight(w, "e5m2") - w).norm() / w.norm()
    assert 0 < e4 < 2**-4 and e4 < e5 < 2**-3


# --- MXFP4 -----------------------------------------------------------------------------------------


def mxfp4_reference(block: list[float]) -> list[float]:
    amax = max(abs(v) for v in block)
    exp = -127 if amax == 0 else max(-127, min(127, math.frexp(amax)[1] - 1 - 2))
    scale = 2.0**exp
    return [e2m1_reference(v / scale) * scale for v in block]


def test_mxfp4_scale_rule_by_hand():
    # amax 6: scale 2^(2-2) = 1, the values are e2m1 already; amax 7: the same scale, 7 saturates to 6;
    # amax 8: scale 2, so 1 -> 0.5 * 2 = 1 and 7 -> 3.5 -> 4 (tie to even) -> 8.
    blocks = torch.zeros(3, 32)
    blocks[0, :3] = torch.tensor([6.0, 1.5, -0.5])
    blocks[1, :2] = torch.tensor([7.0, 0.7])
    blocks[2, :3] = torch.tensor([8.0, 1.0, 7.0])
    out = fake_quant_mxfp4(blocks)
    assert out[0, :3].tolist() == [6.0, 1.5, -0.5]
    assert out[1, :2].tolist() == [6.0, 0.5]
    assert out[2, :3].tolist() == [8.0, 1.0, 8.0]


def test_mxfp4_matches_reference_over_magnitudes_and_ragged_blocks():
    x = _rand(8, 70, seed=3) * torch.logspace(-30, 30, 8)[:, None]  # 70 = 32 + 32 + 6: a ragged last block
    out = fake_quant_mxfp4(x)
    for row, got in zip(x.tolist(), out.tolist(), strict=True):
        expected = [v for start in range(0, 70, 32) for v in mxfp4_reference(row[start : start + 32])]
        assert got == pytest.approx(expected, rel=0, abs=0)


def test_mxfp4_zero_and_tiny_blocks():
    assert torch.equal(fake_quant_mxfp4(torch.zeros(2, 32)), torch.zeros(2, 32))
    tiny = torch.full((1, 32), 1e-40)  # below 2^-127 * 0.5: the scale exponent clamps at -127
    assert fake_quant_mxfp4(tiny).tolist() == [mxfp4_reference(tiny[0].tolist())]


# --- NVFP4 -----------------------------------------------------------------------------------------


def nvfp4_reference(row: list[float], g: float) -> list[float]:
    """One row in blocks of 16 with global scale g (float32 arithmetic, as the kernel's)."""
    f32 = torch.float32
    out = []
    for start in range(0, len(row), 16):
        block = row[start : start + 16]
        amax_b = torch.tensor(max(abs(v) for v in block), dtype=f32)
        s_b = (amax_b / (6.0 * torch.tensor(g, dtype=f32))).clamp(max=448).to(torch.float8_e4m3fn).to(f32)
        s = s_b * torch.tensor(g, dtype=f32)
        for v in block:
            q = 0.0 if s == 0 else e2m1_reference((torch.tensor(v, dtype=f32) / s).item())
            out.append((torch.tensor(q, dtype=f32) * s).item())  # the product in float32, as the kernel's
    return out


def test_nvfp4_scale_rule_by_hand():
    # tensor amax 2688 = 448 * 6: global scale 1; a block with amax 6 has block scale 1 (exact values),
    # one with amax 12 block scale 2, one with amax 2688 block scale 448.
    x = torch.zeros(3, 16)
    x[0, :3] = torch.tensor([6.0, -1.5, 0.4])
    x[1, :2] = torch.tensor([12.0, 5.0])
    x[2, :2] = torch.tensor([2688.0, 500.0])
    out = fake_quant_nvfp4(x)
    assert out[0, :3].tolist() == [6.0, -1.5, 0.5]
    assert out[1, :2].tolist() == [12.0, 4.0]  # 5 / 2 = 2.5 -> 2 (tie to even)
    assert out[2, :2].tolist() == [2688.0, 448.0]  # 500 / 448 = 1.12 -> 1


@pytest.mark.parametrize("per_row", [False, True])
def test_nvfp4_matches_reference_with_ragged_blocks(per_row):
    x = _rand(6, 40, seed=4) * torch.logspace(-4, 3, 6)[:, None]  # 40 = 16 + 16 + 8
    out = fake_quant_nvfp4(x, per_row=per_row)
    for row, got in zip(x, out, strict=True):
        amax = (row if per_row else x).abs().max()
        g = (amax / torch.tensor(448.0 * 6.0)).item()
        assert got.tolist() == nvfp4_reference(row.tolist(), g)


# --- shared rules ----------------------------------------------------------------------------------

ACTIVATION_FORMATS = ["fp8_e4m3", "fp8_e5m2", "mxfp4", "nvfp4"]


@pytest.mark.parametrize("fmt", ACTIVATION_FORMATS)
def test_activations_are_scaled_per_token(fmt):
    """A token's rounding does not depend on the other tokens of the batch."""
    x = _rand(5, 48, seed=5) * torch.logspace(-3, 3, 5)[:, None]
    batch = fake_quant_activations(x, fmt)
    for i in range(len(x)):
        assert torch.equal(batch[i], fake_quant_activations(x[i : i + 1], fmt)[0])
        assert torch.equal(batch[i], fake_quant_activations(x[i], fmt))  # 1-D input works too


@pytest.mark.parametrize("fmt", ACTIVATION_FORMATS)
def test_non_finite_values_pass_through_and_set_no_scale(fmt):
    x = _rand(2, 64, seed=6)
    bad = x.clone()
    bad[0, 3], bad[0, 40], bad[1, 7] = float("nan"), float("inf"), -float("inf")
    out, clean = fake_quant_activations(bad, fmt), fake_quant_activations(x.masked_fill(~bad.isfinite(), 0.0), fmt)
    assert math.isnan(out[0, 3]) and out[0, 40] == float("inf") and out[1, 7] == -float("inf")
    finite = bad.isfinite()
    assert torch.equal(out[finite], clean[finite])


@pytest.mark.parametrize("fmt", ACTIVATION_FORMATS)
def test_dtype_shape_and_zeros_kept(fmt):
    x = _rand(3, 4, 33, seed=7).to(torch.bfloat16)
    x[1] = 0.0
    out = fake_quant_activations(x, fmt)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape and torch.equal(out[1], x[1])
    assert bool((torch.sign(out) * torch.sign(x) >= 0).all())


def test_four_bit_error_far_above_fp8():
    w = _rand(128, 256, seed=8) * 0.05
    rel = {fmt: float((fake_quant_activations(w, fmt) - w).norm() / w.norm()) for fmt in ACTIVATION_FORMATS}
    assert rel["fp8_e4m3"] < rel["fp8_e5m2"] < min(rel["mxfp4"], rel["nvfp4"]) < 0.25
    assert rel["nvfp4"] < rel["mxfp4"]  # finer blocks and a non-power-of-two scale


# --- schemes and labels ----------------------------------------------------------------------------


def test_fp8_alias_resolves_per_platform():
    assert resolve("fp8", on_gpu=False) == (SCHEMES["fp8_w8"], True)
    assert resolve("fp8", on_gpu=True) == (SCHEMES["fp8_w8a8"], False)
    assert resolve("fp8_w8a8", on_gpu=False) == (SCHEMES["fp8_w8a8"], True)
    assert resolve("nvfp4_w4a4", on_gpu=True) == (SCHEMES["nvfp4_w4a4"], True)
    assert resolve("bf16", on_gpu=False) == (SCHEMES["bf16"], False)
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve("fp4", on_gpu=False)


def test_every_scheme_has_its_own_label():
    labels = {name: precision_enum(*((s := resolve(name, on_gpu=False))[0].name, s[1])) for name in SCHEMES}
    assert len(set(labels.values())) == len(SCHEMES)
    assert common_pb2.PRECISION_UNSPECIFIED not in labels.values()
    for name, value in labels.items():
        label = common_pb2.Precision.Name(value)
        assert label == "PRECISION_BF16" if name == "bf16" else label.endswith("_EMULATED")
    assert precision_enum("fp8_w8a8", emulated=False) == common_pb2.PRECISION_FP8
    with pytest.raises(ValueError):
        precision_enum("nvfp4_w4", emulated=False)  # no real kernel here: never labelled as real
    assert kv_cache_enum("fp8") == kv_cache_enum("fp8_e4m3") != kv_cache_enum("fp8_e5m2")
    assert set(PRECISIONS) == {*SCHEMES, "fp8"}
