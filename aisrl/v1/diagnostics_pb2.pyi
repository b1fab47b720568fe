from aisrl.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MismatchBatch(_message.Message):
    __slots__ = ("run_id", "step", "policy_version", "lp_pi", "lp_mu", "lengths", "advantages", "config", "dry_run", "reward_mean", "eval_step", "accuracy_greedy", "accuracy_sampled")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    LP_PI_FIELD_NUMBER: _ClassVar[int]
    LP_MU_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    ADVANTAGES_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    REWARD_MEAN_FIELD_NUMBER: _ClassVar[int]
    EVAL_STEP_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_GREEDY_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_SAMPLED_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    step: int
    policy_version: int
    lp_pi: bytes
    lp_mu: bytes
    lengths: _containers.RepeatedScalarFieldContainer[int]
    advantages: _containers.RepeatedScalarFieldContainer[float]
    config: _common_pb2.CorrectionConfig
    dry_run: bool
    reward_mean: float
    eval_step: int
    accuracy_greedy: float
    accuracy_sampled: float
    def __init__(self, run_id: _Optional[str] = ..., step: _Optional[int] = ..., policy_version: _Optional[int] = ..., lp_pi: _Optional[bytes] = ..., lp_mu: _Optional[bytes] = ..., lengths: _Optional[_Iterable[int]] = ..., advantages: _Optional[_Iterable[float]] = ..., config: _Optional[_Union[_common_pb2.CorrectionConfig, _Mapping]] = ..., dry_run: _Optional[bool] = ..., reward_mean: _Optional[float] = ..., eval_step: _Optional[int] = ..., accuracy_greedy: _Optional[float] = ..., accuracy_sampled: _Optional[float] = ...) -> None: ...

class WeightStats(_message.Message):
    __slots__ = ("reliability", "ess", "variance_amplification", "penalty", "weight_mean", "weight_min", "weight_max")
    RELIABILITY_FIELD_NUMBER: _ClassVar[int]
    ESS_FIELD_NUMBER: _ClassVar[int]
    VARIANCE_AMPLIFICATION_FIELD_NUMBER: _ClassVar[int]
    PENALTY_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_MEAN_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_MIN_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_MAX_FIELD_NUMBER: _ClassVar[int]
    reliability: float
    ess: float
    variance_amplification: float
    penalty: float
    weight_mean: float
    weight_min: float
    weight_max: float
    def __init__(self, reliability: _Optional[float] = ..., ess: _Optional[float] = ..., variance_amplification: _Optional[float] = ..., penalty: _Optional[float] = ..., weight_mean: _Optional[float] = ..., weight_min: _Optional[float] = ..., weight_max: _Optional[float] = ...) -> None: ...

