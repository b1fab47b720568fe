"""Weight emulation on a checkpoint's state dict (HF names): what the HF engine loads.

Invariant: only the weights vLLM's quantized linear layers hold are rounded (attention q/k/v/o,
MLP gate/up/down), plus `lm_head` and the input embeddings when asked; norms and biases never.
q/k/v and gate/up of one layer are rounded as one stacked tensor, as vLLM fuses them before it
quantizes, so per-tensor (and NVFP4 global) scales match what the vLLM engine uses.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from aisrl.models.quant.formats import Granularity
from aisrl.models.quant.schemes import Format, fake_quant_weight

# `<prefix>.<proj>.weight`: the linear layers vLLM's quantization methods own.
_LINEAR_WEIGHT = re.compile(
    r"^(?P<prefix>.*?)(?P<proj>q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$"
)
_HEAD_WEIGHT = re.compile(r"^(?P<prefix>.*?)(?P<proj>lm_head|embed_tokens)\.weight$")
_FUSED = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}


def quantized_weight_match(name: str, tensor: torch.Tensor, include_head: bool = False) -> re.Match | None:
    """The name's match when this checkpoint tensor is one a scheme rounds, else None."""
    if tensor.dim() != 2 or not tensor.is_floating_point():
        return None
    return _LINEAR_WEIGHT.match(name) or (_HEAD_WEIGHT.match(name) if include_head else None)


@dataclass(frozen=True)
class EmulationReport:
    """What emulation did: per rounded tensor, the relative error ||w_q - w|| / ||w|| (Frobenius)."""

    fmt: Format
    relative_error: dict[str, float]
    untouched: tuple[str, ...]

    @property
    def mean_relative_error(self) -> float:
        errors = list(self.relative_error.values())
        return sum(errors) / len(errors) if errors else 0.0

    @property
    def max_relative_error(self) -> float:
        return max(self.relative_error.values(), default=0.0)


def relative_error(original: torch.Tensor, rounded: torch.Tensor) -> float:
    ref = original.to(torch.float32)
    norm = float(ref.norm())
    return float((rounded.to(torch.float32) - ref).norm()) / norm if norm > 0 else 0.0


def emulate_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    fmt: Format,
    granularity: Granularity = "tensor",
    include_head: bool = False,
    fuse_like_vllm: bool = True,
) -> tuple[dict[str, torch.Tensor], EmulationReport]:
    """Weight-rounded copy of a state dict and the report; the input is not modified."""
    out = dict(state_dict)
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for name, tensor in state_dict.items():
        match = quantized_weight_match(name, tensor, include_head)
        if match is None:
            continue
        proj = match["proj"]
        groups[(match["prefix"], _FUSED.get(proj, proj) if fuse_like_vllm else proj)].append(name)
    errors: dict[str, float] = {}
    for names in groups.values():
        stacked = torch.cat([state_dict[n] for n in names], dim=0)
        rounded = fake_quant_weight(stacked, fmt, granularity)
        for name, part in zip(names, rounded.split([state_dict[n].shape[0] for n in names], dim=0), strict=True):
            out[name] = part.contiguous()
            errors[name] = relative_error(state_dict[name], out[name])
    untouched = tuple(sorted(set(state_dict) - set(errors)))
    return out, EmulationReport(fmt, dict(sorted(errors.items())), untouched)
