"""FP8 weight emulation: error bounds of the e4m3 grid, granularity, and which tensors are touched.

(The other formats, bit-exact references and non-finite handling: test_quant_formats.py.)"""

from __future__ import annotations

import pytest
import torch

from aisrl.models.quant.checkpoint import emulate_state_dict, quantized_weight_match
from aisrl.models.quant.formats import FP8_MAX as _FP8_MAX
from aisrl.models.quant.formats import GRANULARITIES, fake_quant_fp8_weight, fp8_weight_scale

FP8_MAX = _FP8_MAX["e4m3"]


def fake_quant_fp8(w: torch.Tensor, granularity: str = "tensor") -> torch.Tensor:
    return fake_quant_fp8_weight(w, "e4m3", granularity)  # type: ignore[arg-type]


def fp8_scale(w: torch.Tensor, granularity: str) -> torch.Tensor:
    return fp8_weight_scale(w, "e4m3", granularity)  # type: ignore[arg-type]


def emulate_fp8_state_dict(sd, granularity, **kw):
    return emulate_state_dict(sd, "fp8_e4m3", granularity, **kw)


def is_fp8_linear_weight(name: str, tensor: torch.Tensor) -> bool:
    return quantized_weight_match(name, tensor) is not None


# e4m3 keeps 3 mantissa bits: rounding to nearest moves a normal value by at most 2^-4 of its
# magnitude; below the smallest normal (2^-6) the grid is uniform with spacing 2^-9.
E4M3_REL = 2.0**-4
E4M3_SUBNORMAL_ABS = 2.0**-10
BF16_REL = 2.0**-8  # rounding the dequantized value back to BF16


