"""Unit tests of algos.py, the advantage and loss math: GRPO/RLOO baselines and equal-reward groups, GAE against
hand values and a reference loop (and VAPO's length-adaptive lambda), the policy loss and its aggregation weights,
the clipped value loss and explained variance, the KL estimators and the outcome-reward placement.

Run: python -m pytest tests/test_algos.py -q
"""

import math

import pytest
import torch

from algos import (
    compute_gae_advantages,
    compute_grpo_advantages,
    compute_kl,
    compute_policy_loss,
    compute_rloo_advantages,
    compute_value_loss,
    equal_reward_groups,
    explained_variance,
    length_adaptive_lam,
    logprob_mismatch,
    loss_weights,
    outcome_token_rewards,
    tis_weights,
)

MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


def lengths_mask(lengths, width: int) -> torch.Tensor:
    return (torch.arange(width)[None, :] < torch.as_tensor(lengths)[:, None]).float()


# ---------------------------------------------------------------------------------------------
# GRPO, RLOO, equal-reward groups
# ---------------------------------------------------------------------------------------------

def test_grpo_hand_computed_with_and_without_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 4.0, 5.0])
    group_ids = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    # group 0: mean 0.25; sample std sqrt((0.75^2 + 3 * 0.25^2) / 3) = sqrt(0.25) = 0.5
    # group 1: mean 3; sample std sqrt((1 + 1) / 1) = sqrt(2) (the population std would be 1)
    # group 2: one sample -> 0
    eps = 1e-6
    expected = torch.tensor([0.75 / (0.5 + eps), -0.25 / (0.5 + eps), -0.25 / (0.5 + eps), -0.25 / (0.5 + eps),
                             -1 / (math.sqrt(2) + eps), 1 / (math.sqrt(2) + eps), 0.0])
    torch.testing.assert_close(compute_grpo_advantages(rewards, group_ids), expected)
    # Dr. GRPO: r - mean only
    expected_no_std = torch.tensor([0.75, -0.25, -0.25, -0.25, -1.0, 1.0, 0.0])
    torch.testing.assert_close(compute_grpo_advantages(rewards, group_ids, scale_by_std=False), expected_no_std)


def test_grpo_docstring_example():
    # [1, 0, 0, 0]: mean 0.25, std 0.5 -> [1.5, -0.5, -0.5, -0.5]
    adv = compute_grpo_advantages(torch.tensor([1.0, 0, 0, 0]), torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(adv, torch.tensor([1.5, -0.5, -0.5, -0.5]), atol=1e-5, rtol=0)


def test_grpo_groups_keyed_by_id_not_position():
    gen = torch.Generator().manual_seed(0)
    # 4 prompts x 3 samples, contiguous, with arbitrary (non 0..n-1) prompt ids
    contiguous_ids = torch.tensor([17, 17, 17, 3, 3, 3, 42, 42, 42, 8, 8, 8])
    rewards = torch.randint(0, 3, (12,), generator=gen).float()
    perm = torch.randperm(12, generator=gen)
    assert not torch.equal(contiguous_ids[perm], contiguous_ids)  # really interleaved
    for scale in (True, False):
        ref = compute_grpo_advantages(rewards, contiguous_ids, scale_by_std=scale)
        shuffled = compute_grpo_advantages(rewards[perm], contiguous_ids[perm], scale_by_std=scale)
        torch.testing.assert_close(shuffled, ref[perm])
    torch.testing.assert_close(compute_rloo_advantages(rewards[perm], contiguous_ids[perm]),
                               compute_rloo_advantages(rewards, contiguous_ids)[perm])
    # strictly alternating ids [0, 1, 0, 1]: groups are {r0, r2} and {r1, r3}, not neighbours
    adv = compute_grpo_advantages(torch.tensor([1.0, 5.0, 3.0, 5.0]), torch.tensor([0, 1, 0, 1]), scale_by_std=False)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0, 0.0]))  # means 2 and 5


def test_grpo_singleton_group_is_zero():
    adv = compute_grpo_advantages(torch.tensor([3.0, 1.0, 0.0]), torch.tensor([5, 6, 6]))
    assert adv[0].item() == 0.0
    assert torch.isfinite(adv).all()


# Dyadic values are exact in floating point; 0.9, 0.3, 0.1 are not, so their group mean carries a
# rounding error: a correct implementation must still give exactly (or essentially) zero advantage.
@pytest.mark.parametrize("value,size", [(1.0, 4), (0.0, 8), (0.5, 3), (0.9, 3), (0.3, 6), (0.1, 8), (0.9, 64)])
def test_grpo_all_equal_group_gives_zero(value, size):
    rewards = torch.full((size,), value)
    group_ids = torch.zeros(size, dtype=torch.long)
    adv = compute_grpo_advantages(rewards, group_ids)
    assert torch.isfinite(adv).all()
    assert adv.abs().max().item() < 1e-4, f"equal rewards {value} x {size} gave advantage {adv[0].item():.4f}"
    assert equal_reward_groups(rewards, group_ids).all()


def test_rloo_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 4.0, 7.0])
    group_ids = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    # group 0: 1 - mean(0,0,0) = 1; 0 - mean(1,0,0) = -1/3.  group 1: 2 - 4 = -2, 4 - 2 = 2.  singleton -> 0
    expected = torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3, -2.0, 2.0, 0.0])
    torch.testing.assert_close(compute_rloo_advantages(rewards, group_ids), expected)


def test_rloo_equals_loo_loop_and_scaled_centering():
    gen = torch.Generator().manual_seed(1)
    group_ids = torch.tensor([2, 0, 1, 2, 0, 1, 2, 0, 2, 1, 1])  # sizes 4, 3, 4
    rewards = torch.randn(11, generator=gen, dtype=torch.float64)
    adv = compute_rloo_advantages(rewards, group_ids)
    for i in range(11):
        others = [rewards[j] for j in range(11) if j != i and group_ids[j] == group_ids[i]]
        g = len(others) + 1
        mean = rewards[group_ids == group_ids[i]].mean()
        assert adv[i].item() == pytest.approx((rewards[i] - sum(others) / len(others)).item(), abs=1e-12)
        assert adv[i].item() == pytest.approx((g / (g - 1) * (rewards[i] - mean)).item(), abs=1e-12)


def test_equal_reward_groups():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 2.0])
    group_ids = torch.tensor([4, 4, 4, 5, 5, 6, 6, 7])
    # group 4 all 1, group 5 mixed, group 6 all 0, group 7 a single sample (its advantage is 0 too)
    expected = torch.tensor([True, True, True, False, False, True, True, True])
    assert torch.equal(equal_reward_groups(rewards, group_ids), expected)
    # interleaved ids: same answer per row
    perm = torch.tensor([7, 0, 3, 5, 1, 4, 6, 2])
    assert torch.equal(equal_reward_groups(rewards[perm], group_ids[perm]), expected[perm])


