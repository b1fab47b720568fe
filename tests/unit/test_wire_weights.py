"""Weights over the wire: state dict -> WeightChunk stream -> the same state dict, or a clear error."""

from __future__ import annotations

import hashlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aisrl.v1 import weights_pb2
from aisrl.wire.weights import (
    DTYPES,
    MIN_CHUNK_BYTES,
    WeightsAssembler,
    WeightsIntegrityError,
    assemble_weights,
    chunk_size,
    iter_weight_chunks,
    tensor_payload,
    weights_digest,
)


def sample_state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "model.layers.0.mlp.up_proj.weight": torch.randn(64, 48, generator=gen).to(torch.bfloat16),
        "model.embed_tokens.weight": torch.randn(40, 32, generator=gen),
        "model.norm.weight": torch.ones(32, dtype=torch.float16),
        "lm_head.weight": torch.randn(40, 32, generator=gen).to(torch.float8_e4m3fn),
        "buffers.step": torch.tensor(7, dtype=torch.int64),  # a scalar
        "buffers.mask": torch.tensor([True, False, True]),
        "buffers.empty": torch.zeros(0, 4),
    }


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(sorted(a)) == list(sorted(b))
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert bytes(tensor_payload(a[name])) == bytes(tensor_payload(b[name])), name


def test_round_trip_in_small_chunks_with_the_announced_digest():
    state = sample_state()
    digest = weights_digest(state)
    chunks = list(iter_weight_chunks(state, version=3, max_chunk_bytes=MIN_CHUNK_BYTES))
    assert len(chunks) > len(state)  # the bf16 tensor (6 KiB) spans several chunks
    assert all(len(c.data) <= MIN_CHUNK_BYTES and c.version == 3 for c in chunks)
    assert [c.last for c in chunks].count(True) == 1 and chunks[-1].last and chunks[-1].sha256 == digest.sha256
    headers = [c.tensor_name for c in chunks if c.tensor_name]
    assert headers == sorted(state)
    back = assemble_weights(
        chunks, 3, expected_sha256=digest.sha256, expected_total_bytes=digest.total_bytes,
        expected_num_tensors=digest.num_tensors,
    )  # fmt: skip
    assert_same(state, back)
    expected = hashlib.sha256(b"".join(bytes(tensor_payload(state[n])) for n in sorted(state))).hexdigest()
    assert digest.sha256 == expected and digest.num_tensors == len(state)


def test_every_supported_dtype_round_trips():
    state = {name: torch.arange(6, dtype=torch.float32).reshape(2, 3).to(dtype) for name, dtype in DTYPES.items()}
    assert_same(state, assemble_weights(iter_weight_chunks(state, version=1)))


def test_empty_state_dict_is_one_last_chunk():
    chunks = list(iter_weight_chunks({}, version=2))
    assert len(chunks) == 1 and chunks[0].last and chunks[0].sha256 == hashlib.sha256().hexdigest()
    assert assemble_weights(chunks, expected_version=2) == {}


def test_chunk_size_is_capped():
    assert chunk_size(0) > 0 and chunk_size(1) == MIN_CHUNK_BYTES and chunk_size(1 << 40) == 64 << 20


def test_unsupported_dtype_is_refused():
    with pytest.raises(WeightsIntegrityError, match="complex64"):
        list(iter_weight_chunks({"w": torch.zeros(2, dtype=torch.complex64)}, version=1))


@given(
    shapes=st.lists(st.lists(st.integers(0, 40), min_size=0, max_size=3), min_size=1, max_size=5),
    dtype=st.sampled_from(["float32", "bfloat16", "int8", "float64"]),
    size=st.integers(MIN_CHUNK_BYTES, 3 * MIN_CHUNK_BYTES),
)
@settings(max_examples=40, deadline=None)
def test_round_trip_property(shapes, dtype, size):
    gen = torch.Generator().manual_seed(1)
    state = {f"t{i}": (torch.rand(shape, generator=gen) * 100).to(DTYPES[dtype]) for i, shape in enumerate(shapes)}
    assert_same(state, assemble_weights(iter_weight_chunks(state, version=9, max_chunk_bytes=size)))


def chunks_of(state=None, size=MIN_CHUNK_BYTES) -> list[weights_pb2.WeightChunk]:
    return list(iter_weight_chunks(state or sample_state(), version=5, max_chunk_bytes=size))


def corrupt_payload(chunks):
    chunks[1].data = bytes([chunks[1].data[0] ^ 1]) + chunks[1].data[1:]
    return chunks


def drop_middle(chunks):
    del chunks[next(i for i, c in enumerate(chunks) if c.offset > 0)]  # a continuation chunk
    return chunks


def drop_tensor(chunks):
    del chunks[1]  # a whole one-chunk tensor: only the checksum can tell
    return chunks


def swap_tensors(chunks):
    firsts = [i for i, c in enumerate(chunks) if c.tensor_name and len(c.data) == c.tensor_bytes]
    i, j = firsts[0], firsts[1]
    chunks[i], chunks[j] = chunks[j], chunks[i]
    return chunks


def wrong_shape(chunks):
    chunks[0].shape[:] = [999]
    return chunks


def wrong_version(chunks):
    chunks[-1].version = 6
    return chunks


def truncated(chunks):
    return chunks[:-1]


def after_last(chunks):
    return [*chunks, weights_pb2.WeightChunk(version=5)]


def bad_dtype(chunks):
    chunks[0].dtype = "complex64"
    return chunks


def no_checksum(chunks):
    chunks[-1].sha256 = ""
    return chunks


def overrun(chunks):
    chunks[-1].data += b"\x00"
    return chunks


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (corrupt_payload, "sha256 mismatch"),
        (drop_middle, "is incomplete|offset"),
        (drop_tensor, "sha256 mismatch"),
        (swap_tensors, "ascending name order"),
        (wrong_shape, "needs"),
        (wrong_version, "version 6"),
        (truncated, "without its last chunk"),
        (after_last, "after the last chunk"),
        (bad_dtype, "unsupported dtype"),
        (no_checksum, "no sha256"),
        (overrun, "announced"),
    ],
)
def test_broken_streams_raise_a_clear_error(mutate, fragment):
    with pytest.raises(WeightsIntegrityError, match=fragment):
        assemble_weights(mutate(chunks_of()), expected_version=5)


def test_notice_expectations_are_checked():
    state = sample_state()
    digest = weights_digest(state)
    with pytest.raises(WeightsIntegrityError, match="the notice says"):
        assemble_weights(chunks_of(state), expected_sha256="0" * 64)
    with pytest.raises(WeightsIntegrityError, match="payload bytes"):
        assemble_weights(chunks_of(state), expected_total_bytes=digest.total_bytes + 1)
    with pytest.raises(WeightsIntegrityError, match="tensors, the notice"):
        assemble_weights(chunks_of(state), expected_num_tensors=1)
    with pytest.raises(WeightsIntegrityError, match="expected 4"):
        assemble_weights(chunks_of(state), expected_version=4)


def test_assembler_is_incremental():
    assembler = WeightsAssembler(expected_version=5)
    chunks = chunks_of()
    for chunk in chunks[:-1]:
        assembler.add(chunk)
    assert not assembler.done
    with pytest.raises(WeightsIntegrityError):
        assembler.finish()
    assembler.add(chunks[-1])
    assert assembler.done and assembler.sha256 == chunks[-1].sha256
    assert_same(sample_state(), assembler.finish())
