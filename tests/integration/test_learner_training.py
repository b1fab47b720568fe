"""A learner step end to end on a tiny random model: real Redis, the real diagnostics service over gRPC.

Trajectory groups are hand-made (the rollout side is not under test): their completions are random,
their rollout logprobs are the learner's own logprobs plus noise, a realistic FP8-like mismatch.
"""

from __future__ import annotations

import asyncio
import socket

import grpc
import httpx
import numpy as np
import pytest
import torch
from learner_support import ToyTask, learner_settings, make_group, put_groups, tiny_model, toy_source

from aisrl.core.ais import compute_coefficient
from aisrl.redis_conn import free_port
from aisrl.services.diagnostics.config import DiagnosticsSettings
from aisrl.services.diagnostics.history import History
from aisrl.services.diagnostics.main import start_diagnostics
from aisrl.services.learner.groups import decode_group
from aisrl.services.learner.learner import Learner
from aisrl.services.learner.trainer import token_coefficients
from aisrl.v1 import diagnostics_pb2, diagnostics_pb2_grpc

pytestmark = pytest.mark.timeout(240)


async def _start_diagnostics(redis_url, grpc_port=0):
    return await start_diagnostics(
        DiagnosticsSettings(http_port=0, grpc_port=grpc_port, redis_url=redis_url), redis_url
    )


async def _learner(tmp_path, redis_url, task=None, **overrides) -> Learner:
    model = tiny_model(tmp_path / "model")
    learner = Learner(learner_settings(tmp_path, redis_url, model, **overrides), redis_url, task=task or object(),
                      problem_source=toy_source)  # fmt: skip
    await learner.start()
    return learner


def _mismatched_groups(learner: Learner, n: int, seed: int, noise: float = 0.05):
    """Groups whose rollout logprobs are the learner's lp_pi plus Gaussian noise (kept <= 0)."""
    rng = np.random.default_rng(seed)
    drafts = [make_group("t", f"p{i}-a0", 0, seed + i) for i in range(n)]
    prepared = learner.trainer.prepare([decode_group(str(i), g) for i, g in enumerate(drafts)])
    lp = np.minimum(prepared.lp_pi + rng.normal(0.0, noise, prepared.lp_pi.shape), 0.0)
    out, k = [], 0
    for i, draft in enumerate(drafts):
        comps, lps = [], []
        for s in draft.samples:
            ids = np.frombuffer(s.completion_ids, dtype="<i4")
            comps.append(ids)
            lps.append(lp[k : k + len(ids)])
            k += len(ids)
        out.append(make_group("t", f"p{i}-a0", 0, seed + i, lp_mu=lps, completions=comps))
    return out


async def test_step_uses_the_services_alpha_mixed_gradient_and_lowers_the_loss(tmp_path, redis_url):
    diagnostics = await _start_diagnostics(redis_url)
    learner = await _learner(tmp_path, redis_url, diagnostics_target=diagnostics.grpc_target, batch_size=4)
    try:
        groups = _mismatched_groups(learner, 4, seed=10)
        await put_groups(learner.client, learner.streams, groups)
        prepared = learner.trainer.prepare([decode_group(str(i), g) for i, g in enumerate(groups)])
        coef = await learner.diagnostics.coefficient(prepared.arrays, step=1, version=0, prev_ema=None)
        assert not coef.computed_locally and 0.05 < coef.alpha < 0.95, coef.alpha

        # The gradient the trainer uses is exactly (1 - alpha) g_PG + alpha g_IS (docs/ais.md).
        config = learner.settings.correction_config()
        keep = compute_coefficient(prepared.arrays, config).token_keep
        g_mix = learner.trainer.gradient(prepared, coef.token_coef)
        g_pg = learner.trainer.gradient(prepared, token_coefficients(prepared.arrays, config, 0.0, keep))
        g_is = learner.trainer.gradient(prepared, token_coefficients(prepared.arrays, config, 1.0, keep))
        assert not torch.allclose(g_pg["lm_head.weight"], g_is["lm_head.weight"], rtol=1e-3, atol=0)
        for name, g in g_mix.items():
            torch.testing.assert_close(g, (1 - coef.alpha) * g_pg[name] + coef.alpha * g_is[name], rtol=1e-4, atol=1e-7)

        before = learner.trainer.batch_loss(prepared, coef.token_coef)
        record = await learner.step_once()
        after = learner.trainer.batch_loss(prepared, coef.token_coef)
        assert after < before - 1e-4, (before, after)
        assert record.alpha == pytest.approx(coef.alpha) and not record.computed_locally
        assert (record.step, record.version, record.skipped) == (1, 1, False)
        # The service recorded the step under the run (the learner asked it, not a fake).
        async with grpc.aio.insecure_channel(diagnostics.grpc_target) as channel:
            latest = await diagnostics_pb2_grpc.DiagnosticsStub(channel).GetLatest(
                diagnostics_pb2.GetLatestRequest(run_id="t"), timeout=5
            )
        assert latest.step == 1 and latest.alpha == pytest.approx(record.alpha)
    finally:
        await learner.close()
        await diagnostics.stop()


