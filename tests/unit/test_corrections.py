"""The composable corrections (IcePop, divergence rejection, M2PO, self-normalized IS, AIS with a mask)
against a naive per-token reference, their properties (hypothesis), their gradients and their validation.

The reference is written from docs/corrections.md alone: lists of floats, `math`, one token or one
sequence at a time, nothing shared with aisrl.core.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import aisrl.core.ais as ais
from aisrl.core.ais import arrays_from_ragged, compute_coefficient
from aisrl.core.corrections import m2po_keep, reject_drop
from aisrl.core.grpo import mixed_ppo_loss
from aisrl.core.types import CorrectionConfig, CorrectionMode, MismatchArrays, RejectRule, WeightLevel
from tests.correction_cases import CORRECTION_CASES
from tests.unit.test_ais_properties import batches
from tests.unit.test_ais_reference import random_ragged
from tests.unit.test_grpo import _grads, ppo_setting  # noqa: F401 (a fixture)

CLAMP = 20.0


def _div(d: float, estimator: str) -> float:
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d * d
    return math.exp(d) - 1.0 - d


def reference(lp_pi, lp_mu, adv, cfg: CorrectionConfig, alpha: float) -> dict:
    """Masks, loss coefficients and correction diagnostics, token by token."""
    deltas = [[max(-CLAMP, min(CLAMP, p - m)) for p, m in zip(ps, ms, strict=True)]
              for ps, ms in zip(lp_pi, lp_mu, strict=True)]  # fmt: skip
    flat = [d for ds in deltas for d in ds]
    n = len(flat)
    carried, seq_of = [], []
    for s, ds in enumerate(deltas):
        for d in ds:
            seq_of.append(s)
            if cfg.level is WeightLevel.TOKEN:
                carried.append(math.exp(d))
            elif cfg.level is WeightLevel.SEQUENCE:
                carried.append(math.exp(max(-CLAMP, min(CLAMP, sum(ds)))))
            else:
                carried.append(math.exp(sum(ds) / len(ds)))
    low, high, rejected, seq_drop = [False] * n, [False] * n, [False] * n, [False] * n
    for i, d in enumerate(flat):
        if cfg.mode is CorrectionMode.MIS and cfg.cap is not None:
            low[i] = low[i] or carried[i] < 1.0 / cfg.cap
            high[i] = high[i] or carried[i] > cfg.cap
        if cfg.mask_ratio_lo is not None and math.exp(d) < cfg.mask_ratio_lo:
            low[i] = True
        if cfg.mask_ratio_hi is not None and math.exp(d) > cfg.mask_ratio_hi:
            high[i] = True
    if cfg.reject_rule is not None:
        rule, t = cfg.reject_rule, cfg.reject_threshold
        est = rule.value[-2:]
        if rule.value.startswith("token"):
            for i, d in enumerate(flat):
                v = _div(d, est)
                rejected[i] = (abs(v) if est == "k1" else v) > t
        else:
            agg = rule.value.split("_")[1]
            for s, ds in enumerate(deltas):
                vals = [_div(d, est) for d in ds]
                v = {"sum": sum(vals), "mean": sum(vals) / len(vals), "max": max(vals)}[agg]
                if (abs(v) if est == "k1" else v) > t:
                    for i in range(n):
                        rejected[i] = rejected[i] or seq_of[i] == s
    for s, ds in enumerate(deltas):
        drop = cfg.veto_threshold is not None and any(math.exp(d) < cfg.veto_threshold for d in ds)
        drop = drop or (cfg.opsm_kl_threshold is not None and adv[s] < 0
                        and sum(-d for d in ds) / len(ds) > cfg.opsm_kl_threshold)  # fmt: skip
        for i in range(n):
            seq_drop[i] = seq_drop[i] or (drop and seq_of[i] == s)
    keep = [not (low[i] or high[i] or rejected[i] or seq_drop[i]) for i in range(n)]
    n_m2po = 0
    if cfg.m2po_threshold is not None:  # greedy: drop the largest delta^2 (the later token on ties)
        while any(keep):
            kept = [i for i in range(n) if keep[i]]
            if sum(flat[i] ** 2 for i in kept) / len(kept) <= cfg.m2po_threshold:
                break
            worst = max(kept, key=lambda i: (flat[i] ** 2, i))
            keep[worst] = False
            n_m2po += 1
    wt = [min(w, cfg.cap) if cfg.cap is not None else w for w in carried]
    if cfg.self_normalize and any(keep):
        if cfg.level is WeightLevel.TOKEN:
            mean = sum(w for w, k in zip(wt, keep, strict=True) if k) / keep.count(True)
        else:
            per_seq = {seq_of[i]: wt[i] for i in range(n) if keep[i]}
            mean = sum(per_seq.values()) / len(per_seq)
        wt = [w / mean for w in wt]
    kept_w = [w for w, k in zip(wt, keep, strict=True) if k]
    mean_w = sum(kept_w) / len(kept_w) if kept_w else 0.0
    seq_w = [math.exp(max(-CLAMP, min(CLAMP, sum(ds)))) for ds in deltas]
    return {
        "keep": keep,
        "coef": [(1.0 - alpha) + alpha * w if k else 0.0 for w, k in zip(wt, keep, strict=True)],
        "frac_mask_low": low.count(True) / n,
        "frac_mask_high": high.count(True) / n,
        "frac_rejected": rejected.count(True) / n,
        "frac_m2po": n_m2po / n,
        "frac_kept": keep.count(True) / n,
        "frac_masked": keep.count(False) / n,
        "loss_weight_mean": mean_w,
        "weight_std": math.sqrt(sum((w - mean_w) ** 2 for w in kept_w) / len(kept_w)) if kept_w else 0.0,
        "ess_sequence": sum(seq_w) ** 2 / sum(w * w for w in seq_w),
        "m2": sum(d * d for d in flat) / n,
    }


@pytest.mark.parametrize("mismatch", [0.05, 0.5])
@pytest.mark.parametrize("name", list(CORRECTION_CASES))
def test_matches_naive_reference(name, mismatch):
    config = CorrectionConfig(**CORRECTION_CASES[name])
    for seed in range(3):
        lp_pi, lp_mu, adv = random_ragged(zlib.crc32(f"{name}{mismatch}{seed}".encode()), mismatch)
        got = compute_coefficient(arrays_from_ragged(lp_pi, lp_mu, adv), config)
        want = reference(lp_pi, lp_mu, adv, config, got.alpha)
        np.testing.assert_array_equal(got.token_keep, want["keep"])
        np.testing.assert_allclose(got.token_coef, want["coef"], rtol=1e-12, atol=0)
        stats = got.corrections
        for key in ("frac_mask_low", "frac_mask_high", "frac_rejected", "frac_m2po", "frac_kept"):
            assert getattr(stats, key) == want[key], key
        assert got.frac_masked == pytest.approx(want["frac_masked"], abs=1e-15)
        for key in ("loss_weight_mean", "weight_std", "ess_sequence", "m2"):
            assert getattr(stats, key) == pytest.approx(want[key], rel=1e-9, abs=1e-12), key


@pytest.mark.parametrize("level", list(WeightLevel))
@pytest.mark.parametrize("mode", list(CorrectionMode))
def test_fast_path_diagnostics_match_the_reference(mode, level):
    """Without masks the blocked fast path reports the same correction diagnostics."""
    config = CorrectionConfig(mode=mode, level=level, cap=None if mode is CorrectionMode.MIS else 2.0)
    lp_pi, lp_mu, adv = random_ragged(zlib.crc32(f"{mode}{level}".encode()), 0.3)
    got = compute_coefficient(arrays_from_ragged(lp_pi, lp_mu, adv), config)
    want = reference(lp_pi, lp_mu, adv, config, got.alpha)
    for key in ("loss_weight_mean", "weight_std", "ess_sequence", "m2", "frac_kept"):
        assert getattr(got.corrections, key) == pytest.approx(want[key], rel=1e-7, abs=1e-9), key


# --- properties ----------------------------------------------------------------------------------

PROFILE = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
mask_configs = st.fixed_dictionaries(
    {
        "mask_ratio_lo": st.none() | st.floats(0.0, 1.0),
        "mask_ratio_hi": st.none() | st.floats(1.0001, 10.0),
        "reject": st.none() | st.tuples(st.sampled_from(RejectRule), st.floats(0.0, 3.0)),
        "m2po_threshold": st.none() | st.floats(0.0, 2.0),
        "self_normalize": st.booleans(),
        "mode": st.sampled_from(CorrectionMode),
        "level": st.sampled_from(WeightLevel),
    }
)


def _config(spec: dict) -> CorrectionConfig:
    rule = spec["reject"]
    return CorrectionConfig(
        mode=spec["mode"], level=spec["level"], mask_ratio_lo=spec["mask_ratio_lo"],
        mask_ratio_hi=spec["mask_ratio_hi"], reject_rule=rule[0] if rule else None,
        reject_threshold=rule[1] if rule else None, m2po_threshold=spec["m2po_threshold"],
        self_normalize=spec["self_normalize"], tau_kl=0.05,
    )  # fmt: skip


@PROFILE
@given(batch=batches(), spec=mask_configs)
def test_masks_only_remove_tokens_and_never_move_the_shadow_alpha(batch, spec):
    config = _config(spec)
    plain = compute_coefficient(batch, CorrectionConfig(mode=config.mode, level=config.level, tau_kl=0.05))
    got = compute_coefficient(batch, config)
    assert not (got.token_keep & ~plain.token_keep).any()
    assert (got.token_coef[~got.token_keep] == 0.0).all()
    for name in ("alpha", "alpha_ais", "alpha_raw", "kl", "reliability", "penalty"):
        assert getattr(got, name) == getattr(plain, name), name  # diagnostics see every token
    c = got.corrections
    assert c.frac_kept == pytest.approx(1.0 - got.frac_masked, abs=1e-15)
    assert all(0.0 <= v <= 1.0 for v in (c.frac_mask_low, c.frac_mask_high, c.frac_rejected, c.frac_m2po))
    assert all(math.isfinite(v) and v >= 0.0 for v in (c.weight_std, c.loss_weight_mean, c.ess_sequence, c.m2))
    assert c.ess_sequence <= got.n_sequences * (1 + 1e-12)


@PROFILE
@given(
    batch=batches(),
    spec=mask_configs,
    cap=st.none() | st.floats(0.5, 5.0),
    veto=st.none() | st.floats(1e-3, 1.0),
    opsm=st.none() | st.floats(0.0, 2.0),
)
def test_blocked_path_agrees_with_the_per_token_path(batch, spec, cap, veto, opsm):
    """mis, veto, opsm, IcePop (token level) and self-normalization run on the blocked path; forced onto the
    general per-token path (aisrl.core.corrections.apply_corrections) they give the same masks and weights."""
    spec = spec | {"reject": None, "m2po_threshold": None}
    config = _config(spec).model_copy(update={"cap": cap, "veto_threshold": veto, "opsm_kl_threshold": opsm})
    got = compute_coefficient(batch, config)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ais, "_needs_general_path", lambda _config: True)
        want = compute_coefficient(batch, config)
    np.testing.assert_array_equal(got.token_keep, want.token_keep)
    np.testing.assert_allclose(got.token_coef, want.token_coef, rtol=1e-12, atol=0)
    assert got.frac_masked == want.frac_masked and got.alpha == want.alpha
    for key in ("frac_mask_low", "frac_mask_high", "frac_kept", "ess_sequence", "m2"):
        assert getattr(got.corrections, key) == getattr(want.corrections, key), key
    mean = want.corrections.loss_weight_mean
    assert got.corrections.loss_weight_mean == pytest.approx(mean, rel=1e-12)
    # The blocked path's std comes from sums of x and x^2 (ais.py, numerical notes): cancellation costs up to
    # about sqrt(n * eps) of the weights' size, against the per-token path's two-pass std.
    assert got.corrections.weight_std == pytest.approx(want.corrections.weight_std, rel=1e-9, abs=1e-6 * mean)


@PROFILE
@given(batch=batches(), lo=st.floats(0.0, 1.0), hi=st.floats(1.0001, 10.0))
def test_icepop_keeps_exactly_the_ratios_inside_its_bounds(batch, lo, hi):
    got = compute_coefficient(batch, CorrectionConfig(mode="tis", cap=None, mask_ratio_lo=lo, mask_ratio_hi=hi))
    ratio = np.exp(np.clip(batch.lp_pi - batch.lp_mu, -CLAMP, CLAMP))
    np.testing.assert_array_equal(got.token_keep, (ratio >= lo) & (ratio <= hi))
    np.testing.assert_array_equal(got.token_coef, np.where(got.token_keep, ratio, 0.0))  # IcePop: M(k) = k inside
    assert got.corrections.frac_mask_low == np.mean(ratio < lo)
    assert got.corrections.frac_mask_high == np.mean(ratio > hi)


@PROFILE
@given(batch=batches(), tau=st.floats(0.0, 3.0))
def test_m2po_masks_the_fewest_largest_tokens_that_bring_m2_under_the_threshold(batch, tau):
    delta = np.clip(batch.lp_pi - batch.lp_mu, -CLAMP, CLAMP)
    keep = m2po_keep(delta, np.ones(delta.size, dtype=bool), tau)
    q = delta * delta
    if keep.any():
        assert q[keep].mean() <= tau * (1 + 1e-12) + 1e-300
        assert q[keep].max() <= q[~keep].min(initial=np.inf)  # only the largest are masked
    if not keep.all():  # minimal: putting back the smallest masked token breaks the bound
        back = keep.copy()
        back[np.flatnonzero(~keep)[np.argmin(q[~keep])]] = True
        assert q[back].mean() > tau * (1 - 1e-12)


def test_m2po_masks_the_later_of_equal_tokens_first():
    # delta^2 = 0.25 three times: the first stays (mean (0.25 + 0.01 + 0) / 3 = 0.087 <= 0.1), the later two go.
    keep = m2po_keep(np.array([0.5, 0.1, -0.5, 0.5, 0.0]), np.ones(5, dtype=bool), 0.1)
    np.testing.assert_array_equal(keep, [True, True, False, False, True])
    masked_first = m2po_keep(np.array([0.5, 0.1, -0.5, 0.5, 0.0]), np.array([False, True, True, True, True]), 0.1)
    np.testing.assert_array_equal(masked_first, [False, True, True, False, True])


@PROFILE
@given(batch=batches(), rule=st.sampled_from(RejectRule), t=st.floats(0.0, 3.0), more=st.floats(0.0, 3.0))
def test_rejection_is_monotone_in_its_threshold_and_drops_whole_sequences(batch, rule, t, more):
    delta = np.clip(batch.lp_pi - batch.lp_mu, -CLAMP, CLAMP)
    strict, loose = reject_drop(delta, batch.lengths, rule, t), reject_drop(delta, batch.lengths, rule, t + more)
    assert not (loose & ~strict).any()
    if rule.aggregation != "token":
        starts = np.concatenate([[0], np.cumsum(batch.lengths)[:-1]])
        per_seq = np.split(strict, starts[1:])
        assert all(part.all() or not part.any() for part in per_seq)


@PROFILE
@given(batch=batches(), level=st.sampled_from(WeightLevel), cap=st.none() | st.floats(1.0, 5.0))
def test_self_normalized_weights_average_one_over_what_they_normalize(batch, level, cap):
    got = compute_coefficient(batch, CorrectionConfig(mode="tis", level=level, cap=cap, self_normalize=True))
    if level is WeightLevel.TOKEN:
        assert got.token_coef.mean() == pytest.approx(1.0, rel=1e-9)
    else:
        starts = np.concatenate([[0], np.cumsum(batch.lengths)[:-1]])
        assert got.token_coef[starts].mean() == pytest.approx(1.0, rel=1e-9)


def test_every_token_masked_is_reported_not_a_crash():
    batch = MismatchArrays(np.array([-0.1, -2.0, -0.5]), np.array([-1.5, -0.2, -0.4]), np.array([2, 1]),
                           np.array([1.0, -1.0]))  # fmt: skip
    got = compute_coefficient(batch, CorrectionConfig(mode="ais", m2po_threshold=0.0, self_normalize=True))
    assert not got.token_keep.any() and (got.token_coef == 0.0).all()
    assert got.frac_masked == 1.0 and got.corrections.frac_kept == 0.0 and got.corrections.weight_std == 0.0
    assert math.isfinite(got.alpha_ais)


# --- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"mask_ratio_lo": 2.0, "mask_ratio_hi": 1.5}, "mask_ratio_hi"),  # reversed
        ({"mask_ratio_lo": 1.0, "mask_ratio_hi": 1.0}, "mask_ratio_hi"),  # empty
        ({"mask_ratio_lo": -0.1}, "mask_ratio_lo"),
        ({"mask_ratio_hi": 0.0}, "mask_ratio_hi"),
        ({"mask_ratio_lo": math.nan}, "mask_ratio_lo"),
        ({"mask_ratio_hi": math.inf}, "mask_ratio_hi"),
        ({"reject_rule": "token_k2"}, "reject_threshold"),  # a rule needs its threshold
        ({"reject_threshold": 0.1}, "reject_threshold"),  # and a threshold its rule
        ({"reject_rule": "token_k2", "reject_threshold": -1.0}, "reject_threshold"),
        ({"reject_rule": "token_k2", "reject_threshold": math.nan}, "reject_threshold"),
        ({"reject_rule": "seq_max_k1", "reject_threshold": 1.0}, "reject_rule"),  # not a verl option
        ({"m2po_threshold": -0.01}, "m2po_threshold"),
        ({"m2po_threshold": math.nan}, "m2po_threshold"),
        ({"self_normalize": "maybe"}, "self_normalize"),
    ],
)
def test_bad_parameters_are_errors_naming_the_field(kwargs, field):
    with pytest.raises(ValidationError) as err:
        CorrectionConfig(**kwargs)
    assert err.value.errors()[0]["loc"] == (field,), err.value


# --- gradients -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["icepop", "reject-token-k3", "m2po", "snis-token", "ais-icepop", "ais-reject-snis"])
def test_gradient_is_the_mixture_on_the_kept_tokens_only(ppo_setting, name):  # noqa: F811
    """The loss gradient equals (1 - alpha) g_PG + alpha g_IS summed over the kept tokens, with the pre-mask
    denominator; g_IS weights each token by its (self-normalized) applied weight."""
    model, inputs, targets, lp_old, token_adv, batch = ppo_setting
    n = batch.lp_pi.size
    config = CorrectionConfig(**CORRECTION_CASES[name])
    result = compute_coefficient(batch, config)
    keep = result.token_keep
    assert 0 < keep.sum() < n or (config.self_normalize and keep.all()), "the case must mask some tokens"
    assert config.level is WeightLevel.TOKEN
    alpha = result.alpha
    w = np.exp(np.clip(batch.lp_pi - batch.lp_mu, -CLAMP, CLAMP))
    plain = w if config.cap is None else np.minimum(w, config.cap)
    wt = plain / plain[keep].mean() if config.self_normalize else plain

    def grad(coef: np.ndarray) -> torch.Tensor:
        return _grads(model, mixed_ppo_loss(model.token_logprobs(inputs, targets), lp_old, token_adv, coef, n))

    g = grad(result.token_coef)
    g_pg, g_is = grad(keep.astype(float)), grad(np.where(keep, wt, 0.0))
    torch.testing.assert_close(g, (1 - alpha) * g_pg + alpha * g_is, rtol=1e-11, atol=1e-14)
    # The correction changes the gradient (the check is not vacuous): not the unmasked, unnormalized mixture.
    assert not torch.allclose(g, grad((1 - alpha) + alpha * plain), rtol=1e-6, atol=1e-9)
