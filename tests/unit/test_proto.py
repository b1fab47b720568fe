"""Protobuf contracts: the committed code is current, and every message survives a round trip."""

from __future__ import annotations

import filecmp

import numpy as np
import pytest
from google.protobuf.descriptor import FieldDescriptor

from aisrl.core.types import (
    CORRECTION_STAT_FIELDS,
    BatchValidationError,
    CorrectionConfig,
    CorrectionMode,
    WeightLevel,
)
from aisrl.protogen import REPO_ROOT, generate
from aisrl.v1 import common_pb2, diagnostics_pb2, rollout_pb2, weights_pb2
from aisrl.wire.coefficient import (
    LEARNER_SIGNALS,
    batch_from_pb,
    batch_to_pb,
    config_from_pb,
    config_to_pb,
    encode_batch,
    record_from_pb,
    record_to_pb,
    signals_from_pb,
)
from tests.correction_cases import CORRECTION_CASES

MODULES = (common_pb2, rollout_pb2, weights_pb2, diagnostics_pb2)
ALL_MESSAGES = [getattr(module, name) for module in MODULES for name in module.DESCRIPTOR.message_types_by_name]


def test_generated_code_is_current(tmp_path):
    written = generate(tmp_path)
    assert written, "protoc produced nothing"
    for path in written:
        committed = REPO_ROOT / path.relative_to(tmp_path)
        assert committed.exists(), f"{committed} is not committed: run `make proto`"
        assert filecmp.cmp(path, committed, shallow=False), f"{committed} is stale: run `make proto`"


_SCALARS = {
    FieldDescriptor.TYPE_DOUBLE: 1.25,
    FieldDescriptor.TYPE_FLOAT: 0.5,
    FieldDescriptor.TYPE_INT64: -7,
    FieldDescriptor.TYPE_UINT64: 2**40 + 3,
    FieldDescriptor.TYPE_INT32: -3,
    FieldDescriptor.TYPE_UINT32: 9,
    FieldDescriptor.TYPE_BOOL: True,
    FieldDescriptor.TYPE_STRING: "héllo",
    FieldDescriptor.TYPE_BYTES: b"\x00\x01\xff",
}


def _fill(message, depth: int = 0) -> None:
    """Sets every field of a message (recursively) to a non-default value."""
    for field in message.DESCRIPTOR.fields:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if depth > 3:
                continue
            if field.is_repeated:
                _fill(getattr(message, field.name).add(), depth + 1)
                _fill(getattr(message, field.name).add(), depth + 1)
            else:
                _fill(getattr(message, field.name), depth + 1)
            continue
        if field.type == FieldDescriptor.TYPE_ENUM:
            value = field.enum_type.values[-1].number
        else:
            value = _SCALARS[field.type]
        if field.is_repeated:
            getattr(message, field.name).extend([value, value])
        else:
            setattr(message, field.name, value)


@pytest.mark.parametrize("message_cls", ALL_MESSAGES, ids=lambda m: m.DESCRIPTOR.full_name)
def test_every_message_round_trips(message_cls):
    original = message_cls()
    _fill(original)
    assert original.ByteSize() > 0
    decoded = message_cls.FromString(original.SerializeToString())
    assert decoded == original
    for field in message_cls.DESCRIPTOR.fields:
        if field.is_repeated:
            assert len(getattr(decoded, field.name)) > 0, field.name
        elif field.type != FieldDescriptor.TYPE_MESSAGE:
            assert getattr(decoded, field.name) == getattr(original, field.name), field.name


@pytest.mark.parametrize("mode", list(CorrectionMode))
@pytest.mark.parametrize("level", list(WeightLevel))
@pytest.mark.parametrize("cap", [None, 1.5, 2.0])
def test_correction_config_round_trips(mode, level, cap):
    config = CorrectionConfig(mode=mode, level=level, cap=cap if mode != CorrectionMode.MIS else 3.0,
                              beta=0.3, fixed_alpha=0.2, veto_threshold=1e-3)  # fmt: skip
    assert config_from_pb(config_to_pb(config)) == config


@pytest.mark.parametrize("name", list(CORRECTION_CASES))
def test_every_correction_round_trips(name):
    config = CorrectionConfig(**CORRECTION_CASES[name])
    assert config_from_pb(common_pb2.CorrectionConfig.FromString(config_to_pb(config).SerializeToString())) == config


