from aisrl.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PromptJob(_message.Message):
    __slots__ = ("run_id", "job_id", "task", "problem_json", "group_size", "max_tokens", "temperature", "min_policy_version", "issued_version", "seed", "created_unix")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_JSON_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    MIN_POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    ISSUED_VERSION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    job_id: str
    task: str
    problem_json: str
    group_size: int
    max_tokens: int
    temperature: float
    min_policy_version: int
    issued_version: int
    seed: int
    created_unix: float
    def __init__(self, run_id: _Optional[str] = ..., job_id: _Optional[str] = ..., task: _Optional[str] = ..., problem_json: _Optional[str] = ..., group_size: _Optional[int] = ..., max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., min_policy_version: _Optional[int] = ..., issued_version: _Optional[int] = ..., seed: _Optional[int] = ..., created_unix: _Optional[float] = ...) -> None: ...

class Sample(_message.Message):
    __slots__ = ("prompt_ids", "completion_ids", "logprobs", "text", "reward", "finish_reason")
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    prompt_ids: bytes
    completion_ids: bytes
    logprobs: bytes
    text: str
    reward: float
    finish_reason: str
    def __init__(self, prompt_ids: _Optional[bytes] = ..., completion_ids: _Optional[bytes] = ..., logprobs: _Optional[bytes] = ..., text: _Optional[str] = ..., reward: _Optional[float] = ..., finish_reason: _Optional[str] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_wait_s", "generate_s", "score_s")
    QUEUE_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    GENERATE_S_FIELD_NUMBER: _ClassVar[int]
    SCORE_S_FIELD_NUMBER: _ClassVar[int]
    queue_wait_s: float
    generate_s: float
    score_s: float
    def __init__(self, queue_wait_s: _Optional[float] = ..., generate_s: _Optional[float] = ..., score_s: _Optional[float] = ...) -> None: ...

class TrajectoryGroup(_message.Message):
    __slots__ = ("run_id", "job_id", "task", "problem_uid", "policy_version", "precision", "worker_id", "samples", "timings", "created_unix", "model_id", "kv_cache_dtype", "lm_head_quantized")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_UID_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    LM_HEAD_QUANTIZED_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    job_id: str
    task: str
    problem_uid: str
    policy_version: int
    precision: _common_pb2.Precision
    worker_id: str
    samples: _containers.RepeatedCompositeFieldContainer[Sample]
    timings: Timings
    created_unix: float
    model_id: str
    kv_cache_dtype: _common_pb2.KvCacheDtype
    lm_head_quantized: bool
    def __init__(self, run_id: _Optional[str] = ..., job_id: _Optional[str] = ..., task: _Optional[str] = ..., problem_uid: _Optional[str] = ..., policy_version: _Optional[int] = ..., precision: _Optional[_Union[_common_pb2.Precision, str]] = ..., worker_id: _Optional[str] = ..., samples: _Optional[_Iterable[_Union[Sample, _Mapping]]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., created_unix: _Optional[float] = ..., model_id: _Optional[str] = ..., kv_cache_dtype: _Optional[_Union[_common_pb2.KvCacheDtype, str]] = ..., lm_head_quantized: _Optional[bool] = ...) -> None: ...

class DeadLetter(_message.Message):
    __slots__ = ("source_stream", "message_id", "reason", "payload", "worker_id", "created_unix")
    SOURCE_STREAM_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    source_stream: str
    message_id: str
    reason: str
    payload: bytes
    worker_id: str
    created_unix: float
    def __init__(self, source_stream: _Optional[str] = ..., message_id: _Optional[str] = ..., reason: _Optional[str] = ..., payload: _Optional[bytes] = ..., worker_id: _Optional[str] = ..., created_unix: _Optional[float] = ...) -> None: ...
