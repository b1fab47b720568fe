"""Trajectory labels: which scheme, KV cache dtype and head precision produced a group.

Invariant: a label is derived only from what the engine reports it actually ran (the resolved
scheme, whether it was emulated, the KV cache dtype vLLM built its cache with), never from what
was asked for; a combination without a label is an error, not PRECISION_UNSPECIFIED.
"""

from __future__ import annotations

from dataclasses import dataclass

from aisrl.v1 import common_pb2

_EMULATED = {
    "fp8_w8": common_pb2.PRECISION_FP8_EMULATED,
    "fp8_w8a8": common_pb2.PRECISION_FP8_W8A8_EMULATED,
    "fp8_e5m2_w8": common_pb2.PRECISION_FP8_E5M2_W8_EMULATED,
    "fp8_e5m2_w8a8": common_pb2.PRECISION_FP8_E5M2_W8A8_EMULATED,
    "mxfp4_w4": common_pb2.PRECISION_MXFP4_W4_EMULATED,
    "mxfp4_w4a4": common_pb2.PRECISION_MXFP4_W4A4_EMULATED,
    "nvfp4_w4": common_pb2.PRECISION_NVFP4_W4_EMULATED,
    "nvfp4_w4a4": common_pb2.PRECISION_NVFP4_W4A4_EMULATED,
}
_KV = {
    "auto": common_pb2.KV_CACHE_DTYPE_AUTO,
    "fp8": common_pb2.KV_CACHE_DTYPE_FP8_E4M3,  # vLLM's "fp8" is e4m3 (STR_DTYPE_TO_TORCH_DTYPE / kv_cache_dtype docs)
    "fp8_e4m3": common_pb2.KV_CACHE_DTYPE_FP8_E4M3,
    "fp8_e5m2": common_pb2.KV_CACHE_DTYPE_FP8_E5M2,
}


@dataclass(frozen=True)
class PrecisionLabel:
    """The precision fields of a TrajectoryGroup."""

    precision: int
    kv_cache_dtype: int
    lm_head_quantized: bool


def precision_enum(scheme: str, emulated: bool) -> int:
    """The Precision value of a resolved scheme (schemes.resolve), real or emulated."""
    if scheme == "bf16":
        return common_pb2.PRECISION_BF16
    if not emulated:
        if scheme != "fp8_w8a8":
            raise ValueError(f"scheme {scheme!r} has no real (non-emulated) implementation to label")
        return common_pb2.PRECISION_FP8
    if scheme not in _EMULATED:
        raise ValueError(f"no Precision label for scheme {scheme!r}")
    return _EMULATED[scheme]


def kv_cache_enum(kv_cache_dtype: str) -> int:
    if kv_cache_dtype not in _KV:
        raise ValueError(f"no KvCacheDtype label for {kv_cache_dtype!r}")
    return _KV[kv_cache_dtype]


def precision_label(scheme: str, emulated: bool, kv_cache_dtype: str, lm_head_quantized: bool) -> PrecisionLabel:
    return PrecisionLabel(precision_enum(scheme, emulated), kv_cache_enum(kv_cache_dtype), lm_head_quantized)