# ---------------------------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------------------------

def reference_gae(rewards, values, lengths, gamma, lam):
    """Plain reversed loop per row over the valid tokens only; V after the last valid token is 0."""
    B, R = rewards.shape
    adv, ret = torch.zeros(B, R, dtype=torch.float64), torch.zeros(B, R, dtype=torch.float64)
    for b in range(B):
        running, next_value = 0.0, 0.0
        for t in reversed(range(int(lengths[b]))):
            delta = rewards[b, t].item() + gamma * next_value - values[b, t].item()
            running = delta + gamma * lam * running
            adv[b, t] = running
            ret[b, t] = running + values[b, t].item()
            next_value = values[b, t].item()
    return adv, ret


def test_gae_docstring_example():
    # gamma = lam = 1: A_t = R - V_t = [1 - 0.2, 1 - 0.5, 1 - 0.9]; returns = R = 1
    adv, ret = compute_gae_advantages(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.2, 0.5, 0.9]]),
                                      torch.ones(1, 3))
    torch.testing.assert_close(adv, torch.tensor([[0.8, 0.5, 0.1]]))
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0, 1.0]]))


def test_length_adaptive_lambda_and_gae_with_a_lambda_per_sequence():
    """VAPO: lambda = 1 - 1 / (alpha * length), at least 0. GAE with one lambda per row equals GAE run on
    each row alone with its lambda. Row 0 (lambda 0): A_t = delta_t; row 1 (lambda 1): A_t = R - V_t."""
    torch.testing.assert_close(length_adaptive_lam(torch.tensor([10, 20, 100, 1000]), 0.05),
                               torch.tensor([0.0, 0.0, 0.8, 0.98]))
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    values = torch.tensor([[0.2, 0.5, 0.9], [0.2, 0.5, 0.9]])
    adv, ret = compute_gae_advantages(rewards, values, torch.ones(2, 3), 1.0, torch.tensor([0.0, 1.0]))
    # row 0: delta = [0 + 0.5 - 0.2, 0 + 0.9 - 0.5, 1 + 0 - 0.9] = [0.3, 0.4, 0.1]
    torch.testing.assert_close(adv, torch.tensor([[0.3, 0.4, 0.1], [0.8, 0.5, 0.1]]))
    torch.testing.assert_close(ret, adv + values)


