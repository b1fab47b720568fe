"""Properties of the AIS core that must hold for every batch and config (hypothesis), plus the
input-validation contract: bad input raises BatchValidationError naming the field."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from aisrl.core.ais import (
    LOGPROB_TOLERANCE,
    arrays_from_ragged,
    carried_weights,
    compute_coefficient,
    distinct_digits,
    health_warnings,
    log_ratios,
    validate_batch,
    weight_stats,
)
from aisrl.core.types import (
    BatchValidationError,
    CorrectionConfig,
    CorrectionMode,
    MismatchArrays,
    WeightLevel,
)

PROFILE = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
logprob = st.floats(-30.0, 0.0, allow_nan=False)


@st.composite
def batches(draw, identical: bool = False) -> MismatchArrays:
    lengths = draw(st.lists(st.integers(1, 12), min_size=1, max_size=6))
    n = sum(lengths)
    lp_pi = np.array(draw(st.lists(logprob, min_size=n, max_size=n)))
    if identical:
        lp_mu = lp_pi.copy()
    elif draw(st.booleans()):  # an FP8-like perturbation of pi
        noise = np.array(draw(st.lists(st.floats(-2.0, 2.0), min_size=n, max_size=n)))
        lp_mu = np.minimum(lp_pi + noise, 0.0)
    else:  # unrelated policies, log-ratios up to +-30 (beyond the clamp)
        lp_mu = np.array(draw(st.lists(logprob, min_size=n, max_size=n)))
    advantages = np.array(draw(st.lists(st.floats(-10.0, 10.0), min_size=len(lengths), max_size=len(lengths))))
    return MismatchArrays(lp_pi=lp_pi, lp_mu=lp_mu, lengths=np.array(lengths, dtype=np.int64), advantages=advantages)


@st.composite
def configs(draw, mode: CorrectionMode | None = None) -> CorrectionConfig:
    mode = mode or draw(st.sampled_from(CorrectionMode))
    cap = draw(st.none() | st.floats(1.0, 10.0))
    if mode is CorrectionMode.MIS and cap is None:
        cap = 2.0
    bounds = sorted(draw(st.lists(st.floats(0.0, 1.0), min_size=2, max_size=2)))
    return CorrectionConfig(
        mode=mode,
        level=draw(st.sampled_from(WeightLevel)),
        cap=cap,
        tau_kl=draw(st.floats(1e-5, 10.0)),
        beta=draw(st.floats(0.0, 0.99)),
        alpha_min=bounds[0],
        alpha_max=bounds[1],
        fixed_alpha=draw(st.floats(0.0, 1.0)),
        veto_threshold=draw(st.none() | st.floats(1e-3, 1.0)),
        opsm_kl_threshold=draw(st.none() | st.floats(0.0, 2.0)),
    )


prev_emas = st.none() | st.floats(0.0, 1.0)


@PROFILE
@given(batch=batches(), config=configs(CorrectionMode.AIS), prev_ema=prev_emas)
def test_ais_alpha_stays_within_its_bounds(batch, config, prev_ema):
    result = compute_coefficient(batch, config, prev_ema)
    assert config.alpha_min <= result.alpha <= config.alpha_max
    assert result.alpha == result.alpha_ais


@PROFILE
@given(batch=batches(), config=configs(), prev_ema=prev_emas)
def test_diagnostics_stay_in_range_and_finite(batch, config, prev_ema):
    r = compute_coefficient(batch, config, prev_ema)
    for stats in (r.applied, r.raw):
        assert 0.0 < stats.reliability <= 1.0
        assert 0.0 < stats.ess <= r.n_tokens
        assert 0.0 < stats.penalty <= 1.0
        assert stats.variance_amplification > 0.0
        assert 0.0 < stats.weight_min <= stats.weight_mean * (1 + 1e-12) and stats.weight_mean <= stats.weight_max * (
            1 + 1e-12
        )
    assert r.kl >= 0.0 and 0.0 <= r.severity <= 1.0 and 0.0 <= r.alpha_raw <= 1.0
    if config.cap is not None:
        assert r.applied.weight_max <= config.cap
    for name in ("frac_truncated", "frac_masked", "frac_vetoed", "frac_opsm"):
        assert 0.0 <= getattr(r, name) <= 1.0, name
    assert r.frac_masked >= max(r.frac_vetoed, r.frac_opsm) - 1e-12
    scalars = [r.alpha, r.alpha_ema, r.kl_k1, r.chi2_token, r.chi2_sequence, r.ppl_ratio]
    assert all(math.isfinite(x) for x in scalars)
    assert r.token_coef.shape == r.token_keep.shape == (r.n_tokens,)
    assert np.isfinite(r.token_coef).all() and (r.token_coef >= 0.0).all()
    assert (r.token_coef[~r.token_keep] == 0.0).all()
    assert r.frac_masked == pytest.approx(1.0 - r.token_keep.mean())


@PROFILE
@given(batch=batches(), config=configs(), prev_ema=prev_emas)
def test_coefficient_mixes_one_and_the_applied_weight(batch, config, prev_ema):
    r = compute_coefficient(batch, config, prev_ema)
    w = carried_weights(log_ratios(batch.lp_pi, batch.lp_mu), batch.lengths, config.level)
    wt = w if config.cap is None else np.minimum(w, config.cap)
    want = (1.0 - r.alpha) + r.alpha * wt
    np.testing.assert_allclose(r.token_coef[r.token_keep], want[r.token_keep], rtol=1e-12)
    token_adv = np.repeat(batch.advantages, batch.lengths)
    for got, helper in ((r.raw, weight_stats(w, token_adv)), (r.applied, weight_stats(wt, token_adv))):
        for name, value in helper.__dict__.items():
            assert getattr(got, name) == pytest.approx(value, rel=1e-9), name
    expected_alpha = {"none": 0.0, "tis": 1.0, "mis": 1.0, "fixed": config.fixed_alpha, "ais": r.alpha_ais}
    assert r.alpha == expected_alpha[config.mode.value]


@PROFILE
@given(batch=batches(), config=configs(), prev_ema=prev_emas)
def test_diagnostics_do_not_depend_on_the_mode(batch, config, prev_ema):
    """Every mode reports what AIS would have done, over all tokens, before any masking."""
    modes = [m for m in CorrectionMode if config.cap is not None or m is not CorrectionMode.MIS]
    results = [compute_coefficient(batch, config.model_copy(update={"mode": m}), prev_ema) for m in modes]
    for r in results[1:]:
        assert (r.applied, r.raw, r.kl, r.severity, r.alpha_raw, r.alpha_ema, r.alpha_ais, r.chi2_token) == (
            results[0].applied, results[0].raw, results[0].kl, results[0].severity, results[0].alpha_raw,
            results[0].alpha_ema, results[0].alpha_ais, results[0].chi2_token,
        )  # fmt: skip


@PROFILE
@given(batch=batches(identical=True), config=configs(CorrectionMode.AIS))
def test_identical_policies_need_no_correction(batch, config):
    config = config.model_copy(update={"alpha_min": 0.0})
    r = compute_coefficient(batch, config)
    assert r.kl == 0.0 and r.kl_k1 == 0.0 and r.severity == 0.0
    assert r.reliability == 1.0 and r.raw.reliability == 1.0
    assert r.variance_amplification == 1.0 and r.penalty == 1.0
    assert r.alpha_raw == 0.0 and r.alpha == 0.0
    assert r.chi2_token == 0.0 and r.chi2_sequence == 0.0 and r.ppl_ratio == 1.0
    assert r.frac_truncated == 0.0 and r.warnings == ()
    assert (r.token_coef[r.token_keep] == 1.0).all()


@PROFILE
@given(batch=batches(), config=configs(CorrectionMode.MIS))
def test_mis_masks_exactly_the_weights_outside_the_band(batch, config):
    config = config.model_copy(update={"veto_threshold": None, "opsm_kl_threshold": None})
    r = compute_coefficient(batch, config)
    w = carried_weights(log_ratios(batch.lp_pi, batch.lp_mu), batch.lengths, config.level)
    inside = (w >= 1.0 / config.cap) & (w <= config.cap)
    np.testing.assert_array_equal(r.token_keep, inside)
    np.testing.assert_array_equal(r.token_coef[inside], w[inside])  # alpha = 1 and wt = w inside the band
    if config.level is not WeightLevel.TOKEN:  # whole sequences go
        for seq_keep in np.split(r.token_keep, np.cumsum(batch.lengths)[:-1]):
            assert seq_keep.all() or not seq_keep.any()


@PROFILE
@given(
    batch=batches(),
    config=configs(),
    veto=st.floats(1e-3, 1.5),
    opsm=st.floats(0.0, 3.0),
    use=st.sampled_from(["veto", "opsm", "both"]),
)
def test_veto_and_opsm_drop_exactly_the_right_sequences(batch, config, veto, opsm, use):
    update = {"veto_threshold": veto if use != "opsm" else None, "opsm_kl_threshold": opsm if use != "veto" else None}
    config = config.model_copy(update=update | {"mode": CorrectionMode.AIS})
    r = compute_coefficient(batch, config)
    delta = log_ratios(batch.lp_pi, batch.lp_mu)
    seqs = np.split(delta, np.cumsum(batch.lengths)[:-1])
    vetoed = [config.veto_threshold is not None and bool((np.exp(d) < veto).any()) for d in seqs]
    off = [
        config.opsm_kl_threshold is not None and a < 0 and float(np.mean(-d)) > opsm
        for d, a in zip(seqs, batch.advantages, strict=True)
    ]
    want_keep = np.repeat([not (v or o) for v, o in zip(vetoed, off, strict=True)], batch.lengths)
    np.testing.assert_array_equal(r.token_keep, want_keep)
    n = r.n_tokens
    assert r.frac_vetoed == pytest.approx(sum(k for k, v in zip(batch.lengths, vetoed, strict=True) if v) / n)
    assert r.frac_opsm == pytest.approx(sum(k for k, o in zip(batch.lengths, off, strict=True) if o) / n)


@PROFILE
@given(batch=batches(), config=configs(), scale=st.floats(1e-100, 1e100))
def test_variance_amplification_ignores_the_scale_of_advantages(batch, config, scale):
    base = compute_coefficient(batch, config)
    scaled = MismatchArrays(batch.lp_pi, batch.lp_mu, batch.lengths, batch.advantages * scale)
    nonzero = batch.advantages != 0.0  # stay clear of overflow, underflow and subnormal precision loss
    assume(np.isfinite(scaled.advantages).all())
    assume((np.abs(batch.advantages[nonzero]) > 1e-300).all() and (np.abs(scaled.advantages[nonzero]) > 1e-300).all())
    assert compute_coefficient(scaled, config).variance_amplification == pytest.approx(
        base.variance_amplification, rel=1e-9
    )


@PROFILE
@given(
    batch=batches(),
    which=st.sampled_from(["lp_pi", "lp_mu", "advantages"]),
    bad=st.sampled_from([math.nan, math.inf, -math.inf]),
    data=st.data(),
)
def test_non_finite_input_is_an_error_naming_the_field(batch, which, bad, data):
    values = getattr(batch, which).copy()
    k = data.draw(st.integers(0, values.size - 1))
    values[k] = bad
    broken = MismatchArrays(**{**batch.__dict__, which: values})
    for call in (lambda: validate_batch(broken), lambda: compute_coefficient(broken, CorrectionConfig())):
        with pytest.raises(BatchValidationError) as err:
            call()
        assert err.value.field == f"{which}[{k}]"


@PROFILE
@given(batch=batches(), which=st.sampled_from(["lp_pi", "lp_mu"]), value=st.floats(2e-6, 50.0), data=st.data())
def test_positive_logprob_is_an_error_naming_the_field(batch, which, value, data):
    values = getattr(batch, which).copy()
    k = data.draw(st.integers(0, values.size - 1))
    values[k] = value
    broken = MismatchArrays(**{**batch.__dict__, which: values})
    with pytest.raises(BatchValidationError) as err:
        compute_coefficient(broken, CorrectionConfig())
    assert err.value.field == f"{which}[{k}]"
    assert "> 0" in err.value.message


def test_logprobs_within_the_rounding_tolerance_are_accepted():
    batch = arrays_from_ragged([[LOGPROB_TOLERANCE, -1.0]], [[0.0, -1.1]], [1.0])
    assert compute_coefficient(batch, CorrectionConfig()).n_tokens == 2


def test_long_sequences_do_not_overflow():
    """10,000 tokens drifting by 0.01 each: sum of deltas 100, clamped to 20 at the sequence level."""
    lp_pi = np.full(20_000, -1.0)
    lp_mu = np.concatenate([np.full(10_000, -1.01), np.full(10_000, -0.99)])
    batch = MismatchArrays(lp_pi, lp_mu, np.array([10_000, 10_000]), np.array([1.0, -1.0]))
    r = compute_coefficient(batch, CorrectionConfig(level=WeightLevel.SEQUENCE, cap=None, mode=CorrectionMode.TIS))
    assert r.raw.weight_max == pytest.approx(math.exp(20.0)) and r.raw.weight_min == pytest.approx(math.exp(-20.0))
    assert np.isfinite(r.token_coef).all() and math.isfinite(r.chi2_sequence)
    assert r.chi2_sequence == pytest.approx((math.exp(40.0) + math.exp(-40.0)) / 2 - 1.0)
    geometric = compute_coefficient(batch, CorrectionConfig(level=WeightLevel.GEOMETRIC))
    assert geometric.raw.weight_max == pytest.approx(math.exp(0.01))


def test_token_log_ratios_are_clamped():
    batch = arrays_from_ragged([[-0.1, -50.0]], [[-50.0, -0.1]], [1.0])
    r = compute_coefficient(batch, CorrectionConfig(cap=None, mode=CorrectionMode.TIS))
    assert r.raw.weight_max == math.exp(20.0) and r.raw.weight_min == math.exp(-20.0)
    assert r.kl_k1 == 0.0


def test_ema_carries_across_batches_in_ais_mode_only():
    batch = arrays_from_ragged([[-0.5, -1.0, -0.2]], [[-0.6, -0.9, -0.25]], [1.0])
    config = CorrectionConfig(beta=0.75, tau_kl=1.0, alpha_min=0.0, alpha_max=1.0)
    first = compute_coefficient(batch, config)
    assert first.alpha_ema == first.alpha_raw
    second = compute_coefficient(batch, config, prev_ema=0.9)
    assert second.alpha_ema == pytest.approx(0.75 * 0.9 + 0.25 * first.alpha_raw)
    assert second.alpha == second.alpha_ema
    bounded = compute_coefficient(batch, config.model_copy(update={"alpha_max": 0.1}), prev_ema=0.9)
    assert bounded.alpha == 0.1 and bounded.alpha_ema == second.alpha_ema
    fixed = compute_coefficient(batch, config.model_copy(update={"mode": CorrectionMode.FIXED}), prev_ema=0.9)
    assert fixed.alpha == config.fixed_alpha and fixed.alpha_ema == second.alpha_ema


@pytest.mark.parametrize("prev_ema", [math.nan, math.inf])
def test_non_finite_prev_ema_is_an_error(prev_ema):
    batch = arrays_from_ragged([[-0.5]], [[-0.6]], [1.0])
    with pytest.raises(BatchValidationError) as err:
        compute_coefficient(batch, CorrectionConfig(beta=0.5), prev_ema=prev_ema)
    assert err.value.field == "prev_ema"


def test_health_warnings_fire_on_their_thresholds():
    calm = compute_coefficient(arrays_from_ragged([[-0.5, -1.0]], [[-0.51, -1.0]], [1.0]), CorrectionConfig())
    assert calm.warnings == ()
    wild = compute_coefficient(arrays_from_ragged([[-0.1, -9.0, -0.2, -0.3]], [[-6.0, -0.1, -0.2, -0.3]], [1.0]),
                               CorrectionConfig(cap=None))  # fmt: skip
    assert [w.split(" ")[0] for w in wild.warnings] == ["ESS/N", "mean", "kl", "chi2_token"]


def _good() -> dict[str, np.ndarray]:
    return {
        "lp_pi": np.array([-0.1, -0.2, -0.3, -0.4, -0.5]),
        "lp_mu": np.array([-0.1, -0.25, -0.3, -0.35, -0.5]),
        "lengths": np.array([2, 3]),
        "advantages": np.array([1.0, -1.0]),
    }


BAD_BATCHES = [
    ("no tokens", {"lp_pi": np.array([]), "lp_mu": np.array([]), "lengths": np.array([], dtype=int)}, "lp_pi"),
    ("no sequences", {"lengths": np.array([], dtype=int), "advantages": np.array([])}, "lengths"),
    ("lp_mu length", {"lp_mu": np.array([-0.1, -0.2, -0.3, -0.4])}, "lp_mu"),
    ("zero length", {"lengths": np.array([0, 5])}, "lengths[0]"),
    ("negative length", {"lengths": np.array([6, -1])}, "lengths[1]"),
    ("lengths sum", {"lengths": np.array([2, 2])}, "lengths"),
    ("advantage count", {"advantages": np.array([1.0])}, "advantages"),
    ("float lengths", {"lengths": np.array([2.0, 3.0])}, "lengths"),
    ("2-d lp_pi", {"lp_pi": np.zeros((5, 1)) - 1}, "lp_pi"),
    ("strings", {"advantages": np.array(["a", "b"])}, "advantages"),
    ("nan lp_mu", {"lp_mu": np.array([-0.1, -0.25, np.nan, -0.35, -0.5])}, "lp_mu[2]"),
    ("-inf lp_pi", {"lp_pi": np.array([-0.1, -0.2, -0.3, -np.inf, -0.5])}, "lp_pi[3]"),
    ("positive lp_pi", {"lp_pi": np.array([-0.1, -0.2, 0.5, -0.4, -0.5])}, "lp_pi[2]"),
    ("inf advantage", {"advantages": np.array([1.0, np.inf])}, "advantages[1]"),
]


@pytest.mark.parametrize(("case", "change", "field"), BAD_BATCHES, ids=[c[0] for c in BAD_BATCHES])
def test_invalid_batches_name_the_field(case, change, field):
    batch = MismatchArrays(**(_good() | change))
    for call in (lambda: validate_batch(batch), lambda: compute_coefficient(batch, CorrectionConfig())):
        with pytest.raises(BatchValidationError) as err:
            call()
        assert err.value.field == field, err.value
    assert validate_batch(MismatchArrays(**_good())) is None


def test_value_errors_locate_the_token_in_its_sequence():
    batch = MismatchArrays(**(_good() | {"lp_mu": np.array([-0.1, -0.25, -0.3, np.nan, -0.5])}))
    with pytest.raises(BatchValidationError, match=r"token 3 \(sequence 1, position 1\)"):
        validate_batch(batch)


RAGGED_ERRORS = [
    ("no sequences", ([], [], []), "lp_pi"),
    ("sequence count", ([[-0.1], [-0.2]], [[-0.1]], [0.0, 0.0]), "lp_mu"),
    ("advantage count", ([[-0.1], [-0.2]], [[-0.1], [-0.2]], [0.0]), "advantages"),
    ("empty sequence", ([[-0.1], []], [[-0.1], []], [0.0, 0.0]), "lp_pi[1]"),
    ("ragged", ([[-0.1], [-0.2, -0.3]], [[-0.1], [-0.2]], [0.0, 0.0]), "lp_mu[1]"),
    ("not a list", ([[-0.1], 5], [[-0.1], [-0.2]], [0.0, 0.0]), "lp_pi[1]"),
    ("not numbers", ([[-0.1], ["x"]], [[-0.1], [-0.2]], [0.0, 0.0]), "lp_pi"),
]


@pytest.mark.parametrize(("case", "args", "field"), RAGGED_ERRORS, ids=[c[0] for c in RAGGED_ERRORS])
def test_ragged_construction_names_the_field(case, args, field):
    with pytest.raises(BatchValidationError) as err:
        arrays_from_ragged(*args)
    assert err.value.field == field


def test_ragged_construction_packs_in_order():
    arrays = arrays_from_ragged([[-0.1, -0.2], [-0.3]], [[-0.4, -0.5], [-0.6]], [1.5, -2.0])
    np.testing.assert_array_equal(arrays.lp_pi, [-0.1, -0.2, -0.3])
    np.testing.assert_array_equal(arrays.lp_mu, [-0.4, -0.5, -0.6])
    np.testing.assert_array_equal(arrays.lengths, [2, 1])
    np.testing.assert_array_equal(arrays.advantages, [1.5, -2.0])
    assert arrays.lp_pi.dtype == np.float64 and arrays.lengths.dtype == np.int64


def test_float32_inputs_are_computed_in_float64():
    arrays = arrays_from_ragged([[-0.1, -0.2], [-0.3]], [[-0.4, -0.5], [-0.6]], [1.5, -2.0])
    lp_pi, lp_mu, adv = (x.astype(np.float32) for x in (arrays.lp_pi, arrays.lp_mu, arrays.advantages))
    got = compute_coefficient(MismatchArrays(lp_pi, lp_mu, arrays.lengths.astype(np.int32), adv), CorrectionConfig())
    want = compute_coefficient(
        MismatchArrays(lp_pi.astype(np.float64), lp_mu.astype(np.float64), arrays.lengths, adv.astype(np.float64)),
        CorrectionConfig(),
    )
    assert got.token_coef.dtype == np.float64 and got.alpha == want.alpha and got.kl == want.kl


@pytest.mark.parametrize(
    ("reliability", "weight_mean", "kl", "chi2", "expected"),
    [
        (0.5, 1.0, 0.1004, 0.0, "kl 0.1004 > 0.1:"),
        (0.5, 1.0, 0.10000001, 0.0, "kl 0.10000001 > 0.1:"),
        (0.5, 1.0, 0.2345678, 0.0, "kl 0.235 > 0.1:"),
        (0.2999, 1.0, 0.0, 0.0, "ESS/N 0.2999 < 0.3:"),
        (0.5, 2.0004, 0.0, 0.0, "mean weight 2.0004 outside [0.5, 2.0]:"),
        (0.5, 1.0, 0.0, 1.00049, "chi2_token 1.0005 > 1.0:"),
    ],
)
def test_health_warnings_print_values_that_differ_from_their_thresholds(reliability, weight_mean, kl, chi2, expected):
    (warning,) = health_warnings(reliability, weight_mean, kl, chi2)
    assert warning.startswith(expected), warning


def test_distinct_digits_keeps_three_digits_unless_more_are_needed():
    assert distinct_digits(0.123456, 0.1) == "0.123"
    assert distinct_digits(0.1, 0.1) == "0.1"  # equal to the bound: nothing to tell apart
    assert distinct_digits(-0.10001, 0.1, -0.1) == "-0.10001"
