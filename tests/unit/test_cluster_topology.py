"""The topology is data: real `aisrl` sub-commands, real settings as env variables, a fixed start order."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import typer

from aisrl.cli import app
from aisrl.cluster.cli import DEFAULT_CONFIG
from aisrl.cluster.config import SERVICE_SETTINGS, load_cluster_settings
from aisrl.cluster.topology import Ports, build_model_init, build_topology, resolve_ports
from aisrl.models.config import WarmStartSettings
from aisrl.settings import env_name

THREAD_VARS = {"OMP_NUM_THREADS", "MKL_NUM_THREADS", "VLLM_CPU_OMP_THREADS_BIND"}


def counter(start: int = 20_000):
    numbers = itertools.count(start)
    return lambda: next(numbers)


def topology(replicas: int = 2, **overrides):
    settings = load_cluster_settings(DEFAULT_CONFIG, {"run_id": "t1", "replicas": replicas, **overrides})
    return settings, build_topology(settings, resolve_ports(settings, counter()), "redis://127.0.0.1:6399/0")


def command_names(typer_app: typer.Typer, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    names = {(*prefix, c.name) for c in typer_app.registered_commands}
    for group in typer_app.registered_groups:
        names |= command_names(group.typer_instance, (*prefix, group.name))
    return names


def test_every_argv_is_a_real_aisrl_subcommand():
    settings, topo = topology()
    real = command_names(app)
    specs = [*topo.processes, build_model_init(settings, Path("m"))]
    for spec in specs:
        assert spec.argv[0] == "aisrl"
        assert tuple(spec.argv[1:]) in real, spec.argv


def test_every_env_var_is_a_real_setting_and_parses_back(monkeypatch):
    _, topo = topology(threads={"rollout": 1})
    for spec in topo.processes:
        cls = SERVICE_SETTINGS[spec.service]
        names = {env_name(cls, field): field for field in cls.model_fields}
        for var in spec.env:
            assert var in names or var in THREAD_VARS, f"{spec.name}: {var} is not a setting of {cls.__name__}"
        # The service, started with exactly this environment, sees exactly these settings.
        for var in list(__import__("os").environ):
            if var.startswith("AISRL_"):
                monkeypatch.delenv(var)
        for var, value in spec.env.items():
            monkeypatch.setenv(var, value)
        parsed = cls()
        for field, value in spec.settings.items():
            got = getattr(parsed, field)
            assert (got.value if hasattr(got, "value") else got) == value, (spec.name, field)


def test_model_init_env_is_warm_start_settings(monkeypatch):
    settings, _ = topology()
    spec = build_model_init(settings, Path("out/dir"))
    for var, value in spec.env.items():
        monkeypatch.setenv(var, value)
    parsed = WarmStartSettings()
    assert parsed.out == "out/dir" and parsed.task == "countdown" and parsed.steps == settings.model_init["steps"]


def test_build_topology_is_pure(monkeypatch):
    settings, _ = topology()
    ports = resolve_ports(settings, counter())
    first = build_topology(settings, ports, "redis://x:1/0")
    monkeypatch.setenv("AISRL_LEARNER_LR", "0.5")  # the environment is not read
    monkeypatch.chdir("/")  # nor the working directory
    assert build_topology(settings, ports, "redis://x:1/0") == first


def test_wiring_and_start_order():
    settings, topo = topology(replicas=3)
    names = [p.name for p in topo.processes]
    assert names == ["diagnostics", "learner", "rollout-0", "rollout-1", "rollout-2"]
    waves = [[p.name for p in wave] for wave in topo.start_waves()]
    assert waves == [["diagnostics"], ["learner", "rollout-0", "rollout-1", "rollout-2"]]
    diag, learner = topo.by_name("diagnostics"), topo.by_name("learner")
    assert learner.main and not any(p.main for p in topo.processes if p is not learner)
    assert learner.settings["diagnostics_target"] == f"127.0.0.1:{diag.settings['grpc_port']}"
    assert learner.settings["max_steps"] == settings.steps
    for p in topo.processes:
        assert p.settings["redis_url"] == "redis://127.0.0.1:6399/0"
        assert p.ready_url == f"http://127.0.0.1:{p.settings['http_port']}/readyz"
    rollouts = [p for p in topo.processes if p.service == "rollout"]
    assert {p.settings["worker_id"] for p in rollouts} == {"rollout-0", "rollout-1", "rollout-2"}
    assert all(p.settings["model_path"] == learner.settings["model_path"] for p in rollouts)
    assert topo.dashboard_url == f"{topo.diagnostics_url}/v1/runs/t1/dashboard"


def test_ports_fixed_base_and_free():
    settings = load_cluster_settings(DEFAULT_CONFIG, {"replicas": 2})
    settings.ports.rollout_http_base = 9100
    settings.ports.learner_http = 9000
    ports = resolve_ports(settings, counter(30_000))
    assert ports.rollout_http == (9100, 9101) and ports.learner_http == 9000
    assert len({ports.diagnostics_http, ports.diagnostics_grpc, ports.learner_grpc}) == 3
    with pytest.raises(ValueError, match="resolved"):
        Ports(0, 1, 2, 3, (4,))
    with pytest.raises(ValueError, match="distinct"):
        Ports(1, 1, 2, 3, (4,))


def test_threads_go_to_the_environment():
    _, topo = topology(threads={"learner": 2, "rollout": 1})
    assert topo.by_name("learner").env["OMP_NUM_THREADS"] == "2"
    assert topo.by_name("rollout-1").env["OMP_NUM_THREADS"] == "1"
    assert "OMP_NUM_THREADS" not in topo.by_name("diagnostics").env
