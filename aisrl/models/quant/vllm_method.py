"""The emulated schemes inside vLLM: an out-of-tree quantization method (`aisrl_emulated`).

Invariant: every vLLM linear layer (`LinearBase`: fused qkv, o, fused gate_up, down) holds weights
already rounded to the scheme's weight format, rounded again each time weights are (re)loaded
(vLLM's layer-wise `reload_weights` re-runs `process_weights_after_loading` on the freshly loaded,
full-precision values), and, for W8A8/W4A4, rounds its input per token before vLLM's unchanged
high-precision GEMM. `lm_head` and the input embeddings stay in high precision unless
`quantize_lm_head`: then both hold rounded weights and the head's input is rounded like a linear
layer's. The rounding is formats.py's; emulation gives no speedup.

`register()` makes the method known to vLLM; it is this package's `vllm.general_plugins` entry
point, so vLLM runs it in every process it starts (engine core, workers) as well as in ours. The
classes live at module level because vLLM pickles the config into the processes it spawns.
Importing this module imports vLLM.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod, VocabParallelEmbedding

from aisrl.models.quant.formats import GRANULARITIES
from aisrl.models.quant.schemes import SCHEMES, Scheme, fake_quant_activations, fake_quant_weight

METHOD_NAME = "aisrl_emulated"


def quantization_overrides(scheme: Scheme, granularity: str, quantize_lm_head: bool) -> dict[str, Any]:
    """vLLM `hf_overrides` that hand the method its settings (read by `from_config_dict_json`)."""
    config = {"scheme": scheme.name, "granularity": granularity, "quantize_lm_head": quantize_lm_head}
    return {"quantization_config_dict_json": json.dumps(config)}


def register() -> None:
    """Registers `aisrl_emulated` with vLLM (idempotent)."""
    if METHOD_NAME not in QUANTIZATION_METHODS:
        register_quantization_config(METHOD_NAME)(EmulatedConfig)


def _round_weight(layer: torch.nn.Module, config: EmulatedConfig) -> None:
    weight = layer.weight
    if config.scheme.weights is not None and not weight.is_meta:
        weight.data.copy_(fake_quant_weight(weight.data, config.scheme.weights, config.granularity))


def _round_input(x: torch.Tensor, config: EmulatedConfig) -> torch.Tensor:
    return x if config.scheme.activations is None else fake_quant_activations(x, config.scheme.activations)


class EmulatedLinearMethod(UnquantizedLinearMethod):
    """vLLM's unquantized GEMM on rounded weights and (W8A8, W4A4) per-token rounded inputs."""

    def __init__(self, config: EmulatedConfig) -> None:
        super().__init__()
        self.emulated = config

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        _round_weight(layer, self.emulated)  # before the CPU GEMM packs (and drops) the weight
        super().process_weights_after_loading(layer)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return super().apply(layer, _round_input(x, self.emulated), bias)


class EmulatedEmbeddingMethod(UnquantizedEmbeddingMethod):
    """Rounded embedding and lm_head weights; the head's input rounded as a linear layer's."""

    def __init__(self, config: EmulatedConfig) -> None:
        super().__init__()
        self.emulated = config

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        _round_weight(layer, self.emulated)
        super().process_weights_after_loading(layer)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return super().apply(layer, _round_input(x, self.emulated), bias)


class EmulatedConfig(QuantizationConfig):
    """One emulated scheme (schemes.py) for the whole model."""

    def __init__(self, scheme: str, granularity: str = "tensor", quantize_lm_head: bool = False) -> None:
        super().__init__()
        if scheme not in SCHEMES:
            raise ValueError(f"{METHOD_NAME}: unknown scheme {scheme!r}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"{METHOD_NAME}: granularity must be one of {GRANULARITIES}, got {granularity!r}")
        self.scheme, self.granularity, self.quantize_lm_head = SCHEMES[scheme], granularity, quantize_lm_head

    def get_name(self) -> str:
        return METHOD_NAME

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> EmulatedConfig:
        return cls(config["scheme"], config.get("granularity", "tensor"), bool(config.get("quantize_lm_head")))

    @classmethod
    def from_config_dict_json(cls, text: str) -> EmulatedConfig:
        return cls.from_config(json.loads(text))

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if isinstance(layer, LinearBase):
            return EmulatedLinearMethod(self)
        if isinstance(layer, VocabParallelEmbedding):  # the lm_head (ParallelLMHead) included
            return EmulatedEmbeddingMethod(self) if self.quantize_lm_head else UnquantizedEmbeddingMethod()
        return None