def test_gae_hand_computed_gamma_lambda():
    gamma, lam = 0.9, 0.8  # gamma * lam = 0.72
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 1.0, 7.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.4, 0.6], [0.2, 0.3, -5.0]], dtype=torch.float64)
    mask = lengths_mask([3, 2], 3)
    adv, ret = compute_gae_advantages(rewards, values, mask, gamma, lam)
    # row 0: delta2 = 1 + 0.9 * 0 - 0.6 = 0.4                      A2 = 0.4
    #        delta1 = 0 + 0.9 * 0.6 - 0.4 = 0.14                    A1 = 0.14 + 0.72 * 0.4 = 0.428
    #        delta0 = 0 + 0.9 * 0.4 - 0.5 = -0.14                   A0 = -0.14 + 0.72 * 0.428 = 0.16816
    # row 1 (length 2; the 7.0 and -5.0 are padding): V after the last valid token is 0
    #        delta1 = 1 + 0.9 * 0 - 0.3 = 0.7                       A1 = 0.7
    #        delta0 = 0.5 + 0.9 * 0.3 - 0.2 = 0.57                  A0 = 0.57 + 0.72 * 0.7 = 1.074
    expected_adv = torch.tensor([[0.16816, 0.428, 0.4], [1.074, 0.7, 0.0]], dtype=torch.float64)
    expected_ret = torch.tensor([[0.66816, 0.828, 1.0], [1.274, 1.0, 0.0]], dtype=torch.float64)  # A + V
    torch.testing.assert_close(adv, expected_adv)
    torch.testing.assert_close(ret, expected_ret)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_gae_matches_reference_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    B, R = 6, 9
    gamma = 0.5 + 0.5 * torch.rand(1, generator=gen).item()
    lam = 0.5 + 0.5 * torch.rand(1, generator=gen).item()
    lengths = torch.randint(0, R + 1, (B,), generator=gen)
    lengths[0], lengths[1] = R, 1  # always a full row and a one-token row
    rewards = torch.randn(B, R, generator=gen, dtype=torch.float64)
    values = torch.randn(B, R, generator=gen, dtype=torch.float64)
    mask = lengths_mask(lengths, R).double()
    adv, ret = compute_gae_advantages(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = reference_gae(rewards, values, lengths, gamma, lam)
    torch.testing.assert_close(adv, ref_adv)
    torch.testing.assert_close(ret, ref_ret)


def test_gae_masked_positions_have_no_effect():
    gen = torch.Generator().manual_seed(5)
    B, R = 5, 7
    mask = lengths_mask([7, 3, 1, 0, 5], R)
    rewards, values = torch.randn(B, R, generator=gen), torch.randn(B, R, generator=gen)
    garbage = 1e4 * torch.randn(B, R, generator=gen)
    adv, ret = compute_gae_advantages(rewards, values, mask, 0.95, 0.9)
    adv2, ret2 = compute_gae_advantages(torch.where(mask.bool(), rewards, garbage),
                                        torch.where(mask.bool(), values, -garbage), mask, 0.95, 0.9)
    torch.testing.assert_close(adv2, adv)
    torch.testing.assert_close(ret2, ret)
    assert torch.all(adv[mask == 0] == 0) and torch.all(ret[mask == 0] == 0)


def test_gae_gamma_lambda_one_identity():
    gen = torch.Generator().manual_seed(6)
    B, R = 4, 6
    lengths = [6, 4, 2, 1]
    mask = lengths_mask(lengths, R).double()
    rewards = torch.randn(B, R, generator=gen, dtype=torch.float64) * mask
    values = torch.randn(B, R, generator=gen, dtype=torch.float64)
    adv, ret = compute_gae_advantages(rewards, values, mask, 1.0, 1.0)
    # A_t = sum_{k >= t} r_k - V_t: a reversed cumulative sum of the rewards
    reward_to_go = rewards.flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(adv, (reward_to_go - values) * mask)
    torch.testing.assert_close(ret, reward_to_go * mask)

    # a single outcome reward R on the last valid token: A_t = R - V_t and returns = R everywhere valid
    outcome = torch.tensor([1.0, 0.0, -2.0, 3.0], dtype=torch.float64)
    token_rewards = torch.zeros(B, R, dtype=torch.float64)
    token_rewards[torch.arange(B), torch.tensor(lengths) - 1] = outcome
    adv, ret = compute_gae_advantages(token_rewards, values, mask, 1.0, 1.0)
    torch.testing.assert_close(adv, (outcome[:, None] - values) * mask)
    torch.testing.assert_close(ret, outcome[:, None].expand(B, R) * mask)


# ---------------------------------------------------------------------------------------------
# loss_weights
# ---------------------------------------------------------------------------------------------

def test_loss_weights_hand_computed():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # token-mean: 3 tokens -> 1/3 each
    torch.testing.assert_close(loss_weights(mask, "token-mean", 2, 3.0, 3),
                               torch.tensor([[1 / 3, 1 / 3, 0], [1 / 3, 0, 0]]))
    # seq-mean-token-mean: 1/len/B -> row 0: 1/2/2 = 1/4, row 1: 1/1/2 = 1/2
    torch.testing.assert_close(loss_weights(mask, "seq-mean-token-mean", 2, 3.0, 3),
                               torch.tensor([[1 / 4, 1 / 4, 0], [1 / 2, 0, 0]]))
    # Dr. GRPO: 1 / (B * max_new_tokens) = 1 / (2 * 4) with max_new_tokens 4
    torch.testing.assert_close(loss_weights(mask, "seq-mean-token-sum-norm", 2, 3.0, 4),
                               torch.tensor([[1 / 8, 1 / 8, 0], [1 / 8, 0, 0]]))
    with pytest.raises(ValueError):
        loss_weights(mask, "sum", 2, 3.0, 3)


@pytest.mark.parametrize("mode", MODES)
def test_loss_weights_sum(mode):
    lengths = [7, 1, 3, 0, 5, 2]
    B, R = len(lengths), 7
    mask = lengths_mask(lengths, R)
    w = loss_weights(mask, mode, B, mask.sum().item(), R)
    assert torch.all(w[mask == 0] == 0)
    if mode == "token-mean":
        assert w.sum().item() == pytest.approx(1.0)
    elif mode == "seq-mean-token-mean":
        # the empty row contributes nothing: 5 non-empty rows of the 6 carry 1/6 each
        assert w.sum().item() == pytest.approx(5 / 6)
        nonempty = lengths_mask([7, 1, 3, 5, 2], R)
        w2 = loss_weights(nonempty, mode, 5, nonempty.sum().item(), R)
        assert w2.sum().item() == pytest.approx(1.0)
        torch.testing.assert_close(w2.sum(dim=1), torch.full((5,), 1 / 5))
    else:
        assert w.sum().item() == pytest.approx(sum(lengths) / (B * R))  # 18 / 42


# ---------------------------------------------------------------------------------------------
# compute_policy_loss
# ---------------------------------------------------------------------------------------------

# (ratio, advantage, per-token loss, clipped?) with clip_low 0.2, clip_high 0.28: range [0.8, 1.28].
# per-token loss = max(-A * r, -A * clip(r, 0.8, 1.28))
POLICY_CASES = [
    (1.5, 1.0, -1.28, True),    # above the range, A > 0: max(-1.5, -1.28) = -1.28
    (1.25, 1.0, -1.25, False),  # inside [0.8, 1.28] though outside a symmetric 1.2: max(-1.25, -1.25)
    (0.5, 1.0, -0.5, False),    # below, A > 0: max(-0.5, -0.8) = -0.5 (pessimistic: no clip)
    (1.5, -1.0, 1.5, False),    # above, A < 0: max(1.5, 1.28) = 1.5
    (0.5, -1.0, 0.8, True),     # below, A < 0: max(0.5, 0.8) = 0.8
    (0.82, -1.0, 0.82, False),  # inside near the lower edge
    (0.75, -2.0, 1.6, True),    # below, A = -2: max(1.5, 1.6) = 1.6
    (1.1, 2.0, -2.2, False),    # inside, A = 2
    (0.9, -2.0, 1.8, False),    # inside, A = -2
]


@pytest.mark.parametrize("ratio,adv,expected,clipped", POLICY_CASES)
def test_policy_loss_per_token_hand_computed(ratio, adv, expected, clipped):
    old = torch.tensor([[-1.3]])
    logprobs = old + math.log(ratio)
    loss, stats = compute_policy_loss(logprobs, old, torch.tensor([[adv]]), torch.ones(1, 1),
                                      clip_low=0.2, clip_high=0.28)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    assert stats["policy/clipfrac"] == (1.0 if clipped else 0.0)
    assert stats["policy/ratio"] == pytest.approx(ratio, abs=1e-5)


def test_policy_loss_batch_and_clipfrac():
    ratios = torch.tensor([[c[0] for c in POLICY_CASES] + [5.0]])
    advs = torch.tensor([[c[1] for c in POLICY_CASES] + [1.0]])
    # the last token is masked out (weight 0): it would be clipped, but must not count
    weights = torch.tensor([[1.0] * len(POLICY_CASES) + [0.0]]) / len(POLICY_CASES)
    loss, stats = compute_policy_loss(ratios.log(), torch.zeros_like(ratios), advs, weights, 0.2, 0.28)
    # mean of the per-token values: (-1.28 - 1.25 - 0.5 + 1.5 + 0.8 + 0.82 + 1.6 - 2.2 + 1.8) / 9 = 1.29 / 9
    assert loss.item() == pytest.approx(1.29 / 9, abs=1e-5)
    assert stats["policy/clipfrac"] == pytest.approx(3 / 9)  # the three True cases of 9 valid tokens


def test_policy_loss_gradient_zero_when_clipped():
    # ratio 1.5, A = 1 is clipped: the loss is the constant -1.28, so d loss / d logprob = 0;
    # ratio 1.1, A = 1 is not: d(-r)/d logp = -r = -1.1
    logprobs = torch.tensor([[math.log(1.5), math.log(1.1)]], requires_grad=True)
    loss, _ = compute_policy_loss(logprobs, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), 0.2, 0.2)
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, -1.1]]))


