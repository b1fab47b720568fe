"""The AIS coefficient and every diagnostic of one mismatch batch (docs/ais.md), as pure numpy.

Invariant: `compute_coefficient` is a pure function of (batch, config, prev_ema). It either
raises `BatchValidationError` naming the offending input (nothing is dropped, zeroed or
clamped silently; a non-finite value is always an error) or returns finite numbers computed in
float64 over every carried token. Diagnostics (rho, ESS, kl, s, v, p, alpha_raw and the extra
metrics) are computed identically in every mode, over all carried tokens and before any masking:
mis, veto and off-policy sequence masking change only the loss mask (`token_keep`,
`token_coef`) and the reported fractions, so a run without correction still shows what AIS would
have done.

The formulation, for N carried tokens i in S sequences:

- delta_i = clamp(lp_pi_i - lp_mu_i, -20, 20); token weight exp(delta_i); A_i = advantage of
  token i's sequence.
- Carried weight w_i: token level exp(delta_i); sequence level exp(clamp(sum_s delta, -20, 20));
  geometric level exp(mean_s delta); at the sequence levels every token of s carries w_s.
- Applied weight wt_i = min(w_i, C) (cap C, None: wt = w).
- Weight stats of x: ESS = (sum x)^2 / sum x^2, rho = ESS / N, v = sum (x A)^2 / sum A^2 (v = 1
  when every A is 0), p = min(1, 1 / v). `applied` are the stats of wt, `raw` those of w.
- kl = mean_i(exp(delta_i) - 1 - delta_i) (k3, token-level delta at every level);
  s = 1 - exp(-kl / tau_kl).
- alpha_raw = s * rho_applied * p_applied; alpha_ema = alpha_raw without prev_ema, else
  beta * prev_ema + (1 - beta) * alpha_raw; alpha_ais = clip(alpha_ema, alpha_min, alpha_max).
  The loss uses alpha = 0 (none), 1 (tis, mis), fixed_alpha (fixed) or alpha_ais (ais): the EMA
  and the bounds belong to ais mode only.
- Loss coefficient c_i = (1 - alpha) + alpha * wt_i for kept tokens, 0 for masked ones.
- Masks: mis drops tokens (token level) or whole sequences (sequence levels) whose carried weight
  is outside [1/C, C]; the veto drops sequences holding a token whose token-level weight is below
  veto_threshold; off-policy sequence masking drops sequences with A < 0 whose mean(-delta)
  exceeds opsm_kl_threshold; IcePop ratio bounds, divergence rejection, M2PO and self-normalized
  weights are `aisrl.core.corrections` (docs/corrections.md). mis, the veto, opsm, IcePop at the token
  level and self-normalization run on the blocked path below; divergence rejection, M2PO and IcePop at
  the sequence levels decide their masks on explicit per-token arrays (`apply_corrections`), after
  which token-level loss weights take the blocked coefficient pass too. A test forces the per-token
  masks on configs the blocked path handles and checks that both give the same masks and coefficients.
- Correction diagnostics (`CorrectionStats`): the share of tokens masked for each reason, the kept
  share, the mean and standard deviation of the loss weights over kept tokens, the sequence-level
  ESS of exp(clamp(sum_s delta)) and m2 = mean(delta^2).
- Extra metrics (clamped delta throughout): kl_k1 = mean(-delta); ppl_ratio = exp(kl_k1);
  chi2_token = mean(exp(delta)^2) - 1; chi2_sequence = mean_s(exp(clamp(sum_s delta))^2) - 1;
  frac_truncated = share of tokens whose carried weight exceeds C (0 without a cap);
  frac_masked = share of tokens masked by mis, veto and opsm together; frac_vetoed and frac_opsm
  = share of tokens in the sequences each rule drops (a sequence may count in both).
- Warnings (verl's health thresholds): applied ESS/N < 0.3; mean raw carried weight outside
  [0.5, 2]; |kl| > 0.1; chi2_token > 1.

Validation: empty batches, inconsistent lengths or counts, non-finite values (NaN, +-inf) in
lp_pi, lp_mu, advantages or prev_ema, and log-probabilities above LOGPROB_TOLERANCE (1e-6, float
rounding of log 1) are errors; the field names the array and the first bad index (`lp_mu[17]`).

Speed (bench/bench_ais.py; figures and method in docs/performance.md, "AIS computation"): the
tokens are processed in blocks of whole sequences that stay in the CPU cache (`_BLOCK_TOKENS`), so
lp_pi and lp_mu travel from memory once. Per block, token level: d = pi - mu (float32 inputs, the
wire's, are widened here rather than copied first), the two validation maxima, min and max of d, the
per-sequence sums of d, sum d^2 (einsum: one pass, numpy's own loop; BLAS dot starts threads), exp
once per token written where the coefficients will be, the per-sequence sums of w and of w^2; the
truncation sums only in blocks whose largest weight exceeds the cap, the ratio band (mis, IcePop)
as two comparisons. Then O(S) work on per-sequence sums, then one blocked pass turning the weights
into coefficients in place (masks, kept-token sums and alpha together). No Python loop over sequences,
no per-token temporary array outside a block. Measured on 1M tokens (2 shared vCPUs, load 6 to 17):
5.9 to 8.4 ms of CPU per call for the FP8-like batch (1.13x to 1.15x faster than before), against 1 to
1.5 ms for np.exp alone, so issue 11's 5 ms target is missed by about 1.2x even in CPU time at the
quietest moment, and wall time adds the load's waits; masked and self-normalized batches cost 1.2x to
1.5x the unmasked one (1.9x to 3.4x before, when they took the per-token path). float32 arithmetic is
not used: kl needs w - 1 to float64 precision, and the reference tests pin every diagnostic to 1e-9.

Numerical notes: the clamp is applied only when some delta lies outside [-20, 20] (it is the
identity otherwise); kl = (sum_s (sum_{i in s} w_i - L_s) - sum delta) / N: each sequence's weights
are summed on their own (pairwise) and its length subtracted, so the rounding error of kl is about
1e-16 per token (relative error about 1e-16 / kl: 1e-13 at kl = 1e-3, the FP8 regime; it grows only
for kl far below any tau_kl that gives alpha a visible value); v is computed on advantages scaled by
max|A| (v is scale-free), so huge advantages cannot overflow; rho and ESS are clamped to 1 and N
against the last-bit rounding of (sum x)^2 / sum x^2; on the blocked path the kept tokens' weight_std
comes from their sums of x and x^2 in one pass, whose cancellation costs up to about sqrt(N * eps)
of the weights' size (a spread below ~1e-7 of the mean reads as noise of that size; the per-token
path's is two-pass).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from aisrl.core.corrections import apply_corrections, self_normalized
from aisrl.core.types import (
    LOG_RATIO_CLAMP,
    BatchValidationError,
    CoefficientResult,
    CorrectionConfig,
    CorrectionMode,
    CorrectionStats,
    MismatchArrays,
    WeightLevel,
    WeightStats,
)
from aisrl.core.weights import (
    applied_weights,
    carried_weights,
    log_ratios,
    mis_bounds,
    sequence_log_weights,
    sequence_starts,
)

# The weight helpers live in aisrl.core.weights (shared with the corrections); callers may import them from here.
__all__ = ["applied_weights", "carried_weights", "log_ratios", "mis_bounds", "sequence_log_weights", "sequence_starts"]

# Log-probabilities up to this much above 0 are accepted as float rounding of a certain token
# (log 1 = 0) and used as they are; anything larger is an error.
LOGPROB_TOLERANCE = 1e-6

# verl's rollout-correction health thresholds (docs/ais.md, "Health warnings"), turned into warnings.
WARN_MIN_RELIABILITY = 0.3
WARN_WEIGHT_MEAN_RANGE = (0.5, 2.0)
WARN_MAX_KL = 0.1
WARN_MAX_CHI2_TOKEN = 1.0


# --------------------------------------------------------------------------------------------
# Validation and construction
# --------------------------------------------------------------------------------------------


def _as_1d(value: object, field: str, kinds: str) -> np.ndarray:
    """value as a 1-D array whose dtype kind is in `kinds` ('iuf' numbers, 'iu' integers)."""
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise BatchValidationError(field, f"not an array of numbers ({exc})") from None
    if array.ndim != 1:
        raise BatchValidationError(field, f"must be one-dimensional, got shape {array.shape}")
    if array.dtype.kind not in kinds:
        what = "integers" if kinds == "iu" else "real numbers"
        raise BatchValidationError(field, f"must hold {what}, got dtype {array.dtype}")
    return array


def _log_probs(array: np.ndarray) -> np.ndarray:
    return array if array.dtype in (np.float32, np.float64) else array.astype(np.float64)


def _checked_shapes(batch: MismatchArrays) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The batch's arrays with every shape and length checked (values are not): log-probabilities as
    float32 or float64 (float32, the wire's, is widened block by block in the sweep, not copied here),
    lengths as int64, advantages as float64."""
    lp_pi = _log_probs(_as_1d(batch.lp_pi, "lp_pi", "iuf"))
    lp_mu = _log_probs(_as_1d(batch.lp_mu, "lp_mu", "iuf"))
    lengths = _as_1d(batch.lengths, "lengths", "iu").astype(np.int64, copy=False)
    advantages = _as_1d(batch.advantages, "advantages", "iuf").astype(np.float64, copy=False)
    n = lp_pi.size
    if n == 0:
        raise BatchValidationError("lp_pi", "empty batch: no tokens")
    if lp_mu.size != n:
        raise BatchValidationError("lp_mu", f"has {lp_mu.size} tokens but lp_pi has {n}")
    if lengths.size == 0:
        raise BatchValidationError("lengths", "empty batch: no sequences")
    short = np.flatnonzero(lengths < 1)
    if short.size:
        k = int(short[0])
        raise BatchValidationError(f"lengths[{k}]", f"sequence {k} has {lengths[k]} tokens; each needs at least 1")
    total = int(lengths.sum())
    if total != n:
        raise BatchValidationError("lengths", f"sum to {total} tokens but lp_pi has {n}")
    if advantages.size != lengths.size:
        raise BatchValidationError("advantages", f"has {advantages.size} values for {lengths.size} sequences")
    return lp_pi, lp_mu, lengths, advantages