def test_proto_mirrors_the_core_declarations():
    """One declaration each: every CorrectionConfig field is a CorrectionConfig proto field (cap also as no_cap),
    every CorrectionStats field a CoefficientResult field, so nothing is added to one side only."""
    config_fields = {f.name for f in common_pb2.CorrectionConfig.DESCRIPTOR.fields}
    assert config_fields == set(CorrectionConfig.model_fields) | {"no_cap"}
    result_fields = {f.name for f in diagnostics_pb2.CoefficientResult.DESCRIPTOR.fields}
    assert set(CORRECTION_STAT_FIELDS) <= result_fields


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"reject_rule": "seq_max_k9", "reject_threshold": 1.0}, "config.reject_rule"),
        ({"mask_ratio_lo": 2.0, "mask_ratio_hi": 1.0}, "config.mask_ratio_hi"),
        ({"m2po_threshold": -1.0}, "config.m2po_threshold"),
        ({"reject_rule": "token_k3"}, "config.reject_threshold"),
    ],
)
def test_bad_correction_fields_name_the_field(change, field):
    with pytest.raises(BatchValidationError) as err:
        config_from_pb(common_pb2.CorrectionConfig(**change))
    assert err.value.field == field


def test_unset_config_takes_design_defaults():
    assert config_from_pb(common_pb2.CorrectionConfig()) == CorrectionConfig()


def test_mismatch_batch_round_trips_float32():
    from aisrl.core.synthetic import synthetic_batch

    arrays = synthetic_batch(n_sequences=7, mean_length=9, seed=4)
    pb = diagnostics_pb2.MismatchBatch.FromString(batch_to_pb(arrays, CorrectionConfig()).SerializeToString())
    decoded = batch_from_pb(pb)
    np.testing.assert_array_equal(decoded.lengths, arrays.lengths)
    np.testing.assert_array_equal(decoded.advantages, arrays.advantages)
    np.testing.assert_allclose(decoded.lp_pi, arrays.lp_pi, rtol=1e-6)
    np.testing.assert_allclose(decoded.lp_mu, arrays.lp_mu, rtol=1e-6)


def test_million_token_batch_is_a_few_megabytes():
    n = 1_000_000
    pb = diagnostics_pb2.MismatchBatch(
        lp_pi=np.zeros(n, "<f4").tobytes(), lp_mu=np.zeros(n, "<f4").tobytes(),
        lengths=[250] * 4000, advantages=[0.5] * 4000,
    )  # fmt: skip
    assert pb.ByteSize() < 9 * 1024 * 1024


def test_coefficient_record_round_trips():
    record = {
        "run_id": "r", "step": 3, "policy_version": 2, "mode": "tis", "level": "sequence",
        "n_tokens": 10, "n_sequences": 2, "alpha": 1.0, "alpha_raw": 0.2, "alpha_ema": 0.2, "alpha_ais": 0.2,
        "kl": 0.01, "severity": 0.9, "kl_k1": 0.009, "chi2_token": 0.1, "chi2_sequence": 0.3, "ppl_ratio": 1.01,
        "frac_truncated": 0.1, "frac_masked": 0.0, "frac_vetoed": 0.0, "frac_opsm": 0.0, "warnings": ["w"],
        **{name: 0.125 * (k + 1) for k, name in enumerate(CORRECTION_STAT_FIELDS)},
        "computed_unix": 1.5, "compute_ms": 0.1, "computed_locally": True,
        "applied": {"reliability": 0.8, "ess": 8.0, "variance_amplification": 1.2, "penalty": 1 / 1.2,
                    "weight_mean": 1.0, "weight_min": 0.5, "weight_max": 2.0},
        "raw": {"reliability": 0.7, "ess": 7.0, "variance_amplification": 1.5, "penalty": 1 / 1.5,
                "weight_mean": 1.1, "weight_min": 0.5, "weight_max": 3.0},
    }  # fmt: skip
    # the learner's signals are recorded beside the result but are not part of the gRPC answer
    signals = {"reward_mean": 0.5, "eval_step": 2, "accuracy_greedy": 0.25, "accuracy_sampled": None}
    decoded = record_from_pb(
        diagnostics_pb2.CoefficientResult.FromString(record_to_pb(record | signals).SerializeToString())
    )
    assert not set(LEARNER_SIGNALS) & set(decoded)
    for key, value in record.items():
        assert decoded[key] == pytest.approx(value) if isinstance(value, float) else decoded[key] == value, key
    assert decoded["reliability"] == record["applied"]["reliability"]


