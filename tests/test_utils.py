"""Unit tests of utils.py: left padding, position ids and masked whitening (also across simulated processes),
dropout switched off, and the LoRA helpers (adapters, merging, saving only what trains, merged generation).

Run: python -m pytest tests/test_utils.py -q
"""

import threading

import pytest
import torch
from conftest import dropout_model

from utils import (
    add_lora,
    left_pad,
    lora_merged,
    lora_scaling,
    masked_whiten,
    merge_lora_state_dict,
    position_ids_from_mask,
    trainable_state_only,
)

# ---------------------------------------------------------------------------------------------
# Padding and position ids
# ---------------------------------------------------------------------------------------------

def test_left_pad():
    ids, mask = left_pad([[1, 2, 3], [4], [], [5, 6]], pad_id=9)
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4], [9, 9, 9], [9, 5, 6]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0], [0, 1, 1]]


def test_position_ids_from_mask():
    # left-padded prompt then a right-padded response: cumsum - 1, clamped at 0
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0],   # cumsum [0,0,1,2,3,4,4,4] - 1 -> [-1,-1,0,1,2,3,3,3]
                         [1, 1, 1, 1, 1, 1, 1, 1],
                         [0, 0, 0, 0, 0, 0, 0, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2, 3, 3, 3],
                                                     [0, 1, 2, 3, 4, 5, 6, 7],
                                                     [0, 0, 0, 0, 0, 0, 0, 0]]


# ---------------------------------------------------------------------------------------------
# masked_whiten
# ---------------------------------------------------------------------------------------------