async def test_diagnostics_timeout_falls_back_locally_and_resumes_with_the_service(tmp_path, redis_url):
    port = free_port()
    hung = socket.socket()  # accepts TCP connections but never speaks gRPC: every call hits its deadline
    hung.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    hung.bind(("127.0.0.1", port))
    hung.listen(16)
    learner = await _learner(tmp_path, redis_url, diagnostics_target=f"127.0.0.1:{port}", diagnostics_timeout_s=0.3,
                             batch_size=2)  # fmt: skip
    diagnostics = None
    try:
        groups = _mismatched_groups(learner, 4, seed=20)
        await put_groups(learner.client, learner.streams, groups)
        prepared = learner.trainer.prepare([decode_group(str(i), g) for i, g in enumerate(groups[:2])])
        expected = compute_coefficient(prepared.arrays, learner.settings.correction_config())
        first = await learner.step_once()
        assert first.computed_locally and first.diagnostics["computed_locally"] is True
        assert first.alpha == pytest.approx(expected.alpha, rel=1e-9)  # the same core, locally
        local = learner.metrics.local_alpha.labels(reason="deadline_exceeded")
        assert local._value.get() == 1

        hung.close()
        diagnostics = await _start_diagnostics(redis_url, grpc_port=port)
        second = await learner.step_once()
        assert not second.computed_locally and second.diagnostics["computed_locally"] is False
        assert local._value.get() == 1  # the service answers again: no more local steps
        # The step computed locally while the service was away is in its history now, marked local.
        history = History(learner.client)
        step1, step2 = await history.get("t", first.step), await history.get("t", second.step)
        assert step1["computed_locally"] is True and step1["alpha"] == first.alpha
        assert step2["computed_locally"] is False and step1["config"]["mode"] == step2["config"]["mode"]
    finally:
        hung.close()
        await learner.close()
        if diagnostics is not None:
            await diagnostics.stop()


async def test_the_learner_sends_its_reward_and_held_out_accuracy_to_the_service(tmp_path, redis_url):
    """Reward with every batch; an evaluation (run after step 2) with the next batch, recorded by the service,
    and re-sent when the service missed a step (the learner then computed alpha locally)."""
    diagnostics = await _start_diagnostics(redis_url)
    learner = await _learner(tmp_path, redis_url, task=ToyTask(), diagnostics_target=diagnostics.grpc_target,
                             batch_size=2, max_staleness=4, eval_every=2, eval_size=3, eval_samples=2)  # fmt: skip
    try:
        await put_groups(learner.client, learner.streams, _mismatched_groups(learner, 8, seed=40))
        records = [await learner.step_once() for _ in range(2)]
        evaluation = learner.last_eval
        assert evaluation is not None and learner.unsent_eval == (2, evaluation)
        port = diagnostics.grpc_port
        await diagnostics.stop()  # the service is down: step 3 is computed locally
        records.append(await learner.step_once())
        assert records[2].computed_locally and learner.unsent_eval == (2, evaluation)  # kept for the next batch
        diagnostics = await _start_diagnostics(redis_url, grpc_port=port)  # the same history (Redis)
        records.append(await learner.step_once())
        assert not records[3].computed_locally and learner.unsent_eval == (4, learner.last_eval)  # step 4's own

        async with httpx.AsyncClient(base_url=diagnostics.http_url, timeout=10) as http:
            batches = {b["step"]: b for b in (await http.get("/v1/runs/t/batches")).json()["batches"]}
        # step 3 reached the service only as the learner's local record, sent once it answered again
        # (LocalRecord carries the coefficient, not the reward: its reward point is missing)
        assert sorted(batches) == [1, 2, 3, 4] and batches[3]["computed_locally"] is True
        assert batches[3]["reward_mean"] is None
        for record in records:
            if record.step != 3:
                assert batches[record.step]["reward_mean"] == pytest.approx(record.reward_mean, rel=1e-12)
        assert [batches[s]["eval_step"] for s in (1, 2)] == [None, None]
        assert batches[4]["eval_step"] == 2
        assert batches[4]["accuracy_greedy"] == evaluation.greedy_accuracy
        assert batches[4]["accuracy_sampled"] == evaluation.sampled_accuracy is not None
    finally:
        await learner.close()
        await diagnostics.stop()


async def test_every_token_masked_skips_the_step(tmp_path, redis_url):
    """mis with a cap just above 1 and a large mismatch masks every token: skipped, counted, no new version."""
    learner = await _learner(tmp_path, redis_url, correction_mode="mis", correction_cap=1.0001, batch_size=2)
    try:
        await put_groups(learner.client, learner.streams, _mismatched_groups(learner, 2, seed=30, noise=0.5))
        record = await learner.step_once()
        assert record.skipped and record.version == 0 and learner.metrics.skipped_steps._value.get() == 1
        assert record.step == 1 and len(learner.used_unacked) == 2  # consumed: acked at the next checkpoint
    finally:
        await learner.close()


async def test_prepare_is_pure_and_at_the_rollout_temperature(tmp_path, redis_url):
    learner = await _learner(tmp_path, redis_url, temperature=0.5)
    try:
        groups = [decode_group(str(i), g) for i, g in enumerate(_mismatched_groups(learner, 2, seed=40))]
        params = [p.detach().clone() for p in learner.trainer.model.parameters()]
        a = await asyncio.to_thread(learner.trainer.prepare, groups)
        assert all(torch.equal(p, q) for p, q in zip(params, learner.trainer.model.parameters(), strict=True))
        row = a.input_ids[0, : a.row_lengths[0]].unsqueeze(0)
        with torch.no_grad():
            logits = learner.trainer.model(input_ids=row).logits[0].float() / 0.5
        lp = torch.log_softmax(logits[:-1], -1).gather(-1, row[0, 1:].unsqueeze(-1)).squeeze(-1)
        np.testing.assert_allclose(a.lp_pi[: a.lengths[0]], lp[-a.lengths[0] :].numpy(), rtol=1e-5, atol=1e-5)
    finally:
        await learner.close()
