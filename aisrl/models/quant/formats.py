"""Number formats of low-precision rollouts, emulated: round to the format's grid and dequantize back.

Invariant: every `fake_quant_*` returns, in the input's dtype and shape, exactly the values a kernel
of that format would multiply with, `dequant(quant(x / s)) * s`, computed in float32 with the scale
rule written in its docstring. Rounding is to nearest, ties to even, saturating at the format's
largest finite value. Non-finite inputs pass through unchanged (a NaN or inf stays visible, it is
never hidden as a finite value) and do not enter any scale. Blocks run along the last dimension (the
input features of a linear weight `(out, in)` and of its activations `(tokens, in)`); a last block
that does not fill up is zero-padded for its scale only.

Formats:
- fp8 e4m3 / e5m2 (`torch.float8_e4m3fn` / `float8_e5m2`, max 448 / 57344), scale = amax / max,
  per tensor, per output channel or per 128x128 block for weights (vLLM's online FP8 floors), per
  token for activations (vLLM's dynamic per-token rule).
- MXFP4 (OCP Microscaling v1.0): e2m1 values in blocks of 32 with a power-of-two (e8m0) scale
  2^(floor(log2 amax) - 2), the exponent clamped to [-127, 127]; values past 6 saturate.
- NVFP4: e2m1 values in blocks of 16, an e4m3 block scale amax_b / (6 g) on top of a float32 global
  scale g = amax / (448 * 6) (per tensor for weights, per token for activations).
"""

from __future__ import annotations

import itertools
from typing import Literal

import torch

Fp8Dtype = Literal["e4m3", "e5m2"]
Granularity = Literal["tensor", "channel", "block"]
GRANULARITIES: tuple[Granularity, ...] = ("tensor", "channel", "block")

FP8_DTYPES: dict[Fp8Dtype, torch.dtype] = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
FP8_MAX: dict[Fp8Dtype, float] = {k: float(torch.finfo(v).max) for k, v in FP8_DTYPES.items()}  # 448, 57344
FP8_BLOCK = 128
# The 8 non-negative values of e2m1 (FP4); the other 8 codes are their negatives (-0 included).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0
E2M1_EMAX = 2  # exponent of the largest e2m1 normal (4 = 1.0 * 2^2)
MXFP4_BLOCK = 32
NVFP4_BLOCK = 16
E8M0_MIN_EXP, E8M0_MAX_EXP = -127, 127
_TINY = torch.finfo(torch.float32).tiny
_MIDPOINTS = torch.tensor([(a + b) / 2 for a, b in itertools.pairwise(E2M1_VALUES)])
_GRID = torch.tensor(E2M1_VALUES)


def _finite_abs(x: torch.Tensor) -> torch.Tensor:
    """|x| as float32 with non-finite entries as 0, so they never set a scale."""
    a = x.detach().to(torch.float32).abs()
    return torch.where(torch.isfinite(a), a, torch.zeros_like(a))


