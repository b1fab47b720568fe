"""Wire arrays: little-endian float32/int32 bytes round-trip, and every bad input names its field."""

from __future__ import annotations

import numpy as np
import pytest

from aisrl.wire.arrays import WireArrayError, bytes_to_float32, bytes_to_int32, float32_to_bytes, int32_to_bytes


def test_float32_round_trip_is_little_endian_and_zero_copy():
    values = np.array([-1.5, 0.0, -0.25, 3.0e-8], dtype=np.float64)
    data = float32_to_bytes(values, "logprobs")
    assert data == values.astype("<f4").tobytes() and len(data) == 16
    back = bytes_to_float32(data, "logprobs", expected=4)
    assert back.dtype == np.dtype("<f4") and np.array_equal(back, values.astype(np.float32))
    assert not back.flags.writeable  # a view over the message bytes, not a copy


def test_int32_round_trip():
    ids = [0, 1, 2**31 - 1, -(2**31)]
    back = bytes_to_int32(int32_to_bytes(np.array(ids, dtype=np.int64), "completion_ids"), "completion_ids")
    assert back.tolist() == ids
    assert int32_to_bytes([], "prompt_ids") == b"" and bytes_to_int32(b"", "prompt_ids").size == 0


@pytest.mark.parametrize(
    ("call", "field", "fragment"),
    [
        (lambda: bytes_to_float32(b"\x00" * 6, "logprobs"), "logprobs", "6 bytes"),
        (lambda: bytes_to_float32(b"\x00" * 8, "logprobs", expected=3), "logprobs", "expected 3 values, got 2"),
        (lambda: bytes_to_int32(b"\x00" * 5, "prompt_ids"), "prompt_ids", "whole number"),
        (lambda: int32_to_bytes([1, 2**31], "completion_ids"), "completion_ids[1]", "does not fit in int32"),
        (lambda: int32_to_bytes([1.5], "completion_ids"), "completion_ids", "expected integers"),
        (lambda: float32_to_bytes([0.0, 1e300], "logprobs"), "logprobs[1]", "does not fit in float32"),
        (lambda: float32_to_bytes([[1.0]], "logprobs"), "logprobs", "1-D"),
        (lambda: float32_to_bytes(["a"], "logprobs"), "logprobs", "expected numbers"),
    ],
)
def test_errors_name_the_field(call, field, fragment):
    with pytest.raises(WireArrayError) as info:
        call()
    assert info.value.field == field and fragment in str(info.value)
    assert str(info.value).startswith(field)


def test_non_finite_values_are_encoded_as_they_are():
    # Judging logprobs (NaN means broken logits) is the caller's job; the wire never rewrites values.
    data = float32_to_bytes([np.nan, -np.inf], "logprobs")
    back = bytes_to_float32(data, "logprobs")
    assert np.isnan(back[0]) and back[1] == -np.inf
