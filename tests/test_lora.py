"""LoRA (peft): adapters on the policy and on the critic's backbone, the reference model for free, saving
adapters or merged weights, checkpoints of what trains, exact resume."""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_train import metrics, train

from utils import add_lora, lora_merged, lora_scaling, merge_lora_state_dict, trainable_state_only

LORA = ["--lora-r", "4", "--lora-alpha", "8"]  # scaling alpha / r = 2
LORA_LR = "3e-3"  # the learning tests' rate with LoRA rank 16 (full fine-tuning: 3e-4)
SHORT = ["--max-steps", "2", "--prompts-per-step", "4", "--num-generations", "4", "--eval-every", "0",
         "--reward-workers", "0", "--seed", "3"]


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


def test_ppo_with_lora_trains_only_adapters_and_the_reference_is_the_policy_without_them(tmp_path, tiny_base):
    """PPO with a k3 KL: no reference model is loaded, the KL of the first update is exactly 0 (the policy
    before any update is the base), checkpoints hold only the adapters and the value head, and the merged
    policy is the base plus scaling x B A in each adapted weight, every other weight the base's exactly."""
    result = train("train_ppo.py", tmp_path, *SHORT, *LORA, "--kl-coef", "0.05", "--merge-on-save",
                   "--save-every", "2", "--lr", "1e-2", "--critic-lr", "1e-2")
    assert result.returncode == 0, result.stderr[-3000:]
    setup = next(line for line in result.stdout.splitlines() if line.startswith("distributed setup"))
    assert "policy whole, critic whole" in setup and "reference" not in setup
    assert "LoRA: trainable parameters: policy" in result.stdout
    rows = metrics(tmp_path)
    assert rows[0]["policy/kl"] == 0.0 and rows[1]["policy/kl"] > 0
    saved = tmp_path / "checkpoints" / "step-000002"
    policy, critic = load_file(saved / "model.safetensors"), load_file(saved / "model_1.safetensors")
    assert policy and all(".lora_A." in k or ".lora_B." in k for k in policy)
    assert "value_head.weight" in critic and all("lora_" in k or k == "value_head.weight" for k in critic)
    base, merged = load_file(tiny_base / "model.safetensors"), load_file(tmp_path / "policy" / "model.safetensors")
    assert merged.keys() == base.keys()
    moved = 0.0
    for key in base:
        module = key.rsplit(".", 1)[0]  # the policy trains as the base model class with peft's layers in it
        if f"{module}.lora_A.default.weight" not in policy:
            assert torch.equal(merged[key], base[key]), key
            continue
        delta = 2.0 * policy[f"{module}.lora_B.default.weight"] @ policy[f"{module}.lora_A.default.weight"]
        torch.testing.assert_close(merged[key], base[key] + delta, rtol=0, atol=1e-6)
        moved = max(moved, delta.abs().max().item())
    assert moved > 1e-4  # the adapters did train

    from critic import ValueModel

    critic_model = ValueModel.from_pretrained(str(tmp_path / "critic"))  # merged: a plain model, no peft
    assert type(critic_model.backbone).__name__ == "LlamaModel"


