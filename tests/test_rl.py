"""PPO and GRPO arithmetic on hand-computed cases: GAE, whitening, the clipped losses, the KL
estimators, token rewards and group advantages."""

import math

import pytest
import torch

from llmpipe.alignment.rl import (
    clipped_policy_loss,
    clipped_value_loss,
    explained_variance,
    gae,
    group_advantages,
    kl_estimators,
    masked_mean,
    token_rewards,
    whiten,
)


def test_gae_on_a_four_token_trajectory_with_known_values():
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0, 9.0]])  # the fifth token is padding: ignored
    values = torch.tensor([[0.5, 0.6, 0.7, 0.8, 9.0]])
    mask = torch.tensor([[True, True, True, True, False]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # deltas r_t + V_{t+1} - V_t, with V after the last token 0: 0.1, 0.1, 0.1, 0.2
    a3 = 0.2
    a2 = 0.1 + 0.95 * a3
    a1 = 0.1 + 0.95 * a2
    a0 = 0.1 + 0.95 * a1
    torch.testing.assert_close(advantages, torch.tensor([[a0, a1, a2, a3, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[a0 + 0.5, a1 + 0.6, a2 + 0.7, a3 + 0.8, 0.0]]))
    _, monte_carlo = gae(rewards, values, mask, gamma=1.0, lam=1.0)  # lambda 1: the sum of future rewards
    torch.testing.assert_close(monte_carlo, torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]]))


def test_whitening_uses_the_real_tokens_only():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    std = math.sqrt(((1 - 2.5) ** 2 + (2 - 2.5) ** 2 + (3 - 2.5) ** 2 + (4 - 2.5) ** 2) / 3)  # unbiased
    expected = torch.tensor([[(1 - 2.5) / std, (2 - 2.5) / std, (3 - 2.5) / std], [(4 - 2.5) / std, 0, 0]])
    torch.testing.assert_close(whiten(x, mask), expected)
    torch.testing.assert_close(whiten(x, mask, shift_mean=False), (expected + 2.5) * mask)


def test_the_clipped_policy_loss_at_and_beyond_the_clip_range():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.3, 1.3, 1.2, 0.7]]))  # ratios
    advantages = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    loss, metrics = clipped_policy_loss(logp, old, advantages, mask, clip=0.2)
    # per token max(-A r, -A clip(r)): +A beyond 1.2 is clipped (-1.2); -A at 1.3 is not (1.3);
    # exactly at the edge (-1.2, not counted as clipped); -A below 0.8 is clipped (0.8)
    assert loss.item() == pytest.approx((-1.2 + 1.3 - 1.2 + 0.8) / 4, abs=1e-6)
    assert metrics["clip_fraction"].item() == pytest.approx(2 / 4)
    ratio = torch.tensor([1.3, 1.3, 1.2, 0.7])
    assert metrics["approx_kl"].item() == pytest.approx(((ratio - 1) - ratio.log()).mean().item(), abs=1e-6)
    same, same_metrics = clipped_policy_loss(old, old, advantages, mask)
    assert same.item() == pytest.approx(-advantages.mean().item()) and same_metrics["approx_kl"].item() == 0


def test_the_clipped_value_loss_at_and_beyond_the_clip_range():
    old = torch.tensor([[1.0, 1.0, 1.0]])
    values = torch.tensor([[1.5, 1.1, 1.2]])
    returns = torch.tensor([[2.0, 2.0, 0.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    # 1.5 clips to 1.2: max((1.5-2)^2, (1.2-2)^2) = 0.64; 1.1 inside: 0.81; 1.2 at the edge vs 0: 1.44
    expected = 0.5 * (0.64 + 0.81 + 1.44) / 3
    assert clipped_value_loss(values, old, returns, mask, clip=0.2).item() == pytest.approx(expected, abs=1e-6)


def test_the_kl_estimators_on_one_token_and_in_expectation():
    est = kl_estimators(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)]))
    assert est["k1"].item() == pytest.approx(math.log(2))
    assert est["k2"].item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert est["k3"].item() == pytest.approx((0.5 - 1) - math.log(0.5))
    p, q = torch.tensor([0.6, 0.3, 0.1]), torch.tensor([0.2, 0.5, 0.3])
    exact = (p * (p / q).log()).sum().item()
    samples = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    est = kl_estimators(p.log()[samples], q.log()[samples])
    assert est["k1"].mean().item() == pytest.approx(exact, abs=0.01)  # unbiased
    assert est["k3"].mean().item() == pytest.approx(exact, abs=0.01)  # unbiased, and never negative
    assert (est["k3"] >= 0).all()
    same = kl_estimators(torch.tensor([-1.0]), torch.tensor([-1.0]))
    assert all(v.item() == 0 for v in same.values())


def test_token_rewards_put_the_score_on_the_last_real_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    rewards = token_rewards(torch.tensor([1.0, -2.0]), kl, mask, kl_coef=0.05)
    torch.testing.assert_close(rewards, torch.tensor([[-0.005, -0.01, -0.015 + 1.0], [-0.02 - 2.0, 0.0, 0.0]]))


def test_group_advantages_with_a_constant_group_are_zero_not_nan():
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    advantages = group_advantages(rewards, group_size=4)
    assert torch.isfinite(advantages).all()
    assert advantages[:4].tolist() == [0.0] * 4
    std = math.sqrt(4 * 0.25 / 3)  # unbiased std of [0, 1, 0, 1] (mean 0.5)
    torch.testing.assert_close(advantages[4:], torch.tensor([-0.5, 0.5, -0.5, 0.5]) / (std + 1e-4))
    torch.testing.assert_close(group_advantages(rewards, 4, scale=False)[4:], torch.tensor([-0.5, 0.5, -0.5, 0.5]))
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(rewards, 3)


def test_explained_variance_of_a_perfect_and_a_constant_critic():
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 2.5), returns, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_mean(returns, mask).item() == 2.5
