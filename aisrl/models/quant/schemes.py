"""Rollout precision schemes: which format a scheme rounds weights and activations to.

Invariant: a scheme is named once here (SCHEMES) and everything else (engine settings, labels, the
vLLM method, the checkpoint emulation, the mismatch command) looks it up; `fp8` is an alias whose
meaning depends on the platform (real vLLM FP8 on a GPU, `fp8_w8` emulation on the CPU).
Weights are quantized with the scheme's weight format, activations (the input of every quantized
linear layer) dynamically per token with its activation format; see formats.py for the math.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aisrl.models.quant.formats import (
    Granularity,
    fake_quant_fp8_per_token,
    fake_quant_fp8_weight,
    fake_quant_mxfp4,
    fake_quant_nvfp4,
)
from aisrl.models.quant.names import PRECISIONS, Format, SchemeName


@dataclass(frozen=True)
class Scheme:
    """Formats of one scheme; None means the high-precision (BF16 or float32) values are kept."""

    name: SchemeName
    weights: Format | None
    activations: Format | None

    @property
    def quantizes(self) -> bool:
        return self.weights is not None or self.activations is not None


SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme("bf16", None, None),
        Scheme("fp8_w8", "fp8_e4m3", None),
        Scheme("fp8_w8a8", "fp8_e4m3", "fp8_e4m3"),
        Scheme("fp8_e5m2_w8", "fp8_e5m2", None),
        Scheme("fp8_e5m2_w8a8", "fp8_e5m2", "fp8_e5m2"),
        Scheme("mxfp4_w4", "mxfp4", None),
        Scheme("mxfp4_w4a4", "mxfp4", "mxfp4"),
        Scheme("nvfp4_w4", "nvfp4", None),
        Scheme("nvfp4_w4a4", "nvfp4", "nvfp4"),
    )
}


def resolve(precision: str, on_gpu: bool) -> tuple[Scheme, bool]:
    """The scheme a precision setting means on this platform, and whether it runs as emulation.

    On a GPU, fp8 and fp8_w8a8 are vLLM's own FP8 kernels (not emulated); every other quantized scheme
    is emulated on any device."""
    if precision == "fp8":
        precision = "fp8_w8a8" if on_gpu else "fp8_w8"
    if precision not in SCHEMES:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    scheme = SCHEMES[precision]
    real = scheme.name == "bf16" or (on_gpu and scheme.name == "fp8_w8a8")
    return scheme, not real


def fake_quant_weight(weight: torch.Tensor, fmt: Format, granularity: Granularity = "tensor") -> torch.Tensor:
    """A 2-D weight (out, in) rounded to fmt: fp8 at the given scale granularity, 4-bit formats in blocks
    along the input features with one global NVFP4 scale for the whole tensor."""
    if fmt in ("fp8_e4m3", "fp8_e5m2"):
        return fake_quant_fp8_weight(weight, fmt[4:], granularity)  # type: ignore[arg-type]
    if fmt == "mxfp4":
        return fake_quant_mxfp4(weight)
    if fmt == "nvfp4":
        return fake_quant_nvfp4(weight, per_row=False)
    raise ValueError(f"unknown format {fmt!r}")


def fake_quant_activations(x: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Activations (..., in) rounded to fmt with dynamic per-token scales (NVFP4: a per-token global scale)."""
    if fmt in ("fp8_e4m3", "fp8_e5m2"):
        return fake_quant_fp8_per_token(x, fmt[4:])  # type: ignore[arg-type]
    if fmt == "mxfp4":
        return fake_quant_mxfp4(x)
    if fmt == "nvfp4":
        return fake_quant_nvfp4(x, per_row=True)
    raise ValueError(f"unknown format {fmt!r}")
