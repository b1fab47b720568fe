"""Benchmark: the cluster against the simplest peer a user could pick instead, TRL's `GRPOTrainer`.

Three arms, one after another in one run, on the same model, task, batch, token limit and stop rule:
- TRL 1.16 `GRPOTrainer` in this process: HF `generate` (no vLLM), float32, `--trl-threads` torch
  threads (default: every CPU), one optimizer step per generated batch (`per_device_train_batch_size`
  = prompts x G, so no old-logprob forward, as TRL does when generation and update are aligned),
  beta 0 (no reference model), the learner's lr and temperature, the rollout's stop rule (the
  end of the first line: every newline token is an EOS for generation and for TRL's completion mask),
  gradient checkpointing off (TRL's default is on: `--trl-gradient-checkpointing`; off is faster here);
  reward: the task's own verifier;
- the cluster: `aisrl up` on deploy/cluster.yaml (bench_cluster.run_cluster);
- optionally (`--sync`) the in-process synchronous loop of bench_cluster.

Printed per arm: trained completion tokens/s over the steady state (steps 2..N, bench_cluster's
definition), seconds per step and the phase breakdown; then the three targets as ratios of this run:
1. trained tokens/s, cluster / TRL;
2. sampling tokens/s: each rollout replica's completion tokens over its seconds inside the engine
   (`sample_s` of its `batch written` events in steps 2..N), summed over replicas, / HF `generate`'s
   completion tokens over its seconds in TRL;
3. learner step tokens/s: trained tokens over the learner's lp_pi + diagnostics + update seconds, /
   trained tokens over TRL's training part (its step minus generation and scoring).
Nothing is asserted; on a shared machine, compare the ratios, not absolutes. TRL is a benchmark-only
dependency: `pip install -e '.[bench]'`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.bench_cluster import CLUSTER_PHASES, cluster_config, run_cluster, run_sync, steady_rate
from bench.common import add_model_options, resolve_model

TRL_MISSING = "bench_peer needs TRL, a benchmark-only dependency: pip install -e '.[bench]' (trl==1.16.*)"


def trl_missing() -> str | None:
    """The message to print when TRL cannot be imported, else None."""
    return None if importlib.util.find_spec("trl") else TRL_MISSING


def trl_config_kwargs(args: argparse.Namespace, learner: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """GRPOConfig keyword arguments for the same work as the cluster's learner (module docstring)."""
    return {
        "output_dir": str(out_dir), "per_device_train_batch_size": args.batch * args.group,
        "gradient_accumulation_steps": 1, "num_generations": args.group, "max_completion_length": args.tokens,
        "learning_rate": float(learner["lr"]), "temperature": float(learner["temperature"]), "beta": 0.0,
        "max_steps": args.steps, "num_train_epochs": 1, "use_cpu": True, "bf16": False, "fp16": False,
        "logging_steps": 1, "report_to": "none", "save_strategy": "no", "disable_tqdm": True,
        "dataloader_num_workers": 0, "seed": 0, "lr_scheduler_type": "constant", "warmup_steps": 0,
        # TRL's GRPOConfig turns gradient checkpointing on by default; it recomputes the forward pass in the
        # backward to save memory, which a 1M-parameter model does not need: off, the peer is faster.
        "gradient_checkpointing": args.trl_gradient_checkpointing,
    }  # fmt: skip


