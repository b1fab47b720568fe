from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Precision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRECISION_UNSPECIFIED: _ClassVar[Precision]
    PRECISION_BF16: _ClassVar[Precision]
    PRECISION_FP8: _ClassVar[Precision]
    PRECISION_FP8_EMULATED: _ClassVar[Precision]
    PRECISION_FP8_W8A8_EMULATED: _ClassVar[Precision]
    PRECISION_FP8_E5M2_W8_EMULATED: _ClassVar[Precision]
    PRECISION_FP8_E5M2_W8A8_EMULATED: _ClassVar[Precision]
    PRECISION_MXFP4_W4_EMULATED: _ClassVar[Precision]
    PRECISION_MXFP4_W4A4_EMULATED: _ClassVar[Precision]
    PRECISION_NVFP4_W4_EMULATED: _ClassVar[Precision]
    PRECISION_NVFP4_W4A4_EMULATED: _ClassVar[Precision]

class KvCacheDtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KV_CACHE_DTYPE_UNSPECIFIED: _ClassVar[KvCacheDtype]
    KV_CACHE_DTYPE_AUTO: _ClassVar[KvCacheDtype]
    KV_CACHE_DTYPE_FP8_E4M3: _ClassVar[KvCacheDtype]
    KV_CACHE_DTYPE_FP8_E5M2: _ClassVar[KvCacheDtype]

class CorrectionMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CORRECTION_MODE_UNSPECIFIED: _ClassVar[CorrectionMode]
    CORRECTION_MODE_NONE: _ClassVar[CorrectionMode]
    CORRECTION_MODE_TIS: _ClassVar[CorrectionMode]
    CORRECTION_MODE_MIS: _ClassVar[CorrectionMode]
    CORRECTION_MODE_FIXED: _ClassVar[CorrectionMode]
    CORRECTION_MODE_AIS: _ClassVar[CorrectionMode]

class WeightLevel(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WEIGHT_LEVEL_UNSPECIFIED: _ClassVar[WeightLevel]
    WEIGHT_LEVEL_TOKEN: _ClassVar[WeightLevel]
    WEIGHT_LEVEL_SEQUENCE: _ClassVar[WeightLevel]
    WEIGHT_LEVEL_GEOMETRIC: _ClassVar[WeightLevel]
PRECISION_UNSPECIFIED: Precision
PRECISION_BF16: Precision
PRECISION_FP8: Precision
PRECISION_FP8_EMULATED: Precision
PRECISION_FP8_W8A8_EMULATED: Precision
PRECISION_FP8_E5M2_W8_EMULATED: Precision
PRECISION_FP8_E5M2_W8A8_EMULATED: Precision
PRECISION_MXFP4_W4_EMULATED: Precision
PRECISION_MXFP4_W4A4_EMULATED: Precision
PRECISION_NVFP4_W4_EMULATED: Precision
PRECISION_NVFP4_W4A4_EMULATED: Precision
KV_CACHE_DTYPE_UNSPECIFIED: KvCacheDtype
KV_CACHE_DTYPE_AUTO: KvCacheDtype
KV_CACHE_DTYPE_FP8_E4M3: KvCacheDtype
KV_CACHE_DTYPE_FP8_E5M2: KvCacheDtype
CORRECTION_MODE_UNSPECIFIED: CorrectionMode
CORRECTION_MODE_NONE: CorrectionMode
CORRECTION_MODE_TIS: CorrectionMode
CORRECTION_MODE_MIS: CorrectionMode
CORRECTION_MODE_FIXED: CorrectionMode
CORRECTION_MODE_AIS: CorrectionMode
WEIGHT_LEVEL_UNSPECIFIED: WeightLevel
WEIGHT_LEVEL_TOKEN: WeightLevel
WEIGHT_LEVEL_SEQUENCE: WeightLevel
WEIGHT_LEVEL_GEOMETRIC: WeightLevel

class CorrectionConfig(_message.Message):
    __slots__ = ("mode", "level", "cap", "no_cap", "tau_kl", "beta", "alpha_min", "alpha_max", "fixed_alpha", "veto_threshold", "opsm_kl_threshold", "self_normalize", "mask_ratio_lo", "mask_ratio_hi", "reject_rule", "reject_threshold", "m2po_threshold")
    MODE_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    CAP_FIELD_NUMBER: _ClassVar[int]
    NO_CAP_FIELD_NUMBER: _ClassVar[int]
    TAU_KL_FIELD_NUMBER: _ClassVar[int]
    BETA_FIELD_NUMBER: _ClassVar[int]
    ALPHA_MIN_FIELD_NUMBER: _ClassVar[int]
    ALPHA_MAX_FIELD_NUMBER: _ClassVar[int]
    FIXED_ALPHA_FIELD_NUMBER: _ClassVar[int]
    VETO_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    OPSM_KL_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    SELF_NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    MASK_RATIO_LO_FIELD_NUMBER: _ClassVar[int]
    MASK_RATIO_HI_FIELD_NUMBER: _ClassVar[int]
    REJECT_RULE_FIELD_NUMBER: _ClassVar[int]
    REJECT_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    M2PO_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    mode: CorrectionMode
    level: WeightLevel
    cap: float
    no_cap: bool
    tau_kl: float
    beta: float
    alpha_min: float
    alpha_max: float
    fixed_alpha: float
    veto_threshold: float
    opsm_kl_threshold: float
    self_normalize: bool
    mask_ratio_lo: float
    mask_ratio_hi: float
    reject_rule: str
    reject_threshold: float
    m2po_threshold: float
    def __init__(self, mode: _Optional[_Union[CorrectionMode, str]] = ..., level: _Optional[_Union[WeightLevel, str]] = ..., cap: _Optional[float] = ..., no_cap: _Optional[bool] = ..., tau_kl: _Optional[float] = ..., beta: _Optional[float] = ..., alpha_min: _Optional[float] = ..., alpha_max: _Optional[float] = ..., fixed_alpha: _Optional[float] = ..., veto_threshold: _Optional[float] = ..., opsm_kl_threshold: _Optional[float] = ..., self_normalize: _Optional[bool] = ..., mask_ratio_lo: _Optional[float] = ..., mask_ratio_hi: _Optional[float] = ..., reject_rule: _Optional[str] = ..., reject_threshold: _Optional[float] = ..., m2po_threshold: _Optional[float] = ...) -> None: ...
