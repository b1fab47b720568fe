"""Benchmark: `compute_coefficient` on 10k, 100k and 1M tokens at every weight level, per regime.

Prints, per regime, size and level: the median and p90 wall time, the median CPU time of the calling
thread (which the machine's load inflates less than wall time), the wall time per 1M tokens and its
ratio to the 5 ms target of issue 11 (<= 1 meets it), and the ratio to a bare `np.exp` over as many
float64 values (the one transcendental call per token that any implementation must make). Everything is
timed interleaved in one process. `--baseline-rev REV` also times the `aisrl/core` of a git revision
(loaded from git under a private package name, so both run in this process, interleaved) and prints
its median and the speed-up. The load average is printed before and after. Nothing is asserted.

Regimes: an FP8-like mismatch (no weight reaches the cap), also with float32 log-probabilities
(what the diagnostics service decodes from the wire; the baseline copied them to float64 first); a
heavy one (about 8% of the tokens truncated) alone, with mis, veto and off-policy sequence masking,
with self-normalized tis and with IcePop (all on the blocked path); and the heavy one with IcePop,
divergence rejection and M2PO under AIS (masks on the per-token path).
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from aisrl.core import ais, types
from aisrl.core.synthetic import synthetic_batch

ROOT = Path(__file__).resolve().parents[1]
MEAN_LENGTH = 250
SIZES = (10_000, 100_000, 1_000_000)
TARGET_MS_PER_M = 5.0  # issue 11: compute_coefficient on 1M tokens <= 5 ms
HEAVY = 0.5
REGIMES: dict[str, tuple[float, dict[str, Any]]] = {
    # name: (logprob noise of the synthetic batch, config fields)
    "fp8-like ais": (0.05, {"mode": "ais"}),
    "fp8-like ais, float32 in": (0.05, {"mode": "ais"}),  # lp_pi, lp_mu as the service decodes them
    "heavy ais": (HEAVY, {"mode": "ais"}),
    "heavy mis+veto+opsm": (HEAVY, {"mode": "mis", "veto_threshold": 0.25, "opsm_kl_threshold": 0.0}),
    "heavy tis self-norm": (HEAVY, {"mode": "tis", "self_normalize": True}),
    "heavy ais+icepop": (HEAVY, {"mode": "ais", "mask_ratio_lo": 0.5, "mask_ratio_hi": 2.0}),
    "heavy ais+icepop+reject+m2po": (
        HEAVY,
        {
            "mode": "ais",
            "mask_ratio_lo": 0.5,
            "mask_ratio_hi": 2.0,
            "reject_rule": "seq_max_k3",
            "reject_threshold": 5.0,
            "m2po_threshold": 0.1,
        },
    ),
}


def load_core(rev: str) -> tuple[ModuleType, ModuleType]:
    """(ais, types) of `aisrl/core` at git revision rev, imported as a private package beside ours."""
    package = f"_aisrl_core_{rev.replace('/', '_').replace('-', '_').replace('.', '_')}"
    names = subprocess.run(["git", "ls-tree", "--name-only", rev, "aisrl/core/"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()  # fmt: skip
    folder = Path(tempfile.mkdtemp(prefix="bench_ais_")) / package
    folder.mkdir()
    for name in names:
        if name.endswith(".py"):
            text = subprocess.run(["git", "show", f"{rev}:{name}"], cwd=ROOT, check=True, capture_output=True,
                                  text=True).stdout  # fmt: skip
            (folder / Path(name).name).write_text(text.replace("aisrl.core.", f"{package}."))
    sys.path.insert(0, str(folder.parent))
    try:
        return importlib.import_module(f"{package}.ais"), importlib.import_module(f"{package}.types")
    finally:
        sys.path.remove(str(folder.parent))


def _median_p90(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[int(0.9 * (len(ordered) - 1))]


def _repeats(n_tokens: int, scale: float) -> int:
    return max(9, int(scale * max(15, min(300, 30_000_000 // n_tokens))))


def interleaved(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, tuple[list[float], list[float]]]:
    """{name: (wall seconds, thread CPU seconds)} of every call, one of each per round, round after round."""
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in calls}
    for call in calls.values():
        call()  # warm-up
    for _ in range(repeats):
        for name, call in calls.items():
            wall, cpu = time.perf_counter(), time.thread_time()
            call()
            times[name][1].append(time.thread_time() - cpu)
            times[name][0].append(time.perf_counter() - wall)
    return times


def _load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg()) + f" on {os.cpu_count()} CPUs"


def _row(regime: str, n: int, level: str, times: dict[str, tuple[list[float], list[float]]], base: bool) -> str:
    med, p90 = _median_p90(times["ours"][0])
    cpu = statistics.median(times["ours"][1])
    per_m = med * 1e3 * 1e6 / n
    row = (f"{regime:29s} {n:>9,d} {level:9s} {med * 1e3:7.2f} [{p90 * 1e3:7.2f}] {cpu * 1e3:7.2f} {per_m:7.2f} "
           f"{per_m / TARGET_MS_PER_M:5.2f} {med / statistics.median(times['exp'][0]):5.1f}")  # fmt: skip
    if "base" in times:
        base_med, base_cpu = (statistics.median(x) for x in times["base"])
        row += f" {base_med * 1e3:7.2f} {base_cpu * 1e3:7.2f} {base_med / med:5.2f}x/{base_cpu / cpu:4.2f}x"
    elif base:
        row += f" {'n/a':>7s}"
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="token counts")
    parser.add_argument("--levels", nargs="+", default=[x.value for x in types.WeightLevel], help="weight levels")
    parser.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES), metavar="REGIME",
                        help=f"regimes (default: all of {', '.join(REGIMES)})")  # fmt: skip
    parser.add_argument("--baseline-rev", help="also time aisrl/core at this git revision (e.g. the commit before)")
    parser.add_argument("--repeat-scale", type=float, default=1.0, help="multiplies the repeats per row")
    args = parser.parse_args(argv)
    cores: dict[str, tuple[ModuleType, ModuleType]] = {"ours": (ais, types)}
    if args.baseline_rev:
        cores["base"] = load_core(args.baseline_rev)
    base = args.baseline_rev
    print(f"compute_coefficient, sequences of ~{MEAN_LENGTH} tokens; {_load()}")
    print("ms: wall median [p90]; cpu: thread CPU median; /1M: wall ms per 1M tokens; /5ms: /1M over the 5 ms "
          "target; exp: wall median over np.exp's on as many float64, timed interleaved in this run")  # fmt: skip
    if base:
        print(f"base: aisrl/core at {base}, wall and cpu medians; speed-up: base over ours, wall/cpu")
    print(f"{'regime':29s} {'tokens':>9s} {'level':9s} {'ms':>7s} {'[p90]':>9s} {'cpu':>7s} {'/1M':>7s} {'/5ms':>5s} "
          f"{'exp':>5s}" + (f" {'base':>7s} {'cpu':>7s} {'speed-up':>11s}" if base else ""))  # fmt: skip
    for regime in args.regimes:
        mismatch, fields = REGIMES[regime]
        for size in args.sizes:
            batch = synthetic_batch(n_sequences=max(1, size // MEAN_LENGTH), mean_length=MEAN_LENGTH,
                                    mismatch=mismatch, seed=7)  # fmt: skip
            if regime.endswith("float32 in"):
                batch = replace(batch, lp_pi=batch.lp_pi.astype(np.float32), lp_mu=batch.lp_mu.astype(np.float32))
            exp_input = np.ascontiguousarray(batch.lp_pi - batch.lp_mu)
            for level in args.levels:
                calls: dict[str, Callable[[], object]] = {"exp": lambda x=exp_input: np.exp(x)}
                for name, (core, core_types) in cores.items():
                    try:
                        config = core_types.CorrectionConfig(level=level, **fields)
                    except ValueError:  # a baseline without this correction
                        continue
                    calls[name] = lambda c=core, b=batch, cfg=config: c.compute_coefficient(b, cfg)
                times = interleaved(calls, _repeats(batch.lp_pi.size, args.repeat_scale))
                print(_row(regime, batch.lp_pi.size, level, times, bool(base)), flush=True)
    heavy_noise, heavy_fields = REGIMES["heavy mis+veto+opsm"]
    r = ais.compute_coefficient(synthetic_batch(SIZES[-1] // MEAN_LENGTH, MEAN_LENGTH, heavy_noise, seed=7),
                                types.CorrectionConfig(**heavy_fields))  # fmt: skip
    print(f"(heavy regime, 1M tokens, token level: {r.frac_truncated:.1%} of the tokens truncated, "
          f"{r.frac_masked:.1%} masked: {r.frac_vetoed:.1%} vetoed, {r.frac_opsm:.1%} by opsm)")  # fmt: skip
    print(_load())


if __name__ == "__main__":
    main()
