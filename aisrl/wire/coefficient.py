"""Conversions between the diagnostics protobuf messages and the AIS core types.

Invariant: every decoding error is a BatchValidationError naming the offending field
(`lp_pi`, `lengths`, `config.cap`, ...), so both gRPC (INVALID_ARGUMENT) and REST (422)
report the same field; nothing is defaulted silently. Large arrays are float32 little-endian
bytes on the wire, decoded as float32 views of the message's bytes (no copy); the core widens them
to float64 block by block as it computes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict
from enum import StrEnum
from typing import Any

import numpy as np
from pydantic import ValidationError

from aisrl.core.types import (
    BatchValidationError,
    CoefficientResult,
    CorrectionConfig,
    CorrectionMode,
    MismatchArrays,
    WeightLevel,
)
from aisrl.v1 import common_pb2, diagnostics_pb2

_MODE_TO_PB = {
    CorrectionMode.NONE: common_pb2.CORRECTION_MODE_NONE,
    CorrectionMode.TIS: common_pb2.CORRECTION_MODE_TIS,
    CorrectionMode.MIS: common_pb2.CORRECTION_MODE_MIS,
    CorrectionMode.FIXED: common_pb2.CORRECTION_MODE_FIXED,
    CorrectionMode.AIS: common_pb2.CORRECTION_MODE_AIS,
}
_MODE_FROM_PB = {v: k for k, v in _MODE_TO_PB.items()} | {common_pb2.CORRECTION_MODE_UNSPECIFIED: CorrectionMode.AIS}
_LEVEL_TO_PB = {
    WeightLevel.TOKEN: common_pb2.WEIGHT_LEVEL_TOKEN,
    WeightLevel.SEQUENCE: common_pb2.WEIGHT_LEVEL_SEQUENCE,
    WeightLevel.GEOMETRIC: common_pb2.WEIGHT_LEVEL_GEOMETRIC,
}
_LEVEL_FROM_PB = {v: k for k, v in _LEVEL_TO_PB.items()} | {common_pb2.WEIGHT_LEVEL_UNSPECIFIED: WeightLevel.TOKEN}
# Every other config field travels as a proto3 `optional` of the same name (enums as their string
# value), so a field added to CorrectionConfig needs only its proto line (test_proto checks both agree).
_OPTIONAL_FIELDS = tuple(name for name in CorrectionConfig.model_fields if name not in ("mode", "level", "cap"))


def config_error(exc: ValidationError, prefix: str = "config") -> BatchValidationError:
    """The first problem of a CorrectionConfig validation error, with its field path."""
    err = exc.errors()[0]
    path = ".".join(str(p) for p in err["loc"])
    return BatchValidationError(f"{prefix}.{path}" if path else prefix, err["msg"])


def config_from_pb(pb: common_pb2.CorrectionConfig) -> CorrectionConfig:
    if pb.mode not in _MODE_FROM_PB:
        raise BatchValidationError("config.mode", f"unknown correction mode {pb.mode}")
    if pb.level not in _LEVEL_FROM_PB:
        raise BatchValidationError("config.level", f"unknown weight level {pb.level}")
    fields: dict[str, Any] = {"mode": _MODE_FROM_PB[pb.mode], "level": _LEVEL_FROM_PB[pb.level]}
    if pb.no_cap:
        if pb.HasField("cap"):
            raise BatchValidationError("config.cap", "set either cap or no_cap, not both")
        fields["cap"] = None
    elif pb.HasField("cap"):
        fields["cap"] = pb.cap
    for name in _OPTIONAL_FIELDS:
        if pb.HasField(name):
            fields[name] = getattr(pb, name)
    try:
        return CorrectionConfig(**fields)
    except ValidationError as exc:
        raise config_error(exc) from None


def config_to_pb(config: CorrectionConfig) -> common_pb2.CorrectionConfig:
    pb = common_pb2.CorrectionConfig(mode=_MODE_TO_PB[config.mode], level=_LEVEL_TO_PB[config.level])
    if config.cap is None:
        pb.no_cap = True
    else:
        pb.cap = config.cap
    for name in _OPTIONAL_FIELDS:
        value = getattr(config, name)
        if value is not None:
            setattr(pb, name, value.value if isinstance(value, StrEnum) else value)
    return pb


def float32_le(data: bytes, field: str) -> np.ndarray:
    """float32 little-endian bytes -> a read-only float32 view of them; the byte count must be a multiple of 4.

    No float64 copy: `compute_coefficient` widens float32 in the cache, block by block, with the same
    results (bench/bench_ais.py, regime "fp8-like ais, float32 in": the copy cost as much as the computation).
    """
    if len(data) % 4:
        raise BatchValidationError(field, f"{len(data)} bytes is not a whole number of float32 values")
    return np.frombuffer(data, dtype="<f4")


def batch_from_pb(pb: diagnostics_pb2.MismatchBatch) -> MismatchArrays:
    """Decodes the arrays of a batch; consistency (lengths, finiteness) is checked by the core."""
    return MismatchArrays(
        lp_pi=float32_le(pb.lp_pi, "lp_pi"),
        lp_mu=float32_le(pb.lp_mu, "lp_mu"),
        lengths=np.asarray(pb.lengths, dtype=np.int64),
        advantages=np.asarray(pb.advantages, dtype=np.float64),
    )


# What the learner measured, sent beside a batch (MismatchBatch's optional fields of these names) and recorded
# with it; None where not measured (a step without evaluation, or an older learner).
LEARNER_SIGNALS = ("reward_mean", "eval_step", "accuracy_greedy", "accuracy_sampled")
_ACCURACIES = ("accuracy_greedy", "accuracy_sampled")


def signals_from_pb(pb: diagnostics_pb2.MismatchBatch) -> dict[str, float | int | None]:
    """The learner's signals of a batch, every name of LEARNER_SIGNALS present (None: unset), checked."""
    signals = {name: getattr(pb, name) if pb.HasField(name) else None for name in LEARNER_SIGNALS}
    reward = signals["reward_mean"]
    if reward is not None and not math.isfinite(reward):
        raise BatchValidationError("reward_mean", f"must be finite, got {reward}")
    for name in _ACCURACIES:
        value = signals[name]
        if value is not None and not 0.0 <= value <= 1.0:  # also refuses NaN
            raise BatchValidationError(name, f"must be a share in [0, 1], got {value}")
        if value is not None and signals["eval_step"] is None:
            raise BatchValidationError(name, "given without eval_step")
    if signals["eval_step"] is not None:
        if signals["accuracy_greedy"] is None:
            raise BatchValidationError("eval_step", "given without accuracy_greedy")
        if signals["eval_step"] > pb.step:
            raise BatchValidationError("eval_step", f"{signals['eval_step']} is after the batch's step {pb.step}")
    return signals


