"""`aisrl model mismatch` parts: the batched learner scoring equals one unpadded forward pass per
completion, the statistics follow their definitions, and the run list is validated."""

from __future__ import annotations

import numpy as np
import pytest

from aisrl.models.config import MismatchSettings
from aisrl.models.mismatch import learner_logprobs, mismatch_stats, table
from aisrl.models.tiny import TinyModelConfig, create_model
from aisrl.services.rollout.engine import make_completion
from tests.logprob_reference import forward_logprobs


def test_batched_scoring_equals_unpadded_forward():
    model = create_model(TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)).eval()
    rng = np.random.default_rng(0)
    shapes = [(3, 5), (9, 1), (5, 12), (1, 4)]  # (prompt, completion) lengths
    ids = [(rng.integers(4, 60, size=p).tolist(), rng.integers(4, 60, size=n).tolist()) for p, n in shapes]
    completions = [make_completion(p, c, [-1.0] * len(c), "", "length") for p, c in ids]
    batched = learner_logprobs(model, completions, temperature=0.7, batch=3)  # two batches, ragged widths
    for c, lp in zip(completions, batched, strict=True):
        np.testing.assert_allclose(lp, forward_logprobs(model, c, 0.7), atol=2e-6)


def test_stats_follow_their_definitions():
    lp_mu = np.array([-1.0, -2.0, -0.5, -3.0, -1.0])
    d = np.array([0.0, 0.2, -0.05, 0.0, -0.3])
    stats = mismatch_stats(lp_mu + d, lp_mu, np.array([2, 3]))
    k3 = np.exp(d) - 1 - d
    assert stats["k3_mean"] == pytest.approx(k3.mean())
    assert stats["k3_p99"] == pytest.approx(np.quantile(k3, 0.99))
    assert stats["seq_log_ratio_std"] == pytest.approx(np.std([0.2, -0.35]))
    assert stats["frac_big"] == pytest.approx(2 / 5)
    assert mismatch_stats(lp_mu, lp_mu, np.array([5]))["k3_mean"] == 0.0


def test_runs_are_parsed_and_checked():
    settings = MismatchSettings(runs="bf16, nvfp4_w4a4+fp8_e5m2,fp8")
    assert settings.run_list() == [("bf16", "auto"), ("nvfp4_w4a4", "fp8_e5m2"), ("fp8", "auto")]
    with pytest.raises(ValueError, match="unknown precision 'fp4'"):
        MismatchSettings(runs="fp4")
    with pytest.raises(ValueError, match="unknown KV cache dtype 'int8'"):
        MismatchSettings(runs="bf16+int8")
    assert len(MismatchSettings().run_list()) == 12


def test_table_has_a_row_per_run():
    from aisrl.models.mismatch import MismatchRow

    row = MismatchRow("bf16", "BF16 / kv AUTO", 10, 100.0, 1e-5, 1e-4, 0.01, 0.0, 1.0, 0.01, 1.0, 0.01, 0.5)
    assert table([row, row], "t").row_count == 2
