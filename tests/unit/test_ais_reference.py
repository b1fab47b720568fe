"""compute_coefficient against a deliberately naive, per-token Python-loop reference of docs/ais.md.

The reference below is written from the formulas alone (lists of floats, `math`, one token at a
time, no numpy and nothing shared with aisrl.core.ais), so the vectorized, blocked implementation
is checked on random batches for every mode x level x cap x smoothing x masking combination.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest

import aisrl.core.ais as ais
from aisrl.core.ais import arrays_from_ragged, compute_coefficient
from aisrl.core.types import CorrectionConfig, CorrectionMode, WeightLevel

CLAMP = 20.0


def _clamp(x: float) -> float:
    return max(-CLAMP, min(CLAMP, x))


def _stats(x: list[float], adv: list[float]) -> dict[str, float]:
    n = len(x)
    ess = sum(x) ** 2 / sum(v * v for v in x)
    if all(a == 0.0 for a in adv):
        var = 1.0
    else:
        var = sum((v * a) ** 2 for v, a in zip(x, adv, strict=True)) / sum(a * a for a in adv)
    return {
        "reliability": ess / n,
        "ess": ess,
        "variance_amplification": var,
        "penalty": min(1.0, 1.0 / var),
        "weight_mean": sum(x) / n,
        "weight_min": min(x),
        "weight_max": max(x),
    }


def reference(lp_pi: list[list[float]], lp_mu: list[list[float]], adv: list[float], cfg: CorrectionConfig, prev_ema):
    """Every reported quantity, token by token, straight from the formulas."""
    cap = cfg.cap
    deltas = [[_clamp(p - m) for p, m in zip(ps, ms, strict=True)] for ps, ms in zip(lp_pi, lp_mu, strict=True)]
    seq_w = [math.exp(_clamp(sum(ds))) for ds in deltas]
    carried: list[float] = []
    tok_adv: list[float] = []
    flat_delta: list[float] = []
    for s, ds in enumerate(deltas):
        for d in ds:
            flat_delta.append(d)
            tok_adv.append(adv[s])
            if cfg.level is WeightLevel.TOKEN:
                carried.append(math.exp(d))
            elif cfg.level is WeightLevel.SEQUENCE:
                carried.append(seq_w[s])
            else:
                carried.append(math.exp(sum(ds) / len(ds)))
    n = len(carried)
    applied_w = [min(w, cap) if cap is not None else w for w in carried]
    applied = _stats(applied_w, tok_adv)
    raw = _stats(carried, tok_adv)
    kl = sum(math.exp(d) - 1.0 - d for d in flat_delta) / n
    severity = 1.0 - math.exp(-kl / cfg.tau_kl)
    alpha_raw = severity * applied["reliability"] * applied["penalty"]
    alpha_ema = alpha_raw if prev_ema is None else cfg.beta * prev_ema + (1.0 - cfg.beta) * alpha_raw
    alpha_ais = min(max(alpha_ema, cfg.alpha_min), cfg.alpha_max)
    alpha = {
        CorrectionMode.NONE: 0.0,
        CorrectionMode.TIS: 1.0,
        CorrectionMode.MIS: 1.0,
        CorrectionMode.FIXED: cfg.fixed_alpha,
        CorrectionMode.AIS: alpha_ais,
    }[cfg.mode]

    keep: list[bool] = []
    vetoed = opsm = 0
    i = 0
    for s, ds in enumerate(deltas):
        seq_keep = True
        if cfg.veto_threshold is not None and any(math.exp(d) < cfg.veto_threshold for d in ds):
            seq_keep = False
            vetoed += len(ds)
        if cfg.opsm_kl_threshold is not None and adv[s] < 0 and sum(-d for d in ds) / len(ds) > cfg.opsm_kl_threshold:
            seq_keep = False
            opsm += len(ds)
        for _ in ds:
            token_keep = seq_keep
            lo_w, hi_w = (0.0, math.inf) if cap is None else (1.0 / cap, cap)
            if cfg.mode is CorrectionMode.MIS and not lo_w <= carried[i] <= hi_w:
                token_keep = False  # at sequence levels every token of s carries the same w_s
            keep.append(token_keep)
            i += 1
    coef = [(1.0 - alpha) + alpha * wt if k else 0.0 for wt, k in zip(applied_w, keep, strict=True)]
    chi2_token = sum(math.exp(d) ** 2 for d in flat_delta) / n - 1.0
    return {
        "n_tokens": n,
        "n_sequences": len(lp_pi),
        "alpha": alpha,
        "alpha_raw": alpha_raw,
        "alpha_ema": alpha_ema,
        "alpha_ais": alpha_ais,
        "kl": kl,
        "severity": severity,
        "applied": applied,
        "raw": raw,
        "kl_k1": sum(-d for d in flat_delta) / n,
        "chi2_token": chi2_token,
        "chi2_sequence": sum(w * w for w in seq_w) / len(seq_w) - 1.0,
        "ppl_ratio": math.exp(sum(-d for d in flat_delta) / n),
        "frac_truncated": sum(w > cap for w in carried) / n if cap is not None else 0.0,
        "frac_masked": keep.count(False) / n,
        "frac_vetoed": vetoed / n,
        "frac_opsm": opsm / n,
        "warnings": {
            "ESS/N": applied["reliability"] < 0.3,
            "mean weight": not 0.5 <= raw["weight_mean"] <= 2.0,
            "kl": abs(kl) > 0.1,
            "chi2_token": chi2_token > 1.0,
        },
        "token_coef": coef,
        "token_keep": keep,
    }


def random_ragged(seed: int, mismatch: float):
    """A small ragged batch: FP8-like noise, a few far-off tokens, one long drifting sequence."""
    rng = np.random.default_rng(seed)
    n_seq = int(rng.integers(2, 9))
    lengths = rng.integers(1, 30, size=n_seq)
    lengths[0] = 400  # long: its summed log-ratio exceeds the clamp
    lp_pi, lp_mu = [], []
    for s, k in enumerate(lengths):
        pi = -rng.gamma(0.6, 1.5, size=k)
        noise = rng.normal(0.0, mismatch, size=k)
        if s == 0:
            noise += 0.08  # sum of deltas ~ -32: the sequence weight hits the clamp
        else:
            far = rng.random(k) < 0.1
            noise[far] += rng.normal(0.0, 4.0, size=int(far.sum()))  # a few tokens far apart
        mu = np.minimum(pi + noise, 0.0)
        if s == 1 and seed % 3 == 0:  # log-ratios beyond the clamp, both ways
            pi[0], mu[0] = -0.1, -45.0
            if k > 1:
                pi[1], mu[1] = -40.0, -0.01
        lp_pi.append(pi.tolist())
        lp_mu.append(mu.tolist())
    rewards = rng.integers(0, 2, size=n_seq).astype(float)
    rewards[:2] = (seed % 2, 1.0)  # on even seeds the long, off-policy sequence has A < 0 (opsm drops it)
    adv = ((rewards - rewards.mean()) / (rewards.std() + 1e-6)).tolist()
    if seed % 5 == 0:
        adv = [0.0] * n_seq
    return lp_pi, lp_mu, adv


SMOOTHING = [  # (beta, prev_ema, alpha_min, alpha_max, tau_kl)
    (0.0, None, 0.0, 1.0, 1e-3),
    (0.9, 0.3, 0.1, 0.8, 3e-2),
    (0.5, None, 0.0, 0.6, 1.0),
]
MASKS = [(None, None), (0.3, 0.02)]  # (veto_threshold, opsm_kl_threshold)


def assert_matches(got, want) -> None:
    scalars = ("alpha", "alpha_raw", "alpha_ema", "alpha_ais", "kl", "severity", "kl_k1", "chi2_token",
               "chi2_sequence", "ppl_ratio", "frac_truncated", "frac_masked", "frac_vetoed", "frac_opsm")  # fmt: skip
    for name in scalars:
        assert getattr(got, name) == pytest.approx(want[name], rel=1e-9, abs=1e-12), name
    assert got.n_tokens == want["n_tokens"] and got.n_sequences == want["n_sequences"]
    for which in ("applied", "raw"):
        stats = getattr(got, which)
        for name, value in want[which].items():
            assert getattr(stats, name) == pytest.approx(value, rel=1e-9, abs=1e-12), f"{which}.{name}"
    assert got.reliability == got.applied.reliability and got.penalty == got.applied.penalty
    for prefix, crossed in want["warnings"].items():
        assert any(w.startswith(prefix) for w in got.warnings) == crossed, (prefix, got.warnings)
    assert len(got.warnings) == sum(want["warnings"].values())
    np.testing.assert_array_equal(got.token_keep, want["token_keep"])
    np.testing.assert_allclose(got.token_coef, want["token_coef"], rtol=1e-12, atol=0)
    assert got.token_coef.dtype == np.float64 and got.token_keep.dtype == bool


MODE_CAPS = [(m, c) for m in CorrectionMode for c in (None, 1.5, 2.0, 5.0)]


@pytest.mark.parametrize("masks", MASKS, ids=["no-masks", "veto+opsm"])
@pytest.mark.parametrize("smoothing", SMOOTHING, ids=["per-batch", "ema", "ema-first"])
@pytest.mark.parametrize("level", list(WeightLevel))
@pytest.mark.parametrize(("mode", "cap"), MODE_CAPS)
def test_matches_naive_reference(mode, level, cap, smoothing, masks):
    beta, prev_ema, alpha_min, alpha_max, tau_kl = smoothing
    veto, opsm = masks
    config = CorrectionConfig(mode=mode, level=level, cap=cap, beta=beta, alpha_min=alpha_min, alpha_max=alpha_max,
                              tau_kl=tau_kl, fixed_alpha=0.35, veto_threshold=veto, opsm_kl_threshold=opsm)  # fmt: skip
    seed = zlib.crc32(f"{mode}{level}{cap}{smoothing}{masks}".encode())
    for mismatch in (0.05, 0.5):
        lp_pi, lp_mu, adv = random_ragged(seed, mismatch)
        got = compute_coefficient(arrays_from_ragged(lp_pi, lp_mu, adv), config, prev_ema)
        assert_matches(got, reference(lp_pi, lp_mu, adv, config, prev_ema))


@pytest.mark.parametrize("block", [1, 3, 64])
@pytest.mark.parametrize("level", list(WeightLevel))
def test_blocking_does_not_change_results(monkeypatch, block, level):
    """The blocked sweep (blocks of whole sequences; a long sequence makes its own block) gives the
    reference's numbers whatever the block size."""
    lp_pi, lp_mu, adv = random_ragged(seed=11 + block, mismatch=0.5)
    for mode, cap in ((CorrectionMode.AIS, 2.0), (CorrectionMode.MIS, 1.5), (CorrectionMode.TIS, None)):
        config = CorrectionConfig(mode=mode, level=level, cap=cap, tau_kl=0.05, veto_threshold=0.2,
                                  opsm_kl_threshold=0.01)  # fmt: skip
        want = reference(lp_pi, lp_mu, adv, config, None)
        monkeypatch.setattr(ais, "_BLOCK_TOKENS", block)
        assert_matches(compute_coefficient(arrays_from_ragged(lp_pi, lp_mu, adv), config), want)


def test_mis_without_cap_masks_nothing_and_cap_below_one_masks_everything():
    lp_pi, lp_mu, adv = random_ragged(seed=5, mismatch=0.5)
    arrays = arrays_from_ragged(lp_pi, lp_mu, adv)
    for level in WeightLevel:
        uncapped = compute_coefficient(arrays, CorrectionConfig(mode=CorrectionMode.MIS, level=level, cap=None))
        assert uncapped.token_keep.all() and uncapped.frac_masked == 0.0
        tight = compute_coefficient(arrays, CorrectionConfig(mode=CorrectionMode.MIS, level=level, cap=0.5))
        assert not tight.token_keep.any() and tight.frac_masked == 1.0