def _token_place(index: int, lengths: np.ndarray) -> str:
    ends = np.cumsum(lengths)
    seq = int(np.searchsorted(ends, index, side="right"))
    return f"token {index} (sequence {seq}, position {index - int(ends[seq] - lengths[seq])})"


def _check_values(lp_pi: np.ndarray, lp_mu: np.ndarray, lengths: np.ndarray, advantages: np.ndarray) -> None:
    """Every value finite, every log-probability <= LOGPROB_TOLERANCE; the error names the first bad one."""
    for name, lp in (("lp_pi", lp_pi), ("lp_mu", lp_mu)):
        bad = np.flatnonzero(~np.isfinite(lp))
        if bad.size:
            k = int(bad[0])
            raise BatchValidationError(f"{name}[{k}]", f"non-finite value {lp[k]} at {_token_place(k, lengths)}")
        bad = np.flatnonzero(lp > LOGPROB_TOLERANCE)
        if bad.size:
            k = int(bad[0])
            raise BatchValidationError(
                f"{name}[{k}]",
                f"log-probability {lp[k]} > 0 at {_token_place(k, lengths)} (tolerance {LOGPROB_TOLERANCE})",
            )
    bad = np.flatnonzero(~np.isfinite(advantages))
    if bad.size:
        k = int(bad[0])
        raise BatchValidationError(f"advantages[{k}]", f"non-finite advantage {advantages[k]} of sequence {k}")