def test_precision_labels_round_trip_and_old_values_keep_their_meaning():
    """Every scheme's label survives the wire; the values older producers wrote are unchanged."""
    from aisrl.models.quant.schemes import SCHEMES
    from aisrl.services.rollout.labels import kv_cache_enum, precision_label

    assert (common_pb2.PRECISION_BF16, common_pb2.PRECISION_FP8, common_pb2.PRECISION_FP8_EMULATED) == (1, 2, 3)
    for name in SCHEMES:
        for kv in ("auto", "fp8_e4m3", "fp8_e5m2"):
            label = precision_label(name, name != "bf16", kv, lm_head_quantized=name == "nvfp4_w4a4")
            group = rollout_pb2.TrajectoryGroup(
                precision=label.precision,
                kv_cache_dtype=label.kv_cache_dtype,
                lm_head_quantized=label.lm_head_quantized,
            )
            decoded = rollout_pb2.TrajectoryGroup.FromString(group.SerializeToString())
            assert (decoded.precision, decoded.kv_cache_dtype, decoded.lm_head_quantized) == (
                label.precision, kv_cache_enum(kv), name == "nvfp4_w4a4",
            )  # fmt: skip
    # A group from a producer that predates the KV field reads as "not reported", never as a dtype.
    assert rollout_pb2.TrajectoryGroup().kv_cache_dtype == common_pb2.KV_CACHE_DTYPE_UNSPECIFIED


def _signals_round_trip(signals, step=5):
    from aisrl.core.synthetic import synthetic_batch

    arrays = synthetic_batch(n_sequences=3, mean_length=4, seed=1)
    pb = diagnostics_pb2.MismatchBatch.FromString(
        batch_to_pb(arrays, CorrectionConfig(), step=step, signals=signals).SerializeToString()
    )
    encoded = diagnostics_pb2.MismatchBatch.FromString(encode_batch(arrays, CorrectionConfig(), step=step,
                                                                    signals=signals))  # fmt: skip
    assert encoded == pb  # the learner's fast encoding carries them too
    return signals_from_pb(pb)


@pytest.mark.parametrize(
    "signals",
    [
        {"reward_mean": 0.375, "eval_step": 4, "accuracy_greedy": 0.5, "accuracy_sampled": 0.25},
        {"reward_mean": 0.0, "eval_step": 0, "accuracy_greedy": 0.0, "accuracy_sampled": 0.0},  # zero is not unset
        {"reward_mean": -1.5, "eval_step": 5, "accuracy_greedy": 1.0, "accuracy_sampled": None},  # no samples asked
        {"reward_mean": 0.5, "eval_step": None, "accuracy_greedy": None, "accuracy_sampled": None},  # no evaluation
    ],
)
def test_learner_signals_round_trip_and_zero_is_not_absent(signals):
    assert _signals_round_trip(signals) == signals


def test_a_batch_without_signals_reads_as_all_absent():
    assert _signals_round_trip(None) == dict.fromkeys(LEARNER_SIGNALS)
    assert _signals_round_trip({}) == dict.fromkeys(LEARNER_SIGNALS)


@pytest.mark.parametrize(
    ("signals", "field"),
    [
        ({"reward_mean": float("nan")}, "reward_mean"),
        ({"reward_mean": float("inf")}, "reward_mean"),
        ({"eval_step": 1, "accuracy_greedy": 1.5}, "accuracy_greedy"),
        ({"eval_step": 1, "accuracy_greedy": 0.5, "accuracy_sampled": -0.1}, "accuracy_sampled"),
        ({"eval_step": 1, "accuracy_greedy": float("nan")}, "accuracy_greedy"),
        ({"accuracy_greedy": 0.5}, "accuracy_greedy"),  # an accuracy without the step it was measured at
        ({"eval_step": 1}, "eval_step"),  # an evaluation without its greedy accuracy
        ({"eval_step": 6, "accuracy_greedy": 0.5}, "eval_step"),  # after the batch's step (5)
    ],
)
def test_bad_learner_signals_name_the_field(signals, field):
    with pytest.raises(BatchValidationError) as err:
        _signals_round_trip(signals)
    assert err.value.field == field


def test_unknown_learner_signal_is_refused_by_the_sender():
    with pytest.raises(ValueError, match="reward"):
        batch_to_pb(*_tiny(), signals={"reward": 1.0})


def _tiny():
    from aisrl.core.synthetic import synthetic_batch

    return synthetic_batch(n_sequences=2, mean_length=3, seed=0), CorrectionConfig()