def rate(tokens: float, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else float("nan")


def sampling_rate(batches_by_replica: list[list[dict[str, Any]]], t0: float, t1: float) -> float:
    """Sum over replicas of completion tokens / seconds inside the engine, for batches written in (t0, t1]."""
    total = 0.0
    for batches in batches_by_replica:
        inside = [b for b in batches if t0 < b["ts"] <= t1 and "sample_s" in b]
        seconds = sum(float(b["sample_s"]) for b in inside)
        if seconds > 0:
            total += sum(int(b["tokens"]) for b in inside) / seconds
    return total


def cluster_learner_seconds(step: dict[str, Any]) -> float:
    """The learner's own compute of one step: lp_pi, the diagnostics round trip (alpha) and the update."""
    seconds = step["seconds"]
    return sum(float(seconds.get(k, 0.0)) for k in ("prepare", "diagnostics", "update"))


# ----------------------------------------------------------------------------- the TRL arm


def run_trl(args: argparse.Namespace, learner: dict[str, Any], model_dir: Path, tmp: Path) -> dict[str, Any]:
    """`args.steps` GRPOTrainer steps; per step: end time, trained tokens, generation and training seconds."""
    import warnings

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback

    warnings.filterwarnings("ignore", message="TRL currently supports vLLM")  # vLLM is not used by this arm
    from trl import GRPOConfig, GRPOTrainer

    from aisrl.services.rollout.engine import newline_token_ids
    from aisrl.tasks import get_task, problem_from_json, problem_to_json

    torch.set_num_threads(args.trl_threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    # TRL stops generation and masks completions at model.generation_config.eos_token_id: the first line.
    model.generation_config.eos_token_id = sorted({*newline_token_ids(tokenizer), tokenizer.eos_token_id})
    task = get_task("countdown")
    problems = [task.train_problem(0, i) for i in range(args.steps * args.batch)]
    dataset = Dataset.from_dict({"prompt": [p.prompt for p in problems],
                                 "problem": [problem_to_json(p) for p in problems]})  # fmt: skip

    def countdown_reward(prompts, completions, problem, **_):
        return [task.verify(problem_from_json(j), c) for j, c in zip(problem, completions, strict=True)]

    trainer = GRPOTrainer(
        model=model, reward_funcs=countdown_reward, args=GRPOConfig(**trl_config_kwargs(args, learner, tmp / "trl")),
        train_dataset=dataset, processing_class=tokenizer,
    )  # fmt: skip
    steps: list[dict[str, float]] = []
    current: dict[str, float] = {}

    def timed(name: str, fn, count=None):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            current[name] = current.get(name, 0.0) + time.perf_counter() - t0
            if count:
                current[count[0]] = current.get(count[0], 0) + count[1](out)
            return out

        return wrapper

    trainer._generate_single_turn = timed(
        "generate", trainer._generate_single_turn, ("sampled", lambda out: sum(len(c) for c in out[0]))
    )
    trainer._generate_and_score_completions = timed(
        "generate_score", trainer._generate_and_score_completions,
        ("tokens", lambda out: int(out["completion_mask"].sum())),
    )  # fmt: skip

    class StepClock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            current.clear()
            current["begin"] = time.perf_counter()

        def on_step_end(self, *_, **__):
            end = time.perf_counter()
            steps.append({**current, "end": end, "step": end - current["begin"]})

    trainer.remove_callback(PrinterCallback)  # TRL's per-step log lines
    trainer.add_callback(StepClock())
    trainer.train()
    return {"steps": steps}


# ----------------------------------------------------------------------------- report


def target_lines(trl: dict | None, cluster: dict | None, sync: dict | None) -> list[str]:
    """The targets of issue 11 as ratios of this run (module docstring), for the arms that ran."""
    lines = []
    if trl and cluster:
        rows = [
            ("trained tokens/s, cluster / TRL", cluster["rate"], trl["rate"], 1.5),
            ("sampling tokens/s, rollouts / HF generate", cluster["sample_rate"], trl["sample_rate"], 1.0),
            ("learner step tokens/s, learner / TRL training", cluster["learner_rate"], trl["train_rate"], 1.0),
        ]
        lines.append("  targets (ratios of this run):")
        lines += [f"    {name:<46}{a / b:6.2f}x  ({a:,.0f} vs {b:,.0f}; target >= {t}x)" for name, a, b, t in rows]
    if trl and sync:
        lines.append(f"    {'trained tokens/s, synchronous loop / TRL':<46}{sync['rate'] / trl['rate']:6.2f}x")
    if cluster and sync:
        lines.append(f"    {'trained tokens/s, cluster / synchronous loop':<46}{cluster['rate'] / sync['rate']:6.2f}x")
    return lines


def _median(rows: list[dict[str, Any]], key) -> float:
    return statistics.median(key(r) for r in rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="steps on each side (>= 2)")
    parser.add_argument("--replicas", type=int, default=2, help="rollout replicas of the cluster")
    parser.add_argument("--batch", type=int, default=32, help="prompts (groups) per step")
    parser.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    parser.add_argument("--tokens", type=int, default=24, help="max tokens per completion")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per cluster process")
    parser.add_argument("--trl-threads", type=int, default=os.cpu_count() or 1, help="torch threads of TRL")
    parser.add_argument(
        "--trl-gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="TRL's default (on) recomputes activations in the backward pass; off is faster here",
    )
    parser.add_argument("--sync", action=argparse.BooleanOptionalAction, default=True,
                        help="also run bench_cluster's synchronous loop")  # fmt: skip
    parser.add_argument("--only", choices=("all", "trl", "cluster"), default="all")
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed for `aisrl up`")
    add_model_options(parser)
    args = parser.parse_args(argv or [])
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the steady state starts at the end of step 1)")
    if args.only != "cluster" and (missing := trl_missing()):
        print(missing, file=sys.stderr)
        return

    import logging

    logging.getLogger("aisrl").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="aisrl-bench-peer-") as name:
        tmp = Path(name)
        model_dir, model_label = resolve_model(args.model, tmp)
        config = cluster_config(args, model_dir, tmp / "runs")
        learner = config["services"]["learner"]
        print(f"[{config['task']}, {args.batch} prompts x G={args.group} x <= {args.tokens} tokens, stop at the end "
              f"of the first line, {args.steps} steps, model {model_label}, lr {learner['lr']}; TRL float32 "
              f"{args.trl_threads} thread(s); cluster {args.replicas} replicas, {args.threads} thread(s) per "
              f"process; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}]", flush=True)  # fmt: skip

        trl = cluster = sync = None
        if args.only in ("all", "trl"):
            trl = run_trl(args, learner, model_dir, tmp)
            s = trl["steps"]
            trl["rate"], trl["per_step"] = steady_rate([r["end"] for r in s], [int(r["tokens"]) for r in s])
            gen = _median(s[1:], lambda r: r["generate"])
            score = _median(s[1:], lambda r: r["generate_score"] - r["generate"])
            train = _median(s[1:], lambda r: r["step"] - r["generate_score"])
            trl["sample_rate"] = rate(sum(r["sampled"] for r in s[1:]), sum(r["generate"] for r in s[1:]))
            trained = sum(r["tokens"] for r in s[1:])
            trl["train_rate"] = rate(trained, sum(r["step"] - r["generate_score"] for r in s[1:]))
            print(f"  TRL GRPOTrainer   : {trl['rate']:8,.0f} trained tokens/s, {trl['per_step']:.2f} s/step, load "
                  f"{os.getloadavg()[0]:.1f}; median "
                  f"HF generate {gen:.3f} s, reward + packing {score:.3f} s, training part {train:.3f} s",
                  flush=True)  # fmt: skip
        if args.only in ("all", "cluster"):
            cluster = run_cluster(config, tmp, args.timeout)
            s = cluster["steps"]
            cluster["rate"], cluster["per_step"] = steady_rate([r["ts"] for r in s], [int(r["tokens"]) for r in s])
            t0, t1 = s[0]["ts"], s[-1]["ts"]
            cluster["sample_rate"] = sampling_rate(cluster["rollout_batches_by_replica"], t0, t1)
            cluster["learner_rate"] = rate(sum(int(r["tokens"]) for r in s[1:]),
                                           sum(cluster_learner_seconds(r) for r in s[1:]))  # fmt: skip
            print(f"  cluster           : {cluster['rate']:8,.0f} trained tokens/s, {cluster['per_step']:.2f} s/step, "
                  f"load {os.getloadavg()[0]:.1f} (wall {cluster['wall_s']:.0f} s incl. start-up)",
                  flush=True)  # fmt: skip
            for key, label in CLUSTER_PHASES:
                seconds = _median(s[1:], lambda r, k=key: float(r["seconds"].get(k, 0.0)))
                print(f"    {key:<12}{seconds:8.3f} s  {label}")
        if args.sync and args.only == "all":
            sync = run_sync(config, model_dir, tmp, args.threads)
            sync["rate"], sync["per_step"] = steady_rate(sync["ends"], sync["tokens"])
            print(f"  synchronous loop  : {sync['rate']:8,.0f} trained tokens/s, {sync['per_step']:.2f} s/step, load "
                  f"{os.getloadavg()[0]:.1f}",
                  flush=True)  # fmt: skip
        for line in target_lines(trl, cluster, sync):
            print(line)


if __name__ == "__main__":
    main(sys.argv[1:])