class CoefficientResult(_message.Message):
    __slots__ = ("run_id", "step", "policy_version", "mode", "level", "n_tokens", "n_sequences", "alpha", "alpha_raw", "alpha_ema", "alpha_ais", "kl", "severity", "applied", "raw", "kl_k1", "chi2_token", "chi2_sequence", "ppl_ratio", "frac_truncated", "frac_masked", "frac_vetoed", "frac_opsm", "warnings", "computed_unix", "compute_ms", "computed_locally", "frac_mask_low", "frac_mask_high", "frac_rejected", "frac_m2po", "frac_kept", "weight_std", "loss_weight_mean", "ess_sequence", "m2")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    N_TOKENS_FIELD_NUMBER: _ClassVar[int]
    N_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    ALPHA_RAW_FIELD_NUMBER: _ClassVar[int]
    ALPHA_EMA_FIELD_NUMBER: _ClassVar[int]
    ALPHA_AIS_FIELD_NUMBER: _ClassVar[int]
    KL_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    KL_K1_FIELD_NUMBER: _ClassVar[int]
    CHI2_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CHI2_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    PPL_RATIO_FIELD_NUMBER: _ClassVar[int]
    FRAC_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    FRAC_MASKED_FIELD_NUMBER: _ClassVar[int]
    FRAC_VETOED_FIELD_NUMBER: _ClassVar[int]
    FRAC_OPSM_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    COMPUTED_UNIX_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTED_LOCALLY_FIELD_NUMBER: _ClassVar[int]
    FRAC_MASK_LOW_FIELD_NUMBER: _ClassVar[int]
    FRAC_MASK_HIGH_FIELD_NUMBER: _ClassVar[int]
    FRAC_REJECTED_FIELD_NUMBER: _ClassVar[int]
    FRAC_M2PO_FIELD_NUMBER: _ClassVar[int]
    FRAC_KEPT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_STD_FIELD_NUMBER: _ClassVar[int]
    LOSS_WEIGHT_MEAN_FIELD_NUMBER: _ClassVar[int]
    ESS_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    M2_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    step: int
    policy_version: int
    mode: _common_pb2.CorrectionMode
    level: _common_pb2.WeightLevel
    n_tokens: int
    n_sequences: int
    alpha: float
    alpha_raw: float
    alpha_ema: float
    alpha_ais: float
    kl: float
    severity: float
    applied: WeightStats
    raw: WeightStats
    kl_k1: float
    chi2_token: float
    chi2_sequence: float
    ppl_ratio: float
    frac_truncated: float
    frac_masked: float
    frac_vetoed: float
    frac_opsm: float
    warnings: _containers.RepeatedScalarFieldContainer[str]
    computed_unix: float
    compute_ms: float
    computed_locally: bool
    frac_mask_low: float
    frac_mask_high: float
    frac_rejected: float
    frac_m2po: float
    frac_kept: float
    weight_std: float
    loss_weight_mean: float
    ess_sequence: float
    m2: float
    def __init__(self, run_id: _Optional[str] = ..., step: _Optional[int] = ..., policy_version: _Optional[int] = ..., mode: _Optional[_Union[_common_pb2.CorrectionMode, str]] = ..., level: _Optional[_Union[_common_pb2.WeightLevel, str]] = ..., n_tokens: _Optional[int] = ..., n_sequences: _Optional[int] = ..., alpha: _Optional[float] = ..., alpha_raw: _Optional[float] = ..., alpha_ema: _Optional[float] = ..., alpha_ais: _Optional[float] = ..., kl: _Optional[float] = ..., severity: _Optional[float] = ..., applied: _Optional[_Union[WeightStats, _Mapping]] = ..., raw: _Optional[_Union[WeightStats, _Mapping]] = ..., kl_k1: _Optional[float] = ..., chi2_token: _Optional[float] = ..., chi2_sequence: _Optional[float] = ..., ppl_ratio: _Optional[float] = ..., frac_truncated: _Optional[float] = ..., frac_masked: _Optional[float] = ..., frac_vetoed: _Optional[float] = ..., frac_opsm: _Optional[float] = ..., warnings: _Optional[_Iterable[str]] = ..., computed_unix: _Optional[float] = ..., compute_ms: _Optional[float] = ..., computed_locally: _Optional[bool] = ..., frac_mask_low: _Optional[float] = ..., frac_mask_high: _Optional[float] = ..., frac_rejected: _Optional[float] = ..., frac_m2po: _Optional[float] = ..., frac_kept: _Optional[float] = ..., weight_std: _Optional[float] = ..., loss_weight_mean: _Optional[float] = ..., ess_sequence: _Optional[float] = ..., m2: _Optional[float] = ...) -> None: ...

class LocalRecord(_message.Message):
    __slots__ = ("result", "config")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    result: CoefficientResult
    config: _common_pb2.CorrectionConfig
    def __init__(self, result: _Optional[_Union[CoefficientResult, _Mapping]] = ..., config: _Optional[_Union[_common_pb2.CorrectionConfig, _Mapping]] = ...) -> None: ...

class GetLatestRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...
