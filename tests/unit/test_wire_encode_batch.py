"""encode_batch: the learner's fast serialization of a MismatchBatch is the protobuf message batch_to_pb builds."""

from __future__ import annotations

import pytest

from aisrl.core.synthetic import synthetic_batch
from aisrl.core.types import CorrectionConfig
from aisrl.v1 import diagnostics_pb2
from aisrl.wire.coefficient import _varint, batch_to_pb, encode_batch


@pytest.mark.parametrize(("n_sequences", "mean_length"), [(1, 1), (3, 5), (40, 30), (300, 200)])
@pytest.mark.parametrize("config", [CorrectionConfig(), CorrectionConfig(mode="mis", level="sequence", cap=None)])
def test_encoded_batch_parses_to_the_same_message(n_sequences, mean_length, config):
    # sizes cover 1-, 2- and 3-byte length varints (4 bytes per token per array)
    arrays = synthetic_batch(n_sequences=n_sequences, mean_length=mean_length, seed=n_sequences)
    want = batch_to_pb(arrays, config, run_id="run-1", step=7, policy_version=3, dry_run=True)
    got = diagnostics_pb2.MismatchBatch.FromString(
        encode_batch(arrays, config, run_id="run-1", step=7, policy_version=3, dry_run=True)
    )
    assert got == want


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 16_383, 16_384, 8_000_000, 2**32 + 5])
def test_varint_is_protobufs(value):
    pb = diagnostics_pb2.MismatchBatch(step=value)  # step is a uint64: key byte 0x10 then the varint
    encoded = pb.SerializeToString()
    assert encoded == (b"\x10" + _varint(value) if value else b"")
