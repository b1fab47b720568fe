"""A plain transformers `generate` engine: the benchmark baseline and a reference for the vLLM engine.

Invariant: same contract as every RolloutEngine. Logprobs are computed here from the raw logits
`generate` returns (`log_softmax(logits / temperature)` at the sampled ids), so they do not depend
on which logits processors transformers applies; top-k is explicitly off (transformers' default
is 50) and top-p stays at 1 for training. Weights are BF16 or float32; every quantized scheme is
emulated here with the same rounding as in the vLLM engine (aisrl/models/quant): weights rounded
as they load (checkpoint.py), inputs of the quantized linear layers rounded per token by forward
pre-hooks. The KV cache is the compute dtype (`kv_cache_dtype` other than auto is refused).
Sampling seeds the torch RNG once per batch inside a forked RNG state, so results repeat for the
same batch and seed, and the caller's RNG is left alone.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch

from aisrl.models.quant.hf_model import add_activation_rounding, round_state_dict
from aisrl.models.quant.schemes import resolve
from aisrl.services.rollout.engine import (
    Completion,
    EngineConfig,
    RolloutEngine,
    SamplingConfig,
    check_prompt_tokens,
    check_same_layout,
    make_completion,
    newline_token_ids,
)


def _read_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    return {name: t for shard in shards for name, t in load_file(shard).items()}


class HfEngine(RolloutEngine):
    """transformers `AutoModelForCausalLM.generate` over an HF checkpoint directory (BF16 weights)."""

    def __init__(self, model_dir: str | Path, config: EngineConfig | None = None, device: str | None = None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config = config or EngineConfig()
        if self.config.kv_cache_dtype != "auto":
            raise ValueError("the HF engine has no FP8 KV cache: use kv_cache_dtype=auto, or the vllm engine")
        self.precision = self.config.precision
        self._scheme, _ = resolve(self.precision, on_gpu=False)  # emulated on any device here
        self.scheme, self.emulated = self._scheme.name, self._scheme.quantizes
        self.kv_cache_dtype = "auto"
        self.lm_head_quantized = self.config.quantize_lm_head and self._scheme.quantizes
        self.model_dir = Path(model_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._broken: str | None = None
        self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        self._tokenizer.padding_side = "left"
        self._model = AutoModelForCausalLM.from_pretrained(
            self.model_dir, dtype=getattr(torch, self.config.compute_dtype), local_files_only=True
        ).to(self.device)
        self._model.eval()
        add_activation_rounding(self._model, self._scheme, self.lm_head_quantized)
        if self._scheme.weights is not None:
            self.load_weights(self.model_dir)
        self._stop_ids = sorted({*newline_token_ids(self._tokenizer), self._tokenizer.eos_token_id})
        self._eos_only = [self._tokenizer.eos_token_id]

    def check_prompt(self, prompt: str, max_tokens: int) -> None:
        super().check_prompt(prompt, max_tokens)
        ids = self._tokenizer(prompt)["input_ids"]
        config = self._model.config
        check_prompt_tokens(ids, max_tokens, config.max_position_embeddings, config.vocab_size)

    def generate(self, prompts: Sequence[str], sampling: SamplingConfig) -> list[list[Completion]]:
        if self._broken:
            raise RuntimeError(f"the HF engine is broken: {self._broken}; load a good checkpoint first")
        if not prompts:
            return []
        tok = self._tokenizer
        batch = tok(list(prompts), return_tensors="pt", padding=True).to(self.device)
        stop_ids = self._stop_ids if sampling.stop_at_newline else self._eos_only
        greedy = sampling.temperature == 0
        kwargs = {"do_sample": False} if greedy else {"do_sample": True, "temperature": sampling.temperature}
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []), torch.no_grad():
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            out = self._model.generate(
                **batch,
                **kwargs,
                top_k=sampling.top_k if sampling.top_k > 0 else 0,
                top_p=sampling.top_p,
                num_return_sequences=sampling.n,
                max_new_tokens=sampling.max_tokens,
                eos_token_id=stop_ids,
                pad_token_id=tok.pad_token_id,
                output_logits=True,
                return_dict_in_generate=True,
            )
        width = batch["input_ids"].shape[1]
        new = out.sequences[:, width:]  # (B * n, steps)
        logits = torch.stack(out.logits, dim=1).float()  # raw logits, (B * n, steps, V)
        if not greedy:
            logits = logits / sampling.temperature
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
        is_stop = torch.isin(new, torch.tensor(stop_ids, device=new.device))
        groups: list[list[Completion]] = []
        for p in range(len(prompts)):
            prompt_ids = batch["input_ids"][p][batch["attention_mask"][p].bool()].tolist()
            group = []
            for row in range(p * sampling.n, (p + 1) * sampling.n):
                stops = torch.nonzero(is_stop[row]).flatten()
                length = int(stops[0]) + 1 if len(stops) else new.shape[1]
                ids = new[row, :length].tolist()
                reason = "stop" if len(stops) else "length"
                text = tok.decode(ids, skip_special_tokens=True)
                group.append(make_completion(prompt_ids, ids, logprobs[row, :length].tolist(), text, reason))
            groups.append(group)
        return groups

    def load_weights(self, model_dir: str | Path) -> float:
        start = time.perf_counter()
        if Path(model_dir) != self.model_dir:
            check_same_layout(self.model_dir, model_dir)  # load_state_dict would copy what fits, then raise
        state = _read_state_dict(Path(model_dir))
        state, self.last_report = round_state_dict(
            state, self._scheme, self.config.fp8_granularity, self.lm_head_quantized
        )
        try:  # from here on a failure leaves the weights mixed: what was copied stays copied
            missing, unexpected = self._model.load_state_dict(state, strict=False)
        except Exception as exc:
            self._broken = f"loading {model_dir} failed part-way ({exc!r})"
            raise
        # A tied lm_head is absent from the checkpoint by design; anything else missing is an error.
        missing = [k for k in missing if not (k == "lm_head.weight" and self._model.config.tie_word_embeddings)]
        if missing or unexpected:
            self._broken = f"{model_dir} was loaded only in part"
            raise ValueError(
                f"checkpoint {model_dir} does not fit the model: missing {missing}, unexpected {unexpected}"
            )
        self.model_dir, self._broken = Path(model_dir), None
        return time.perf_counter() - start

    @property
    def broken(self) -> str | None:
        return self._broken

    def close(self) -> None:
        self._model = None  # type: ignore[assignment]
