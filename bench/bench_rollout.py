"""Benchmark: rollout tokens/s of the vLLM engine against the plain transformers `generate` loop.

Both engines sample the same batch (prompts x G completions x a fixed number of tokens, no early
stop) from the same tiny BF16 model in this process, one engine at a time, after one warm-up batch
each, computing in bfloat16 and then in float32 (CPUs without AVX512-BF16 run bfloat16 slowly); the
ratio is vLLM / HF. Also prints the median in-place weight reload time of the vLLM engine (and, at
fp8 on the CPU, the reload-and-round time). On the CPU, fp8 is emulated (fp8_w8): it measures the
mismatch machinery, never a speedup. Nothing is asserted; on a shared machine, compare ratios, not absolutes.

vLLM spawns an engine process by default, hence the `__main__` guard; `--in-process` skips that.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from aisrl.services.rollout.engine import EngineConfig, RolloutEngine, SamplingConfig, create_engine


def _tokens_per_second(engine: RolloutEngine, prompts: list[str], sampling: SamplingConfig, repeats: int) -> float:
    engine.generate(prompts[: max(1, len(prompts) // 4)], sampling)  # warm-up (compilation, allocator)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        groups = engine.generate(prompts, sampling)
        seconds = time.perf_counter() - start
        rates.append(sum(len(c.token_ids) for g in groups for c in g) / seconds)
    return statistics.median(rates)


def _median_reload(engine: RolloutEngine, model_dir: Path, repeats: int) -> float:
    return statistics.median(engine.load_weights(model_dir) for _ in range(repeats))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--group", type=int, default=4, help="completions per prompt (G)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per completion")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model-dir", type=Path, default=None, help="an HF checkpoint (default: a random tiny model)")
    parser.add_argument("--in-process", action="store_true", help="run vLLM's engine core in this process")
    args = parser.parse_args(argv)

    from aisrl.models.tiny import init_model_dir

    with tempfile.TemporaryDirectory(prefix="aisrl-bench-") as tmp:
        model_dir = args.model_dir or init_model_dir(Path(tmp) / "tiny")
        # Fixed-length completions, so both engines generate exactly the same number of tokens.
        sampling = SamplingConfig(n=args.group, max_tokens=args.tokens, temperature=1.0, seed=0, stop_at_newline=False)
        prompts = [f"{i} + {2 * i + 1} =" for i in range(args.prompts)]
        shape = f"{args.prompts} prompts x G={args.group} x {args.tokens} tokens"
        config = EngineConfig(in_process=args.in_process)

        for dtype in ("bfloat16", "float32"):
            cfg = config.model_copy(update={"compute_dtype": dtype})
            with create_engine("hf", model_dir, cfg) as hf:
                hf_rate = _tokens_per_second(hf, prompts, sampling, args.repeats)
            start = time.perf_counter()
            with create_engine("vllm", model_dir, cfg) as engine:
                startup = time.perf_counter() - start
                vllm_rate = _tokens_per_second(engine, prompts, sampling, args.repeats)
                if dtype == "bfloat16":
                    reload_s = _median_reload(engine, model_dir, max(3, args.repeats))
            print(f"[{shape}, BF16 weights, {dtype} compute]")
            print(f"  HF generate        : {hf_rate:10,.0f} tokens/s")
            print(f"  vLLM               : {vllm_rate:10,.0f} tokens/s  (start-up {startup:.1f} s)")
            print(f"  vLLM / HF          : {vllm_rate / hf_rate:10.2f}x", flush=True)
        print(f"vLLM reload (bf16)   : {reload_s * 1000:10.1f} ms median (in place, collective_rpc reload_weights)")

        with create_engine("vllm", model_dir, config.model_copy(update={"precision": "fp8"})) as fp8:
            label = "reload + round (emulated)" if fp8.emulated else "reload, online FP8"
            fp8_rate = _tokens_per_second(fp8, prompts, sampling, args.repeats)
            fp8_reload = _median_reload(fp8, model_dir, max(3, args.repeats))
        note = " (FP8-emulated BF16 weights: no speedup expected)" if fp8.emulated else ""
        print(f"vLLM (fp8)           : {fp8_rate:10,.0f} tokens/s{note}")
        print(f"vLLM reload (fp8)    : {fp8_reload * 1000:10.1f} ms median ({label})")


if __name__ == "__main__":
    main()