def test_masked_whiten_hand_computed():
    x = torch.tensor([[1.0, 3.0, 100.0], [5.0, -7.0, -7.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # valid values 1, 3, 5: mean 3, population var (4 + 0 + 4) / 3 = 8/3
    s = (8 / 3) ** 0.5
    expected = torch.tensor([[-2 / s, 0.0, 0.0], [2 / s, 0.0, 0.0]])
    torch.testing.assert_close(masked_whiten(x, mask), expected, atol=1e-6, rtol=0)
    # shift_mean=False keeps the mean: (x - 3) / s + 3
    torch.testing.assert_close(masked_whiten(x, mask, shift_mean=False),
                               torch.tensor([[3 - 2 / s, 3.0, 0.0], [3 + 2 / s, 0.0, 0.0]]), atol=1e-6, rtol=0)


def test_masked_whiten_statistics():
    gen = torch.Generator().manual_seed(0)
    x = 3 + 5 * torch.randn(6, 9, generator=gen)
    mask = (torch.arange(9)[None] < torch.tensor([9, 1, 4, 0, 7, 2])[:, None]).float()
    out = masked_whiten(x, mask)
    valid = out[mask.bool()]
    assert valid.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert valid.var(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    assert torch.all(out[mask == 0] == 0)


def test_masked_whiten_single_token():
    out = masked_whiten(torch.tensor([[4.0, 2.0]]), torch.tensor([[1.0, 0.0]]))
    assert torch.isfinite(out).all()
    assert out.tolist() == [[0.0, 0.0]]


def test_masked_whiten_across_processes():
    """Two threads play two processes; `reduce` is a real all-reduce (sum) between them."""
    gen = torch.Generator().manual_seed(1)
    x = 2 + 3 * torch.randn(6, 5, generator=gen)
    # the halves hold different numbers of tokens (12 vs 6), so per-half statistics differ
    mask = (torch.arange(5)[None] < torch.tensor([5, 4, 3, 1, 2, 3])[:, None]).float()
    halves = [(x[:3], mask[:3]), (x[3:], mask[3:])]
    slots, barrier, outputs = [None, None], threading.Barrier(2), [None, None]

    def all_reduce_for(rank):
        def reduce(t):
            slots[rank] = t
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()  # nobody overwrites a slot before both have read it
            return total
        return reduce

    def worker(rank):
        outputs[rank] = masked_whiten(*halves[rank], reduce=all_reduce_for(rank))

    threads = [threading.Thread(target=worker, args=(rank,)) for rank in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    combined = torch.cat(outputs)
    torch.testing.assert_close(combined, masked_whiten(x, mask), atol=1e-6, rtol=0)
    # independent reference over all valid tokens of both processes
    valid = x[mask.bool()]
    reference = (x - valid.mean()) / valid.std(unbiased=False) * mask
    torch.testing.assert_close(combined, reference, atol=1e-5, rtol=0)
    # the check can fail: whitening each half on its own gives something else
    local = torch.cat([masked_whiten(*h) for h in halves])
    assert (local - combined).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------------

def test_disable_dropout_makes_train_mode_forward_equal_eval_mode(tmp_path, tiny_base):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from utils import disable_dropout

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, attention_dropout=0.5))
    for model, expected in ((AutoModelForCausalLM.from_pretrained(dropout_model(tiny_base, tmp_path / "gpt2")), 7),
                            (llama, 2)):
        ids = torch.randint(0, 50, (2, 12))
        model.train()
        torch.manual_seed(0)
        assert not torch.equal(model(ids).logits, model.eval()(ids).logits)  # dropout is really there
        assert disable_dropout(model) == expected
        eval_logits = model(ids).logits
        torch.testing.assert_close(model.train()(ids).logits, eval_logits, rtol=0, atol=0)
        assert disable_dropout(model) == 0


# ---------------------------------------------------------------------------------------------
# LoRA (peft)
# ---------------------------------------------------------------------------------------------

def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2))


def test_merge_lora_state_dict_by_hand():
    W, bias, E = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([0.5, -0.5]), torch.tensor([[7.0, 8.0]])
    A, B = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0], [-1.0]])  # rank 1: B @ A = [[3, 6], [-1, -2]]
    state = {"base_model.model.block.proj.base_layer.weight": W, "base_model.model.block.proj.base_layer.bias": bias,
             "base_model.model.block.proj.lora_A.default.weight": A,
             "base_model.model.block.proj.lora_B.default.weight": B, "base_model.model.embed.weight": E}
    merged = merge_lora_state_dict(state, scaling=0.5)
    assert merged.keys() == {"block.proj.weight", "block.proj.bias", "embed.weight"}
    assert torch.equal(merged["block.proj.weight"], torch.tensor([[2.5, 5.0], [2.5, 3.0]]))
    assert torch.equal(merged["block.proj.bias"], bias) and torch.equal(merged["embed.weight"], E)


def test_adapters_start_as_the_base_and_merge_to_what_they_compute():
    from transformers import LlamaForCausalLM

    base = tiny_llama()
    config, base_state = base.config, {k: v.clone() for k, v in base.state_dict().items()}
    ids = torch.randint(0, 50, (2, 9))
    base_logits = base(ids).logits.detach()
    model = add_lora(base, r=4, alpha=8)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    adapted = {n.split(".lora_A.")[0].rsplit(".", 1)[-1] for n in trainable if ".lora_A." in n}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # not lm_head
    assert lora_scaling(model) == 2.0
    torch.testing.assert_close(model(ids).logits, base_logits, rtol=0, atol=0)  # B = 0: exactly the base
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    adapted_logits = model(ids).logits.detach()
    assert not torch.allclose(adapted_logits, base_logits, atol=1e-3)
    with model.disable_adapter():  # the KL reference: the same weights, adapters off
        torch.testing.assert_close(model(ids).logits, base_logits, rtol=0, atol=0)
    merged = LlamaForCausalLM(config)
    merged.load_state_dict(merge_lora_state_dict(model.state_dict(), lora_scaling(model)))  # strict: every key
    torch.testing.assert_close(merged(ids).logits, adapted_logits, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(p, base_state[n]) for n, p in model.get_base_model().state_dict().items()
               if "lora_" not in n and ".base_layer." not in n)


