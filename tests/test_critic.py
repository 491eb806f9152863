"""Unit tests of critic.py: the value model (head, init, save/load, the read-out shift) and the value pass of a
rollout (batched_values).

Run: python -m pytest tests/test_critic.py -q
"""

import pytest
import torch
from transformers import AutoModel, LlamaConfig

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
# The value pass of a rollout (critic.batched_values)
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