def test_sequence_level_ratio_gspo_hand_computed():
    """GSPO: one ratio per sequence, exp(mean token log-ratio over the tokens in the loss), clipped whole.
    Row 0: log-ratios [log 2, 0] (+ a padded token of weight 0) -> ratio 2^0.5 = 1.414, A = 1: clipped at
    1.2 on both tokens, no gradient. Row 1: [log 0.81, 0] -> ratio 0.9, A = -1: inside, -A r = 0.9 per token.
    token-mean over 4 tokens: (-1.2 - 1.2 + 0.9 + 0.9) / 4 = -0.15. d loss / d logp of each token of row 1:
    (2 tokens x 1/4) x r x 1/2 (the mean's share) = 0.225; token-level PPO would give 0.2025 and 0.25."""
    logprobs = torch.tensor([[math.log(2.0), 0.0, 5.0], [math.log(0.81), 0.0, 0.0]], requires_grad=True)
    advs = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])
    weights = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]]) / 4
    loss, stats = compute_policy_loss(logprobs, torch.zeros(2, 3), advs, weights, 0.2, 0.2, ratio_level="sequence")
    assert loss.item() == pytest.approx(-0.15, abs=1e-6)
    assert stats["policy/clipfrac"] == pytest.approx(0.5)
    assert stats["policy/ratio"] == pytest.approx((2 * math.sqrt(2) + 2 * 0.9) / 4, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, 0.0, 0.0], [0.225, 0.225, 0.0]]))
    token, _ = compute_policy_loss(logprobs, torch.zeros(2, 3), advs, weights, 0.2, 0.2)
    assert token.item() == pytest.approx((-1.2 - 1.0 + 0.81 + 1.0) / 4, abs=1e-6)  # token level differs


def test_policy_loss_log_ratio_clamp():
    logprobs = torch.tensor([[0.0, 0.0, -1000.0]], requires_grad=True)
    old = torch.tensor([[-1000.0, -1000.0, 0.0]])
    advs = torch.tensor([[-1.0, 1.0, -1.0]])
    loss, stats = compute_policy_loss(logprobs, old, advs, torch.ones(1, 3), 0.2, 0.2)
    # token 0: log-ratio 1000 -> clamped to 20, A = -1: max(e^20, 1.2) = e^20 (exp(1000) would be inf)
    # token 1: ratio e^20, A = 1: max(-e^20, -1.2) = -1.2
    # token 2: log-ratio -1000 -> -20, A = -1: max(e^-20, 0.8) = 0.8
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(math.exp(20) - 1.2 + 0.8, rel=1e-6)
    assert stats["policy/approx_kl"] == pytest.approx(0.5 * 400)  # 0.5 * 20^2 on each token
    loss.backward()
    assert torch.isfinite(logprobs.grad).all()


def _micro_batched_loss(logprobs, old, advs, weights, parts):
    """Sum of the micro-batch losses, each with its slice of the weights of the whole batch."""
    total = 0.0
    size = len(logprobs) // parts
    for i in range(0, len(logprobs), size):
        loss, _ = compute_policy_loss(logprobs[i:i + size], old[i:i + size], advs[i:i + size],
                                      weights[i:i + size], 0.2, 0.28)
        loss.backward()  # gradient accumulation: the .grad of the leaf sums over micro-batches
        total += loss.item()
    return total


@pytest.mark.parametrize("mode", MODES)
def test_policy_loss_micro_batch_invariance(mode):
    gen = torch.Generator().manual_seed(2)
    lengths = [8, 1, 3, 6, 2, 8, 5, 4]
    B, R, max_new = len(lengths), 8, 10
    mask = lengths_mask(lengths, R)
    old = -torch.rand(B, R, generator=gen) * 3
    base = old + 0.3 * torch.randn(B, R, generator=gen)  # ratios spread on both sides of the clip range
    advs = torch.randn(B, generator=gen)[:, None].expand(B, R) + 0.1 * torch.randn(B, R, generator=gen)
    weights = loss_weights(mask, mode, B, mask.sum().item(), max_new)

    # independent reference of the aggregated objective
    r = (base - old).exp()
    per_token = torch.maximum(-advs * r, -advs * r.clamp(0.8, 1.28))
    if mode == "token-mean":
        expected = (per_token * mask).sum() / mask.sum()
    elif mode == "seq-mean-token-mean":
        expected = ((per_token * mask).sum(1) / mask.sum(1)).mean()
    else:
        expected = (per_token * mask).sum() / (B * max_new)

    results = {}
    for parts in (1, 2, 4):
        logprobs = base.clone().requires_grad_(True)
        results[parts] = (_micro_batched_loss(logprobs, old, advs, weights, parts), logprobs.grad.clone())
    assert results[1][0] == pytest.approx(expected.item(), abs=1e-6)
    for parts in (2, 4):
        assert results[parts][0] == pytest.approx(results[1][0], abs=1e-6)
        torch.testing.assert_close(results[parts][1], results[1][1], atol=1e-7, rtol=1e-6)
    assert torch.all(results[1][1][mask == 0] == 0)

    # The check can fail: normalising each micro-batch on its own (the veRL/TRL accumulation bug)
    # changes token-mean, because micro-batches hold different numbers of tokens.
    if mode == "token-mean":
        wrong = 0.0
        for i in range(0, B, 2):
            m = mask[i:i + 2]
            w = loss_weights(m, mode, 2, m.sum().item(), max_new) / 4  # / 4 micro-batches
            wrong += compute_policy_loss(base[i:i + 2], old[i:i + 2], advs[i:i + 2], w, 0.2, 0.28)[0].item()
        assert abs(wrong - results[1][0]) > 1e-3


