"""A scheme on a transformers model: the HF engine's emulation, and the tests' reference forward.

Invariant: after `emulate_model`, the model computes what the vLLM method (vllm_method.py) computes
for the same checkpoint: the same tensors rounded the same way (q/k/v and gate/up fused for their
scales), the same linear inputs rounded per token. Weights are rounded from the values given, so
call it again (or `round_state_dict`) on every new set of full-precision weights.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from aisrl.models.quant.checkpoint import EmulationReport, emulate_state_dict, quantized_weight_match
from aisrl.models.quant.formats import Granularity
from aisrl.models.quant.schemes import Scheme, fake_quant_activations


def round_state_dict(
    state: Mapping[str, torch.Tensor], scheme: Scheme, granularity: Granularity, include_head: bool
) -> tuple[dict[str, torch.Tensor], EmulationReport | None]:
    """The scheme's rounded copy of a state dict (unchanged when the scheme keeps weights high)."""
    if scheme.weights is None:
        return dict(state), None
    return emulate_state_dict(state, scheme.weights, granularity, include_head=include_head)


def add_activation_rounding(model: torch.nn.Module, scheme: Scheme, include_head: bool) -> int:
    """Forward pre-hooks rounding the input of every linear layer the scheme quantizes; how many were added."""
    fmt = scheme.activations
    if fmt is None:
        return 0

    def round_input(_module: torch.nn.Module, args: tuple) -> tuple:
        return (fake_quant_activations(args[0], fmt), *args[1:])

    hooked = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and quantized_weight_match(
            f"{name}.weight", module.weight, include_head
        ):
            module.register_forward_pre_hook(round_input)
            hooked += 1
    return hooked


def emulate_model(
    model: torch.nn.Module, scheme: Scheme, granularity: Granularity = "tensor", include_head: bool = False
):
    """Rounds a loaded model's weights in place and hooks its linear inputs; returns the model."""
    state, _ = round_state_dict(model.state_dict(), scheme, granularity, include_head)
    model.load_state_dict(state)
    add_activation_rounding(model, scheme, include_head)
    return model
