"""The local cluster as data: which processes, with which command, environment, health URL and order.

Invariant: `build_topology` is a pure function of (ClusterSettings, Ports, redis URL): no I/O, no
clock, no environment reads, no free-port lookups (the caller resolves ports first). Each process
is `aisrl <service>` and gets its settings only as that service's environment variables (named by
`aisrl.settings.env_name`), so the same topology can be checked against docker-compose.yml or a
Kubernetes manifest. A process starts once every process in its `after` is ready.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic_settings import BaseSettings

from aisrl.cluster.config import SERVICE_SETTINGS, ClusterSettings
from aisrl.models.config import WarmStartSettings
from aisrl.settings import env_name

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Ports:
    """Concrete ports (none is 0) for one start of the cluster."""

    diagnostics_http: int
    diagnostics_grpc: int
    learner_http: int
    learner_grpc: int
    rollout_http: tuple[int, ...]

    def __post_init__(self) -> None:
        every = [self.diagnostics_http, self.diagnostics_grpc, self.learner_http, self.learner_grpc,
                 *self.rollout_http]  # fmt: skip
        if any(p <= 0 for p in every):
            raise ValueError(f"ports must be resolved (no 0) before building the topology: {every}")
        if len(set(every)) != len(every):
            raise ValueError(f"ports must be distinct: {every}")


def resolve_ports(settings: ClusterSettings, pick: Callable[[], int]) -> Ports:
    """Ports from the settings, with every 0 replaced by pick() (e.g. `aisrl.redis_conn.free_port`)."""
    p = settings.ports
    taken: set[int] = set()

    def use(port: int) -> int:
        chosen = port
        while chosen == 0 or chosen in taken:
            chosen = pick()
            if port and chosen != port:  # a fixed port given twice is a settings error, not something to fix
                raise ValueError(f"port {port} is used twice in ports")
        taken.add(chosen)
        return chosen

    fixed = [use(v) for v in (p.diagnostics_http, p.diagnostics_grpc, p.learner_http, p.learner_grpc)]
    rollout = tuple(use(p.rollout_http_base + i if p.rollout_http_base else 0) for i in range(settings.replicas))
    return Ports(*fixed, rollout_http=rollout)


@dataclass(frozen=True)
class ProcessSpec:
    """One child process of the cluster."""

    name: str  # unique: diagnostics, learner, rollout-0, ...
    service: str  # the `aisrl` sub-command and the key of SERVICE_SETTINGS
    argv: tuple[str, ...]  # ("aisrl", service): every setting travels in env
    env: Mapping[str, str]  # the service's settings as its environment variables
    settings: Mapping[str, Any]  # the same settings by field name (for reports and checks)
    http_url: str  # base URL of the process's HTTP API
    ready_path: str = "/readyz"  # GET answers 200 once the process can do its work
    after: tuple[str, ...] = ()  # processes that must be ready before this one starts
    main: bool = False  # the process whose exit ends the run (the learner, at `steps`)

    @property
    def ready_url(self) -> str:
        return self.http_url + self.ready_path


@dataclass(frozen=True)
class Topology:
    run_id: str
    redis_url: str
    processes: tuple[ProcessSpec, ...]
    dashboard_url: str
    learner_metrics_url: str
    diagnostics_url: str

    def by_name(self, name: str) -> ProcessSpec:
        for spec in self.processes:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def start_waves(self) -> list[list[ProcessSpec]]:
        """Processes grouped so that each wave needs only earlier waves to be ready (start order)."""
        placed: dict[str, int] = {}
        waves: list[list[ProcessSpec]] = []
        remaining = list(self.processes)
        while remaining:
            ready = [s for s in remaining if all(d in placed for d in s.after)]
            if not ready:
                raise ValueError(f"unsatisfiable start order: {[s.name for s in remaining]}")
            for spec in ready:
                placed[spec.name] = len(waves)
            waves.append(ready)
            remaining = [s for s in remaining if s.name not in placed]
        return waves


def env_value(value: Any) -> str:
    """How a setting is written into an environment variable (what pydantic-settings parses back)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    if hasattr(value, "value"):  # enums
        return str(value.value)
    return str(value)