def batch_to_pb(
    arrays: MismatchArrays,
    config: CorrectionConfig,
    run_id: str = "",
    step: int = 0,
    policy_version: int = 0,
    dry_run: bool = False,
    signals: Mapping[str, float | int | None] | None = None,
) -> diagnostics_pb2.MismatchBatch:
    """The batch message; `signals` (names of LEARNER_SIGNALS) are set where not None."""
    pb = diagnostics_pb2.MismatchBatch(
        run_id=run_id,
        step=step,
        policy_version=policy_version,
        lp_pi=np.ascontiguousarray(arrays.lp_pi, dtype="<f4").tobytes(),
        lp_mu=np.ascontiguousarray(arrays.lp_mu, dtype="<f4").tobytes(),
        lengths=np.asarray(arrays.lengths, dtype=np.uint32).tolist(),
        advantages=np.asarray(arrays.advantages, dtype=np.float64).tolist(),
        config=config_to_pb(config),
        dry_run=dry_run,
    )
    for name, value in (signals or {}).items():
        if name not in LEARNER_SIGNALS:
            raise ValueError(f"unknown learner signal {name!r} (known: {', '.join(LEARNER_SIGNALS)})")
        if value is not None:
            setattr(pb, name, value)
    return pb


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _bytes_field(number: int, data: bytes) -> list[bytes]:
    """A length-delimited field (wire type 2) as protobuf encodes it: key, length, bytes."""
    return [_varint(number << 3 | 2), _varint(len(data)), data]


_LP_PI = diagnostics_pb2.MismatchBatch.DESCRIPTOR.fields_by_name["lp_pi"].number
_LP_MU = diagnostics_pb2.MismatchBatch.DESCRIPTOR.fields_by_name["lp_mu"].number