def test_token_mean_differs_from_seq_mean_token_mean_on_ragged_masks():
    gen = torch.Generator().manual_seed(3)
    mask = lengths_mask([8, 1, 3, 6], 8)
    old = -torch.rand(4, 8, generator=gen)
    logprobs = old + 0.2 * torch.randn(4, 8, generator=gen)
    advs = torch.randn(4, 8, generator=gen)
    losses = {mode: compute_policy_loss(logprobs, old, advs, loss_weights(mask, mode, 4, mask.sum().item(), 8))[0]
              for mode in MODES}
    assert abs(losses["token-mean"] - losses["seq-mean-token-mean"]).item() > 1e-2
    # with equal lengths they coincide (all rows have the same number of tokens)
    full = torch.ones(4, 8)
    a = compute_policy_loss(logprobs, old, advs, loss_weights(full, "token-mean", 4, 32.0, 8))[0]
    b = compute_policy_loss(logprobs, old, advs, loss_weights(full, "seq-mean-token-mean", 4, 32.0, 8))[0]
    assert a.item() == pytest.approx(b.item(), abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Value loss and explained variance
# ---------------------------------------------------------------------------------------------

def test_value_loss_hand_computed_clipped():
    # five valid tokens and one masked (weight 0) that would be clipped
    values = torch.tensor([[0.5, 0.5, 0.2, -0.5, -0.5, 9.0]], requires_grad=True)
    old = torch.tensor([[0.1, 0.1, 0.1, 0.0, 0.0, 0.0]])
    returns = torch.tensor([[1.0, 0.0, 1.0, 1.0, -2.0, 0.0]])
    weights = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 0.0]]) / 5
    # token 0: V_clip = 0.1 + 0.2 = 0.3; max((0.3-1)^2, (0.5-1)^2) = max(0.49, 0.25) = 0.49   clipped
    # token 1: V_clip = 0.3;              max((0.3-0)^2, (0.5-0)^2) = max(0.09, 0.25) = 0.25   not
    # token 2: V_clip = V = 0.2 (inside):  (0.2-1)^2 = 0.64                                     not
    # token 3: V_clip = -0.2;             max((-0.2-1)^2, (-0.5-1)^2) = max(1.44, 2.25) = 2.25 not
    # token 4: V_clip = -0.2;             max((-0.2+2)^2, (-0.5+2)^2) = max(3.24, 2.25) = 3.24 clipped
    # loss = 0.5 * (0.49 + 0.25 + 0.64 + 2.25 + 3.24) / 5 = 0.5 * 6.87 / 5 = 0.687
    loss, stats = compute_value_loss(values, old, returns, weights, clip_range=0.2)
    assert loss.item() == pytest.approx(0.687, abs=1e-6)
    assert stats["critic/clipfrac"] == pytest.approx(2 / 5)
    assert stats["critic/values"] == pytest.approx((0.5 + 0.5 + 0.2 - 0.5 - 0.5) / 5)
    loss.backward()
    # where the clipped branch wins, V_clip is constant in V: no gradient; else d/dV = (V - R) * w
    expected_grad = torch.tensor([[0.0, 0.5, -0.8, -1.5, 0.0, 0.0]]) / 5
    torch.testing.assert_close(values.grad, expected_grad)


def test_value_loss_docstring_example():
    # V = 0.5, V_old = 0.1, R = 1, clip 0.2 -> 0.5 * max(0.49, 0.25) = 0.245
    loss, _ = compute_value_loss(torch.tensor([[0.5]]), torch.tensor([[0.1]]), torch.tensor([[1.0]]),
                                 torch.ones(1, 1))
    assert loss.item() == pytest.approx(0.245, abs=1e-6)


def test_value_loss_unclipped():
    values = torch.tensor([[0.5, 0.5, -0.5, 3.0]])
    old = torch.tensor([[0.1, 0.1, 0.0, 0.0]])
    returns = torch.tensor([[1.0, 0.0, -2.0, 0.0]])
    weights = torch.tensor([[0.25, 0.25, 0.5, 0.0]])
    # 0.5 * (0.25 * 0.25 + 0.25 * 0.25 + 0.5 * 2.25) = 0.5 * 1.25 = 0.625
    loss, stats = compute_value_loss(values, old, returns, weights, clip_range=None)
    assert loss.item() == pytest.approx(0.625, abs=1e-6)
    assert stats["critic/clipfrac"] == 0.0


def test_explained_variance():
    gen = torch.Generator().manual_seed(7)
    mask = lengths_mask([5, 2, 4], 5)
    returns = torch.randn(3, 5, generator=gen)
    garbage = 100 * torch.randn(3, 5, generator=gen)
    # perfect prediction on valid tokens (garbage elsewhere must not count) -> 1
    perfect = torch.where(mask.bool(), returns, garbage)
    assert explained_variance(perfect, returns, mask) == pytest.approx(1.0, abs=1e-6)
    # predicting the masked mean -> Var(R - mean) / Var(R) = 1 -> 0
    mean = (returns * mask).sum() / mask.sum()
    assert explained_variance(torch.where(mask.bool(), mean, garbage), returns, mask) == pytest.approx(0.0, abs=1e-5)
    # predicting R/2: Var(R/2) / Var(R) = 1/4 -> 0.75
    assert explained_variance(returns / 2, returns, mask) == pytest.approx(0.75, abs=1e-5)


# ---------------------------------------------------------------------------------------------
# KL estimators and outcome rewards
# ---------------------------------------------------------------------------------------------

def test_kl_hand_computed():
    logprobs = torch.tensor([0.0, -1.0, -0.5])
    ref = torch.tensor([-1.0, 0.0, -0.5])
    # log q - log p = [-1, 1, 0]
    # k1 = log p - log q = [1, -1, 0]
    torch.testing.assert_close(compute_kl(logprobs, ref, "k1"), torch.tensor([1.0, -1.0, 0.0]))
    # k3 = e^x - x - 1 with x = log q - log p: [e^-1, e - 2, 0] = [0.367879, 0.718282, 0]
    torch.testing.assert_close(compute_kl(logprobs, ref, "k3"), torch.tensor([math.exp(-1), math.e - 2, 0.0]))
    with pytest.raises(ValueError):
        compute_kl(logprobs, ref, "k2")


def test_kl_k3_nonnegative_and_clamped():
    gen = torch.Generator().manual_seed(4)
    logprobs, ref = torch.randn(1000, generator=gen) * 3, torch.randn(1000, generator=gen) * 3
    k3 = compute_kl(logprobs, ref, "k3")
    assert torch.all(k3 >= 0)
    assert torch.all(k3 <= 10.0)
    # x = 5: e^5 - 6 = 142.4 -> clamped to 10; x = -1000 -> x clamped to -20: 20 - 1 + e^-20 = 19 -> 10
    # x = 2: e^2 - 3 = 4.389 stays
    out = compute_kl(torch.tensor([0.0, 0.0, 0.0]), torch.tensor([5.0, -1000.0, 2.0]), "k3")
    torch.testing.assert_close(out, torch.tensor([10.0, 10.0, math.exp(2) - 3]))
    # k1 is clamped at +-20 as well
    torch.testing.assert_close(compute_kl(torch.tensor([0.0]), torch.tensor([-1000.0]), "k1"), torch.tensor([20.0]))


def test_outcome_token_rewards_on_last_valid_token():
    rewards = torch.tensor([1.0, 0.5, -1.0, 2.0])
    mask = lengths_mask([3, 1, 4, 0], 4)
    expected = torch.tensor([[0.0, 0.0, 1.0, 0.0],   # length 3 -> column 2
                             [0.5, 0.0, 0.0, 0.0],   # length 1 -> column 0
                             [0.0, 0.0, 0.0, -1.0],  # length 4 -> column 3 (truncated: still the last)
                             [0.0, 0.0, 0.0, 0.0]])  # empty response: nowhere to put it
    torch.testing.assert_close(outcome_token_rewards(rewards, mask), expected)


