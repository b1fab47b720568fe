"""The rollout-engine interface: sample G completions per prompt, with the logprob of every sampled token.

Invariant (docs/ais.md, "The logprob contract"): `Completion.logprobs[i]` is the log-probability of `token_ids[i]` under
the distribution it was sampled from, `log_softmax(logits / temperature)` of the weights the
engine holds, at the precision it runs. Sampling never truncates that distribution in training:
top-p < 1 or top-k > 0 is refused unless `SamplingConfig.training` is False. A NaN, infinite,
positive or missing logprob raises `RolloutLogprobError`; nothing is ever replaced by zeros.
Generation stops after a token containing a newline (the task answer convention) or EOS; that
stop token is part of `token_ids` (and has its logprob), since the policy must learn to stop.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from aisrl.models.quant.names import PRECISION_HELP, KvCacheDtype, Precision
from aisrl.services.rollout.labels import PrecisionLabel, precision_label

Fp8Granularity = Literal["tensor", "channel", "block"]
FinishReason = Literal["stop", "length"]
# vLLM samples in float32; a sampled token's logprob can exceed 0 by rounding only.
_LOGPROB_SLACK = 1e-4


class RolloutLogprobError(ValueError):
    """An engine returned a logprob that cannot belong to a sampling distribution (NaN, inf, > 0, missing)."""


class PromptRejected(ValueError):
    """The engine refuses a request for what it asks, not for the engine's state: a prompt longer than the
    model's context, one without tokens, token ids outside the model's vocabulary, sampling parameters the
    engine does not accept. The job is bad (dead-lettered); the engine and the other jobs are fine."""


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample one batch. `n` completions per prompt (the GRPO group size G).

    temperature 0 means greedy (evaluation only, training=False); its logprobs are those of the
    untempered model, log_softmax(logits), since a greedy pick has no sampling distribution.
    """

    n: int = 1
    max_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    seed: int | None = None
    stop_at_newline: bool = True
    training: bool = True  # training rollouts refuse anything that changes the sampling distribution

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"SamplingConfig.n must be >= 1, got {self.n}")
        if self.max_tokens < 1:
            raise ValueError(f"SamplingConfig.max_tokens must be >= 1, got {self.max_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"SamplingConfig.temperature must be finite and >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"SamplingConfig.top_k must be -1, 0 (off) or positive, got {self.top_k}")
        if self.training:
            if self.top_p < 1.0 or self.top_k > 0:
                raise ValueError(
                    f"SamplingConfig.top_p={self.top_p}, top_k={self.top_k}: training rollouts must sample from the "
                    "full tempered distribution (top-p/top-k truncate it, and the rollout logprobs would no longer "
                    "be those of the policy the learner corrects for); set training=False for evaluation only"
                )
            if self.temperature == 0:
                raise ValueError("SamplingConfig.temperature=0 (greedy) has no sampling distribution; training=False")

    def prompt_seed(self, index: int) -> int | None:
        """The seed of prompt `index`: distinct per prompt (one shared seed would give every prompt the same noise)."""
        if self.seed is None:
            return None
        return int(np.random.SeedSequence([self.seed, index]).generate_state(1)[0])


@dataclass(frozen=True)
class Completion:
    """One sampled completion. `logprobs[i]` belongs to `token_ids[i]` (see the module invariant)."""

    prompt_token_ids: np.ndarray  # int32, as the engine tokenized the prompt (BOS included)
    token_ids: np.ndarray  # int32, the stop token included when finish_reason is "stop"
    logprobs: np.ndarray  # float32, one per token in token_ids
    text: str  # token_ids decoded, special tokens skipped
    finish_reason: FinishReason

    def __post_init__(self) -> None:
        check_logprobs(self.token_ids, self.logprobs)
        if self.finish_reason not in ("stop", "length"):
            raise ValueError(f"Completion.finish_reason must be 'stop' or 'length', got {self.finish_reason!r}")

    @property
    def answer(self) -> str:
        """The completion up to its first newline: what task verifiers score."""
        return self.text.split("\n", 1)[0]