def encode_batch(
    arrays: MismatchArrays,
    config: CorrectionConfig,
    run_id: str = "",
    step: int = 0,
    policy_version: int = 0,
    dry_run: bool = False,
    signals: Mapping[str, float | int | None] | None = None,
) -> bytes:
    """The serialized MismatchBatch of batch_to_pb, byte for byte a valid encoding of the same message.

    Why: protobuf (upb 7.36) took 12 to 25 ms to serialize a message holding two 4 MB bytes fields (1M tokens)
    and 0.6 ms for one of them alone. A protobuf message's encoding may list its fields in any order, and a
    length-delimited field is its key, its length and its bytes, so the small fields are serialized by protobuf
    and the two arrays appended as they are (one copy, in the join).
    """
    small = batch_to_pb(MismatchArrays(np.empty(0), np.empty(0), arrays.lengths, arrays.advantages), config, run_id,
                        step, policy_version, dry_run, signals)  # fmt: skip
    lp_pi = np.ascontiguousarray(arrays.lp_pi, dtype="<f4").tobytes()
    lp_mu = np.ascontiguousarray(arrays.lp_mu, dtype="<f4").tobytes()
    return b"".join([small.SerializeToString(), *_bytes_field(_LP_PI, lp_pi), *_bytes_field(_LP_MU, lp_mu)])


def result_fields(result: CoefficientResult) -> dict[str, Any]:
    """The reported scalars of a result as plain JSON-able values (arrays left out)."""
    return {
        "mode": result.mode.value,
        "level": result.level.value,
        "n_tokens": result.n_tokens,
        "n_sequences": result.n_sequences,
        "alpha": result.alpha,
        "alpha_raw": result.alpha_raw,
        "alpha_ema": result.alpha_ema,
        "alpha_ais": result.alpha_ais,
        "reliability": result.reliability,
        "ess": result.ess,
        "severity": result.severity,
        "kl": result.kl,
        "variance_amplification": result.variance_amplification,
        "penalty": result.penalty,
        "applied": asdict(result.applied),
        "raw": asdict(result.raw),
        "kl_k1": result.kl_k1,
        "chi2_token": result.chi2_token,
        "chi2_sequence": result.chi2_sequence,
        "ppl_ratio": result.ppl_ratio,
        "frac_truncated": result.frac_truncated,
        "frac_masked": result.frac_masked,
        "frac_vetoed": result.frac_vetoed,
        "frac_opsm": result.frac_opsm,
        **asdict(result.corrections),
        "warnings": list(result.warnings),
    }


_RECORD_ONLY = ("reliability", "ess", "variance_amplification", "penalty", "config", *LEARNER_SIGNALS)


def record_to_pb(record: dict[str, Any]) -> diagnostics_pb2.CoefficientResult:
    """A recorded batch (result_fields plus run_id, step, ...) as the gRPC result message."""
    fields = {k: v for k, v in record.items() if k not in _RECORD_ONLY}
    fields["mode"] = _MODE_TO_PB[CorrectionMode(fields["mode"])]
    fields["level"] = _LEVEL_TO_PB[WeightLevel(fields["level"])]
    fields["applied"] = diagnostics_pb2.WeightStats(**fields["applied"])
    fields["raw"] = diagnostics_pb2.WeightStats(**fields["raw"])
    return diagnostics_pb2.CoefficientResult(**fields)


def record_from_pb(pb: diagnostics_pb2.CoefficientResult) -> dict[str, Any]:
    """The inverse of record_to_pb (the convenience mirrors of `applied` are restored)."""
    fields: dict[str, Any] = {
        f.name: getattr(pb, f.name)
        for f in pb.DESCRIPTOR.fields
        if f.name not in ("mode", "level", "applied", "raw", "warnings")
    }
    fields["mode"] = _MODE_FROM_PB[pb.mode].value
    fields["level"] = _LEVEL_FROM_PB[pb.level].value
    fields["warnings"] = list(pb.warnings)
    for name in ("applied", "raw"):
        stats = getattr(pb, name)
        fields[name] = {f.name: getattr(stats, f.name) for f in stats.DESCRIPTOR.fields}
    for name in ("reliability", "ess", "variance_amplification", "penalty"):
        fields[name] = fields["applied"][name]
    return fields
