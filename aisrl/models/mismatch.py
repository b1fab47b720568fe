"""`aisrl model mismatch`: how far each rollout precision's sampling policy mu is from the learner's pi.

For N held-out prompts of a task, every run (a precision, optionally with an FP8 KV cache) samples
G completions per prompt with the vLLM engine, all runs with the same seeds; the learner's float32
forward of the same checkpoint scores the same tokens; the per-token log ratio d = lp_pi - lp_mu
gives the table: per-token k3 KL (mean, p99), the spread (std) of the sequence log ratio sum(d),
the fraction of tokens with |d| > 0.1, the AIS diagnostics of that batch (rho, s, p, alpha from
aisrl.core with the default correction settings and the task's GRPO advantages) and tokens/s.

Invariant: every number is measured in this call. The bf16 run is the floor (engine vs learner
numerics, BF16 vs float32); emulated schemes are never faster than bf16 (their rounding runs in
Python on top of the same GEMMs): their tokens/s is a cost of emulation, not a speed.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from aisrl.models.config import MismatchSettings

BIG_RATIO = 0.1  # |log ratio| above which a token counts as strongly mismatched


@dataclass(frozen=True)
class MismatchRow:
    """One run's measurements."""

    run: str  # precision[+kv cache dtype] as given
    label: str  # the Precision / KvCacheDtype labels its trajectories would carry
    tokens: int
    tokens_per_s: float
    k3_mean: float
    k3_p99: float
    seq_log_ratio_std: float
    frac_big: float  # fraction of tokens with |d| > BIG_RATIO
    rho: float
    s: float
    p: float
    alpha: float
    reward_mean: float


def mismatch_stats(lp_pi: np.ndarray, lp_mu: np.ndarray, lengths: np.ndarray) -> dict[str, float]:
    """Token and sequence statistics of d = lp_pi - lp_mu over sequences packed by lengths (pure)."""
    d = lp_pi.astype(np.float64) - lp_mu.astype(np.float64)
    k3 = np.exp(d) - 1.0 - d
    seq = np.add.reduceat(d, np.concatenate([[0], np.cumsum(lengths)[:-1]]))
    return {
        "k3_mean": float(k3.mean()),
        "k3_p99": float(np.quantile(k3, 0.99)),
        "seq_log_ratio_std": float(seq.std()),
        "frac_big": float(np.mean(np.abs(d) > BIG_RATIO)),
    }


def learner_logprobs(
    model: torch.nn.Module, completions: list, temperature: float, batch: int = 64
) -> list[np.ndarray]:
    """log_softmax(logits / T) of each completion's tokens under the model (right-padded batches, no grad)."""
    out = []
    for first in range(0, len(completions), batch):
        part = completions[first : first + batch]
        seqs = [np.concatenate([c.prompt_token_ids, c.token_ids]).astype(np.int64) for c in part]
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)], mask[i, : len(s)] = torch.from_numpy(s), 1
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        lp = torch.log_softmax(logits / temperature, dim=-1)
        for i, c in enumerate(part):
            start, n = len(c.prompt_token_ids) - 1, len(c.token_ids)
            targets = torch.from_numpy(c.token_ids.astype(np.int64))
            out.append(lp[i, start : start + n].gather(1, targets[:, None])[:, 0].numpy())
    return out


def _label(engine) -> str:
    from aisrl.v1 import common_pb2

    label = engine.precision_label
    precision = common_pb2.Precision.Name(label.precision).removeprefix("PRECISION_")
    kv = common_pb2.KvCacheDtype.Name(label.kv_cache_dtype).removeprefix("KV_CACHE_DTYPE_")
    return f"{precision} / kv {kv}"


