"""PPO arithmetic: GAE against its closed form, masks, whitening, KL estimators, losses, KL controllers."""

import math

import pytest
import torch

from bonesoup.train.ppo.losses import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    kl_penalty,
    last_token_index,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    token_rewards,
    value_loss,
)


def _random_batch(B=5, T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([1, T, 4, 7, 2][:B])
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    return rewards, values, mask.double(), lengths


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_closed_form(gamma, lam):
    rewards, values, mask, lengths = _random_batch()
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for b, L in enumerate(lengths.tolist()):
        v = values[b, :L].tolist() + [0.0]  # V after the last real token is 0: the episode ended
        delta = [rewards[b, t].item() + gamma * v[t + 1] - v[t] for t in range(L)]
        for t in range(L):
            expected = sum((gamma * lam) ** k * delta[t + k] for k in range(L - t))
            assert adv[b, t].item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
            assert ret[b, t].item() == pytest.approx(expected + v[t], rel=1e-12, abs=1e-12)
        # Padding gets nothing, and whatever values/rewards sit there do not leak in.
        assert torch.all(adv[b, L:] == 0) and torch.all(ret[b, L:] == 0)


def test_gae_lambda_one_gamma_one_is_reward_to_go_minus_value():
    rewards, values, mask, lengths = _random_batch(seed=3)
    adv, _ = gae(rewards, values, mask, 1.0, 1.0)
    for b, L in enumerate(lengths.tolist()):
        to_go = rewards[b, :L].flip(0).cumsum(0).flip(0)
        torch.testing.assert_close(adv[b, :L], to_go - values[b, :L])


def test_gae_ignores_garbage_outside_mask():
    rewards, values, mask, _ = _random_batch(seed=4)
    junk = torch.where(mask.bool(), 0.0, 1e6)
    a1, r1 = gae(rewards, values, mask, 0.95, 0.9)
    a2, r2 = gae(rewards + junk, values - junk, mask, 0.95, 0.9)
    torch.testing.assert_close(a1, a2)
    torch.testing.assert_close(r1, r2)


def test_masked_whiten_uses_only_masked_positions():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, -50.0, -50.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    w = masked_whiten(x, mask)
    sel = torch.tensor([1.0, 2.0, 3.0])
    expected = (sel - sel.mean()) / sel.std()  # unbiased std, as masked_var
    torch.testing.assert_close(w[mask.bool()], expected, rtol=1e-6, atol=1e-6)
    assert torch.all(w[~mask.bool()] == 0)
    assert masked_mean(x, mask).item() == pytest.approx(2.0)
    assert masked_var(x, mask).item() == pytest.approx(1.0)
    # shift_mean=False keeps the mean (rewards keep their sign), only rescales.
    w2 = masked_whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(w2[mask.bool()], expected + 2.0, rtol=1e-6, atol=1e-6)


def test_kl_estimators():
    lp = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-1.5, -1.0, -0.5]])
    k1 = kl_penalty(lp, ref, "k1")
    torch.testing.assert_close(k1, lp - ref)
    k3 = kl_penalty(lp, ref, "k3")
    r = torch.exp(ref - lp)
    torch.testing.assert_close(k3, (r - 1) - torch.log(r))
    assert torch.all(k3 >= 0) and k3[0, 2] == 0
    with pytest.raises(ValueError, match="kl estimator"):
        kl_penalty(lp, ref, "k2")


def test_k1_and_k3_are_unbiased_estimates_of_the_same_kl():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(20, generator=g), 0)
    q = torch.softmax(torch.randn(20, generator=g), 0)
    exact = (p * (p / q).log()).sum()
    # Expectation under p over all tokens (exact, no sampling noise).
    lp, lq = p.log()[None], q.log()[None]
    e_k1 = (p * kl_penalty(lp, lq, "k1")[0]).sum()
    e_k3 = (p * kl_penalty(lp, lq, "k3")[0]).sum()
    assert e_k1.item() == pytest.approx(exact.item(), rel=1e-5)
    assert e_k3.item() == pytest.approx(exact.item(), rel=1e-5)


def test_score_lands_on_last_real_token():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    kl = torch.full((3, 5), 0.5)
    score = torch.tensor([2.0, -1.0, 7.0])
    r = token_rewards(score, kl, mask, kl_coef=0.1)
    assert last_token_index(mask).tolist() == [2, 4, 0]
    expected = torch.tensor([[-0.05, -0.05, 1.95, 0, 0], [-0.05] * 4 + [-1.05], [6.95, 0, 0, 0, 0]])
    torch.testing.assert_close(r, expected)
    with pytest.raises(ValueError, match="at least one token"):
        last_token_index(torch.tensor([[0, 0]]))


def test_policy_loss_clips_and_is_exact_at_ratio_one():
    old = torch.log(torch.tensor([[0.5, 0.5, 0.5, 0.5]]))
    new = torch.log(torch.tensor([[0.5, 0.8, 0.2, 0.8]]))  # ratios 1, 1.6, 0.4, 1.6
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    loss, info = policy_loss(new, old, adv, cliprange=0.2)
    torch.testing.assert_close(info["ratio"], torch.tensor([[1.0, 1.6, 0.4, 1.6]]))
    # A > 0, ratio 1.6: clipped to 1.2 (no incentive beyond); A < 0, ratio 0.4: clipped to 0.8;
    # A < 0, ratio 1.6: the unclipped (pessimistic) term wins.
    torch.testing.assert_close(loss, torch.tensor([[-1.0, -1.2, 0.8, 1.6]]))
    assert info["clipped"].tolist() == [[0.0, 1.0, 1.0, 0.0]]
    assert info["approx_kl"][0, 0] == 0
    # Gradient: zero where clipped.
    new = new.clone().requires_grad_(True)
    policy_loss(new, old, adv, 0.2)[0].sum().backward()
    assert new.grad[0, 1] == 0 and new.grad[0, 2] == 0 and new.grad[0, 0] != 0


def test_value_loss_clipped():
    old = torch.tensor([0.0, 0.0, 0.0])
    ret = torch.tensor([1.0, 1.0, -1.0])
    v = torch.tensor([0.1, 0.5, 0.5])
    loss, clipped = value_loss(v, old, ret, cliprange_value=0.2)
    # 0.5 * max((v - R)^2, (clip(v, -0.2, 0.2) - R)^2)
    torch.testing.assert_close(loss, 0.5 * torch.tensor([0.81, 0.8**2, 1.5**2]))
    assert clipped.tolist() == [0.0, 1.0, 0.0]


def test_adaptive_kl_moves_the_coefficient_the_right_way():
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c.update(12.0, n_steps=1000)  # twice the target: error clipped to +0.2
    assert c.value == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    up = c.value
    c.update(6.6, n_steps=1000)  # 10% over: +0.1
    assert c.value == pytest.approx(up * (1 + 0.1 * 0.1))
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c.update(0.0, n_steps=1000)  # far below: -0.2
    assert c.value == pytest.approx(0.1 * (1 - 0.02))
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c.update(6.0, n_steps=1000)
    assert c.value == 0.1
    f = FixedKLController(0.3)
    f.update(100.0, 64)
    assert f.value == 0.3
    with pytest.raises(ValueError, match="target_kl"):
        AdaptiveKLController(0.1, target=0.0, horizon=1)
    assert math.isfinite(c.value)