def test_lora_adapters_load_with_peft_and_a_resumed_run_matches_an_uninterrupted_one(tmp_path, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from critic import ValueModel

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    args = [*SHORT, *LORA, "--advantage", "gae", "--save-every", "1", "--lr", "1e-2", "--critic-lr", "1e-2"]
    assert train("train_ppo.py", whole, *args).returncode == 0
    assert train("train_ppo.py", resumed, *args, "--max-steps", "1").returncode == 0
    result = train("train_ppo.py", resumed, *args)
    assert result.returncode == 0 and "resuming from" in result.stdout, result.stderr[-3000:]

    def comparable(run_dir):
        return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in metrics(run_dir)]

    assert comparable(resumed) == comparable(whole)
    for part in ("policy/adapter_model.safetensors", "critic/adapter_model.safetensors",
                 "critic/value_head.safetensors"):
        a, b = load_file(resumed / part), load_file(whole / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert not (whole / "policy" / "model.safetensors").exists()  # the adapters alone

    ids = torch.randint(5, 100, (2, 7))
    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    with_peft = PeftModel.from_pretrained(base, str(whole / "policy"))
    auto = AutoModelForCausalLM.from_pretrained(whole / "policy")  # transformers' peft integration
    torch.testing.assert_close(auto(ids).logits, with_peft(ids).logits)
    with with_peft.disable_adapter():
        assert not torch.allclose(with_peft(ids).logits, auto(ids).logits, atol=1e-4)  # they trained
    critic = ValueModel.from_pretrained(str(whole / "critic"))
    assert type(critic.backbone).__name__ == "PeftModel"
    assert critic(ids, torch.ones_like(ids)).shape == (2, 7)


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


def test_a_run_that_merges_for_generation_samples_what_an_unmerged_run_does(tmp_path, tiny_base):
    """The same LoRA run with and without --merge-for-generation: the same responses at every step (the
    update in between included), and the same rewards."""
    runs = {}
    for merge in (False, True):
        out = tmp_path / str(merge)
        result = train("train_grpo.py", out, *SHORT, *LORA, "--lr", "1e-2", "--samples-per-step", "16",
                       *(["--merge-for-generation"] * merge))
        assert result.returncode == 0, result.stderr[-3000:]
        samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
        runs[merge] = ([(r["step"], r["response"]) for r in samples], [r["train/reward"] for r in metrics(out)])
    assert len(runs[False][0]) >= 2 and {step for step, _ in runs[False][0]} == {0, 1}
    assert runs[True] == runs[False]


def test_lora_with_dropout_checkpointing_and_bf16_starts_at_ratio_one(tmp_path, tiny_base):
    result = train("train_grpo.py", tmp_path, *SHORT, *LORA, "--lora-dropout", "0.3", "--gradient-checkpointing",
                   "--bf16", "--lr", "1e-2")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metrics(tmp_path)
    assert rows[0]["policy/ratio"] == 1.0  # the update's own log-probs are the old ones
    assert all(r["train/nonfinite_updates"] == 0 for r in rows[:-1])
    adapters = load_file(tmp_path / "policy" / "adapter_model.safetensors")
    assert max(v.abs().max().item() for k, v in adapters.items() if "lora_B" in k) > 0  # gradients reached them
    config = json.loads((tmp_path / "policy" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["lora_dropout"] == 0.3


@pytest.mark.parametrize("bad,message", [
    (["--lora-dropout", "0.1", "--num-mini-batches", "2"], "--lora-dropout > 0 needs one optimizer step"),
    (["--merge-on-save"], "--merge-on-save merges LoRA adapters: it needs --lora-r"),
    (["--lora-r", "4", "--lora-target-modules", " , "], "--lora-target-modules is empty"),
    (["--merge-for-generation"], "--merge-for-generation merges LoRA adapters: it needs --lora-r"),
    (["--lora-r", "4", "--merge-for-generation", "--bf16"], "--merge-for-generation with --bf16: the frozen base"),
])
def test_bad_lora_arguments_fail_fast_with_one_line(bad, message, tmp_path):
    result = train("train_grpo.py", tmp_path, *(["--lora-r", "4"] if "--lora-dropout" in bad else []), *bad)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and message in last, result.stderr[-2000:]


@pytest.mark.parametrize("script,critic", [("train_grpo.py", False), ("train_ppo.py", True)])
def test_lora_learns_on_a_small_budget(script, critic, tmp_path, tiny_base):
    """As the full fine-tune's learning test: held-out accuracy clearly rises in 20 steps, adapters only."""
    steps = 20
    result = train(script, tmp_path, "--max-steps", str(steps), "--eval-every", str(steps), "--lora-r", "16",
                   "--lr", LORA_LR, "--critic-lr", LORA_LR)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metrics(tmp_path)
    base, final = rows[0]["eval/accuracy"], rows[-1]["eval/accuracy"]
    assert base <= 0.5 and final >= base + 0.3, (base, final)
    assert (tmp_path / "policy" / "adapter_model.safetensors").exists()
    assert (tmp_path / "critic" / "adapter_model.safetensors").exists() == critic


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train_grpo.py", "train_ppo.py"])
def test_default_run_with_lora_reaches_90_percent(script, tmp_path, tiny_base):
    """The default with --lora-r 16 and 20 times the full fine-tune's learning rate (README: LoRA)."""
    result = train(script, tmp_path, "--lora-r", "16", "--lr", "2e-3", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["base_accuracy"] <= 0.5 and summary["final_accuracy"] >= 0.9, summary
