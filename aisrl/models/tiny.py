"""Small Llama-style causal LMs created locally from a config (nothing is downloaded).

Invariant: a directory written by `save_model` is a complete Hugging Face checkpoint
(`config.json` with `dtype: bfloat16`, `model.safetensors`, the character tokenizer) that
`transformers.AutoModelForCausalLM`, `AutoTokenizer` and vLLM load unchanged, exactly like a
downloaded checkpoint; every later stage (warm start, rollout engines, learner) only ever
sees such a directory, so a real checkpoint (e.g. Qwen3) goes through the same path.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from aisrl.models.config import TinyModelConfig
from aisrl.models.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, save_char_tokenizer


def llama_config(config: TinyModelConfig) -> LlamaConfig:
    """The transformers config of a tiny model (BF16 weights, untied head, character vocabulary)."""
    if config.hidden_size % config.num_heads:
        raise ValueError(f"hidden_size ({config.hidden_size}) must be divisible by num_heads ({config.num_heads})")
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=config.max_positions,
        initializer_range=config.init_std,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        dtype="bfloat16",
    )


def create_model(config: TinyModelConfig | None = None, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised tiny Llama in float32 (train in float32, save in BF16); deterministic in seed."""
    cfg = llama_config(config or TinyModelConfig())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg).to(torch.float32)
    return model


def save_model(model: PreTrainedModel, out_dir: str | Path) -> Path:
    """Writes the model in BF16 safetensors plus the character tokenizer, as a loadable HF directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Cast a copy: the caller's float32 master weights stay untouched.
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    model.save_pretrained(out, state_dict=state, safe_serialization=True)
    # save_pretrained records the in-memory dtype (float32); the files hold BF16, so say so.
    config = copy.deepcopy(model.config)
    config.dtype = "bfloat16"
    config.save_pretrained(out)
    save_char_tokenizer(out, model_max_length=model.config.max_position_embeddings)
    return out


def init_model_dir(out_dir: str | Path, config: TinyModelConfig | None = None, seed: int = 0) -> Path:
    """Creates a random tiny model and saves it: the fast path for tests and benchmarks."""
    return save_model(create_model(config, seed), out_dir)


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Loads any HF causal-LM directory (tiny or real) without network access."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, local_files_only=True)
