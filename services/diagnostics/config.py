"""Settings of the diagnostics service (environment prefix AISRL_DIAG_; CLI options derived)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from aisrl.settings import CommonSettings


class DiagnosticsSettings(CommonSettings):
    """Serve the AIS coefficient over gRPC (learner) and REST (people), with history in Redis."""

    model_config = SettingsConfigDict(env_prefix="AISRL_DIAG_")

    http_host: str = Field("127.0.0.1", description="Address the REST API listens on (0.0.0.0 in containers).")
    http_port: int = Field(8080, ge=0, le=65535, description="REST port; 0 picks a free port and prints it.")
    grpc_host: str = Field("127.0.0.1", description="Address the gRPC server listens on (0.0.0.0 in containers).")
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free port and prints it.")
    history_limit: int = Field(
        10_000, ge=1, le=10_000_000, description="Batches kept per run; older ones are trimmed (and counted)."
    )
    key_prefix: str = Field("aisrl", min_length=1, description="Prefix of every Redis key this service writes.")
    grpc_reflection: bool = Field(
        True, description="Serve gRPC server reflection, so that grpcurl and similar tools can list and call the API."
    )
    max_message_mb: int = Field(
        256, ge=4, le=2048, description="Largest gRPC message accepted or sent, in MiB (1M tokens is about 8 MiB)."
    )
    offload_tokens: int = Field(
        50_000,
        ge=0,
        description="Batches with at least this many tokens are computed in a worker thread, off the event loop.",
    )
    max_request_mb: float = Field(
        16.0,
        gt=0,
        le=4096,
        description="Largest REST request body accepted, in MiB; a larger one is refused with 413 before it is "
        "read (POST /v1/coefficient JSON takes about 40 bytes per token).",
    )
    rest_inline_kb: int = Field(
        256,
        ge=0,
        description="POST /v1/coefficient bodies smaller than this (KiB) are parsed on the event loop; larger ones "
        "in a worker process, so that the gRPC calls the learner waits on are never held up by a JSON parse.",
    )
    rest_workers: int = Field(
        1, ge=0, le=64, description="Worker processes for large REST bodies (0: a thread, which still holds the GIL)."
    )
    embedded_redis_dir: str | None = Field(
        None,
        description="Where the embedded Redis keeps its append-only file when no Redis URL is set "
        "(unset: a temporary directory, history lost on exit).",
    )