def _skewed(rows: int = 256, cols: int = 192, lo: float = -5.0, seed: int = 0) -> torch.Tensor:
    """Rows whose magnitudes span 10^lo..1: the case per-channel scales exist for."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * torch.logspace(lo, 0, rows)[:, None]


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_error_within_e4m3_bound_float32(granularity):
    w = _skewed()
    q = fake_quant_fp8(w, granularity)
    scale = fp8_scale(w, granularity)
    bound = torch.maximum(E4M3_REL * w.abs(), E4M3_SUBNORMAL_ABS * scale) * (1 + 1e-6)
    assert q.dtype == torch.float32 and q.shape == w.shape
    assert bool(((q - w).abs() <= bound).all())


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_error_within_bound_bf16_and_dtype_kept(granularity):
    w = _skewed(seed=1).to(torch.bfloat16)
    q = fake_quant_fp8(w, granularity)
    assert q.dtype == torch.bfloat16
    w32, q32 = w.float(), q.float()
    scale = fp8_scale(w, granularity)
    bound = torch.maximum(E4M3_REL * w32.abs(), E4M3_SUBNORMAL_ABS * scale) + BF16_REL * q32.abs()
    assert bool(((q32 - w32).abs() <= bound * (1 + 1e-6)).all())


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_zeros_stay_zero_and_sign_kept(granularity):
    w = _skewed(seed=2)
    w[::3, ::5] = 0.0
    q = fake_quant_fp8(w, granularity)
    assert bool((q[::3, ::5] == 0).all())
    assert bool((torch.sign(q) * torch.sign(w) >= 0).all())
    assert bool((fake_quant_fp8(torch.zeros(4, 8), granularity) == 0).all())


def test_exact_on_grid():
    """Values on the e4m3 grid, with every row's (so every scale group's) largest at 448 x 2^k, come back unchanged."""
    g = torch.Generator().manual_seed(3)
    grid = (torch.randn(64, 64, generator=g) * 60).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    grid[:, 0] = FP8_MAX
    w = grid * 2.0**-7
    for granularity in GRANULARITIES:
        assert torch.equal(fake_quant_fp8(w, granularity), w)
        assert torch.equal(fake_quant_fp8(w.to(torch.bfloat16), granularity), w.to(torch.bfloat16))


def test_channel_beats_tensor_on_skewed_rows():
    w = _skewed(lo=-6.0)

    def row_rel_error(q: torch.Tensor) -> torch.Tensor:
        return (q - w).norm(dim=1) / w.norm(dim=1)

    tensor_err = row_rel_error(fake_quant_fp8(w, "tensor"))
    channel_err = row_rel_error(fake_quant_fp8(w, "channel"))
    assert channel_err.mean() < tensor_err.mean()
    # The smallest rows fall below e4m3's normal range under one tensor scale, never under their own.
    small = slice(0, w.shape[0] // 4)
    assert bool((channel_err[small] < tensor_err[small]).all())
    # Per channel, every row's largest element maps to 448: the e4m3 bound holds per row.
    assert float(channel_err.max()) < E4M3_REL


def test_block_scale_is_per_128_tile():
    w = torch.ones(200, 300)
    w[128:, 128:256] = 1e-3
    scale = fp8_scale(w, "block")
    assert scale.shape == w.shape
    assert torch.allclose(scale[0, 0], torch.tensor(1 / FP8_MAX))
    assert torch.allclose(scale[150, 200], torch.tensor(1e-3 / FP8_MAX))
    assert torch.allclose(scale[150, 260], torch.tensor(1 / FP8_MAX))


def test_bad_input_named():
    with pytest.raises(ValueError, match="granularity"):
        fake_quant_fp8(torch.ones(2, 2), "row")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="2-D"):
        fake_quant_fp8(torch.ones(2, 2, 2))


def _llama_like_state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(4)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.05).to(torch.bfloat16)

    sd = {"model.embed_tokens.weight": rand(50, 32), "lm_head.weight": rand(50, 32), "model.norm.weight": rand(32)}
    for proj, shape in {"q_proj": (32, 32), "k_proj": (16, 32), "v_proj": (16, 32), "o_proj": (32, 32)}.items():
        sd[f"model.layers.0.self_attn.{proj}.weight"] = rand(*shape)
    sd["model.layers.0.self_attn.q_proj.bias"] = rand(32)
    for proj, shape in {"gate_proj": (64, 32), "up_proj": (64, 32), "down_proj": (32, 64)}.items():
        sd[f"model.layers.0.mlp.{proj}.weight"] = rand(*shape)
    sd["model.layers.0.input_layernorm.weight"] = rand(32)
    # k_proj gets the largest magnitude of the fused qkv group.
    sd["model.layers.0.self_attn.k_proj.weight"][0, 0] = 1.0
    return sd


def test_state_dict_touches_only_linear_weights():
    sd = _llama_like_state_dict()
    before = {k: v.clone() for k, v in sd.items()}
    out, report = emulate_fp8_state_dict(sd, "tensor")
    linear = {k for k in sd if k.endswith("_proj.weight")}
    assert set(report.relative_error) == linear
    assert set(report.untouched) == set(sd) - linear
    for name in report.untouched:
        assert out[name] is sd[name]
    for name in linear:
        assert out[name].dtype == torch.bfloat16 and out[name].shape == sd[name].shape
        assert 0 < report.relative_error[name] < E4M3_REL
        assert not torch.equal(out[name], sd[name])
    assert all(torch.equal(sd[k], before[k]) for k in sd)  # input not modified
    assert 0 < report.mean_relative_error <= report.max_relative_error
    assert not is_fp8_linear_weight("lm_head.weight", sd["lm_head.weight"])
    assert not is_fp8_linear_weight("model.layers.0.self_attn.q_proj.bias", sd["model.layers.0.self_attn.q_proj.bias"])


def test_fused_groups_share_one_tensor_scale():
    """vLLM quantizes q/k/v as one qkv_proj tensor: q's scale is set by k's large element."""
    sd = _llama_like_state_dict()
    q_name = "model.layers.0.self_attn.q_proj.weight"
    fused, _ = emulate_fp8_state_dict(sd, "tensor", fuse_like_vllm=True)
    alone, _ = emulate_fp8_state_dict(sd, "tensor", fuse_like_vllm=False)
    stacked = torch.cat([sd[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(fused[q_name], fake_quant_fp8(stacked, "tensor")[:32])
    assert torch.equal(alone[q_name], fake_quant_fp8(sd[q_name], "tensor"))
    assert not torch.equal(fused[q_name], alone[q_name])
