"""Test doubles for the rollout worker tests, and a script entry to run a replica in a child process.

What is real and what is not: Redis, gRPC, HTTP and the worker are real. The engine here is a
small deterministic FAKE (no model): the worker tests are about stream semantics (ack, reclaim,
dead letters, backpressure, versions), which do not depend on what the model says; the real
vLLM engine runs in test_rollout_worker.py::test_worker_with_real_vllm_engine. The "echo" task
is a stand-in with the `aisrl.tasks` interface (Problem, problem_from_json, get_task, verify).

`python rollout_support.py SETTINGS_JSON ENGINE_JSON` runs `aisrl.services.rollout.main.serve`
with the fake engine, for the kill and SIGTERM drills (engine options `load_gate_file` and
`load_spawns_child` make its start-up slow, for the drills of a stop during start-up).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import torch

from aisrl.services.rollout.engine import Completion, RolloutEngine, SamplingConfig, make_completion
from aisrl.v1 import rollout_pb2, weights_pb2, weights_pb2_grpc
from aisrl.wire.weights import iter_weight_chunks, weights_digest

# ----------------------------------------------------------------------------- a stand-in task


@dataclass(frozen=True)
class EchoProblem:
    task: str
    uid: str
    prompt: str
    reference: str
    data: dict = field(default_factory=dict)


def echo_problem_json(uid: str, reference: str, marker: str = "") -> str:
    """A problem whose prompt asks to repeat `reference`; marker steers the fake engine (NAN, MISSING)."""
    return json.dumps({"task": "echo", "uid": uid, "prompt": f"echo{marker}:{reference}", "reference": reference})


def parse_echo_problem(text: str) -> EchoProblem:
    try:
        raw = json.loads(text)
        return EchoProblem(raw["task"], raw["uid"], raw["prompt"], raw["reference"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"bad problem JSON: {exc!r}") from None


class EchoTask:
    def verify(self, problem: EchoProblem, completion_text: str) -> float:
        if problem.reference == "boom":
            raise RuntimeError("verifier exploded")
        return 1.0 if completion_text.split("\n", 1)[0] == problem.reference else 0.0


def get_echo_task(name: str) -> EchoTask:
    if name != "echo":
        raise KeyError(f"no task named {name!r}")
    return EchoTask()


def prompt_job(job_id: str, reference: str = "ab", *, run_id: str = "run-1", marker: str = "", **fields) -> bytes:
    values = dict(
        run_id=run_id, job_id=job_id, task="echo", problem_json=echo_problem_json(f"u-{job_id}", reference, marker),
        group_size=4, max_tokens=8, temperature=1.0, seed=7, created_unix=time.time(),
    )  # fmt: skip
    values.update(fields)
    return rollout_pb2.PromptJob(**values).SerializeToString()


# ----------------------------------------------------------------------------- a fake engine


@dataclass(frozen=True)
class RawCompletion:
    """Completion-shaped, without Completion's validation: an engine that returns broken logprobs."""

    prompt_token_ids: np.ndarray
    token_ids: np.ndarray
    logprobs: np.ndarray
    text: str
    finish_reason: str

    @property
    def answer(self) -> str:
        return self.text.split("\n", 1)[0]


class FakeEngine(RolloutEngine):
    """Deterministic: even completions answer the echo prompt right, odd ones wrong.

    Prompts with "NAN" make the whole call raise RolloutLogprobError (as make_completion does for a
    real engine); "MISSING" returns completions with fewer logprobs than tokens, unvalidated;
    "CRASH" makes the call raise RuntimeError (not a job error: the engine failing on that prompt).
    `gate` (a threading.Event) holds generate until set; `gate_file` holds it until the file exists.
    Loading a directory named in `break_on` fails part-way and leaves the engine broken (mixed
    weights, as VllmEngine after a failed reload): it refuses to generate until a load succeeds.
    """

    def __init__(
        self,
        precision: str = "fp8",
        emulated: bool = True,
        gate: threading.Event | None = None,
        gate_file: str | None = None,
        on_generate: str | None = None,
        delay_s: float = 0.0,
        model_dir: str | Path = ".",
        break_on: set[str] | None = None,
    ) -> None:
        self.precision = precision  # type: ignore[assignment]
        self.scheme = "fp8_w8" if precision == "fp8" else precision
        self.emulated = emulated and precision != "bf16"
        self.kv_cache_dtype = "auto"
        self.lm_head_quantized = False
        self.model_dir = Path(model_dir)
        self.break_on = set(break_on or ())
        self.attempts: list[Path] = []  # every load_weights call, failed or not
        self._broken: str | None = None
        self.gate = gate
        self.gate_file = gate_file
        self.on_generate = on_generate  # printed (with the prompt count) when generate starts
        self.delay_s = delay_s
        self.entered = threading.Event()
        self.calls: list[tuple[list[str], SamplingConfig]] = []
        self.loads: list[Path] = []
        self.loaded_state: dict[str, torch.Tensor] | None = None
        self.closed = False

    def generate(self, prompts: Sequence[str], sampling: SamplingConfig) -> list[list[Completion]]:
        if self._broken:
            raise RuntimeError(f"the fake engine is broken: {self._broken}")
        self.calls.append((list(prompts), sampling))
        self.entered.set()
        if self.on_generate:
            print(f"{self.on_generate} {len(prompts)}", flush=True)
        if self.gate is not None:
            self.gate.wait()
        while self.gate_file and not Path(self.gate_file).exists():
            time.sleep(0.01)
        time.sleep(self.delay_s)
        if any("CRASH" in p.partition(":")[0] for p in prompts):
            raise RuntimeError("the fake engine crashed on a prompt")
        return [self._group(p, sampling) for p in prompts]

    def _group(self, prompt: str, sampling: SamplingConfig) -> list:
        head, _, answer = prompt.partition(":")
        out = []
        for i in range(sampling.n):
            text = (answer if i % 2 == 0 else answer + "?")[: sampling.max_tokens - 1] + "\n"
            ids = [ord(c) for c in text]
            logprobs = [-0.1 * (k + 1) for k in range(len(ids))]
            if "NAN" in head:
                logprobs[0] = float("nan")
            if "MISSING" in head:
                out.append(RawCompletion(np.array([1, 2], np.int32), np.array(ids, np.int32),
                                         np.array(logprobs[:-1], np.float32), text, "stop"))  # fmt: skip
                continue
            out.append(make_completion([1, *(ord(c) for c in prompt)], ids, logprobs, text, "stop"))
        return out

    def load_weights(self, model_dir: str | Path) -> float:
        from safetensors.torch import load_file

        self.attempts.append(Path(model_dir))
        if Path(model_dir).name in self.break_on:
            self._broken = f"loading {model_dir} failed part-way"
            raise RuntimeError(self._broken)
        self.loaded_state = load_file(str(Path(model_dir) / "model.safetensors"))
        self.loads.append(Path(model_dir))
        self._broken = None
        return 0.001

    @property
    def broken(self) -> str | None:
        return self._broken

    def close(self) -> None:
        self.closed = True


