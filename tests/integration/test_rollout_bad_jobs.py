"""Bad jobs against the real vLLM engine (CPU, in-process, tiny random model): each is dead-lettered
with vLLM's or the pre-check's reason, the worker keeps running, and the good jobs read in the same
batch are sampled and written, never dead-lettered with the culprit.

One engine serves the whole module (an engine start costs ~15 s). Its tokenizer has one token more
than the model's vocabulary (`<extra>`, id 100): the tokenizer/model mismatch that yields prompt
token ids outside the model. vLLM 0.32 checks token ids only for token-id prompts: a text prompt
tokenized to id 100 is sampled (observed), so the worker's pre-check is what refuses it.
"""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest
from rollout_support import get_echo_task, parse_echo_problem, prompt_job
from test_rollout_worker import (
    GROUP,
    KEYS,
    RUN,
    Running,
    dead_letters,
    groups_written,
    make_settings,
    pending,
    wait_until,
)

from aisrl import streams
from aisrl.services.rollout.engine import PromptRejected, RolloutEngine, SamplingConfig
from aisrl.services.rollout.metrics import RolloutMetrics
from aisrl.services.rollout.worker import RolloutWorker
from aisrl.v1 import rollout_pb2

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
MAX_MODEL_LEN = 128
EXTRA_TOKEN = "<extra>"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from tokenizers import Tokenizer

    from aisrl.models.tiny import TinyModelConfig, init_model_dir
    from aisrl.services.rollout.engine import EngineConfig
    from aisrl.services.rollout.vllm_engine import VllmEngine

    small = TinyModelConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128)
    model_dir = init_model_dir(tmp_path_factory.mktemp("bad-jobs") / "model", small, seed=0)
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    assert tok.add_tokens([EXTRA_TOKEN]) == 1
    tok.save(str(model_dir / "tokenizer.json"))
    config = EngineConfig(in_process=True, kv_cache_gb=0.25, max_model_len=MAX_MODEL_LEN, compute_dtype="float32")
    eng = VllmEngine(model_dir, config)
    assert eng.vocab_size == 100 and eng.max_model_len == MAX_MODEL_LEN
    yield eng
    eng.close()
    shutil.rmtree(model_dir, ignore_errors=True)


class WithoutPreCheck(RolloutEngine):
    """The real engine with the worker's prompt pre-check switched off: what vLLM itself refuses
    mid-batch must still cost only the culprit."""

    def __init__(self, engine) -> None:
        self._engine = engine
        for name in ("precision", "scheme", "emulated", "kv_cache_dtype", "lm_head_quantized", "model_dir"):
            setattr(self, name, getattr(engine, name))

    def check_prompt(self, prompt: str, max_tokens: int) -> None:
        return None

    def generate(self, prompts, sampling):
        return self._engine.generate(prompts, sampling)

    def load_weights(self, model_dir):
        return self._engine.load_weights(model_dir)

    @property
    def broken(self):
        return self._engine.broken


def raw_job(job_id: str, prompt: str, **fields) -> bytes:
    """A job whose prompt is exactly `prompt` (echo_problem_json always writes one)."""
    problem = json.dumps({"task": "echo", "uid": f"u-{job_id}", "prompt": prompt, "reference": "ab"})
    values = dict(run_id=RUN, job_id=job_id, task="echo", problem_json=problem, group_size=2, max_tokens=8,
                  temperature=1.0, seed=3)  # fmt: skip
    return rollout_pb2.PromptJob(**(values | fields)).SerializeToString()


def make_worker(client, engine, redis_url, **overrides) -> RolloutWorker:
    return RolloutWorker(
        client, engine, make_settings(redis_url, **overrides), RolloutMetrics(), tasks=get_echo_task,
        parse_problem=parse_echo_problem, model_id="tiny",
    )  # fmt: skip


async def run_batch(client, redis_url, engine, jobs: dict[str, bytes]):
    """Appends the jobs, lets one worker read them as one batch, and returns (ids, groups, dead letters)."""
    await streams.ensure_group(client, KEYS.prompts, GROUP)
    ids = {name: await streams.append(client, KEYS.prompts, payload) for name, payload in jobs.items()}
    worker = make_worker(client, engine, redis_url, batch_size=len(jobs))
    running = Running(worker)
    try:
        await wait_until(lambda: _resolved(client), timeout=120, what="every job written or dead-lettered")
    finally:
        await running.stop()
    assert not running.task.done() or running.task.exception() is None
    return ids, await groups_written(client), await dead_letters(client), worker


async def _resolved(client) -> bool:
    return (
        await client.xlen(KEYS.prompts) > 0
        and await pending(client) == 0
        and (len(await groups_written(client)) + len(await dead_letters(client)) == await client.xlen(KEYS.prompts))
    )


async def test_bad_prompts_and_sampling_are_dead_lettered_and_their_batch_is_sampled(client, redis_url, engine):
    long_prompt = "x" * 4 * MAX_MODEL_LEN  # the prompt alone is 4x the context
    jobs = {
        "good-1": prompt_job("good-1", group_size=2),
        "long": raw_job("long", long_prompt),
        "no-room": raw_job("no-room", "y" * (MAX_MODEL_LEN - 4)),  # fits, but not with max_tokens=8
        "empty": raw_job("empty", ""),
        "ids": raw_job("ids", f"echo:{EXTRA_TOKEN}ab"),
        "temperature": raw_job("temperature", "echo:ab", temperature=3.0),  # vLLM allows at most 2
        "good-2": prompt_job("good-2", group_size=2),
    }
    ids, groups, dead, worker = await run_batch(client, redis_url, engine, jobs)
    assert sorted(g.job_id for g in groups) == ["good-1", "good-2"]
    assert all(len(g.samples) == 2 for g in groups)
    reasons = {d.message_id: d.reason for d in dead}
    expected = {
        "long": "exceeds the model's maximum length of 128", "no-room": "with max_tokens=8 that exceeds",
        "empty": "the prompt is empty", "ids": "outside the model's vocabulary of 100",
        "temperature": "temperature",
    }  # fmt: skip
    assert len(reasons) == len(expected)
    for name, fragment in expected.items():
        assert fragment in reasons[ids[name]], (name, reasons[ids[name]])
    assert "vLLM refused the request" in reasons[ids["temperature"]]
    kinds = {s.labels["kind"]: s.value for m in worker.metrics.dead_lettered.collect() for s in m.samples
             if s.name.endswith("_total")}  # fmt: skip
    assert kinds == {"prompt": len(expected)}


async def test_what_vllm_refuses_mid_batch_costs_only_the_culprit(client, redis_url, engine):
    """Without the pre-check, vLLM raises VLLMValidationError (not a ValueError) for the whole batch."""
    with pytest.raises(PromptRejected, match=r"longer than the maximum model length|maximum context length"):
        await asyncio.to_thread(engine.generate, ["echo:ab", "z" * 300], SamplingConfig(n=2, max_tokens=4, seed=1))
    jobs = {
        "good-1": prompt_job("good-1", group_size=2),
        "long": raw_job("long", "z" * 300),
        "good-2": prompt_job("good-2", group_size=2),
    }
    ids, groups, dead, _ = await run_batch(client, redis_url, WithoutPreCheck(engine), jobs)
    assert sorted(g.job_id for g in groups) == ["good-1", "good-2"]
    reasons = {d.message_id: d.reason for d in dead}
    assert set(reasons) == {ids["long"]}
    assert "vLLM refused the request" in reasons[ids["long"]] and "prompt" in reasons[ids["long"]]