def measure(settings: MismatchSettings, log=print) -> list[MismatchRow]:
    """Runs every configured precision in turn (one engine at a time) and returns their rows."""
    from aisrl.core.ais import compute_coefficient
    from aisrl.core.grpo import group_advantages
    from aisrl.core.types import CorrectionConfig, MismatchArrays
    from aisrl.models.tiny import load_model
    from aisrl.services.rollout.engine import EngineConfig, SamplingConfig
    from aisrl.services.rollout.vllm_engine import VllmEngine
    from aisrl.tasks import get_task

    model_dir = Path(settings.model)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"no model at {model_dir} (create one with `aisrl model init --out {model_dir}`)")
    task = get_task(settings.task)
    problems = task.eval_split(settings.prompts)
    prompts = [p.prompt for p in problems]
    sampling = SamplingConfig(
        n=settings.group_size, max_tokens=settings.max_tokens, temperature=settings.temperature, seed=settings.seed
    )
    learner = load_model(model_dir, torch.float32).eval()
    rows = []
    runs = settings.run_list()
    for i, (precision, kv) in enumerate(runs, 1):
        name = precision if kv == "auto" else f"{precision}+{kv}"
        config = EngineConfig(
            precision=precision, kv_cache_dtype=kv, compute_dtype=settings.compute_dtype,
            fp8_granularity=settings.fp8_granularity, seed=settings.seed, in_process=True,
        )  # fmt: skip
        start = time.perf_counter()
        engine = VllmEngine(model_dir, config)
        try:
            log(f"[{i}/{len(runs)}] {name}: engine up in {time.perf_counter() - start:.1f} s ({_label(engine)})")
            engine.generate(prompts[:2], sampling)  # warm-up, not timed
            t0 = time.perf_counter()
            groups = engine.generate(prompts, sampling)
            seconds = time.perf_counter() - t0
            label = _label(engine)
        finally:
            engine.close()
        completions = [c for g in groups for c in g]
        lp_mu = np.concatenate([c.logprobs for c in completions])
        lp_pi = np.concatenate(learner_logprobs(learner, completions, settings.temperature))
        lengths = np.array([len(c.token_ids) for c in completions], dtype=np.int64)
        rewards = np.array([[task.verify(p, c.answer) for c in g] for p, g in zip(problems, groups, strict=True)])
        advantages = group_advantages(rewards).reshape(-1)
        result = compute_coefficient(MismatchArrays(lp_pi, lp_mu, lengths, advantages), CorrectionConfig())
        row = MismatchRow(
            run=name, label=label, tokens=int(lengths.sum()), tokens_per_s=float(lengths.sum() / seconds),
            **mismatch_stats(lp_pi, lp_mu, lengths), rho=result.reliability, s=result.severity, p=result.penalty,
            alpha=result.alpha_ais, reward_mean=float(rewards.mean()),
        )  # fmt: skip
        log(f"[{i}/{len(runs)}] {name}: {row.tokens} tokens in {seconds:.1f} s, k3 KL {row.k3_mean:.3g}")
        rows.append(row)
    return rows


def table(rows: list[MismatchRow], title: str):
    """A rich Table of the rows."""
    from rich.table import Table

    t = Table(title=title)
    for header in ("run", "k3 KL mean", "k3 p99", "seq log-ratio std", "|d|>0.1", "rho", "s", "p", "alpha",
                   "reward", "tokens/s"):  # fmt: skip
        t.add_column(header, justify="left" if header == "run" else "right")
    for r in rows:
        t.add_row(
            r.run, f"{r.k3_mean:.2e}", f"{r.k3_p99:.2e}", f"{r.seq_log_ratio_std:.3f}", f"{r.frac_big:.2%}",
            f"{r.rho:.3f}", f"{r.s:.3f}", f"{r.p:.3f}", f"{r.alpha:.3f}", f"{r.reward_mean:.3f}",
            f"{r.tokens_per_s:,.0f}",
        )  # fmt: skip
    return t


def run(settings: MismatchSettings) -> list[MismatchRow]:
    """The command: measure, print the table, and write JSON when asked."""
    from rich.console import Console

    console = Console()
    rows = measure(settings, log=console.print)
    title = (
        f"Rollout precision vs float32 learner: {settings.model}, {settings.prompts} held-out {settings.task} prompts "
        f"x {settings.group_size}, T={settings.temperature}, engine {settings.compute_dtype} (emulated: no speedup)"
    )
    console.print(table(rows, title))
    if settings.out:
        Path(settings.out).parent.mkdir(parents=True, exist_ok=True)
        Path(settings.out).write_text(
            json.dumps({"settings": settings.model_dump(), "rows": [asdict(r) for r in rows]}, indent=2)
        )
        console.print(f"wrote {settings.out}")
    return rows