# ----------------------------------------------------------------------------- a test-only Weights server


class WeightsTestServer(weights_pb2_grpc.WeightsServicer):
    """A real grpc.aio Weights server on an ephemeral port, serving chunks from aisrl.wire.weights.

    Versions listed in `corrupt` are served with one payload byte flipped (their checksum no
    longer matches); the learner's production server comes later and reuses the same wire module.
    """

    def __init__(self) -> None:
        self.versions: dict[int, dict[str, torch.Tensor]] = {}
        self.corrupt: set[int] = set()
        self.fetches: list[int] = []
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self) -> WeightsTestServer:
        self.server = grpc.aio.server()
        weights_pb2_grpc.add_WeightsServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return self

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(grace=0)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def notice(self, run_id: str, version: int) -> bytes:
        digest = weights_digest(self.versions[version])
        return weights_pb2.WeightVersionNotice(
            run_id=run_id, version=version, step=version, endpoint=self.endpoint, sha256=digest.sha256,
            total_bytes=digest.total_bytes, num_tensors=digest.num_tensors, created_unix=time.time(),
        ).SerializeToString()  # fmt: skip

    async def Fetch(self, request, context):  # the gRPC method's name
        self.fetches.append(request.version)
        state = self.versions.get(request.version)
        if state is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no version {request.version}")
        for i, chunk in enumerate(iter_weight_chunks(state, request.version, request.max_chunk_bytes)):
            if request.version in self.corrupt and i == 0 and chunk.data:
                chunk.data = bytes([chunk.data[0] ^ 0xFF]) + chunk.data[1:]
            yield chunk


def tiny_state(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(16, 8, generator=gen).to(torch.bfloat16),
        "model.norm.weight": torch.rand(8, generator=gen),
    }


def write_base_model(path: Path) -> Path:
    """A stand-in checkpoint directory: config and tokenizer files (copied next to fetched weights)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text('{"model_type": "llama"}\n')
    (path / "tokenizer.json").write_text("{}\n")
    (path / "model.safetensors").write_bytes(b"not copied")
    return path


# ----------------------------------------------------------------------------- child-process entry


def _main() -> None:
    from aisrl.logs import configure_logging
    from aisrl.services.rollout.config import RolloutSettings
    from aisrl.services.rollout.main import exit_abandoning_load, serve

    settings = RolloutSettings(**json.loads(sys.argv[1]))
    engine_options = json.loads(sys.argv[2])
    # A slow start-up: the load waits for this file (and first starts a child process, as vLLM its engine core).
    load_gate_file = engine_options.pop("load_gate_file", None)
    load_spawns_child = engine_options.pop("load_spawns_child", False)
    configure_logging("INFO")
    model_dir = write_base_model(Path(settings.work_dir) / "base")
    settings = settings.model_copy(update={"model_path": str(model_dir)})

    def engine_factory(_model_dir: Path, _work_dir: Path) -> FakeEngine:
        if load_spawns_child:
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
            print(f"LOADING {child.pid}", flush=True)
        while load_gate_file and not Path(load_gate_file).exists():
            time.sleep(0.01)
        return FakeEngine(**engine_options)

    finished = asyncio.run(
        serve(settings, settings.redis_url, engine_factory=engine_factory, tasks=get_echo_task,
              parse_problem=parse_echo_problem)
    )  # fmt: skip
    if not finished:  # stopped during start-up, as `aisrl rollout` (main.run) ends then
        exit_abandoning_load(0)


if __name__ == "__main__":
    _main()


def read_until(proc: subprocess.Popen, marker: str, max_lines: int) -> str:
    """The first line of proc's output that starts with marker; AssertionError with what it printed otherwise."""
    seen = []
    for _ in range(max_lines):
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if line.startswith(marker):
            return line
    raise AssertionError(f"child never printed {marker!r}:\n" + "".join(seen))