def check_logprobs(token_ids: np.ndarray, logprobs: np.ndarray) -> None:
    """Raises RolloutLogprobError unless there is one finite, non-positive logprob per token."""
    if token_ids.ndim != 1 or logprobs.ndim != 1:
        raise RolloutLogprobError("Completion.token_ids and Completion.logprobs must be 1-D")
    if len(token_ids) != len(logprobs):
        raise RolloutLogprobError(
            f"Completion.logprobs has {len(logprobs)} values for {len(token_ids)} tokens: missing logprobs"
        )
    bad = ~np.isfinite(logprobs) | (logprobs > _LOGPROB_SLACK)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise RolloutLogprobError(
            f"Completion.logprobs[{i}] = {logprobs[i]!r} for token {int(token_ids[i])}: not a logprob "
            f"({int(bad.sum())} bad of {len(logprobs)}); the engine's logits are broken"
        )


def check_prompt_tokens(ids: Sequence[int], max_tokens: int, max_model_len: int, vocab_size: int) -> None:
    """Raises PromptRejected unless a prompt of token `ids` and `max_tokens` completion tokens fit the model.

    A prompt that fits but leaves fewer than max_tokens is refused too: vLLM would silently cut its
    completions short at the context limit (finish reason "length", as if max_tokens were reached)."""
    if len(ids) == 0:
        raise PromptRejected("the prompt has no tokens")
    bad = [int(i) for i in ids if not 0 <= int(i) < vocab_size]
    if bad:
        raise PromptRejected(
            f"prompt token ids {bad[:5]} are outside the model's vocabulary of {vocab_size} "
            "(tokenizer and model do not match)"
        )
    if len(ids) + max_tokens > max_model_len:
        raise PromptRejected(
            f"the prompt has {len(ids)} tokens; with max_tokens={max_tokens} that exceeds the model's "
            f"maximum length of {max_model_len} tokens"
        )


def make_completion(
    prompt_token_ids: Sequence[int],
    token_ids: Sequence[int],
    logprobs: Sequence[float | None],
    text: str,
    finish_reason: str | None,
) -> Completion:
    """Builds a Completion from an engine's raw output, refusing missing values and unknown finish reasons."""
    if finish_reason not in ("stop", "length"):
        raise RolloutLogprobError(f"engine finished a completion with reason {finish_reason!r}")
    missing = [i for i, lp in enumerate(logprobs) if lp is None]
    if missing:
        raise RolloutLogprobError(f"Completion.logprobs missing at positions {missing[:10]}")
    return Completion(
        prompt_token_ids=np.asarray(prompt_token_ids, dtype=np.int32),
        token_ids=np.asarray(token_ids, dtype=np.int32),
        logprobs=np.asarray(logprobs, dtype=np.float32),
        text=text,
        finish_reason=finish_reason,  # type: ignore[arg-type]
    )


def checkpoint_layout(model_dir: str | Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, dtype) of every tensor in a checkpoint's safetensors files, read from the headers only."""
    from safetensors import safe_open

    shards = sorted(Path(model_dir).glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    layout = {}
    for shard in shards:
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                tensor = f.get_slice(name)
                layout[name] = (tuple(tensor.get_shape()), str(tensor.get_dtype()))
    return layout


def check_same_layout(current: str | Path, new: str | Path) -> None:
    """Raises ValueError, naming the first differences, unless new has exactly current's tensors, shapes and dtypes.

    Checked before a reload: a reload that fails half-way leaves an engine's weights mixed (vLLM's
    layer-wise reload cannot be rolled back), so a checkpoint that cannot fit is refused up front.
    """
    old, fresh = checkpoint_layout(current), checkpoint_layout(new)
    if old == fresh:
        return
    problems = [f"missing {n}" for n in sorted(set(old) - set(fresh))]
    problems += [f"unexpected {n}" for n in sorted(set(fresh) - set(old))]
    problems += [f"{n}: {fresh[n]} instead of {old[n]}" for n in sorted(set(old) & set(fresh)) if old[n] != fresh[n]]
    raise ValueError(f"checkpoint {new} does not fit the loaded model: {'; '.join(problems[:5])}")


def newline_token_ids(tokenizer: Any) -> list[int]:
    """Every token id whose text contains a newline: sampling one ends the answer line."""
    size = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(size)], skip_special_tokens=False)
    return [i for i, text in enumerate(texts) if "\n" in text]


