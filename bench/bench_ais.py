"""Benchmark: `compute_coefficient` on 10k, 100k and 1M tokens at every weight level.

Prints the median and p90 wall time and the ratio to a bare `np.exp` over an array of the same
token count, timed interleaved with it in the same run (the one transcendental call per token
that any implementation must make, so the ratio says how much the rest costs). Two regimes: an
FP8-like mismatch (no weight reaches the cap) and a heavy one (about 20% of the tokens truncated,
with mis, veto and off-policy sequence masking at work), and the heavy one with IcePop, divergence
rejection and M2PO under AIS. Nothing is asserted.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from aisrl.core.ais import compute_coefficient
from aisrl.core.synthetic import synthetic_batch
from aisrl.core.types import CorrectionConfig, CorrectionMode, WeightLevel

MEAN_LENGTH = 250
SIZES = (10_000, 100_000, 1_000_000)
REGIMES = {
    # name: (logprob noise of the synthetic batch, config fields)
    "fp8-like ais": (0.05, {"mode": CorrectionMode.AIS}),
    "heavy mis+veto+opsm": (0.5, {"mode": CorrectionMode.MIS, "veto_threshold": 0.25, "opsm_kl_threshold": 0.0}),
    # The composable corrections (docs/corrections.md): explicit per-token masks, M2PO sorts its large tokens.
    "heavy ais+icepop+reject+m2po": (
        0.5,
        {
            "mode": CorrectionMode.AIS,
            "mask_ratio_lo": 0.5,
            "mask_ratio_hi": 2.0,
            "reject_rule": "seq_max_k3",
            "reject_threshold": 5.0,
            "m2po_threshold": 0.1,
        },
    ),
}


def _median_p90(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[int(0.9 * (len(ordered) - 1))]


def _repeats(n_tokens: int) -> int:
    return max(15, min(300, 30_000_000 // n_tokens))


def main() -> None:
    print(f"compute_coefficient, sequences of ~{MEAN_LENGTH} tokens; times in ms, median [p90];")
    print("ratio = median / median of np.exp over as many float64 values, timed interleaved in this run")
    header = f"{'regime':22s} {'tokens':>10s} {'level':10s} {'median':>8s} {'[p90]':>9s} {'np.exp':>8s} {'ratio':>6s}"
    print(header)
    for regime, (mismatch, fields) in REGIMES.items():
        for size in SIZES:
            batch = synthetic_batch(n_sequences=size // MEAN_LENGTH, mean_length=MEAN_LENGTH, mismatch=mismatch, seed=7)
            n = batch.lp_pi.size
            baseline_input = np.ascontiguousarray(batch.lp_pi - batch.lp_mu)
            for level in WeightLevel:
                config = CorrectionConfig(level=level, **fields)
                compute_coefficient(batch, config)  # warm-up
                ours, bare = [], []
                for _ in range(_repeats(n)):
                    start = time.perf_counter()
                    np.exp(baseline_input)
                    middle = time.perf_counter()
                    compute_coefficient(batch, config)
                    bare.append(middle - start)
                    ours.append(time.perf_counter() - middle)
                med, p90 = _median_p90(ours)
                base, _ = _median_p90(bare)
                print(f"{regime:22s} {n:>10,d} {level.value:10s} {med * 1e3:8.3f} [{p90 * 1e3:7.3f}] "
                      f"{base * 1e3:8.3f} {med / base:6.2f}", flush=True)  # fmt: skip
    heavy_noise, heavy_fields = REGIMES["heavy mis+veto+opsm"]
    r = compute_coefficient(synthetic_batch(SIZES[-1] // MEAN_LENGTH, MEAN_LENGTH, heavy_noise, seed=7),
                            CorrectionConfig(**heavy_fields))  # fmt: skip
    print(f"(heavy regime, 1M tokens, token level: {r.frac_truncated:.1%} of the tokens truncated, "
          f"{r.frac_masked:.1%} masked: {r.frac_vetoed:.1%} vetoed, {r.frac_opsm:.1%} by opsm)")  # fmt: skip


if __name__ == "__main__":
    main()