# --------------------------------------------------------------------------------------------------
# The tables the flags read
# --------------------------------------------------------------------------------------------------

def test_an_estimator_registered_in_the_table_or_passed_as_a_function_is_what_runs(monkeypatch):
    import algos

    rewards, groups = torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.tensor([0, 0, 0, 0])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])

    def centred(rewards, response_mask, kl_penalty, **_):
        return (rewards - rewards.mean())[:, None] * response_mask, None

    monkeypatch.setitem(algos.ADVANTAGE_ESTIMATORS, "centred", centred)
    by_name, returns = algos.compute_advantages("centred", rewards, mask, groups)
    by_function, _ = algos.compute_advantages(centred, rewards, mask, groups)
    expected = torch.tensor([[0.75, 0.75], [-0.25, 0.0], [-0.25, -0.25], [-0.25, -0.25]])
    assert returns is None and torch.equal(by_name, expected) and torch.equal(by_function, expected)
    # the built-in entries look their kernels up when they run: a replaced kernel is used
    monkeypatch.setattr(algos, "compute_grpo_advantages", lambda rewards, group_ids, scale_by_std: rewards * 10)
    assert algos.compute_advantages("grpo", rewards, mask, groups)[0][0, 0].item() == 10.0
    with pytest.raises(ValueError, match=r"--advantage 'nope': not one of gae, grpo, rloo, reinforce_pp, centred"):
        algos.compute_advantages("nope", rewards, mask, groups)


def test_the_built_in_estimators_match_their_kernels_and_whitening_is_over_all_tokens():
    import algos

    rewards, groups = torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([0, 0, 1, 1])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    grpo, _ = algos.compute_advantages("grpo", rewards, mask, groups, scale_by_std=True)
    # group 0: mean 0.5, sample std 0.7071 -> +-0.7071; group 1 equal rewards -> 0
    assert torch.allclose(grpo[:, 0], torch.tensor([0.70710, -0.70710, 0.0, 0.0]), atol=1e-4)
    assert torch.equal(grpo * (1 - mask), torch.zeros_like(grpo))
    rloo, _ = algos.compute_advantages("rloo", rewards, mask, groups)
    assert torch.allclose(rloo[:, 0], torch.tensor([1.0, -1.0, 0.0, 0.0]))
    values = torch.tensor([[0.2, 0.5, 0.0], [0.1, 0.1, 0.1], [0.5, 0.0, 0.0], [0.0, 0.0, 0.0]])
    gae, returns = algos.compute_advantages("gae", rewards, mask, groups, values, gamma=1.0, lam=1.0)
    assert torch.allclose(gae[0, :2], torch.tensor([0.8, 0.5])) and torch.allclose(returns[0, :2], torch.ones(2))
    white, _ = algos.compute_advantages("rloo", rewards, mask, groups, whiten=True)
    tokens = white[mask.bool()]
    assert abs(tokens.mean().item()) < 1e-6 and abs(tokens.std(correction=0).item() - 1) < 1e-5  # over 8 tokens
    assert algos.uses_critic("gae") and not algos.uses_critic("grpo") and not algos.uses_critic(len)


def test_kl_and_aggregation_tables_are_what_compute_kl_and_loss_weights_use(monkeypatch):
    import algos

    logp, ref = torch.tensor([[0.0]]), torch.tensor([[-1.0]])
    assert algos.compute_kl(logp, ref, "k1").item() == 1.0
    monkeypatch.setitem(algos.KL_ESTIMATORS, "twice_k1", lambda lp, rp: 2 * algos.kl_k1(lp, rp))
    assert algos.compute_kl(logp, ref, "twice_k1").item() == 2.0
    monkeypatch.setitem(algos.LOSS_AGGREGATIONS, "sum", lambda mask, *_: mask.float())
    assert torch.equal(algos.loss_weights(torch.ones(2, 2), "sum", 2, 4.0, 2), torch.ones(2, 2))
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        algos.loss_weights(torch.ones(1, 1), "nope", 1, 1.0, 1)


def test_a_sequence_level_ratio_with_ppos_settings_says_what_gspo_uses():
    from algos import gspo_note

    assert gspo_note("token", 0.2, 0.2, "token-mean") is None
    assert gspo_note("sequence", 3e-4, 4e-4, "seq-mean-token-mean") is None
    assert gspo_note("sequence", 0.2, 0.2, "token-mean") == (
        "note: --ratio-level sequence (GSPO) with --clip-low 0.2 --clip-high 0.2 --loss-agg token-mean; GSPO's "
        "paper uses --clip-low 3e-4 --clip-high 4e-4 --loss-agg seq-mean-token-mean")


def test_the_console_names_the_algorithm_not_the_flag():
    from algos import estimator_name

    assert [estimator_name(a) for a in ("gae", "grpo", "rloo")] == ["PPO (GAE critic)", "GRPO", "RLOO"]
    assert estimator_name("gae", short=True) == "ppo"

    def centred(**_):
        return None

    assert estimator_name(centred) == "--advantage centred"


# ---------------------------------------------------------------------------------------------
# Sampler/trainer mismatch: the diff metrics and truncated importance sampling (--tis-cap)
# ---------------------------------------------------------------------------------------------

def test_tis_weights_hand_computed():
    old = torch.log(torch.tensor([[0.5, 0.25, 0.3]]))
    sampler = torch.log(torch.tensor([[0.25, 0.5, 0.3]]))
    w = tis_weights(old, sampler, cap=1.5)
    assert torch.allclose(w, torch.tensor([[1.5, 0.5, 1.0]]))  # ratio 2 capped; 0.5 kept; equal -> 1
    assert torch.allclose(tis_weights(old, sampler, cap=3.0), torch.tensor([[2.0, 0.5, 1.0]]))


def test_tis_weights_scale_the_policy_gradient_and_are_detached():
    """The weighted loss's gradient at logprobs = old (ratio 1, nothing clipped) is -A * w_tis * w per token:
    advantage 2, token weights 0.5, TIS weights [1.5, 0.5] -> d loss / d logprob = [-1.5, -0.5]."""
    logprobs = torch.log(torch.tensor([[0.5, 0.25]])).requires_grad_()
    old = logprobs.detach().clone()
    sampler = torch.log(torch.tensor([[0.25, 0.5]]))
    weights = torch.full((1, 2), 0.5) * tis_weights(old, sampler, cap=1.5)
    loss, _ = compute_policy_loss(logprobs, old, torch.full((1, 2), 2.0), weights)
    loss.backward()
    assert torch.allclose(logprobs.grad, torch.tensor([[-1.5, -0.5]]))
    assert not tis_weights(logprobs, sampler, 2.0).requires_grad