def settings_env(settings_cls: type[BaseSettings], values: Mapping[str, Any]) -> dict[str, str]:
    """{ENV_NAME: text} for settings given by field name. None is written as `null` where the field's default is
    something else (e.g. `correction_cap: null`, no cap); where the default is None it is left out."""
    fields = settings_cls.model_fields
    return {
        env_name(settings_cls, k): "null" if v is None else env_value(v)
        for k, v in values.items()
        if v is not None or (k in fields and fields[k].default is not None)
    }


def _spec(name: str, service: str, values: dict[str, Any], http_port: int, **kw: Any) -> ProcessSpec:
    settings_cls = SERVICE_SETTINGS[service]
    return ProcessSpec(
        name=name, service=service, argv=("aisrl", service), env=settings_env(settings_cls, values),
        settings=dict(values), http_url=f"http://{LOOPBACK}:{http_port}", **kw,
    )  # fmt: skip


def build_topology(settings: ClusterSettings, ports: Ports, redis_url: str) -> Topology:
    """The processes of the cluster, in start order (see the module invariant)."""
    run = settings.run_id
    run_dir = settings.run_dir
    model = str(settings.resolved_model_dir)
    common = {"redis_url": redis_url, "log_json": True}
    over = settings.services

    diagnostics = {
        **over.diagnostics, **common, "http_host": LOOPBACK, "http_port": ports.diagnostics_http,
        "grpc_host": LOOPBACK, "grpc_port": ports.diagnostics_grpc,
    }  # fmt: skip
    learner = {
        **over.learner, **common, "run_id": run, "key_prefix": settings.key_prefix, "model_path": model,
        "task": settings.task, "task_options": settings.task_options, "max_steps": settings.steps,
        "work_dir": str(run_dir / "learner"), "diagnostics_target": f"{LOOPBACK}:{ports.diagnostics_grpc}",
        "http_host": LOOPBACK, "http_port": ports.learner_http, "grpc_host": LOOPBACK, "grpc_port": ports.learner_grpc,
    }  # fmt: skip
    processes = [
        _spec("diagnostics", "diagnostics", diagnostics, ports.diagnostics_http),
        _spec("learner", "learner", learner, ports.learner_http, after=("diagnostics",), main=True),
    ]
    for i, port in enumerate(ports.rollout_http):
        rollout = {
            **over.rollout, **common, "run_id": run, "key_prefix": settings.key_prefix, "model_path": model,
            "worker_id": f"rollout-{i}", "work_dir": str(run_dir / f"rollout-{i}"), "http_host": LOOPBACK,
            "http_port": port,
        }  # fmt: skip
        # Rollouts need only Redis and the model directory; they start beside the learner (both load a model).
        processes.append(_spec(f"rollout-{i}", "rollout", rollout, port, after=("diagnostics",)))
    processes = [_with_threads(spec, settings.threads.get(spec.service)) for spec in processes]
    diag_url = f"http://{LOOPBACK}:{ports.diagnostics_http}"
    return Topology(
        run_id=run, redis_url=redis_url, processes=tuple(processes),
        dashboard_url=f"{diag_url}/v1/runs/{run}/dashboard", learner_metrics_url=f"http://{LOOPBACK}:{ports.learner_http}/metrics",
        diagnostics_url=diag_url,
    )  # fmt: skip


def thread_env(service: str, threads: int) -> dict[str, str]:
    """The environment that sizes a service process's CPU threads (cluster.yaml's `threads:`)."""
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if service == "rollout":
        env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"  # several replicas share the cores; no pinning
    return env


def _with_threads(spec: ProcessSpec, threads: int | None) -> ProcessSpec:
    if threads is None:
        return spec
    return ProcessSpec(**{**spec.__dict__, "env": {**spec.env, **thread_env(spec.service, threads)}})


def build_model_init(settings: ClusterSettings, out: Path) -> ProcessSpec:
    """The one-shot `aisrl model init` job that creates the initial policy in out (no HTTP, no readiness)."""
    values = {**settings.model_init, "task": settings.task, "task_options": settings.task_options, "out": str(out)}
    env = settings_env(WarmStartSettings, values)
    return ProcessSpec(name="model-init", service="model", argv=("aisrl", "model", "init"), env=env,
                       settings=values, http_url="", ready_path="")  # fmt: skip


def log_path(run_dir: Path, spec: ProcessSpec) -> Path:
    return run_dir / "logs" / f"{spec.name}.log"
