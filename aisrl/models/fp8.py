"""FP8 (e4m3) weight emulation: round linear weights to the float8 grid and dequantize back.

Invariant: `fake_quant_fp8` returns, in the input's dtype, exactly what an FP8 kernel would
multiply with: `dequant(quant(w / s)) * s`, with the scale s chosen as vLLM's online FP8 does
(amax / 448 per tensor, per output channel, or per 128x128 block). Only the weights vLLM's
online FP8 quantizes are touched: the `LinearBase` layers (attention q/k/v/o, MLP or expert
gate/up/down projections). Embeddings, norms, biases and `lm_head` (a `ParallelLMHead`, not a
linear layer in vLLM) stay as they are. vLLM fuses q/k/v (`qkv_proj`) and gate/up
(`gate_up_proj`) before quantizing, so those share one scale per tensor here too.

This reproduces the weight-rounding part of the FP8 rollout mismatch only; activations are not
quantized, and nothing gets faster (DESIGN §3).
"""

from __future__ import annotations

import re
import shutil
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

Granularity = Literal["tensor", "channel", "block"]
GRANULARITIES: tuple[Granularity, ...] = ("tensor", "channel", "block")

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
BLOCK = 128
# vLLM's floors on the scale (online/fp8.py `_fp8_channel_scale`, deep_gemm `per_block_cast_to_fp8`).
_CHANNEL_MIN_SCALE = 1.0 / (FP8_MAX * 512)
_BLOCK_MIN_AMAX = 1e-4
_TINY = torch.finfo(torch.float32).tiny

# `<prefix>.<proj>.weight`: the linear layers vLLM's online FP8 quantizes.
_LINEAR_WEIGHT = re.compile(
    r"^(?P<prefix>.*?)(?P<proj>q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$"
)
# Projections vLLM loads into one fused layer (and so one per-tensor scale).
_FUSED = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}


def _check_granularity(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")


def fp8_scale(weight: torch.Tensor, granularity: Granularity) -> torch.Tensor:
    """The float32 scale(s) of a 2-D weight, broadcastable to it (block scales are per 128x128 tile)."""
    _check_granularity(granularity)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    w = weight.detach().to(torch.float32).abs()
    if granularity == "tensor":
        return (w.amax() / FP8_MAX).clamp_min(_TINY).reshape(1, 1)
    if granularity == "channel":
        return (w.amax(dim=1, keepdim=True) / FP8_MAX).clamp_min(_CHANNEL_MIN_SCALE)
    rows, cols = w.shape
    padded = torch.zeros(-(-rows // BLOCK) * BLOCK, -(-cols // BLOCK) * BLOCK)
    padded[:rows, :cols] = w
    tiles = padded.view(padded.shape[0] // BLOCK, BLOCK, padded.shape[1] // BLOCK, BLOCK)
    amax = tiles.amax(dim=(1, 3)).clamp_min(_BLOCK_MIN_AMAX)
    per_element = (amax / FP8_MAX).repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)
    return per_element[:rows, :cols]


def fake_quant_fp8(weight: torch.Tensor, granularity: Granularity = "tensor") -> torch.Tensor:
    """Rounds a 2-D weight through float8 e4m3 with the given scale granularity; same dtype and shape back."""
    scale = fp8_scale(weight, granularity)
    scaled = (weight.detach().to(torch.float32) / scale).clamp(-FP8_MAX, FP8_MAX)
    return (scaled.to(FP8_DTYPE).to(torch.float32) * scale).to(weight.dtype)


def is_fp8_linear_weight(name: str, tensor: torch.Tensor) -> bool:
    """Whether vLLM's online FP8 would quantize this checkpoint tensor."""
    return tensor.dim() == 2 and tensor.is_floating_point() and _LINEAR_WEIGHT.match(name) is not None


@dataclass(frozen=True)
class Fp8Report:
    """What emulation did: per quantized tensor, the relative error ||w_q - w|| / ||w|| (Frobenius)."""

    granularity: Granularity
    relative_error: dict[str, float]
    untouched: tuple[str, ...]

    @property
    def mean_relative_error(self) -> float:
        errors = list(self.relative_error.values())
        return sum(errors) / len(errors) if errors else 0.0

    @property
    def max_relative_error(self) -> float:
        return max(self.relative_error.values(), default=0.0)


def _relative_error(original: torch.Tensor, rounded: torch.Tensor) -> float:
    ref = original.to(torch.float32)
    norm = float(ref.norm())
    return float((rounded.to(torch.float32) - ref).norm()) / norm if norm > 0 else 0.0


def emulate_fp8_state_dict(
    state_dict: Mapping[str, torch.Tensor], granularity: Granularity = "tensor", fuse_like_vllm: bool = True
) -> tuple[dict[str, torch.Tensor], Fp8Report]:
    """FP8-emulated copy of a checkpoint state dict (HF names) and the report; the input is not modified.

    With `fuse_like_vllm`, q/k/v and gate/up of one layer are rounded as one stacked tensor, as
    vLLM loads them, so that per-tensor (and block) scales match what its FP8 kernels would use.
    """
    _check_granularity(granularity)
    out = dict(state_dict)
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for name, tensor in state_dict.items():
        match = _LINEAR_WEIGHT.match(name)
        if match is None or not is_fp8_linear_weight(name, tensor):
            continue
        proj = match["proj"]
        fused = _FUSED.get(proj, proj) if fuse_like_vllm else proj
        groups[(match["prefix"], fused)].append(name)
    errors: dict[str, float] = {}
    for names in groups.values():
        stacked = torch.cat([state_dict[n] for n in names], dim=0)
        rounded = fake_quant_fp8(stacked, granularity)
        for name, part in zip(names, rounded.split([state_dict[n].shape[0] for n in names], dim=0), strict=True):
            out[name] = part.contiguous()
            errors[name] = _relative_error(state_dict[name], out[name])
    untouched = tuple(sorted(set(state_dict) - set(errors)))
    return out, Fp8Report(granularity, dict(sorted(errors.items())), untouched)


def emulate_fp8_checkpoint(src_dir: str | Path, dst_dir: str | Path, granularity: Granularity = "tensor") -> Fp8Report:
    """Writes an FP8-emulated copy of an HF checkpoint directory (safetensors shards, same names and layout).

    Every non-weight file (config, tokenizer, shard index) is copied as is, so dst_dir loads wherever
    src_dir does. All shards are read first, since a fused group may span two shards.
    """
    from safetensors.torch import load_file, save_file

    src, dst = Path(src_dir), Path(dst_dir)
    shards = sorted(src.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no *.safetensors files in {src}")
    dst.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.is_file() and path.suffix != ".safetensors":
            shutil.copy2(path, dst / path.name)
    by_shard = {shard.name: load_file(shard) for shard in shards}
    merged = {name: t for tensors in by_shard.values() for name, t in tensors.items()}
    emulated, report = emulate_fp8_state_dict(merged, granularity)
    for shard_name, tensors in by_shard.items():
        save_file({name: emulated[name] for name in tensors}, str(dst / shard_name), metadata={"format": "pt"})
    return report
