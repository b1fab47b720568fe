"""One forward pass for lp_pi and the update (reuse_forward) trains exactly as two passes do.

A tiny random model, hand-made groups: the same prepare + update with the kept forward pass and
with a separate no-grad pass must give the same lp_pi, the same statistics, the same parameters
and the same RNG stream afterwards.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from learner_support import make_group, tiny_model

from aisrl.models.tiny import load_model
from aisrl.services.learner.groups import decode_group
from aisrl.services.learner.trainer import TrainConfig, Trainer


def _trainer(model_dir, **config) -> Trainer:
    torch.manual_seed(0)
    values = dict(lr=1.0, grad_clip=0.0, compute_dtype="float32", micro_batch_size=3) | config
    trainer = Trainer(load_model(model_dir, dtype=torch.float32), TrainConfig(**values))
    # Plain SGD (lr 1): the parameters move by the gradient itself (Adam's first step is about lr * sign(g),
    # which float32 rounding of a near-zero gradient can flip).
    trainer.optimizer = torch.optim.SGD(trainer.model.parameters(), lr=1.0)
    return trainer


def _groups(n: int = 3):
    return [decode_group(str(i), make_group("t", f"p{i}-a0", 0, seed=10 + i)) for i in range(n)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("model"))


def test_a_kept_forward_pass_trains_exactly_as_a_separate_one(model_dir):
    groups = _groups()
    fused, separate = _trainer(model_dir), _trainer(model_dir, reuse_forward=False)
    assert fused.reuses_forward and not separate.reuses_forward
    a, b = fused.prepare(groups), separate.prepare(groups)
    assert a.graph is not None and b.graph is None
    np.testing.assert_array_equal(a.lp_pi, b.lp_pi)  # the detached pass gives what the no-grad pass gives
    coef = np.linspace(0.5, 1.5, a.n_tokens)  # any per-token coefficients (alpha is a constant of the loss)
    # (sums run in another micro-batch order: equal up to float32 rounding)
    sa, sb = fused.update(a, coef), separate.update(b, coef)
    assert a.graph is None  # used once, then freed
    assert sa.loss == pytest.approx(sb.loss, rel=1e-5) and sa.grad_norm == pytest.approx(sb.grad_norm, rel=1e-5)
    assert sa.clip_fraction == sb.clip_fraction and sa.updates == sb.updates == 1
    for p, q in zip(fused.model.parameters(), separate.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert fused.rng.bit_generator.state == separate.rng.bit_generator.state


@pytest.mark.parametrize("config", [{"ppo_epochs": 2}, {"minibatches": 2}])
def test_several_updates_recompute_their_forward_passes(model_dir, config):
    trainer = _trainer(model_dir, **config)
    assert not trainer.reuses_forward
    prepared = trainer.prepare(_groups())
    assert prepared.graph is None
    stats = trainer.update(prepared, np.ones(prepared.n_tokens))
    assert stats.updates == 2


def test_prompts_run_once_per_group_give_the_packed_passs_logprobs_and_gradient(model_dir):
    groups = _groups(4)
    shared, packed = _trainer(model_dir, reuse_forward=False), _trainer(model_dir, reuse_forward=False,
                                                                        share_prompts=False)  # fmt: skip
    a, b = shared.prepare(groups), packed.prepare(groups)
    assert len(np.unique(a.prompts)) == 4 and len(a.prompts) == 16  # 4 prompts, 4 samples each
    np.testing.assert_allclose(a.lp_pi, b.lp_pi, rtol=1e-5, atol=1e-6)
    rows = np.array([5, 0, 12, 6, 1])  # any rows, in any order, prompts split across micro-batches
    np.testing.assert_allclose(shared.rows_logprobs(a, rows).detach().numpy(),
                               packed.rows_logprobs(b, rows).detach().numpy(), rtol=1e-5, atol=1e-6)  # fmt: skip
    coef = np.linspace(0.5, 1.5, a.n_tokens)
    ga, gb = shared.gradient(a, coef), packed.gradient(b, coef)
    assert ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-4, atol=1e-6)


def test_a_kept_pass_is_used_only_by_its_own_trainer_before_any_step(model_dir):
    """A batch prepared by another trainer, or before an optimizer step, trains on a fresh forward pass:
    the kept graph belongs to other parameters, and backpropagating through it would move nothing here."""
    groups = _groups()
    owner, other = _trainer(model_dir), _trainer(model_dir)
    prepared = owner.prepare(groups)
    coef = np.ones(prepared.n_tokens)
    before = {n: p.detach().clone() for n, p in other.model.named_parameters()}
    owner_before = {n: p.detach().clone() for n, p in owner.model.named_parameters()}
    other.update(prepared, coef)
    assert any(not torch.equal(p, before[n]) for n, p in other.model.named_parameters())
    assert all(torch.equal(p, owner_before[n]) for n, p in owner.model.named_parameters())

    stale = owner.prepare(groups)
    owner.update(owner.prepare(groups), coef)  # a step after `stale` was prepared
    moved = {n: p.detach().clone() for n, p in owner.model.named_parameters()}
    owner.update(stale, coef)
    assert any(not torch.equal(p, moved[n]) for n, p in owner.model.named_parameters())