def validate_batch(batch: MismatchArrays) -> None:
    """Raises BatchValidationError(field, message) unless the batch can be computed on.

    Checked, in this order: arrays are 1-D numbers (lengths integers); at least one token and
    one sequence; lp_mu as long as lp_pi; every length >= 1; lengths sum to the token count; one
    advantage per sequence; every value finite; every log-probability <= LOGPROB_TOLERANCE.
    Per-value errors name the array and the first bad index, e.g. `lp_pi[17]`.
    """
    _check_values(*_checked_shapes(batch))


def _sequence_length(seq: object, field: str) -> int:
    try:
        return len(seq)  # type: ignore[arg-type]
    except TypeError:
        raise BatchValidationError(field, f"must be a list of numbers, got {type(seq).__name__}") from None


def arrays_from_ragged(
    lp_pi: Sequence[Sequence[float]], lp_mu: Sequence[Sequence[float]], advantages: Sequence[float]
) -> MismatchArrays:
    """Packs per-sequence lists into a MismatchArrays, checking shapes with field-naming errors.

    Fields: `lp_pi` (no sequences), `lp_pi[s]` (empty sequence s), `lp_mu` (sequence count),
    `lp_mu[s]` (sequence s of another length than lp_pi[s]), `advantages` (count). Values are
    checked by `validate_batch` / `compute_coefficient`, whose errors name the flat token index
    and its (sequence, position).
    """
    n_seq = len(lp_pi)
    if n_seq == 0:
        raise BatchValidationError("lp_pi", "empty batch: no sequences")
    if len(lp_mu) != n_seq:
        raise BatchValidationError("lp_mu", f"has {len(lp_mu)} sequences but lp_pi has {n_seq}")
    if len(advantages) != n_seq:
        raise BatchValidationError("advantages", f"has {len(advantages)} values for {n_seq} sequences")
    lengths = np.empty(n_seq, dtype=np.int64)
    for s in range(n_seq):
        lengths[s] = _sequence_length(lp_pi[s], f"lp_pi[{s}]")
        if lengths[s] == 0:
            raise BatchValidationError(f"lp_pi[{s}]", "empty sequence: each needs at least 1 token")
        if (k := _sequence_length(lp_mu[s], f"lp_mu[{s}]")) != lengths[s]:
            raise BatchValidationError(f"lp_mu[{s}]", f"has {k} tokens but lp_pi[{s}] has {lengths[s]}")
    n = int(lengths.sum())
    packed = {}
    for name, ragged in (("lp_pi", lp_pi), ("lp_mu", lp_mu)):
        try:
            packed[name] = np.fromiter(itertools.chain.from_iterable(ragged), dtype=np.float64, count=n)
        except (TypeError, ValueError) as exc:
            raise BatchValidationError(name, f"must hold numbers ({exc})") from None
    try:
        adv = np.asarray(advantages, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise BatchValidationError("advantages", f"must hold numbers ({exc})") from None
    return MismatchArrays(lp_pi=packed["lp_pi"], lp_mu=packed["lp_mu"], lengths=lengths, advantages=adv)


# --------------------------------------------------------------------------------------------
# Small pure helpers (also the readable definitions the fast path must agree with)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Moments:
    """Sufficient statistics of per-token weights x for WeightStats (a = A / max|A|)."""

    n: int
    total: float  # sum x
    total_sq: float  # sum x^2
    weighted_sq: float  # sum x^2 a^2
    adv_sq: float  # sum a^2
    minimum: float
    maximum: float


def _stats(m: _Moments) -> WeightStats:
    ess = min(m.total * m.total / m.total_sq, float(m.n))
    v = m.weighted_sq / m.adv_sq if m.adv_sq > 0.0 else 1.0
    return WeightStats(
        reliability=ess / m.n,
        ess=ess,
        variance_amplification=v,
        penalty=min(1.0, 1.0 / v),
        weight_mean=m.total / m.n,
        weight_min=m.minimum,
        weight_max=m.maximum,
    )


def _dot(x: np.ndarray, y: np.ndarray) -> float:
    """sum x*y with numpy's pairwise summation (BLAS dot may start threads on a busy machine)."""
    return float(np.multiply(x, y).sum())


def _unit_advantages(advantages: np.ndarray) -> np.ndarray:
    """A / max|A| (v is invariant to the scale of A; this keeps A^2 from overflowing)."""
    scale = float(np.max(np.abs(advantages)))
    return advantages / scale if scale > 0.0 else advantages


def weight_stats(weights: np.ndarray, token_advantages: np.ndarray) -> WeightStats:
    """ESS, rho, v, p and the range of per-token weights x, with each token's advantage A_i."""
    x = np.asarray(weights, dtype=np.float64)
    a = _unit_advantages(np.asarray(token_advantages, dtype=np.float64))
    x2 = x * x
    a2 = a * a
    return _stats(_Moments(x.size, float(x.sum()), float(x2.sum()), _dot(x2, a2), float(a2.sum()),
                           float(x.min()), float(x.max())))  # fmt: skip


def severity(kl: float, tau_kl: float) -> float:
    """s = 1 - exp(-kl / tau_kl), evaluated as -expm1(-kl / tau_kl) (exact for small kl)."""
    return -math.expm1(-kl / tau_kl)


def distinct_digits(value: float, *bounds: float) -> str:
    """`value` with 3 significant digits, or more when needed to tell it from each differing bound.

    Why: a kl of 0.1004 against a threshold of 0.1 printed as "kl 0.1 > 0.1" with :.3g.
    """
    for digits in range(3, 18):
        text = f"{value:.{digits}g}"
        if all(value == bound or text != f"{bound:.{digits}g}" for bound in bounds):
            return text
    return repr(value)


def health_warnings(reliability: float, raw_weight_mean: float, kl: float, chi2_token: float) -> tuple[str, ...]:
    """verl's health thresholds crossed by a batch, as short sentences (empty when healthy).

    Each value is printed with enough digits to differ visibly from the threshold it crossed.
    """
    warnings = []
    if reliability < WARN_MIN_RELIABILITY:
        rho = distinct_digits(reliability, WARN_MIN_RELIABILITY)
        warnings.append(f"ESS/N {rho} < {WARN_MIN_RELIABILITY}: few tokens carry the weight")
    low, high = WARN_WEIGHT_MEAN_RANGE
    if not low <= raw_weight_mean <= high:
        mean = distinct_digits(raw_weight_mean, low, high)
        warnings.append(f"mean weight {mean} outside [{low}, {high}]: policies far apart")
    if abs(kl) > WARN_MAX_KL:
        warnings.append(
            f"kl {distinct_digits(kl, WARN_MAX_KL, -WARN_MAX_KL)} > {WARN_MAX_KL}: strong rollout/training mismatch"
        )
    if chi2_token > WARN_MAX_CHI2_TOKEN:
        chi2 = distinct_digits(chi2_token, WARN_MAX_CHI2_TOKEN)
        warnings.append(f"chi2_token {chi2} > {WARN_MAX_CHI2_TOKEN}: heavy-tailed token weights")
    return tuple(warnings)


def smoothed_alpha(alpha_raw: float, prev_ema: float | None, config: CorrectionConfig) -> tuple[float, float]:
    """(alpha_ema, alpha_ais): the EMA of alpha_raw over a run's batches, then its clip to the bounds."""
    ema = alpha_raw if prev_ema is None else config.beta * prev_ema + (1.0 - config.beta) * alpha_raw
    return ema, min(max(ema, config.alpha_min), config.alpha_max)


def mode_alpha(config: CorrectionConfig, alpha_ais: float) -> float:
    """The alpha the loss uses in the config's mode."""
    match config.mode:
        case CorrectionMode.NONE:
            return 0.0
        case CorrectionMode.TIS | CorrectionMode.MIS:
            return 1.0
        case CorrectionMode.FIXED:
            return config.fixed_alpha
        case _:
            return alpha_ais


# --------------------------------------------------------------------------------------------
# The coefficient
# --------------------------------------------------------------------------------------------

# Tokens per block of the sweep. A block's intermediates stay in the CPU cache, so the big
# arrays travel from memory once (one pass over 1M float64 from memory costs as much as several
# in-cache operations). Blocks end at sequence boundaries, so per-sequence sums stay local.
_BLOCK_TOKENS = 1 << 15

Blocks = list[tuple[int, int, int, int]]


@dataclass
class _Sweep:
    """What the pass over the tokens gathers; per-sequence arrays are float64[S]."""

    seq_delta: np.ndarray  # sum of the clamped deltas
    seq_w: np.ndarray  # sum of token-level w
    seq_w2: np.ndarray  # sum of token-level w^2
    seq_wt2: np.ndarray | None  # sum of min(w, C)^2 (token level with a cap)
    seq_wmin: np.ndarray | None  # smallest token-level w (veto)
    w: np.ndarray | None  # float64[N] token-level weights (token level); becomes token_coef
    keep: np.ndarray | None  # bool[N]: inside the token-level ratio band (token level with a band)
    truncated_blocks: list[bool]  # per block: some w > C (token level with a cap)
    d2_sum: float = 0.0  # sum delta^2 (M2PO's second moment)
    wt_sum: float = 0.0
    n_truncated: int = 0
    n_low: int = 0  # tokens below the band's lower bound
    n_high: int = 0  # tokens above the band's upper bound
    d_min: float = math.inf
    d_max: float = -math.inf


def _blocks(starts: np.ndarray, n: int) -> Blocks:
    """(first sequence, end sequence, first token, end token) of blocks of whole sequences."""
    firsts = np.unique(np.searchsorted(starts, np.arange(0, n, _BLOCK_TOKENS)))
    firsts = firsts[firsts < starts.size].tolist()
    seq_bounds = [*firsts, starts.size]
    tok_bounds = [*starts[firsts].tolist(), n]
    return list(zip(seq_bounds[:-1], seq_bounds[1:], tok_bounds[:-1], tok_bounds[1:], strict=True))


def _token_band(config: CorrectionConfig) -> tuple[float, float] | None:
    """[lo, hi] on the token ratio that mis (token level) and IcePop keep together, or None for no band.

    Two lower bounds on the same weight combine into their maximum (w < a or w < b iff w < max(a, b)),
    two upper bounds into their minimum, so one pair of comparisons per token gives the masks and counts.
    """
    lo, hi = 0.0, math.inf
    if config.mode is CorrectionMode.MIS:
        lo, hi = mis_bounds(config.cap)
    if config.mask_ratio_lo is not None:
        lo = max(lo, config.mask_ratio_lo)
    if config.mask_ratio_hi is not None:
        hi = min(hi, config.mask_ratio_hi)
    return None if lo == 0.0 and hi == math.inf else (lo, hi)


def _sweep(
    lp_pi: np.ndarray,
    lp_mu: np.ndarray,
    lengths: np.ndarray,
    advantages: np.ndarray,
    starts: np.ndarray,
    blocks: Blocks,
    config: CorrectionConfig,
    band: tuple[float, float] | None,
) -> _Sweep:
    """One blocked pass: validates the log-probabilities, gathers every token-level sum, and applies the
    token-level ratio band (token level only), counting the tokens below and above it."""
    n, n_seq, cap = lp_pi.size, lengths.size, config.cap
    token_level = config.level is WeightLevel.TOKEN
    out = _Sweep(
        seq_delta=np.empty(n_seq),
        seq_w=np.empty(n_seq),
        seq_w2=np.empty(n_seq),
        seq_wt2=np.empty(n_seq) if token_level and cap is not None else None,
        seq_wmin=np.empty(n_seq) if config.veto_threshold is not None else None,
        w=np.empty(n) if token_level else None,
        keep=np.empty(n, dtype=bool) if band is not None else None,
        truncated_blocks=[],
    )
    size = max(t1 - t0 for _, _, t0, t1 in blocks)
    d_buf, x_buf, b_buf = np.empty(size), np.empty(size), np.empty(size, dtype=bool)
    for s0, s1, t0, t1 in blocks:
        m = t1 - t0
        pi, mu = lp_pi[t0:t1], lp_mu[t0:t1]
        # float32 inputs (the wire's) are widened block by block, in the cache: the difference is exact.
        d = np.subtract(pi, mu, out=d_buf[:m], dtype=np.float64)
        # max propagates NaN and catches +inf; -inf shows up as a non-finite delta below. Any
        # failure runs the full check, which names the first bad value.
        if not (float(pi.max()) <= LOGPROB_TOLERANCE and float(mu.max()) <= LOGPROB_TOLERANCE):
            _check_values(lp_pi, lp_mu, lengths, advantages)
        lo, hi = float(d.min()), float(d.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            _check_values(lp_pi, lp_mu, lengths, advantages)
            raise BatchValidationError("lp_pi", "non-finite log-ratio")  # unreachable: some lp is not finite
        if lo < -LOG_RATIO_CLAMP or hi > LOG_RATIO_CLAMP:  # the clamp is the identity otherwise
            np.clip(d, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP, out=d)
            lo, hi = (min(max(x, -LOG_RATIO_CLAMP), LOG_RATIO_CLAMP) for x in (lo, hi))
        out.d_min, out.d_max = min(out.d_min, lo), max(out.d_max, hi)
        local = starts[s0:s1] - t0
        np.add.reduceat(d, local, out=out.seq_delta[s0:s1])
        out.d2_sum += float(np.einsum("i,i->", d, d))  # one pass, numpy's own loop (no BLAS threads)
        w = np.exp(d, out=out.w[t0:t1] if out.w is not None else x_buf[:m])
        np.add.reduceat(w, local, out=out.seq_w[s0:s1])
        x = np.multiply(w, w, out=d)  # the block's deltas are summed: reuse their memory
        np.add.reduceat(x, local, out=out.seq_w2[s0:s1])
        if out.seq_wmin is not None:
            np.minimum.reduceat(w, local, out=out.seq_wmin[s0:s1])
        if out.keep is not None and band is not None:
            keep, above = out.keep[t0:t1], b_buf[:m]
            np.greater_equal(w, band[0], out=keep)
            np.less_equal(w, band[1], out=above)
            out.n_low += m - int(np.count_nonzero(keep))
            out.n_high += m - int(np.count_nonzero(above))
            np.logical_and(keep, above, out=keep)
        if out.seq_wt2 is not None:
            truncated = float(np.exp(hi)) > cap  # exp is monotone: the block's largest weight
            out.truncated_blocks.append(truncated)
            if truncated:
                wt = np.minimum(w, cap, out=x)
                out.wt_sum += float(wt.sum())
                out.n_truncated += int(np.count_nonzero(w > cap))
                np.add.reduceat(np.multiply(wt, wt, out=x), local, out=out.seq_wt2[s0:s1])
            else:
                out.wt_sum += float(out.seq_w[s0:s1].sum())
                out.seq_wt2[s0:s1] = out.seq_w2[s0:s1]
    return out


def _seq_moments(ws: np.ndarray, lengths_f: np.ndarray, a2: np.ndarray, adv_sq: float) -> _Moments:
    """Moments of per-token carried weights when every token of sequence s carries ws[s]."""
    lw2 = lengths_f * (ws * ws)
    return _Moments(int(lengths_f.sum()), _dot(lengths_f, ws), float(lw2.sum()), _dot(lw2, a2), adv_sq,
                    float(ws.min()), float(ws.max()))  # fmt: skip


@dataclass(frozen=True)
class _LossWeights:
    """The per-token loss coefficients and the statistics of the kept tokens' loss weights."""

    coef: np.ndarray  # float64[N]
    n_kept: int
    mean: float  # of the loss weights (wt, over their self-normalization mean) over the kept tokens
    std: float


def _kept_moments(n_kept: int, total: float, total_sq: float, norm: float) -> tuple[float, float]:
    """Mean and standard deviation of x / norm over n_kept values with sum x and sum x^2."""
    if n_kept == 0:
        return 0.0, 0.0
    mean = total / norm / n_kept
    return mean, math.sqrt(max(total_sq / (norm * norm) / n_kept - mean * mean, 0.0))


def _token_loss_weights(
    sweep: _Sweep, blocks: Blocks, cap: float | None, alpha: float, keep: np.ndarray | None, normalize: bool
) -> _LossWeights:
    """c = keep * ((1 - alpha) + alpha * min(w, C) / norm), written over the sweep's weights block by block.

    norm is the mean of min(w, C) over the kept tokens with self-normalization, else 1. Without a mask
    the kept tokens' sums are the sweep's; with one they are gathered by a first pass over the blocks,
    which also zeroes the masked weights (one pass in all without self-normalization).
    """
    coef = sweep.w
    assert coef is not None
    truncated = sweep.truncated_blocks or [False] * len(blocks)
    if keep is None:
        n_kept = coef.size
        if sweep.seq_wt2 is not None:
            total, total_sq = sweep.wt_sum, float(sweep.seq_wt2.sum())
        else:
            total, total_sq = float(sweep.seq_w.sum()), float(sweep.seq_w2.sum())
    else:
        n_kept, total, total_sq = int(np.count_nonzero(keep)), 0.0, 0.0
    norm = total / n_kept if normalize and n_kept and keep is None else 1.0
    scale = alpha / norm  # provisional without a mask: self-normalization needs the kept sum first

    def mix(c: np.ndarray, kb: np.ndarray | None, scale: float) -> None:
        if alpha == 0.0:
            if kb is None:
                c.fill(1.0)
            else:
                np.copyto(c, kb)
            return
        if scale != 1.0:
            np.multiply(c, scale, out=c)
        if alpha != 1.0:
            np.add(c, 1.0 - alpha, out=c)
            if kb is not None:
                np.multiply(c, kb, out=c)

    deferred = keep is not None and normalize
    for (_, _, t0, t1), clipped in zip(blocks, truncated, strict=True):
        c = coef[t0:t1]
        if clipped:
            np.minimum(c, cap, out=c)
        kb = None
        if keep is not None:
            kb = keep[t0:t1]
            np.multiply(c, kb, out=c)
            total += float(c.sum())
            total_sq += float(np.einsum("i,i->", c, c))
        if not deferred:
            mix(c, kb, scale)
    if deferred:
        norm = total / n_kept if n_kept else 1.0
        for _, _, t0, t1 in blocks:
            mix(coef[t0:t1], keep[t0:t1] if keep is not None else None, alpha / norm)
    mean, std = _kept_moments(n_kept, total, total_sq, norm)
    return _LossWeights(coef, n_kept, mean, std)


def _sequence_loss_weights(
    wts: np.ndarray, lengths: np.ndarray, lengths_f: np.ndarray, alpha: float, seq_keep: np.ndarray | None,
    normalize: bool,
) -> _LossWeights:  # fmt: skip
    """Sequence levels: every token of s carries (1 - alpha) + alpha * wts[s] / norm, or 0 if s is dropped;
    norm is the mean of wts over the kept sequences with self-normalization, else 1."""
    kept = wts if seq_keep is None else wts[seq_keep]
    kept_len = lengths_f if seq_keep is None else lengths_f[seq_keep]
    norm = float(kept.mean()) if normalize and kept.size else 1.0
    seq_coef = (1.0 - alpha) + alpha * (wts / norm)
    if seq_keep is not None:
        seq_coef = np.where(seq_keep, seq_coef, 0.0)
    n_kept = int(kept_len.sum())
    mean, std = _kept_moments(n_kept, _dot(kept_len, kept), _dot(kept_len, kept * kept), norm)
    return _LossWeights(np.repeat(seq_coef, lengths), n_kept, mean, std)


def _needs_general_path(config: CorrectionConfig) -> bool:
    """Masks the blocked path does not apply: divergence rejection, M2PO, IcePop at sequence levels."""
    icepop = config.mask_ratio_lo is not None or config.mask_ratio_hi is not None
    return (
        config.reject_rule is not None
        or config.m2po_threshold is not None
        or (icepop and config.level is not WeightLevel.TOKEN)
    )


def compute_coefficient(
    batch: MismatchArrays, config: CorrectionConfig, prev_ema: float | None = None
) -> CoefficientResult:
    """alpha, every diagnostic and the per-token loss coefficients of one batch (module docstring).

    prev_ema is the previous batch's `alpha_ema` of the same run (None for the first batch, or
    without smoothing). Raises BatchValidationError naming the field for any invalid input.
    Vectorized: one blocked pass over the tokens (exp once per token), then O(S) work, then one
    pass writing the coefficients; no Python loop over sequences.
    """
    if prev_ema is not None and not math.isfinite(prev_ema):
        raise BatchValidationError("prev_ema", f"non-finite previous EMA {prev_ema}")
    lp_pi, lp_mu, lengths, advantages = _checked_shapes(batch)
    if not np.isfinite(advantages).all():
        _check_values(lp_pi, lp_mu, lengths, advantages)
    n, n_seq, cap, level = lp_pi.size, lengths.size, config.cap, config.level
    token_level = level is WeightLevel.TOKEN
    general = _needs_general_path(config)
    starts = sequence_starts(lengths)
    blocks = _blocks(starts, n)
    band = _token_band(config) if token_level and not general else None
    sweep = _sweep(lp_pi, lp_mu, lengths, advantages, starts, blocks, config, band)

    lengths_f = lengths.astype(np.float64)
    a = _unit_advantages(advantages)
    a2 = a * a
    adv_sq = _dot(lengths_f, a2)  # sum over tokens of a_i^2
    delta_sum = float(sweep.seq_delta.sum())
    # mean(w - 1 - delta), each term >= 0; L_s leaves each sequence's sum of w exactly (Sterbenz).
    kl = max((float((sweep.seq_w - lengths_f).sum()) - delta_sum) / n, 0.0)
    w_tok_sq = float(sweep.seq_w2.sum())
    chi2_token = w_tok_sq / n - 1.0
    w_seq = np.exp(np.clip(sweep.seq_delta, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    chi2_sequence = float(np.mean(w_seq * w_seq)) - 1.0

    if token_level:
        # exp is monotone, so the extreme weights are the exps of the extreme deltas.
        w_min, w_max = float(np.exp(sweep.d_min)), float(np.exp(sweep.d_max))
        raw = _Moments(n, float(sweep.seq_w.sum()), w_tok_sq, _dot(sweep.seq_w2, a2), adv_sq, w_min, w_max)
        if cap is not None and w_max > cap:
            assert sweep.seq_wt2 is not None
            applied = _Moments(n, sweep.wt_sum, float(sweep.seq_wt2.sum()), _dot(sweep.seq_wt2, a2), adv_sq,
                               min(w_min, cap), cap)  # fmt: skip
        else:
            applied = raw
        n_truncated = sweep.n_truncated
    else:
        ws = w_seq if level is WeightLevel.SEQUENCE else np.exp(sequence_log_weights(sweep.seq_delta, lengths_f, level))
        wts = applied_weights(ws, cap)
        raw = _seq_moments(ws, lengths_f, a2, adv_sq)
        applied = _seq_moments(wts, lengths_f, a2, adv_sq) if cap is not None and raw.maximum > cap else raw
        n_truncated = int(lengths[ws > cap].sum()) if cap is not None else 0

    applied_stats, raw_stats = _stats(applied), _stats(raw)
    s = severity(kl, config.tau_kl)
    alpha_raw = s * applied_stats.reliability * applied_stats.penalty
    alpha_ema, alpha_ais = smoothed_alpha(alpha_raw, prev_ema, config)
    alpha = mode_alpha(config, alpha_ais)

    # Masks: every sequence-level decision on S values, expanded to tokens once.
    seq_keep = np.ones(n_seq, dtype=bool)
    n_vetoed = n_opsm = 0
    if sweep.seq_wmin is not None:
        vetoed = sweep.seq_wmin < config.veto_threshold
        n_vetoed = int(lengths[vetoed].sum())
        seq_keep &= ~vetoed
    if config.opsm_kl_threshold is not None:
        off_policy = (advantages < 0.0) & (-sweep.seq_delta / lengths_f > config.opsm_kl_threshold)
        n_opsm = int(lengths[off_policy].sum())
        seq_keep &= ~off_policy
    n_low, n_high = sweep.n_low, sweep.n_high
    if not token_level and not general and config.mode is CorrectionMode.MIS:  # mis drops whole sequences
        lo_w, hi_w = mis_bounds(cap)
        low, high = ws < lo_w, ws > hi_w
        n_low, n_high = int(lengths[low].sum()), int(lengths[high].sum())
        seq_keep &= ~(low | high)
    seq_masking = not seq_keep.all()

    ess_seq = min(float(w_seq.sum()) ** 2 / _dot(w_seq, w_seq), float(n_seq))
    if general:
        # Divergence rejection, M2PO or IcePop at a sequence level: the masks on explicit per-token arrays.
        # Token level: the sweep's weights are exp of the clamped deltas, the carried weights themselves.
        carried = sweep.w if sweep.w is not None else np.repeat(ws, lengths)
        outcome = apply_corrections(carried, lengths, config, np.repeat(seq_keep, lengths) if seq_masking else None,
                                    lambda: log_ratios(lp_pi, lp_mu))  # fmt: skip
        keep = outcome.keep
        counts = (outcome.n_low, outcome.n_high, outcome.n_rejected, outcome.n_m2po)
        if token_level:  # the loss weights and their kept-token statistics on the blocked path
            loss = _token_loss_weights(sweep, blocks, cap, alpha, keep, config.self_normalize)
            token_coef, n_kept, w_mean, w_std = loss.coef, loss.n_kept, loss.mean, loss.std
        else:
            weights = applied_weights(carried, cap)
            if config.self_normalize:
                weights = self_normalized(weights, keep, lengths, level)
            token_coef = np.where(keep, (1.0 - alpha) + alpha * weights, 0.0)
            n_kept = int(np.count_nonzero(keep))
            kept_w = weights[keep]
            w_mean, w_std = (float(kept_w.mean()), float(kept_w.std())) if n_kept else (0.0, 0.0)
    else:  # the blocked path: mis, veto, opsm, IcePop (token level) and self-normalization
        if token_level:
            keep_mask = sweep.keep
            if seq_masking:
                expanded = np.repeat(seq_keep, lengths)
                keep_mask = expanded if keep_mask is None else np.logical_and(keep_mask, expanded, out=keep_mask)
            loss = _token_loss_weights(sweep, blocks, cap, alpha, keep_mask, config.self_normalize)
        else:
            keep_mask = np.repeat(seq_keep, lengths) if seq_masking else None
            loss = _sequence_loss_weights(wts, lengths, lengths_f, alpha, seq_keep if seq_masking else None,
                                          config.self_normalize)  # fmt: skip
        token_coef, n_kept, w_mean, w_std = loss.coef, loss.n_kept, loss.mean, loss.std
        keep = keep_mask if keep_mask is not None else np.ones(n, dtype=bool)
        counts = (n_low, n_high, 0, 0)
    corrections = CorrectionStats(
        frac_mask_low=counts[0] / n, frac_mask_high=counts[1] / n, frac_rejected=counts[2] / n,
        frac_m2po=counts[3] / n, frac_kept=n_kept / n, weight_std=w_std, loss_weight_mean=w_mean,
        ess_sequence=ess_seq, m2=sweep.d2_sum / n,
    )  # fmt: skip

    kl_k1 = -delta_sum / n
    return CoefficientResult(
        mode=config.mode,
        level=level,
        n_tokens=n,
        n_sequences=n_seq,
        alpha=alpha,
        alpha_raw=alpha_raw,
        alpha_ema=alpha_ema,
        alpha_ais=alpha_ais,
        kl=kl,
        severity=s,
        applied=applied_stats,
        raw=raw_stats,
        kl_k1=kl_k1,
        chi2_token=chi2_token,
        chi2_sequence=chi2_sequence,
        ppl_ratio=math.exp(kl_k1),
        frac_truncated=n_truncated / n,
        frac_masked=(n - n_kept) / n,
        frac_vetoed=n_vetoed / n,
        frac_opsm=n_opsm / n,
        corrections=corrections,
        warnings=health_warnings(applied_stats.reliability, raw_stats.weight_mean, kl, chi2_token),
        token_coef=token_coef,
        token_keep=keep,
    )
