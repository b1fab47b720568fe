"""Per-token arrays on the wire: raw little-endian float32 / int32 bytes (see proto/aisrl/v1/common.proto).

Invariant: encoding never changes a value silently (an int outside int32 or a float that does not
survive float32 is an error naming the field, except ordinary float32 rounding), and decoding
checks the byte length (whole number of 4-byte values, and the expected count when given) and
names the field in every error. Decoded arrays are read-only views over the bytes (no copy).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

F32 = np.dtype("<f4")
I32 = np.dtype("<i4")
_I32_MIN, _I32_MAX = np.iinfo(np.int32).min, np.iinfo(np.int32).max


class WireArrayError(ValueError):
    """Bytes or values that are not a valid wire array; `field` names the message field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _one_dim(values: Sequence[float] | np.ndarray, field: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise WireArrayError(field, f"expected a 1-D array, got shape {array.shape}")
    return array


def float32_to_bytes(values: Sequence[float] | np.ndarray, field: str = "values") -> bytes:
    """float32 little-endian bytes of a 1-D array. Overflow to inf (a finite value beyond float32) is an error."""
    array = _one_dim(values, field)
    if array.dtype.kind not in "fiub":
        raise WireArrayError(field, f"expected numbers, got dtype {array.dtype}")
    with np.errstate(over="ignore"):
        out = array.astype(F32)
    overflow = np.isfinite(array) & ~np.isfinite(out) if array.dtype.kind == "f" else ~np.isfinite(out)
    if overflow.any():
        i = int(np.flatnonzero(overflow)[0])
        raise WireArrayError(f"{field}[{i}]", f"{array[i]!r} does not fit in float32")
    return out.tobytes()


def int32_to_bytes(values: Sequence[int] | np.ndarray, field: str = "values") -> bytes:
    """int32 little-endian bytes of a 1-D integer array; a value outside int32 is an error."""
    array = _one_dim(values, field)
    if array.size == 0:
        return b""
    if array.dtype.kind not in "iub":
        raise WireArrayError(field, f"expected integers, got dtype {array.dtype}")
    bad = (array < _I32_MIN) | (array > _I32_MAX)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise WireArrayError(f"{field}[{i}]", f"{int(array[i])} does not fit in int32")
    return array.astype(I32).tobytes()


def _decode(data: bytes, dtype: np.dtype, field: str, expected: int | None) -> np.ndarray:
    if len(data) % dtype.itemsize:
        raise WireArrayError(field, f"{len(data)} bytes is not a whole number of {dtype.itemsize}-byte values")
    count = len(data) // dtype.itemsize
    if expected is not None and count != expected:
        raise WireArrayError(field, f"expected {expected} values, got {count} ({len(data)} bytes)")
    return np.frombuffer(data, dtype=dtype)


def bytes_to_float32(data: bytes, field: str = "values", expected: int | None = None) -> np.ndarray:
    """A read-only float32 view of little-endian bytes; `expected` is the required number of values."""
    return _decode(data, F32, field, expected)


def bytes_to_int32(data: bytes, field: str = "values", expected: int | None = None) -> np.ndarray:
    """A read-only int32 view of little-endian bytes; `expected` is the required number of values."""
    return _decode(data, I32, field, expected)
