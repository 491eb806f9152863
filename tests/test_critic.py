"""Numerical tests of critic.py: GAE against hand values and a reference loop, the clipped value loss,
the value model (head, init, save/load, the read-out shift) and explained variance.

Run: python -m pytest tests/test_critic.py -q
"""

import pytest
import torch
from transformers import AutoModel, LlamaConfig

from algos import compute_gae_advantages, compute_value_loss, explained_variance, length_adaptive_lam
from critic import ValueModel, batched_values, forward_values
from utils import position_ids_from_mask


def lengths_mask(lengths, width: int) -> torch.Tensor:
    return (torch.arange(width)[None, :] < torch.as_tensor(lengths)[:, None]).float()


def tiny_config(**overrides) -> LlamaConfig:
    kwargs = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=128, initializer_range=0.2)
    return LlamaConfig(**{**kwargs, **overrides})


@pytest.fixture(scope="module")
def critic():
    torch.manual_seed(0)
    model = ValueModel(AutoModel.from_config(tiny_config()))
    return model.eval()


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
# ValueModel
# ---------------------------------------------------------------------------------------------

def test_value_head_has_no_bias(critic):
    assert critic.value_head.bias is None
    assert critic.value_head.weight.shape == (1, 32)


def test_value_head_init_std():
    hidden = 1024
    torch.manual_seed(1)
    config = tiny_config(vocab_size=8, hidden_size=hidden, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=8, num_key_value_heads=8)
    w = ValueModel(AutoModel.from_config(config)).value_head.weight.detach().flatten()
    target = 1 / (hidden + 1)  # ~ 9.76e-4; nn.Linear's default would be ~ 1/sqrt(3 * 1024) = 0.018
    # the sample std of 1024 normals is within ~2.2% (one sigma) of the truth: allow 10%
    assert w.std().item() == pytest.approx(target, rel=0.1)
    assert abs(w.mean().item()) < 4 * target / hidden ** 0.5


def test_value_model_save_load_round_trip(critic, tmp_path):
    gen = torch.Generator().manual_seed(8)
    ids = torch.randint(1, 50, (3, 7), generator=gen)
    mask = torch.tensor([[1] * 7, [0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 0]])
    with torch.no_grad():
        before = critic(ids, mask)
    critic.save_pretrained(str(tmp_path))
    files = sorted(p.name for p in tmp_path.iterdir())
    weight_files = [f for f in files if f.endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl"))]
    assert weight_files and all(f.endswith(".safetensors") for f in weight_files), files
    assert "value_head.safetensors" in files
    loaded = ValueModel.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        after = loaded(ids, mask)
    assert before.shape == (3, 7)
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    assert torch.equal(loaded.value_head.weight, critic.value_head.weight)


def test_forward_values_shift(critic):
    gen = torch.Generator().manual_seed(9)
    P, R = 5, 4
    prompt = torch.randint(1, 50, (3, P), generator=gen)
    prompt_mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1], [0, 0, 0, 1, 1]])
    response = torch.randint(1, 50, (3, R), generator=gen)
    response_mask = lengths_mask([4, 2, 3], R).long()
    ids, mask = torch.cat([prompt, response], 1), torch.cat([prompt_mask, response_mask], 1)
    with torch.no_grad():
        values = forward_values(critic, ids, mask, R)
        # independent full-sequence read-out: backbone with positions counted over real tokens, then the head
        hidden = critic.backbone(input_ids=ids, attention_mask=mask,
                                 position_ids=position_ids_from_mask(mask)).last_hidden_state
        full = (hidden @ critic.value_head.weight.T).squeeze(-1)
    assert values.shape == (3, R)
    # V for response token t is read at column P - 1 + t: columns P-1 .. P+R-2
    torch.testing.assert_close(values, full[:, P - 1:P + R - 1])
    # the state before an action does not see it: changing response token t leaves V_0..V_t unchanged
    other = ids.clone()
    other[:, P + 2] = (other[:, P + 2] + 7) % 50
    with torch.no_grad():
        values2 = forward_values(critic, other, mask, R)
    torch.testing.assert_close(values2[:, :3], values[:, :3])
    assert (values2[:, 3] - values[:, 3]).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------
# The value pass of a rollout (critic.batched_values) and the mini-batches of the update
# ---------------------------------------------------------------------------------------------

def test_batched_values_equal_each_row_alone(critic):
    """Micro-batches of left-padded prompts and right-padded responses give each row the values it gets
    alone; an empty micro-batch (another process has more) writes nothing; 0 outside the response."""
    from rollout import Experience

    torch.manual_seed(1)
    prompts = [[5, 6, 7], [8, 9], [10]]
    responses = [[11, 12, 13, 14], [15], [16, 17]]
    width_p, width_r = 3, 4
    exp = Experience(
        prompt_ids=torch.tensor([[0] * (width_p - len(p)) + p for p in prompts]),
        prompt_mask=torch.tensor([[0] * (width_p - len(p)) + [1] * len(p) for p in prompts]),
        response_ids=torch.tensor([r + [0] * (width_r - len(r)) for r in responses]),
        response_mask=torch.tensor([[1.0] * len(r) + [0.0] * (width_r - len(r)) for r in responses]),
        truncated=torch.zeros(3, dtype=torch.bool), group_ids=torch.zeros(3, dtype=torch.long))
    values = batched_values(critic, exp, [torch.tensor([2, 0]), torch.tensor([], dtype=torch.long),
                                          torch.tensor([1])])
    for row, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        alone = forward_values(critic, torch.tensor([p + r]), torch.ones(1, len(p) + len(r)), len(r))[0]
        assert torch.allclose(values[row, :len(r)], alone, atol=1e-5)
        assert (values[row, len(r):] == 0).all()
    assert not critic.training, "the critic's mode is restored"


@pytest.mark.parametrize("mini_batches,world", [(1, 1), (2, 1), (4, 2)])
def test_mini_batch_parts_cover_each_row_once_per_epoch(mini_batches, world):
    from train_ppo import local_rows, mini_batch_parts

    rows = 8  # per process
    parts = mini_batch_parts(rows * world, mini_batches, seed=3, step=5, epochs=2)
    assert len(parts) == 2 * mini_batches
    for epoch in (parts[:mini_batches], parts[mini_batches:]):
        assert sorted(torch.cat(epoch).tolist()) == list(range(rows * world))
    assert all(torch.equal(a, b)
               for a, b in zip(parts, mini_batch_parts(rows * world, mini_batches, 3, 5, 2), strict=True))
    first = parts[0]
    mine = [local_rows(first, r, rows) + r * rows for r in range(world)]
    assert sorted(torch.cat(mine).tolist()) == sorted(first.tolist())
    assert all(((m >= r * rows) & (m < (r + 1) * rows)).all() for r, m in enumerate(mine))