def test_logprob_mismatch_hand_computed():
    trainer = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]])
    sampler = torch.tensor([[-1.1, -2.0, -2.5], [-0.25, -0.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # the last token is padding: its 9.0 is ignored
    total, count, biggest = logprob_mismatch(trainer, sampler, mask)
    assert math.isclose(total.item(), 0.1 + 0 + 0.5 + 0.25 + 0, abs_tol=1e-6)
    assert count.item() == 5 and math.isclose(biggest.item(), 0.5, abs_tol=1e-6)


# ---------------------------------------------------------------------------------------------
# REINFORCE++, CISPO, Clip-Cov / KL-Cov and the curriculum's weights (issue: the estimators researchers
# compare against), each against values computed by hand
# ---------------------------------------------------------------------------------------------

def test_reinforce_pp_centres_on_the_group_mean_then_whitens_over_the_global_batch():
    import algos

    # group 0: rewards [1, 0] (mean 0.5), group 1: [1, 1] (mean 1); masks of 2, 3, 1, 2 tokens
    rewards, groups = torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([0, 0, 1, 1])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    adv, returns = algos.compute_advantages("reinforce_pp", rewards, mask, groups)
    # centred per token: 0.5 on 2 tokens, -0.5 on 3, 0 on 3 -> mean -1/16, population variance
    # (2 x 0.5625^2 + 3 x 0.4375^2 + 3 x 0.0625^2) / 8 = 0.1523 -> std 0.3903
    std = math.sqrt((2 * 0.5625 ** 2 + 3 * 0.4375 ** 2 + 3 * 0.0625 ** 2) / 8)
    expected = torch.tensor([[0.5625, 0.5625, 0.0], [-0.4375] * 3, [0.0625, 0.0, 0.0], [0.0625, 0.0625, 0.0]]) / std
    assert returns is None
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=0)
    # the docstring's example: one group [1, 0, 0, 0], one token each
    one, _ = algos.compute_advantages("reinforce_pp", torch.tensor([1.0, 0, 0, 0]), torch.ones(4, 1),
                                      torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(one[:, 0], torch.tensor([1.7320, -0.5773, -0.5773, -0.5773]), atol=1e-4, rtol=0)
    # the k1 penalty in the reward: a token's return is the reward minus the penalties from it on
    kl = torch.tensor([[0.1, 0.2], [0.0, 0.0]])
    rew, m, g = torch.tensor([1.0, 0.0]), torch.ones(2, 2), torch.tensor([0, 0])
    with_kl, _ = algos.compute_advantages("reinforce_pp", rew, m, g, kl_penalty=kl)
    centred = torch.tensor([[1 - 0.3 - 0.5, 1 - 0.2 - 0.5], [-0.5, -0.5]])
    white = (centred - centred.mean()) / centred.std(correction=0)
    torch.testing.assert_close(with_kl, white, atol=1e-4, rtol=0)


def all_reduce_threads(world: int):
    """`reduce` functions for `world` threads that stand for processes: each call sums the value over all
    of them (an all-reduce), in lockstep as torch.distributed does."""
    import threading

    barrier, slots = threading.Barrier(world), [None] * world

    def reduce_for(rank):
        def reduce(x):
            slots[rank] = x.clone()
            barrier.wait()
            total = sum(slots[1:], slots[0].clone())
            barrier.wait()  # every one has read the slots before the next call writes them
            return total
        return reduce
    return reduce_for


def run_as_processes(fn, world: int):
    """fn(rank, reduce) in `world` threads with an all-reduce between them; their results in rank order."""
    import threading

    reduce_for, results = all_reduce_threads(world), [None] * world
    threads = [threading.Thread(target=lambda r=r: results.__setitem__(r, fn(r, reduce_for(r))))
               for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return results


def test_reinforce_pp_whitens_over_all_processes_not_each_one():
    import algos

    rewards, groups = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0]), torch.tensor([0, 0, 0, 1, 1, 1])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    whole, _ = algos.compute_advantages("reinforce_pp", rewards, mask, groups)
    parts = [slice(0, 3), slice(3, 6)]
    each = [algos.compute_advantages("reinforce_pp", rewards[p], mask[p], groups[p])[0] for p in parts]
    assert not torch.allclose(torch.cat(each), whole, atol=1e-3)  # whitening per process differs
    shared = run_as_processes(lambda rank, reduce: algos.compute_advantages(
        "reinforce_pp", rewards[parts[rank]], mask[parts[rank]], groups[parts[rank]], reduce=reduce)[0], 2)
    torch.testing.assert_close(torch.cat(shared), whole, atol=1e-6, rtol=0)


def test_cispo_loss_and_gradients_hand_computed():
    from algos import compute_cispo_loss

    # ratios 0.5, 1, 7 (log-probs against old 0), advantages 1, -1, 1, weights 1/3 each
    logp = torch.log(torch.tensor([[0.5, 1.0, 7.0]])).requires_grad_()
    old, adv, w = torch.zeros(1, 3), torch.tensor([[1.0, -1.0, 1.0]]), torch.full((1, 3), 1 / 3)
    loss, stats = compute_cispo_loss(logp, old, adv, w, clip_low=1.0, clip_high=5.0)
    # weights sg(clip(r, 0, 6)) = 0.5, 1, 6; loss = -(0.5 log 0.5 - 1 x 0 + 6 log 7) / 3
    expected = -(0.5 * math.log(0.5) + 6 * math.log(7.0)) / 3
    assert abs(loss.item() - expected) < 1e-5
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.5 / 3, 1 / 3, -6 / 3]]))
    assert abs(stats["policy/clipfrac"] - 1 / 3) < 1e-6  # the ratio 7 was capped
    # PPO's clip (0.2) gives the ratio-7 token no gradient; CISPO gives every token one
    from algos import compute_policy_loss
    logp2 = logp.detach().clone().requires_grad_()
    compute_policy_loss(logp2, old, adv, w)[0].backward()
    assert logp2.grad[0, 2].item() == 0.0 and logp.grad[0, 2].item() != 0.0


def test_cispo_gradient_equals_ppos_on_policy():
    from algos import compute_cispo_loss, compute_policy_loss

    torch.manual_seed(0)
    old = torch.randn(3, 4)
    adv, w = torch.randn(3, 4), torch.rand(3, 4)
    grads = []
    for fn in (compute_policy_loss, compute_cispo_loss):
        logp = old.clone().requires_grad_()
        fn(logp, old, adv, w)[0].backward()
        grads.append(logp.grad)
    torch.testing.assert_close(grads[0], grads[1])  # d(-A r)/d log pi = -A r = -A at r = 1