def _keep_nonfinite(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    x32 = x.detach().to(torch.float32)
    return torch.where(torch.isfinite(x32), q, x32).to(x.dtype)


def round_fp8(x: torch.Tensor, fmt: Fp8Dtype) -> torch.Tensor:
    """float32 x (already divided by its scale) rounded to the fp8 grid, saturating; float32 back."""
    m = FP8_MAX[fmt]
    return x.clamp(-m, m).to(FP8_DTYPES[fmt]).to(torch.float32)


def round_e2m1(x: torch.Tensor) -> torch.Tensor:
    """float32 x rounded to the nearest e2m1 value (ties to the even code), saturating at +-6; NaN stays NaN."""
    a = x.abs().clamp(max=E2M1_MAX)
    mids = _MIDPOINTS.to(a.device)
    down = torch.bucketize(a, mids, right=False)  # a on midpoint k -> k (the smaller neighbour)
    up = torch.bucketize(a, mids, right=True)  # a on midpoint k -> k + 1
    # Codes 0, 2, 4, 6 have an even mantissa bit: a tie above an odd code goes up, above an even one down.
    index = torch.where((down != up) & (down % 2 == 1), up, down).clamp(max=len(E2M1_VALUES) - 1)
    q = torch.copysign(_GRID.to(a.device)[index], x)
    return torch.where(torch.isnan(x), x, q)


def fp8_weight_scale(weight: torch.Tensor, fmt: Fp8Dtype, granularity: Granularity) -> torch.Tensor:
    """float32 scale(s) of a 2-D weight, broadcastable to it (block scales are per 128x128 tile).

    Floors as vLLM's online FP8: none per tensor (beyond float32's tiny), 1 / (max * 512) per channel,
    amax >= 1e-4 per block."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    fmax = FP8_MAX[fmt]
    w = _finite_abs(weight)
    if granularity == "tensor":
        return (w.amax() / fmax).clamp_min(_TINY).reshape(1, 1)
    if granularity == "channel":
        return (w.amax(dim=1, keepdim=True) / fmax).clamp_min(1.0 / (fmax * 512))
    rows, cols = w.shape
    padded = torch.zeros(-(-rows // FP8_BLOCK) * FP8_BLOCK, -(-cols // FP8_BLOCK) * FP8_BLOCK, device=w.device)
    padded[:rows, :cols] = w
    tiles = padded.view(padded.shape[0] // FP8_BLOCK, FP8_BLOCK, padded.shape[1] // FP8_BLOCK, FP8_BLOCK)
    amax = tiles.amax(dim=(1, 3)).clamp_min(1e-4)
    per_element = (amax / fmax).repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)
    return per_element[:rows, :cols]


def fake_quant_fp8_weight(
    weight: torch.Tensor, fmt: Fp8Dtype = "e4m3", granularity: Granularity = "tensor"
) -> torch.Tensor:
    """A 2-D weight through fp8 with the given scale granularity; same dtype and shape back."""
    scale = fp8_weight_scale(weight, fmt, granularity)
    q = round_fp8(weight.detach().to(torch.float32) / scale, fmt) * scale
    return _keep_nonfinite(weight, q)


def fp8_token_scale(x: torch.Tensor, fmt: Fp8Dtype) -> torch.Tensor:
    """Per-token (last-dimension row) float32 scale: max(amax / max, 1 / (max * 512)), vLLM's dynamic rule."""
    fmax = FP8_MAX[fmt]
    return (_finite_abs(x).amax(dim=-1, keepdim=True) / fmax).clamp_min(1.0 / (fmax * 512))


def fake_quant_fp8_per_token(x: torch.Tensor, fmt: Fp8Dtype = "e4m3") -> torch.Tensor:
    """Activations (..., features) through fp8 with one dynamic scale per token; same dtype and shape back."""
    scale = fp8_token_scale(x, fmt)
    return _keep_nonfinite(x, round_fp8(x.detach().to(torch.float32) / scale, fmt) * scale)


def _to_blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
    """float32 view (..., n_blocks, block) of x along its last dimension, zero-padded; and the true length."""
    k = x.shape[-1]
    pad = -k % block
    x32 = x.detach().to(torch.float32)
    if pad:
        x32 = torch.nn.functional.pad(x32, (0, pad))
    return x32.reshape(*x32.shape[:-1], -1, block), k


def _from_blocks(blocks: torch.Tensor, k: int) -> torch.Tensor:
    return blocks.reshape(*blocks.shape[:-2], -1)[..., :k]


def mxfp4_block_exponent(blocks: torch.Tensor) -> torch.Tensor:
    """Shared e8m0 exponent per block (last dim): floor(log2 amax) - 2, clamped to [-127, 127]; -127 for amax 0."""
    amax = _finite_abs(blocks).amax(dim=-1, keepdim=True)
    _, exp = torch.frexp(amax)  # amax = m * 2^exp, m in [0.5, 1): floor(log2 amax) = exp - 1, exactly
    exp = torch.where(amax > 0, exp - 1 - E2M1_EMAX, torch.full_like(exp, E8M0_MIN_EXP))
    return exp.clamp(E8M0_MIN_EXP, E8M0_MAX_EXP)


def fake_quant_mxfp4(x: torch.Tensor, block: int = MXFP4_BLOCK) -> torch.Tensor:
    """x through MXFP4 along its last dimension (e2m1 values, one power-of-two scale per block)."""
    blocks, k = _to_blocks(x, block)
    scale = torch.ldexp(torch.ones_like(blocks[..., :1]), mxfp4_block_exponent(blocks))
    finite = torch.where(torch.isfinite(blocks), blocks, torch.zeros_like(blocks))
    q = round_e2m1(finite / scale) * scale
    return _keep_nonfinite(x, _from_blocks(q, k))


def nvfp4_scales(blocks: torch.Tensor, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(global, block) float32 scales of NVFP4: g = amax / (448 * 6) over the tensor (or each row when per_row),
    block scale = e4m3(amax_block / (6 g)); both 0 where everything is 0."""
    a = _finite_abs(blocks)
    amax = a.amax(dim=(-2, -1), keepdim=True) if per_row else a.amax().reshape([1] * a.dim())
    g = amax / (FP8_MAX["e4m3"] * E2M1_MAX)
    safe_g = torch.where(g > 0, g, torch.ones_like(g))
    block_scale = round_fp8(a.amax(dim=-1, keepdim=True) / (E2M1_MAX * safe_g), "e4m3")
    return g, torch.where(g > 0, block_scale, torch.zeros_like(block_scale))


def fake_quant_nvfp4(x: torch.Tensor, block: int = NVFP4_BLOCK, per_row: bool = False) -> torch.Tensor:
    """x through NVFP4 along its last dimension (e2m1 values, e4m3 block scale, float32 global scale)."""
    blocks, k = _to_blocks(x, block)
    g, block_scale = nvfp4_scales(blocks, per_row)
    scale = block_scale * g
    finite = torch.where(torch.isfinite(blocks), blocks, torch.zeros_like(blocks))
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.where(scale > 0, round_e2m1(finite / safe) * scale, torch.zeros_like(finite))
    return _keep_nonfinite(x, _from_blocks(q, k))