class EngineConfig(BaseModel):
    """Engine knobs shared by every backend; the rollout service's settings carry these fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    precision: Precision = Field("bf16", description=PRECISION_HELP)
    fp8_granularity: Fp8Granularity = Field(
        "tensor",
        description="FP8 weight-scale granularity (fp8 and fp8_e5m2 schemes): tensor, channel (per output row) or "
        "block (128x128). 4-bit schemes always use their blocks along the input features.",
    )
    kv_cache_dtype: KvCacheDtype = Field(
        "auto",
        description="KV cache element type, with any precision: auto (the compute dtype), fp8 (= fp8_e4m3) or "
        "fp8_e5m2 (vLLM engine only; scale 1.0, no calibration; on the CPU needs AVX-512 or AMX).",
    )
    quantize_lm_head: bool = Field(
        False,
        description="Also round lm_head and the input embeddings to the scheme's weight format (and the head's "
        "input to its activation format); by default they stay high precision, as in vLLM.",
    )
    compute_dtype: Literal["bfloat16", "float32"] = Field(
        "bfloat16",
        description="dtype the engine computes in. Weights stay BF16-valued either way; float32 is faster on CPUs "
        "without AVX512-BF16 (and slightly more exact), bfloat16 is what a GPU runs (and online FP8 needs).",
    )
    seed: int = Field(0, ge=0, description="Engine seed (per-batch sampling seeds come with each SamplingConfig).")
    max_model_len: int | None = Field(
        None, ge=16, description="Longest prompt + completion in tokens (unset: the model's max_position_embeddings)."
    )
    kv_cache_gb: float | None = Field(
        1.0, gt=0, le=1024, description="KV-cache memory in GiB (null: vLLM's default share of device memory)."
    )
    enforce_eager: bool | None = Field(
        None, description="Skip torch.compile / CUDA graphs (unset: eager on the CPU, compiled on a GPU)."
    )
    in_process: bool = Field(
        False,
        description="Run vLLM's engine core in this process (no spawned engine process: faster start-up, "
        "usable without a __main__ guard; sets VLLM_ENABLE_V1_MULTIPROCESSING=0, which vLLM then caches for the "
        "whole process, so later engines in it run in-process too).",
    )


class RolloutEngine(ABC):
    """A model that samples completions and can swap its weights in place between batches."""

    precision: Precision  # as configured (fp8 is an alias resolved per platform)
    scheme: str  # the scheme it resolved to (aisrl.models.quant.schemes.SCHEMES)
    emulated: bool  # True when the scheme's rounding is emulated (no low-precision kernels, no speedup)
    kv_cache_dtype: str  # the KV cache dtype the engine really runs with ("auto" when not quantized)
    lm_head_quantized: bool
    model_dir: Path  # the checkpoint whose (full-precision) weights are loaded

    @property
    def precision_label(self) -> PrecisionLabel:
        """What to write on every group this engine samples (labels.py)."""
        return precision_label(self.scheme, self.emulated, self.kv_cache_dtype, self.lm_head_quantized)

    @abstractmethod
    def generate(self, prompts: Sequence[str], sampling: SamplingConfig) -> list[list[Completion]]:
        """`sampling.n` completions for each prompt, in prompt order."""

    def check_prompt(self, prompt: str, max_tokens: int) -> None:
        """Raises PromptRejected when `prompt` with up to `max_tokens` completion tokens cannot be sampled whole.

        Called per job before sampling, so one bad prompt never fails a batch. Engines with a context
        limit and a vocabulary override it; this base check only refuses a prompt without text."""
        if not prompt:
            raise PromptRejected("the prompt is empty")

    @abstractmethod
    def load_weights(self, model_dir: str | Path) -> float:
        """Replaces the weights in place from an HF checkpoint directory; returns the seconds it took.

        On failure the engine keeps its old weights, unless the failure came part-way and left them
        mixed: then `broken` says why, `generate` refuses, and only a complete load repairs it.
        """

    @property
    def broken(self) -> str | None:
        """Why the engine must not sample (a reload failed part-way, its weights are mixed), else None."""
        return None

    def close(self) -> None:  # noqa: B027 - engines without resources need nothing
        """Releases the engine's resources; the engine is unusable afterwards."""

    def __enter__(self) -> RolloutEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def create_engine(backend: Literal["vllm", "hf"], model_dir: str | Path, config: EngineConfig) -> RolloutEngine:
    """The engine of a backend; heavy imports happen here, not when this module is imported."""
    if backend == "vllm":
        from aisrl.services.rollout.vllm_engine import VllmEngine

        return VllmEngine(model_dir, config)
    if backend == "hf":
        from aisrl.services.rollout.hf_engine import HfEngine

        return HfEngine(model_dir, config)
    raise ValueError(f"backend must be 'vllm' or 'hf', got {backend!r}")