def test_cispo_lower_bound_and_sequence_ratio():
    from algos import compute_cispo_loss

    logp = torch.log(torch.tensor([[0.25, 1.0]])).requires_grad_()
    old, adv, w = torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2)
    compute_cispo_loss(logp, old, adv, w, clip_low=0.2, clip_high=0.2)[0].backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.8, -1.0]]))  # 0.25 raised to the bound 0.8
    seq = logp.detach().clone().requires_grad_()
    compute_cispo_loss(seq, old, adv, w, ratio_level="sequence")[0].backward()
    torch.testing.assert_close(seq.grad, torch.full((1, 2), -0.5))  # sqrt(0.25 x 1) for both tokens


def test_token_covariance_hand_computed_and_across_processes():
    from algos import token_covariance

    logp, adv, mask = torch.tensor([[-1.0, -3.0, 5.0]]), torch.tensor([[1.0, -1.0, 9.0]]), torch.tensor([[1.0, 1.0, 0]])
    assert torch.equal(token_covariance(logp, adv, mask), torch.tensor([[1.0, 1.0, 0.0]]))
    # means over both processes: log-probs [-1, -3 | 0, -4] mean -2, advantages [1, -1 | 3, -3] mean 0
    lp, ad = torch.tensor([[-1.0, -3.0], [0.0, -4.0]]), torch.tensor([[1.0, -1.0], [3.0, -3.0]])
    parts = run_as_processes(lambda r, reduce: token_covariance(lp[r:r + 1], ad[r:r + 1], torch.ones(1, 2), reduce), 2)
    torch.testing.assert_close(torch.cat(parts), torch.tensor([[1.0, 1.0], [6.0, 6.0]]))


def test_clip_cov_and_kl_cov_pick_the_tokens_their_paper_describes():
    from algos import clip_cov_tokens, kl_cov_tokens, top_tokens

    cov = torch.tensor([[0.5, 2.0, 3.0, 9.0], [4.0, 1.5, -2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    keys = torch.tensor([[0.1, 0.8, 0.3, 0.2], [0.6, 0.05, 0.0, 0.0]])
    # candidates (1 < cov < 5, in the mask): 2, 3, 4, 1.5 with keys .8, .3, .6, .05
    one = clip_cov_tokens(cov, mask, keys, num_tokens=7, ratio=0.1)  # int(0.7) -> at least 1 token
    assert one.nonzero().tolist() == [[1, 1]]
    two = clip_cov_tokens(cov, mask, keys, num_tokens=7, ratio=2 / 7)
    assert two.nonzero().tolist() == [[0, 2], [1, 1]]
    # KL-Cov: the largest covariances among masked tokens; 9 then 4
    assert kl_cov_tokens(cov, mask, num_tokens=7, ratio=2 / 7).nonzero().tolist() == [[0, 3], [1, 0]]
    assert kl_cov_tokens(cov, mask, num_tokens=7, ratio=1e-4).nonzero().tolist() == [[0, 3]]
    # nothing eligible -> nothing selected; k = 0 -> nothing
    assert not top_tokens(cov, torch.zeros_like(mask, dtype=torch.bool), 3).any()
    assert not top_tokens(cov, mask > 0, 0).any()
    # ties at the k-th score (all covariances 0: no signal) -> exactly k, the first in row order
    zeros = torch.zeros(2, 3)
    assert top_tokens(zeros, torch.ones(2, 3, dtype=torch.bool), 4).nonzero().tolist() == [[0, 0], [0, 1], [0, 2],
                                                                                            [1, 0]]
    assert top_tokens(torch.tensor([[2.0, 1.0, 1.0, 1.0]]), torch.ones(1, 4, dtype=torch.bool), 2).tolist() == [
        [True, True, False, False]]


def test_the_selections_over_two_processes_equal_one_process():
    from algos import clip_cov_tokens, kl_cov_tokens

    torch.manual_seed(1)
    cov, keys = torch.rand(6, 5) * 7 - 1, torch.rand(6, 5)  # about 4 in 7 inside (1, 5)
    mask = (torch.rand(6, 5) > 0.2).float()
    n = mask.sum().item()

    def gather_for(rank, store, barrier):
        def gather(t):
            store[rank] = t
            barrier.wait()
            out = torch.cat([store[0], store[1]])
            barrier.wait()
            return out
        return gather

    import threading
    cov[4] = 0.0  # a row of ties at the k-th largest: every process takes its share in order
    for pick in (lambda c, m, k, g, r=0: clip_cov_tokens(c, m, k, n, ratio=0.2, gather=g, rank=r),
                 lambda c, m, k, g, r=0: kl_cov_tokens(c, m, n, ratio=0.2, gather=g, rank=r),
                 lambda c, m, k, g, r=0: kl_cov_tokens(c.clamp(max=0), m, n, ratio=0.2, gather=g, rank=r)):
        whole = pick(cov, mask, keys, None)
        store, barrier, out = [None, None], threading.Barrier(2), [None, None]
        def part(r, out=out, pick=pick, store=store, barrier=barrier):
            rows = slice(3 * r, 3 * r + 3)
            out[r] = pick(cov[rows], mask[rows], keys[rows], gather_for(r, store, barrier), r)

        threads = [threading.Thread(target=part, args=(r,)) for r in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert whole.sum().item() == int(0.2 * n) and torch.equal(torch.cat(out), whole)


def test_kl_cov_penalty_hand_computed_and_zero_gradient_on_policy():
    from algos import kl_cov_penalty

    logp = torch.tensor([[-1.5, -1.0]], requires_grad=True)
    old, selected, w = torch.tensor([[-1.0, -2.0]]), torch.tensor([[True, False]]), torch.tensor([[0.5, 0.5]])
    penalty = kl_cov_penalty(logp, old, selected, w, coef=1.0)
    assert abs(penalty.item() - 0.25) < 1e-7  # |-0.5| x 1/2 on the selected token only
    penalty.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.5, 0.0]]))  # sign(-0.5) x 1/2
    same = old.clone().requires_grad_()
    kl_cov_penalty(same, old, selected, w).backward()
    assert torch.equal(same.grad, torch.zeros(1, 2))  # one step per rollout: the penalty does nothing


def test_curriculum_weights_hand_computed():
    from algos import curriculum_weights

    assert curriculum_weights([None, 0.0, 0.5, 1.0], floor=0.1).tolist() == [1.0, 0.1, 1.0, 0.1]
    assert curriculum_weights([0.25, 0.75], floor=0.5).tolist() == [1.0, 1.0]
