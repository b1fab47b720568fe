"""Every correction of docs/corrections.md trains through the real trainer and is computed by the real
diagnostics service, over gRPC (as the learner asks) and REST (as a user asks), on one real batch.

The batch is hand-made trajectory groups on a tiny random model (the rollout side is not under test):
the rollout logprobs are the trainer's own lp_pi plus FP8-like noise and a few far-off tokens.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch
from learner_support import learner_settings, make_group, tiny_model

from aisrl.core.ais import compute_coefficient
from aisrl.core.types import CORRECTION_STAT_FIELDS, CorrectionConfig
from aisrl.services.diagnostics.config import DiagnosticsSettings
from aisrl.services.diagnostics.main import start_diagnostics
from aisrl.services.learner.config import CORRECTION_SETTINGS
from aisrl.services.learner.diag_client import DiagnosticsClient
from aisrl.services.learner.groups import decode_group
from aisrl.services.learner.learner import Learner, load_trainer
from aisrl.services.learner.metrics import LearnerMetrics
from aisrl.services.learner.trainer import PreparedBatch
from tests.correction_cases import CORRECTION_CASES

pytestmark = pytest.mark.timeout(240)


def _settings(tmp_path, redis_url, model_dir, case: dict):
    return learner_settings(tmp_path, redis_url, model_dir, **{CORRECTION_SETTINGS[k]: v for k, v in case.items()})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def prepared(model_dir, tmp_path_factory) -> PreparedBatch:
    """One batch: lp_pi from the trainer, lp_mu = lp_pi + noise (10% of the tokens far off)."""
    trainer, _ = load_trainer(model_dir, learner_settings(tmp_path_factory.mktemp("p"), None, model_dir))
    groups = [decode_group(str(i), make_group("t", f"p{i}", 0, seed=40 + i)) for i in range(4)]
    batch = trainer.prepare(groups)
    rng = np.random.default_rng(7)
    noise = rng.normal(0.0, 0.1, batch.lp_pi.shape)
    far = rng.random(batch.lp_pi.shape) < 0.1
    noise[far] += rng.normal(0.0, 2.0, int(far.sum()))
    batch.lp_mu = np.minimum(batch.lp_pi + noise, 0.0).astype(np.float32).astype(np.float64)
    return batch


@pytest.mark.parametrize("name", list(CORRECTION_CASES))
async def test_correction_trains_and_is_computed_by_the_service(name, model_dir, prepared, tmp_path, redis_url):
    case = CORRECTION_CASES[name]
    settings = _settings(tmp_path, redis_url, model_dir, case)
    config = settings.correction_config()
    assert config == CorrectionConfig(**case)  # every learner setting reaches the core config
    local = compute_coefficient(prepared.arrays, config)
    kept = int(local.token_keep.sum())
    assert 0 < kept < prepared.n_tokens or (config.self_normalize and kept == prepared.n_tokens)  # masks bite

    diagnostics = await start_diagnostics(DiagnosticsSettings(http_port=0, grpc_port=0), redis_url)
    client = DiagnosticsClient(diagnostics.grpc_target, "t", config, 10.0, LearnerMetrics())
    try:
        coef = await client.coefficient(prepared.arrays, step=1, version=0, prev_ema=None)
        async with httpx.AsyncClient(base_url=diagnostics.http_url, timeout=30) as http:
            ragged = [prepared.arrays.lp_pi, prepared.arrays.lp_mu]
            starts = np.cumsum(prepared.lengths)[:-1]
            body = {
                "lp_pi": [x.tolist() for x in np.split(ragged[0], starts)],
                "lp_mu": [x.tolist() for x in np.split(ragged[1], starts)],
                "advantages": prepared.seq_advantages.tolist(),
                "config": config.model_dump(mode="json", exclude={"beta"}),
            }
            rest = (await http.post("/v1/coefficient", json=body)).json()
    finally:
        await client.close()
        await diagnostics.stop()
    assert not coef.computed_locally and coef.n_kept == int(local.token_keep.sum())
    np.testing.assert_allclose(coef.token_coef, local.token_coef, rtol=1e-12, atol=0)
    for field in ("alpha", "alpha_ais", "frac_masked", *CORRECTION_STAT_FIELDS):
        want = getattr(local.corrections, field, None) if field in CORRECTION_STAT_FIELDS else getattr(local, field)
        assert coef.record[field] == pytest.approx(want, rel=1e-9, abs=1e-12), ("grpc", field)
        assert rest[field] == pytest.approx(want, rel=1e-9, abs=1e-12), ("rest", field)

    trainer, _ = load_trainer(model_dir, settings)
    before_params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    before = trainer.batch_loss(prepared, coef.token_coef)
    stats = trainer.update(prepared, coef.token_coef)
    after = trainer.batch_loss(prepared, coef.token_coef)
    assert np.isfinite(stats.loss) and np.isfinite(stats.grad_norm) and stats.updates == 1
    assert after < before, (before, after)
    assert any(not torch.equal(p, before_params[n]) for n, p in trainer.model.named_parameters())


async def test_a_new_mask_removing_every_token_skips_the_step(tmp_path, redis_url, model_dir):
    """M2PO with threshold 0 masks every mismatched token: the step is skipped and counted, not a crash."""
    from learner_support import put_groups, toy_source

    settings = learner_settings(tmp_path, redis_url, model_dir, correction_m2po_threshold=0.0,
                                correction_mode="ais", batch_size=2)  # fmt: skip
    learner = Learner(settings, redis_url, task=object(), problem_source=toy_source)
    await learner.start()
    try:
        await put_groups(learner.client, learner.streams, [make_group("t", f"p{i}-a0", 0, 50 + i) for i in range(2)])
        record = await learner.step_once()
        assert record.skipped and record.version == 0 and learner.metrics.skipped_steps._value.get() == 1
        assert record.frac_masked == 1.0 and 0.0 <= record.alpha_ais <= 1.0
        assert record.diagnostics["frac_m2po"] == 1.0 and record.diagnostics["frac_kept"] == 0.0
    finally:
        await learner.close()
