"""Names of the precision settings, without torch (settings and the command line import them).

Invariant: the schemes named here are exactly schemes.SCHEMES (tests/unit/test_quant_formats.py).
"""

from __future__ import annotations

import typing
from typing import Literal

Format = Literal["fp8_e4m3", "fp8_e5m2", "mxfp4", "nvfp4"]
SchemeName = Literal[
    "bf16",
    "fp8_w8",
    "fp8_w8a8",
    "fp8_e5m2_w8",
    "fp8_e5m2_w8a8",
    "mxfp4_w4",
    "mxfp4_w4a4",
    "nvfp4_w4",
    "nvfp4_w4a4",
]
Precision = Literal[SchemeName, "fp8"]
KvCacheDtype = Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2"]
KV_CACHE_DTYPES: tuple[str, ...] = typing.get_args(KvCacheDtype)
PRECISIONS: tuple[str, ...] = (*typing.get_args(SchemeName), "fp8")


PRECISION_HELP = (
    "bf16; fp8_w8 (e4m3 weights) or fp8_w8a8 (plus per-token e4m3 activations); fp8_e5m2_w8 / fp8_e5m2_w8a8; "
    "mxfp4_w4 / mxfp4_w4a4 (e2m1, blocks of 32, power-of-two scale); nvfp4_w4 / nvfp4_w4a4 (e2m1, blocks of 16, "
    "e4m3 block scale + float32 global scale); fp8: vLLM's real FP8 (W8A8) on a GPU, fp8_w8 on the CPU. "
    "Everything but bf16 and GPU fp8/fp8_w8a8 is emulated (values rounded to the format and dequantized, "
    "inside vLLM and the HF engine alike): it reproduces the rounding, never a speedup (docs/precision.md)."
)