def test_trainable_state_only_saves_and_loads_just_the_adapters():
    """Inside the context a LoRA model (tied embeddings, behind a wrapper as DDP puts it) gives only its
    adapters, and loads them strictly into another copy, whose frozen weights stay its own."""
    def lora_model(seed):
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        model = add_lora(LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
                                                      num_hidden_layers=1, num_attention_heads=2,
                                                      tie_word_embeddings=True)), r=2, alpha=4).get_base_model()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_()
        return model

    a, b = lora_model(0), lora_model(1)
    frozen_b = {k: v.clone() for k, v in b.state_dict().items() if "lora_" not in k}
    wrapped = torch.nn.ModuleDict({"module": a})  # keys "module.…", as under DDP
    with trainable_state_only([a, b]):
        state = wrapped.state_dict()
        assert state and all(k.startswith("module.") and "lora_" in k for k in state), sorted(state)
        assert len(state) == sum(p.requires_grad for p in a.parameters())
        b.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})  # strict
        with pytest.raises(RuntimeError, match="Missing key"):
            b.load_state_dict({k: v for k, v in list(state.items())[1:]})  # an adapter missing is still an error
    assert "lm_head.weight" in a.state_dict()  # outside: whole again
    for key, value in b.state_dict().items():
        assert torch.equal(value, a.state_dict()[key] if "lora_" in key else frozen_b[key]), key
    assert not torch.equal(b.state_dict()["lm_head.weight"], a.state_dict()["lm_head.weight"])  # b's own base


def test_generation_with_the_adapters_merged_samples_the_same_tokens():
    """--merge-for-generation: greedy and seeded sampling give the same tokens as the unmerged adapters, and
    the weights come back to the base within a float32 rounding, 50 merges later too."""
    from rollout import generate_responses

    model = add_lora(tiny_llama(), r=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prompts = torch.randint(3, 50, (4, 5))
    kwargs = dict(max_new_tokens=12, top_p=None, top_k=None, stop_token_ids=[2], pad_token_id=0, seeds=[11])
    for temperature, samples in ((0.0, 1), (1.0, 3)):
        plain = generate_responses(model, prompts, torch.ones_like(prompts), temperature=temperature,
                                   num_generations=samples, **kwargs)
        with lora_merged(model):
            assert all(layer.merged for layer in model.modules() if hasattr(layer, "merged_adapters"))
            merged = generate_responses(model, prompts, torch.ones_like(prompts), temperature=temperature,
                                        num_generations=samples, **kwargs)
        assert torch.equal(merged, plain), temperature
        assert len(set(map(tuple, plain.tolist()))) > 2
    for _ in range(50):
        with lora_merged(model):
            pass
    after = model.state_dict()
    for key, value in before.items():
        if "lora_" in key:
            assert torch.equal(after[key], value), key  # the adapters are never touched
        else:
            torch.testing.assert_close(after[key], value, rtol=0, atol=1e-6)  # the base: roundings only
    with lora_merged(model, enabled=False):
        assert not any(getattr(layer, "merged", False) for layer in model.modules())


def test_run_error_is_a_one_line_exit_for_the_command_line_and_an_exception_for_a_notebook():
    import subprocess
    import sys

    from conftest import ROOT

    from utils import RunError

    with pytest.raises(Exception, match="error: x"):  # `except Exception` in a notebook catches it
        raise RunError("error: x")
    result = subprocess.run([sys.executable, "-c", "from utils import RunError; raise RunError('error: bad')"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stderr.strip() == "error: bad"  # no traceback


def test_plain_args_records_a_function_by_name():
    import dataclasses
    import json

    from utils import plain_args

    @dataclasses.dataclass
    class A:
        reward: str = "math"
        lr: float = 1e-4

    def my_reward(response, ground_truth):
        return 1.0

    record = plain_args(A(reward=my_reward))
    assert record == {"reward": f"python:{__name__}.test_plain_args_records_a_function_by_name.<locals>.my_reward",
                      "lr": 1e-4}
    assert json.loads(json.dumps(record)) == record
