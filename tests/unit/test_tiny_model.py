"""Tiny models and the character tokenizer load as ordinary HF checkpoints; the HF engine keeps the logprob contract."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer

from aisrl.models.tiny import TinyModelConfig, create_model, init_model_dir, load_model
from aisrl.models.tokenizer import BOS_ID, EOS_ID, NEWLINE_ID, PAD_ID, VOCAB_SIZE, encode
from aisrl.services.rollout.engine import EngineConfig, SamplingConfig
from aisrl.services.rollout.hf_engine import HfEngine
from tests.logprob_reference import forward_logprobs

SMALL = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_positions=64)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return init_model_dir(tmp_path_factory.mktemp("tiny") / "model", SMALL, seed=0)


def test_tokenizer_is_character_level_and_round_trips(model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir)
    text = "Use 3 5 7 to make 22.\n(3+5)*7-34 ~{}|`"
    ids = tok(text).input_ids
    assert ids[0] == BOS_ID and len(ids) == len(text) + 1
    assert ids == encode(text)
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (BOS_ID, EOS_ID, PAD_ID)
    assert len(tok) == VOCAB_SIZE and tok.convert_tokens_to_ids("\n") == NEWLINE_ID
    printable = "".join(chr(c) for c in range(32, 127))
    assert tok.decode(tok(printable).input_ids[1:]) == printable
    with pytest.raises(ValueError, match="outside"):
        encode("tab\there")


def test_model_saved_in_bf16_and_reloads(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["vocab_size"] == VOCAB_SIZE
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118 (safe_open is no dict) == {torch.bfloat16}
    model = load_model(model_dir)
    original = create_model(SMALL, seed=0)
    for name, tensor in original.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor.to(torch.bfloat16).float())


def test_create_model_is_deterministic_and_leaves_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a, b = create_model(SMALL, seed=7), create_model(SMALL, seed=7)
    assert torch.equal(torch.rand(1), expected)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a.lm_head.weight, create_model(SMALL, seed=8).lm_head.weight)


def test_hf_engine_logprobs_match_forward_pass(model_dir):
    engine = HfEngine(model_dir, EngineConfig())
    sampling = SamplingConfig(n=3, max_tokens=24, temperature=0.7, seed=1)
    prompts = ["12+3=", "Use 3 5 to make 8:", "x"]  # different lengths: left padding must not leak
    groups = engine.generate(prompts, sampling)
    model = load_model(model_dir, torch.bfloat16).eval()
    errors = []
    for prompt, group in zip(prompts, groups, strict=True):
        assert len(group) == 3
        for c in group:
            assert c.prompt_token_ids.tolist() == encode(prompt)
            assert c.token_ids.dtype == np.int32 and c.logprobs.dtype == np.float32
            assert 1 <= len(c.token_ids) <= 24
            if c.finish_reason == "stop":
                assert c.token_ids[-1] in (NEWLINE_ID, EOS_ID)
            assert not np.isin(c.token_ids[:-1], [NEWLINE_ID, EOS_ID]).any()
            errors.append(forward_logprobs(model, c, 0.7) - c.logprobs)
    err = np.abs(np.concatenate(errors))
    # Measured: max 0.0056, mean 0.0014 (BF16 compute, left padding and KV cache vs one unpadded pass).
    assert err.max() < 0.03 and err.mean() < 0.005
    again = engine.generate(prompts, sampling)
    for first, second in zip(groups, again, strict=True):
        assert [c.token_ids.tolist() for c in first] == [c.token_ids.tolist() for c in second]


def test_hf_engine_reload_and_fp8_emulation(model_dir, tmp_path):
    other = init_model_dir(tmp_path / "other", SMALL, seed=1)
    engine = HfEngine(model_dir, EngineConfig(precision="fp8"))
    assert engine.emulated and engine.scheme == "fp8_w8" and engine.last_report.max_relative_error < 2**-4
    seconds = engine.load_weights(other)
    assert seconds > 0 and engine.model_dir == other
    q_proj = engine._model.model.layers[0].self_attn.q_proj.weight
    original = load_model(other, torch.bfloat16).model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(q_proj, original) and torch.allclose(q_proj.float(), original.float(), rtol=2**-4, atol=0)
    narrow = init_model_dir(tmp_path / "narrow", SMALL.model_copy(update={"intermediate_size": 48}))
    with pytest.raises(ValueError, match="does not fit"):
        engine.load_weights(narrow)
    assert engine.model_dir == other and torch.equal(engine._model.model.layers[0].self_attn.q_proj.weight, q_proj)


def test_hf_engine_broken_by_a_part_way_load_until_a_good_load(model_dir, tmp_path, monkeypatch):
    """A misfit checkpoint let past the layout check is copied in part (load_state_dict copies what fits,
    then raises): the engine is broken and refuses to sample until a complete load repairs it."""
    from aisrl.services.rollout import hf_engine

    narrow = init_model_dir(tmp_path / "narrow", SMALL.model_copy(update={"intermediate_size": 48}), seed=1)
    engine = HfEngine(model_dir, EngineConfig())
    sampling = SamplingConfig(n=2, max_tokens=4, seed=0)
    before = engine.generate(["1+1="], sampling)
    monkeypatch.setattr(hf_engine, "check_same_layout", lambda current, new: None)
    with pytest.raises(RuntimeError, match="size mismatch"):
        engine.load_weights(narrow)
    assert engine.broken and engine.model_dir == model_dir
    with pytest.raises(RuntimeError, match="broken"):
        engine.generate(["1+1="], sampling)
    monkeypatch.undo()
    engine.load_weights(model_dir)
    after = engine.generate(["1+1="], sampling)
    assert engine.broken is None and [c.logprobs.tolist() for c in after[0]] == [c.logprobs.tolist() for c in before[0]]


def test_warm_start_is_deterministic_and_trains_on_completions_only(tmp_path):
    from aisrl.models.config import WarmStartSettings
    from aisrl.models.warmstart import IGNORE, make_batch, warm_start

    batch = make_batch([("Use 1 2 to make 3: ", "1+2\n"), ("x", "y\n")], max_positions=64)
    prompt_len = len(encode("Use 1 2 to make 3: "))
    assert (batch["labels"][0, :prompt_len] == IGNORE).all()
    assert batch["labels"][0, prompt_len:].tolist() == encode("1+2\n")[1:]
    assert batch["labels"][1].tolist()[:3] == [IGNORE, IGNORE, encode("y")[1]]
    with pytest.raises(ValueError, match="max_positions"):
        make_batch([("x" * 70, "y\n")], max_positions=64)

    shape = SMALL.model_dump(exclude={"init_std"})
    common = dict(task="countdown", steps=3, batch_size=8, eval_size=4, max_new_tokens=8, **shape)
    results = [warm_start(WarmStartSettings(out=str(tmp_path / name), **common)) for name in ("a", "b")]
    assert results[0].after is not None and results[0].after.n == 4
    files = [(tmp_path / name / "model.safetensors").read_bytes() for name in ("a", "b")]
    assert files[0] == files[1]
    record = json.loads((tmp_path / "a" / "warmstart.json").read_text())
    assert record["settings"]["steps"] == 3 and record["result"]["after"]["n"] == 4


def test_model_init_command_options_come_from_settings(tmp_path):
    from typer.testing import CliRunner

    from aisrl.cli import app
    from aisrl.models.config import WarmStartSettings

    runner = CliRunner()
    help_text = runner.invoke(app, ["model", "init", "--help"], env={"COLUMNS": "200"}).output
    for name in WarmStartSettings.model_fields:
        assert "--" + name.replace("_", "-") in help_text
    out = tmp_path / "m"
    args = ["model", "init", "--out", str(out), "--steps", "0", "--eval-size", "0", "--hidden-size", "32"]
    result = runner.invoke(app, [*args, "--num-heads", "2", "--intermediate-size", "64", "--num-layers", "1"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 32
    bad = runner.invoke(app, ["model", "init", "--out", str(out), "--steps", "-1"])
    assert bad.exit_code != 0 and "steps" in bad.output


def test_hf_engine_runs_activation_schemes_and_refuses_an_fp8_kv_cache(model_dir):
    from aisrl.models.quant.hf_model import emulate_model
    from aisrl.models.quant.schemes import SCHEMES
    from aisrl.v1 import common_pb2

    engine = HfEngine(model_dir, EngineConfig(precision="mxfp4_w4a4", compute_dtype="float32"))
    label = engine.precision_label
    assert (label.precision, label.kv_cache_dtype) == (
        common_pb2.PRECISION_MXFP4_W4A4_EMULATED, common_pb2.KV_CACHE_DTYPE_AUTO,
    )  # fmt: skip
    sampling = SamplingConfig(n=3, max_tokens=12, temperature=0.7, seed=0)
    [group] = engine.generate(["12+3="], sampling)
    reference = emulate_model(load_model(model_dir, torch.float32), SCHEMES["mxfp4_w4a4"]).eval()
    plain = load_model(model_dir, torch.float32).eval()
    for c in group:
        assert np.abs(forward_logprobs(reference, c, 0.7) - c.logprobs).max() < 1e-4
    # The rounding matters: the unrounded model gives clearly different logprobs to the same tokens.
    assert max(np.abs(forward_logprobs(plain, c, 0.7) - c.logprobs).max() for c in group) > 1e-3
    with pytest.raises(ValueError, match="no FP8 KV cache"):
        HfEngine(model_dir, EngineConfig(kv_cache_dtype="fp8"))
