"""GRPO advantages and the AIS-mixed PPO-clip loss, including the autograd proof that the gradient
with coefficient alpha is exactly (1 - alpha) * g_PG + alpha * g_IS (docs/ais.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aisrl.core.ais import compute_coefficient
from aisrl.core.grpo import expand_to_tokens, group_advantages, mixed_ppo_loss, ppo_stats
from aisrl.core.types import BatchValidationError, CorrectionConfig, CorrectionMode, MismatchArrays

# --- group advantages -------------------------------------------------------------------------


def test_equal_rewards_give_exact_zeros():
    for value in (0.0, 1.0, 0.1, -3.7):
        adv = group_advantages(np.full(7, value))
        assert (adv == 0.0).all() and adv.dtype == np.float64
    assert (group_advantages(np.full(5, 0.1), eps=0.0) == 0.0).all()  # no 0 / 0 either
    assert (group_advantages(np.full(5, 0.1), std_normalize=False) == 0.0).all()
    assert (group_advantages(np.array([0.3])) == 0.0).all()  # a group of one


@settings(max_examples=100, deadline=None)
@given(
    rewards=st.lists(st.floats(-100.0, 100.0), min_size=2, max_size=16),
    shift=st.floats(-50.0, 50.0),
    scale=st.floats(0.01, 100.0),
)
def test_advantages_have_zero_mean_unit_scale_and_ignore_affine_reward_changes(rewards, shift, scale):
    r = np.array(rewards)
    adv = group_advantages(r, eps=0.0)
    assert abs(adv.mean()) <= 1e-9
    if np.ptp(r) > 1e-6 * max(1.0, np.abs(r).max()):
        assert np.mean(adv**2) == pytest.approx(1.0, rel=1e-9)  # population std (ddof = 0)
        np.testing.assert_allclose(group_advantages(r * scale + shift, eps=0.0), adv, rtol=1e-6, atol=1e-6)
    centered = group_advantages(r, std_normalize=False)
    np.testing.assert_allclose(centered, r - r.mean(), atol=1e-12)


def test_groups_along_the_last_axis_are_independent():
    rewards = np.array([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [2.0, 4.0, 6.0, 8.0]])
    adv = group_advantages(rewards)
    np.testing.assert_array_equal(adv[1], 0.0)
    np.testing.assert_allclose(adv[0], [1.0, -1.0, -1.0, 1.0], rtol=1e-5)
    np.testing.assert_allclose(adv[2], group_advantages(rewards[2]))
    # eps keeps a tiny spread from exploding: |A| <= spread / eps
    assert np.abs(group_advantages(np.array([0.0, 1e-9]))).max() <= 1e-3 + 1e-12


@pytest.mark.parametrize("rewards", [[1.0, np.nan], [np.inf, 0.0], []])
def test_bad_rewards_are_an_error(rewards):
    with pytest.raises(BatchValidationError) as err:
        group_advantages(np.array(rewards))
    assert err.value.field == "rewards"


def test_expand_to_tokens_numpy_and_torch():
    per_seq, lengths = np.array([1.5, -2.0, 0.5]), np.array([2, 1, 3])
    np.testing.assert_array_equal(expand_to_tokens(per_seq, lengths), [1.5, 1.5, -2.0, 0.5, 0.5, 0.5])
    got = expand_to_tokens(torch.tensor(per_seq), torch.tensor(lengths))
    assert isinstance(got, torch.Tensor) and got.tolist() == [1.5, 1.5, -2.0, 0.5, 0.5, 0.5]
    with pytest.raises(BatchValidationError) as err:
        expand_to_tokens(per_seq, np.array([1, 2]))
    assert err.value.field == "lengths"


# --- the loss ---------------------------------------------------------------------------------


class TinyLM(torch.nn.Module):
    """An embedding and a linear head: enough to produce per-token logprobs with real gradients."""

    def __init__(self, vocab: int = 11, hidden: int = 6, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(vocab, hidden, dtype=torch.float64)
        self.head = torch.nn.Linear(hidden, vocab, dtype=torch.float64)

    def token_logprobs(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.head(torch.tanh(self.embed(inputs)))
        return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None])[:, 0]


def _grads(model: TinyLM, loss: torch.Tensor) -> torch.Tensor:
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return torch.cat([g.reshape(-1) for g in grads])


@pytest.fixture
def ppo_setting():
    """A batch after one optimizer step, so that the PPO ratio is clipped for some tokens."""
    rng = np.random.default_rng(3)
    model = TinyLM()
    lengths = np.array([5, 9, 3, 7, 6])
    n = int(lengths.sum())
    inputs = torch.tensor(rng.integers(0, 11, size=n))
    targets = torch.tensor(rng.integers(0, 11, size=n))
    advantages = group_advantages(np.array([1.0, 0.0, 1.0, 0.0, 0.0]))
    token_adv = expand_to_tokens(advantages, lengths)
    with torch.no_grad():
        lp_old = model.token_logprobs(inputs, targets)
    # The rollout engine's logprobs: the learner's plus FP8-like noise (some weights beyond the cap).
    lp_mu = np.minimum(lp_old.numpy() + rng.normal(0.0, 0.6, size=n), 0.0)
    batch = MismatchArrays(lp_old.numpy().copy(), lp_mu, lengths, advantages)
    # One SGD step on a random objective moves theta away from theta_old.
    step = -(model.token_logprobs(inputs, targets) * torch.tensor(rng.normal(size=n))).sum()
    step.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.8 * p.grad
            p.grad = None
    return model, inputs, targets, lp_old, token_adv, batch


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.37, 0.5, 0.9, 1.0])
def test_gradient_mixes_the_uncorrected_and_the_importance_weighted_gradients(ppo_setting, alpha):
    model, inputs, targets, lp_old, token_adv, batch = ppo_setting
    n = batch.lp_pi.size

    def grad_with(config: CorrectionConfig) -> tuple[torch.Tensor, np.ndarray]:
        coef = compute_coefficient(batch, config).token_coef
        lp_theta = model.token_logprobs(inputs, targets)
        return _grads(model, mixed_ppo_loss(lp_theta, lp_old, token_adv, coef, denominator=n)), coef

    g_pg, c_pg = grad_with(CorrectionConfig(mode=CorrectionMode.NONE))
    g_is, c_is = grad_with(CorrectionConfig(mode=CorrectionMode.TIS, cap=2.0))
    g_mix, c_mix = grad_with(CorrectionConfig(mode=CorrectionMode.FIXED, fixed_alpha=alpha, cap=2.0))
    assert (c_pg == 1.0).all() and (c_is == 2.0).any() and (c_is < 1.0).any()  # some weights truncated
    np.testing.assert_allclose(c_mix, (1 - alpha) * c_pg + alpha * c_is, rtol=1e-15)
    torch.testing.assert_close(g_mix, (1 - alpha) * g_pg + alpha * g_is, rtol=1e-12, atol=1e-14)
    assert g_pg.abs().max() > 1e-3 and not torch.allclose(g_pg, g_is)  # the check is not vacuous

    stats = ppo_stats(model.token_logprobs(inputs, targets), lp_old, token_adv, c_mix)
    assert 0.0 < stats.clip_fraction < 1.0, stats  # clipping active for some tokens, not all
    assert stats.n_kept == n and stats.ratio_min < 0.8 and stats.ratio_max > 1.2 and stats.approx_kl > 0


def test_ais_coefficient_gradient_is_the_same_mixture(ppo_setting):
    model, inputs, targets, lp_old, token_adv, batch = ppo_setting
    n = batch.lp_pi.size
    result = compute_coefficient(batch, CorrectionConfig(mode=CorrectionMode.AIS, tau_kl=0.5))
    assert 0.0 < result.alpha < 1.0
    lp_theta = model.token_logprobs(inputs, targets)
    ones = np.ones(n)
    wt = compute_coefficient(batch, CorrectionConfig(mode=CorrectionMode.TIS)).token_coef
    g = _grads(model, mixed_ppo_loss(lp_theta, lp_old, token_adv, result.token_coef, n))
    g_pg = _grads(model, mixed_ppo_loss(model.token_logprobs(inputs, targets), lp_old, token_adv, ones, n))
    g_is = _grads(model, mixed_ppo_loss(model.token_logprobs(inputs, targets), lp_old, token_adv, wt, n))
    torch.testing.assert_close(g, (1 - result.alpha) * g_pg + result.alpha * g_is, rtol=1e-12, atol=1e-14)


def test_loss_matches_the_formula_and_masking_keeps_the_pre_mask_denominator():
    lp_theta = torch.tensor([-0.5, -1.0, -0.2, -2.0], dtype=torch.float64, requires_grad=True)
    lp_old = torch.tensor([-0.6, -0.5, -0.2, -2.5], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, 0.5, 2.0], dtype=torch.float64)
    coef = np.array([1.2, 0.0, 0.7, 1.0])  # token 1 masked
    loss = mixed_ppo_loss(lp_theta, lp_old, adv, coef, denominator=4, eps_lo=0.2, eps_hi=0.3)
    r = torch.exp(lp_theta.detach() - lp_old)
    terms = [min(float(r[i] * adv[i]), float(torch.clamp(r[i], 0.8, 1.3) * adv[i])) for i in range(4)]
    want = -(1.2 * terms[0] + 0.7 * terms[2] + 1.0 * terms[3]) / 4  # divided by 4, not by 3 survivors
    assert float(loss.detach()) == pytest.approx(want, rel=1e-12)
    loss.backward()
    assert lp_theta.grad[1] == 0.0  # the masked token gets no gradient
    assert lp_theta.grad[3] == 0.0  # clipped (r = e^0.5 > 1.3 with A > 0): no gradient either
    assert lp_theta.grad[0] != 0.0


def test_coefficient_is_detached():
    lp_theta = torch.tensor([-0.5, -1.0], dtype=torch.float64, requires_grad=True)
    coef = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([-0.5, -1.0], dtype=torch.float64, requires_grad=True)
    mixed_ppo_loss(lp_theta, old, torch.tensor([1.0, 1.0]), coef, denominator=2).backward()
    assert coef.grad is None and old.grad is None and lp_theta.grad is not None


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"lp_old": np.zeros(3)}, "lp_old"),
        ({"token_advantages": np.zeros(1)}, "token_advantages"),
        ({"token_coef": np.zeros(4)}, "token_coef"),
        ({"denominator": 0}, "denominator"),
    ],
)
def test_loss_rejects_bad_inputs(kwargs, field):
    args = {"lp_theta": torch.zeros(2, requires_grad=True), "lp_old": np.zeros(2),
            "token_advantages": np.zeros(2), "token_coef": np.ones(2), "denominator": 2} | kwargs  # fmt: skip
    with pytest.raises(BatchValidationError) as err:
        mixed_ppo_loss(**args)
    assert err.value.field == field


def test_stats_of_a_fully_masked_batch_do_not_divide_by_zero():
    stats = ppo_stats(torch.zeros(3), np.zeros(3), np.ones(3), np.zeros(3))
    assert stats.n_kept == 0 and stats.clip_fraction == 0.0 and stats.approx_kl == 0.0
    loss = mixed_ppo_loss(torch.zeros(3, requires_grad=True), np.zeros(3), np.ones(3), np.zeros(3), denominator=3)
    assert float(loss.detach()) == 0.0
