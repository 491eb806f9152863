"""End to end: the real training scripts in a subprocess on the built-in task, small budgets.

The two learning tests (one per estimator) run in CI; the full default runs are marked slow.
"""

import json
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file


def train(script: str, tmp_path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    return subprocess.run([sys.executable, str(ROOT / script), "--output-dir", str(tmp_path), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def metrics(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def check_outputs(tmp_path, steps: int, critic: bool) -> list[dict]:
    """Every output file a run promises, with the keys the issue names."""
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(steps + 1))  # one line per step, then the final eval
    keys = {"train/reward", "train/response_length", "policy/clipfrac", "policy/entropy", "loss/policy",
            "time/generate", "time/reward", "time/logprobs", "time/update", "time/step", "train/repetition",
            "train/nonfinite_updates", "perf/padding"}
    if critic:
        keys |= {"critic/value_loss", "critic/explained_var", "critic/values", "critic/clipfrac", "time/critic"}
    for r in rows[:-1]:
        assert keys <= r.keys(), keys - r.keys()
    assert "eval/accuracy" in rows[0] and "eval/accuracy" in rows[-1]
    # every evaluation's per-problem counts, which reproduce its accuracy (what `evaluate.py compare` reads)
    from evaluate import aggregate_eval

    evals = [json.loads(line) for line in (tmp_path / "eval_problems.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [r["step"] for r in rows if "eval/accuracy" in r]
    for e, r in zip(evals, [r for r in rows if "eval/accuracy" in r], strict=True):
        pooled = [p for per_set in e["per_problem"].values() for p in per_set]
        assert aggregate_eval(pooled)[f"avg@{pooled[0]['n']}"] == pytest.approx(r["eval/accuracy"])
    # the reward audit ran on every step: 8 responses judged again by plain math-verify
    assert all(r["reward/audited"] == 8 and 0 <= r["reward/disagreement"] <= 1 for r in rows[:-1])
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert samples and {"step", "prompt", "response", "reward", "advantage", "ground_truth"} <= samples[0].keys()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["max_steps"] == steps
    assert (tmp_path / "policy" / "model.safetensors").exists()
    # weights only as safetensors; optimizer and RNG states are read back by torch's weights-only loader
    assert not [p for p in tmp_path.rglob("*.bin") if not p.name.startswith("optimizer")]
    assert not list(tmp_path.rglob("custom_checkpoint*"))
    return rows


@pytest.mark.parametrize("script,critic", [("train_grpo.py", False), ("train_ppo.py", True)])
def test_learns_on_a_small_budget(script, critic, tmp_path, tiny_base):
    """Held-out accuracy (avg of 4 samples, temperature 1) clearly rises above the base in 20 steps."""
    steps = 20
    result = train(script, tmp_path, "--max-steps", str(steps), "--eval-every", str(steps), "--lr", "3e-4")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = check_outputs(tmp_path, steps, critic)
    base, final = rows[0]["eval/accuracy"], rows[-1]["eval/accuracy"]
    assert base <= 0.5  # a weak base: RL, not pre-training, does the work
    assert final >= base + 0.3, (base, final)
    assert rows[-2]["train/reward"] > rows[0]["train/reward"] + 0.2
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["base_accuracy"] == base and summary["final_accuracy"] == final
    assert "held-out accuracy" in result.stdout


def test_estimator_is_a_flag_on_either_script(tmp_path, tiny_base):
    """train_grpo.py --advantage gae trains a critic; the saved critic loads back to the same values."""
    import torch

    from critic import ValueModel

    result = train("train_grpo.py", tmp_path, "--advantage", "gae", "--max-steps", "1", "--eval-every", "0",
                   "--prompts-per-step", "4", "--num-generations", "4", "--gradient-checkpointing")
    assert result.returncode == 0, result.stderr[-3000:]
    row = metrics(tmp_path)[0]
    assert "critic/value_loss" in row and "time/critic" in row
    critic = ValueModel.from_pretrained(str(tmp_path / "critic")).eval()
    again = ValueModel.from_pretrained(str(tmp_path / "critic")).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(critic(ids, torch.ones_like(ids)), again(ids, torch.ones_like(ids)))
    assert critic.value_head.weight.abs().sum() > 0


def test_ppo_script_runs_grpo_and_loads_the_policy(tmp_path, tiny_base):
    from transformers import AutoModelForCausalLM

    result = train("train_ppo.py", tmp_path, "--advantage", "rloo", "--max-steps", "1", "--eval-every", "0",
                   "--prompts-per-step", "4", "--num-generations", "4", "--kl-coef", "0.01")
    assert result.returncode == 0, result.stderr[-3000:]
    row = metrics(tmp_path)[0]
    assert "critic/value_loss" not in row and "policy/kl" in row
    assert not (tmp_path / "critic").exists()
    AutoModelForCausalLM.from_pretrained(tmp_path / "policy")


def write_jsonl(path, rows: list[dict]):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


WEIGHT_REWARD = """
def by_weight(response, ground_truth, **extras):  # scores by a field of the record, not by the response
    return extras["weight"]
"""


def test_custom_reward_receives_the_records_other_fields(tmp_path, tiny_base):
    """`--reward file.py:fn` gets each response's record fields as keyword extras, in the worker processes,
    in training and in evaluation: a reward that returns the record's `weight` field gives exactly the
    weights (a missing extra would raise KeyError: errors, reward 0)."""
    weights = [0.0, 0.25, 0.5, 1.0]
    data = write_jsonl(tmp_path / "weighted.jsonl", [{"question": f"What is {i} + 1?", "answer": str(i + 1),
                                                      "weight": w} for i, w in enumerate(weights)])
    (tmp_path / "weight_reward.py").write_text(WEIGHT_REWARD)
    out = tmp_path / "run"
    result = train("train_grpo.py", out, "--dataset", str(data), "--eval-datasets", str(data),
                   "--reward", f"{tmp_path / 'weight_reward.py'}:by_weight", "--reward-workers", "1",
                   "--score-truncated", "--max-steps", "2", "--prompts-per-step", "4", "--num-generations", "4",
                   "--max-new-tokens", "16", "--eval-every", "2", "--eval-num-samples", "2",
                   "--samples-per-step", "16")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metrics(out)
    assert [r["reward/errors"] for r in rows[:2]] == [0, 0]
    assert [r["train/reward"] for r in rows[:2]] == [sum(weights) / 4] * 2  # each step draws each record once
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 32 and all(s["reward"] == weights[s["prompt_id"]] for s in samples)
    assert rows[0]["eval/accuracy"] == rows[-1]["eval/accuracy"] == 0.25  # only weight 1.0 counts as correct


LENGTH_REWARD = """
def by_length(response, ground_truth, **extras):  # differs within a group, so each group's mean matters
    return float(len(response))
"""


def test_each_draw_of_a_prompt_is_its_own_group(tmp_path, tiny_base):
    """With fewer records than prompts per step, a step draws a record more than once: each draw's samples
    are a group of their own (GRPO's baseline is that draw's mean, not the mean of every draw of the
    record), samples keep the record's id, and the start of the run says so with the numbers."""
    data = write_jsonl(tmp_path / "two.jsonl", [{"question": "What is 1 + 1?", "answer": "2"},
                                                {"question": "What is 2 + 3?", "answer": "5"}])
    (tmp_path / "length_reward.py").write_text(LENGTH_REWARD)
    out, reward_spec = tmp_path / "run", f"{tmp_path / 'length_reward.py'}:by_length"
    result = train("train_grpo.py", out, "--dataset", str(data), "--reward", reward_spec,
                   "--reward-workers", "0", "--score-truncated", "--no-scale-by-std", "--max-steps", "1",
                   "--prompts-per-step", "4", "--num-generations", "4", "--max-new-tokens", "16",
                   "--eval-every", "0", "--samples-per-step", "16")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 training prompts, fewer than --prompts-per-step 4" in result.stdout
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 16 and sorted(Counter(s["prompt_id"] for s in samples).values()) == [8, 8]
    for draw in range(4):  # rows are in draw order, num_generations per draw
        group = samples[4 * draw:4 * draw + 4]
        assert len({s["prompt_id"] for s in group}) == 1
        mean = sum(s["reward"] for s in group) / 4
        assert [s["advantage"] for s in group] == pytest.approx([s["reward"] - mean for s in group], abs=1e-4)


@pytest.mark.parametrize("field", ["question", "answer"])
def test_bad_text_in_the_data_stops_before_training_with_one_line(field, tmp_path):
    """A lone surrogate (a broken \\u escape) in a question used to be a tokenizer traceback, in an answer a
    crash part-way through training when a sample holding it was written."""
    rows = [{"question": "What is 1 + 1?", "answer": "2"}, {"question": "What is 2 + 2?", "answer": "4"}]
    rows[1][field] += "\ud800"
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    result = train("train_ppo.py", tmp_path / "run", "--dataset", str(data), "--max-steps", "2",
                   "--prompts-per-step", "2", "--num-generations", "2", "--max-new-tokens", "8",
                   "--eval-every", "0", "--reward-workers", "0", "--samples-per-step", "4")
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {data}: record 1: {field} '{field}' has an invalid character"), \
        result.stderr[-2000:]


def test_any_model_text_is_scored_and_written(tmp_path, tiny_base):
    """Model output is arbitrary text: decoded random token ids, and what a decoder of another tokenizer
    might give (a lone surrogate, NUL, a direction mark) are scored and written to samples.jsonl, which
    escapes what UTF-8 cannot hold, so they read back unchanged; nothing raises."""
    import torch
    from transformers import AutoTokenizer

    from reward import RewardPool, RewardRules, decide_rewards
    from utils import JsonlWriter

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    ids = torch.randint(0, len(tokenizer), (16, 48), generator=torch.Generator().manual_seed(0))
    odd = ["\\boxed{5}\ud800", "\udfff", "\x00<answer>\\boxed{5}</answer>", "\u202e\\boxed{5}", "\\boxed{\ud800}"]
    texts = tokenizer.batch_decode(ids, skip_special_tokens=False) + odd
    n = len(texts)
    with RewardPool("math", num_workers=0) as pool:
        verdicts, stats = pool.score(texts, ["5"] * n, [{"note": t} for t in texts])
    rewards, _ = decide_rewards(verdicts, texts, ["5"] * n, truncated=[False] * n, lengths=[48] * n,
                                repetitive=[False] * n, rules=RewardRules())
    assert sum(stats.values()) == 0
    assert rewards[-len(odd):] == [1.0, 0.0, 1.0, 1.0, 0.0]
    writer = JsonlWriter(tmp_path / "samples.jsonl")
    for text, r in zip(texts, rewards, strict=True):
        writer.write({"response": text, "reward": r, "nested": {"texts": [text]}})
    writer.close()
    back = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [b["response"] for b in back] == texts and [b["nested"]["texts"][0] for b in back] == texts


def test_control_rewards_replace_the_reward_and_the_rule_is_still_logged():
    import random

    from reward import RewardPool, RewardRules, decide_rewards

    texts = ["\\boxed{5}", "\\boxed{4}", "no box", "\\boxed{5}"]
    facts = dict(truncated=[False, False, False, True], lengths=[4] * 4, repetitive=[False] * 4)
    with RewardPool("math", num_workers=0) as pool:
        verdicts, _ = pool.score(texts, ["5"] * 4)
    rule, stats = decide_rewards(verdicts, texts, ["5"] * 4, rules=RewardRules(), **facts)
    assert rule == [1.0, 0.0, 0.0, 0.0] and "train/correct" not in stats
    fmt, stats = decide_rewards(verdicts, texts, ["5"] * 4, rules=RewardRules(reward="format"), **facts)
    assert fmt == [1.0, 1.0, 0.0, 0.0]  # any box; the truncated one still 0 (ORZ's rule)
    assert stats["train/correct"] == 2.0  # the judge's verdicts before the truncation rule
    verdicts = [1.0, 0.0, 0.0, 1.0] * 50
    draw = lambda seed: decide_rewards(verdicts, texts * 50, ["5"] * 200, truncated=[False] * 200,  # noqa: E731
                                       lengths=[4] * 200, repetitive=[False] * 200,
                                       rules=RewardRules(reward="random:0.25"), rng=random.Random(seed))[0]
    first = draw("s")
    assert first == draw("s") and first != draw("t")  # seeded per step and process
    assert 0.1 < sum(first) / len(first) < 0.4  # 200 draws of p = 0.25 (sd 0.03)


def test_reward_audit_counts_and_writes_the_disagreements(tmp_path):
    from reward import audit_verdicts

    texts = ["\\boxed{5}", "\\boxed{0.0000671}", "\\boxed{0.\\overline{3}}", "\\boxed{9^{9^{9^{9}}}}",
             "\\boxed{9^{9^{9^{9}}}} <answer>\\boxed{1}</answer> \\boxed{9^{9^{9^{9}}}}"]
    answers = ["5", "0.0000672", "\\frac13", "1", "1"]
    verdicts = [1.0, 0.0, 1.0, 0.0, 1.0]  # as math_reward judges them
    audited, rows = audit_verdicts(texts, answers, verdicts, list(range(5)), 3, [False] * 5)
    # a power tower is too costly to hand to math-verify in the trainer, also where only math-verify reads
    # it (the last box of the text, outside the answer): not audited
    assert (audited, len(rows)) == (3, 2)
    assert [(r["step"], r["ground_truth"], r["reward"], r["math_verify"]) for r in rows] == [
        (3, "0.0000672", 0.0, 1.0), (3, "\\frac13", 1.0, 0.0)]
    assert audit_verdicts(texts, answers, verdicts, [1], 3, [False] * 5)[0] == 1  # only the picked ones


def test_a_control_run_logs_the_rule_next_to_its_reward(tmp_path, tiny_base):
    result = train("train_grpo.py", tmp_path, "--reward", "random:1", "--max-steps", "2", "--eval-every", "2",
                   "--eval-limit", "8")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metrics(tmp_path)
    for r in rows[:-1]:  # every response that stopped scores 1; the rule's verdicts are logged apart
        assert r["train/reward"] == pytest.approx(1 - r["train/truncated"])
        assert 0 <= r["train/correct"] <= 1
    assert rows[0]["eval/accuracy"] < 1  # evaluation judges with the rule, not the control


def test_config_file_with_command_line_override(tmp_path):
    from cli import parse_args
    from train_grpo import Args

    config = tmp_path / "run.yaml"
    config.write_text("max_steps: 7\nlr: 0.001\nstop_strings: ['</answer>']\n")
    args = parse_args(Args, ["--config", str(config), "--lr", "0.002"])
    assert (args.max_steps, args.lr, args.stop_strings, args.advantage) == (7, 0.002, ["</answer>"], "grpo")
    config.write_text("max_stepz: 7\n")
    with pytest.raises(SystemExit):
        parse_args(Args, ["--config", str(config)])


@pytest.mark.parametrize("bad,message", [
    (["--prompts-per-step", "5", "--num-mini-batches", "3"], "must split"),
    (["--advantage", "grpo", "--num-generations", "1"], "--num-generations >= 2"),
    (["--clip-low", "1.5"], "clip ranges"),
    (["--model", "./no/such/model"], "no such path"),
])
def test_bad_arguments_fail_fast_with_one_line(bad, message, tmp_path):
    result = train("train_ppo.py", tmp_path, *bad, timeout=120)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and message in last, result.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train_grpo.py", "train_ppo.py"])
def test_default_run_reaches_90_percent(script, tmp_path, tiny_base):
    """The no-argument default: base at most 50%, final at least 90% held-out accuracy."""
    result = train(script, tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["base_accuracy"] <= 0.5 and summary["final_accuracy"] >= 0.9, summary


@pytest.mark.parametrize("script", ["train_ppo.py", "train_grpo.py"])
def test_grpo_groups_with_equal_rewards_get_zero_advantage_from_both_scripts(script, tmp_path, tiny_base):
    """GRPO has one default on both entry points: no batch whitening, so a group whose rewards are all
    equal has advantage exactly 0 (whitening would shift it by the batch mean)."""
    result = train(script, tmp_path, "--advantage", "grpo", "--max-steps", "1", "--prompts-per-step", "8",
                   "--num-generations", "4", "--eval-every", "0", "--samples-per-step", "32",
                   "--reward-workers", "0", "--seed", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    groups: dict[int, list[dict]] = {}
    for s in samples:
        groups.setdefault(s["prompt_id"], []).append(s)
    equal = [g for g in groups.values() if len({s["reward"] for s in g}) == 1]
    assert equal and len(equal) < len(groups)  # both kinds present, or the test means nothing
    assert all(s["advantage"] == 0.0 for g in equal for s in g)
    assert json.loads((tmp_path / "config.json").read_text())["whiten_advantages"] is False


def dropout_model(tiny_base, out):
    """A small random GPT-2 with dropout everywhere (embeddings, attention, residuals), the tiny tokenizer."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=256,
                        resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, eos_token_id=tokenizer.eos_token_id,
                        bos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    GPT2LMHeadModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_policy_ratio_is_one_on_the_first_update_of_a_model_with_dropout(tmp_path, tiny_base):
    """Rollout and old log-probs run in eval mode; the update must see the same model, so before any
    optimizer step the PPO ratio is exactly 1 (the k1 KL makes the run compute old log-probs)."""
    model = dropout_model(tiny_base, tmp_path / "model")
    result = train("train_ppo.py", tmp_path / "run", "--model", str(model), "--advantage", "grpo",
                   "--max-steps", "1", "--prompts-per-step", "4", "--num-generations", "4", "--eval-every", "0",
                   "--max-new-tokens", "8", "--kl-coef", "0.1", "--kl-estimator", "k1", "--reward-workers", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    row = metrics(tmp_path / "run")[0]
    assert row["policy/ratio"] == pytest.approx(1.0, abs=1e-6)
    assert row["policy/approx_kl"] == pytest.approx(0.0, abs=1e-10)


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


def test_seq_mean_loss_averages_over_the_kept_sequences_only(tmp_path, tiny_base):
    """Groups with equal rewards have advantage 0 (GRPO, no whitening), so dropping them changes only the
    normaliser: the mean of per-sequence means is over the kept rows, and the gradient grows by
    rows / kept rows (a normaliser that still counted the dropped rows would leave it unchanged)."""
    common = ["--max-steps", "1", "--prompts-per-step", "8", "--num-generations", "4", "--eval-every", "0",
              "--reward-workers", "0", "--seed", "1", "--loss-agg", "seq-mean-token-mean"]
    rows = {}
    for name, extra in (("all", []), ("drop", ["--drop-equal-groups"])):
        result = train("train_grpo.py", tmp_path / name, *common, *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        rows[name] = metrics(tmp_path / name)[0]
    kept = 1.0 - rows["drop"]["train/equal_reward_groups"]
    assert 0 < kept < 1
    ratio = rows["drop"]["policy/grad_norm"] / rows["all"]["policy/grad_norm"]
    assert ratio == pytest.approx(1 / kept, rel=1e-4)


def test_dapo_overlong_shaping_and_masking_truncated_responses(tmp_path, tiny_base):
    """With 6 new tokens nearly every response is cut off. --overlong-buffer 6 lowers each reward by its
    length / 6 (the whole budget is the buffer), logged as train/overlong_penalty; --mask-truncated leaves the
    truncated responses out of the loss, so a batch of only truncated ones leaves the policy as it was."""
    common = ["--max-steps", "1", "--prompts-per-step", "4", "--num-generations", "4", "--eval-every", "0",
              "--reward-workers", "0", "--seed", "1", "--max-new-tokens", "6", "--lr", "1e-2"]
    result = train("train_grpo.py", tmp_path / "shaped", *common, "--overlong-buffer", "6", "--score-truncated")
    assert result.returncode == 0, result.stderr[-3000:]
    row = metrics(tmp_path / "shaped")[0]
    assert row["train/overlong_penalty"] == pytest.approx(-row["train/response_length"] / 6, abs=1e-6)
    assert row["train/truncated"] > 0.5 and row["train/overlong_penalty"] < -0.5
    result = train("train_grpo.py", tmp_path / "masked", *common, "--mask-truncated")
    assert result.returncode == 0, result.stderr[-3000:]
    row = metrics(tmp_path / "masked")[0]
    policy = load_file(tmp_path / "masked" / "policy" / "model.safetensors")
    base = load_file(tiny_base / "model.safetensors")
    moved = any(not torch.equal(policy[k], base[k]) for k in base)
    assert moved == (row["train/truncated"] < 1.0), row  # only responses that ended on their own train


def test_gspo_sequence_ratio_runs_and_starts_at_ratio_one(tmp_path, tiny_base):
    """--ratio-level sequence on the loop with GSPO's clip ranges: of two optimizer steps per rollout the
    first starts at ratio 1 (nothing clipped), the second moves the sequences' ratios past 1 +- 4e-4."""
    result = train("train_grpo.py", tmp_path, "--max-steps", "2", "--prompts-per-step", "4", "--num-generations",
                   "4", "--eval-every", "0", "--reward-workers", "0", "--seed", "1", "--ratio-level", "sequence",
                   "--num-mini-batches", "2", "--clip-low", "3e-4", "--clip-high", "4e-4",
                   "--loss-agg", "seq-mean-token-mean", "--lr", "1e-3")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metrics(tmp_path)
    assert all(0 < r["policy/clipfrac"] < 1 for r in rows[:2]), rows


def test_dynamic_sampling_fills_the_batch_with_groups_that_have_signal(tmp_path, tiny_base):
    """DAPO's dynamic sampling at the start, where most groups of the built-in task get equal rewards: more
    rounds are drawn, the batch holds more groups with signal than one round does, the same prompt count,
    and a run with the same seed draws the same batch again."""
    common = ["--max-steps", "2", "--prompts-per-step", "8", "--num-generations", "4", "--eval-every", "0",
              "--reward-workers", "0", "--seed", "1", "--samples-per-step", "32"]
    plain = train("train_grpo.py", tmp_path / "plain", *common)
    assert plain.returncode == 0, plain.stderr[-3000:]
    runs = {}
    for name in ("dynamic", "again"):
        result = train("train_grpo.py", tmp_path / name, *common, "--dynamic-sampling", "--max-sampling-rounds", "3")
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = (metrics(tmp_path / name), (tmp_path / name / "samples.jsonl").read_text())
    rows, before = runs["dynamic"][0], metrics(tmp_path / "plain")
    assert runs["again"][0][0]["train/reward"] == rows[0]["train/reward"] and runs["again"][1] == runs["dynamic"][1]
    for row in rows[:2]:
        assert 1 <= row["train/sampling_rounds"] <= 3
        assert row["train/signal_groups"] == pytest.approx(1 - row["train/equal_reward_groups"])
    first_plain = 1 - before[0]["train/equal_reward_groups"]
    assert rows[0]["train/sampling_rounds"] > 1 and rows[0]["train/signal_groups"] > first_plain
    samples = [json.loads(line) for line in runs["dynamic"][1].splitlines()]
    assert len([s for s in samples if s["step"] == 0]) == 32  # 8 groups of 4, whatever the rounds drew


def test_vapo_length_adaptive_lambda_on_the_loop(tmp_path, tiny_base):
    """PPO with --adaptive-lam-alpha: the logged lambdas are VAPO's for the step's lengths (alpha 0.1 and at
    most 16 tokens: between 0 and 1 - 1/1.6), and the critic still trains against its own targets."""
    result = train("train_ppo.py", tmp_path, "--max-steps", "2", "--prompts-per-step", "4", "--num-generations",
                   "4", "--eval-every", "0", "--reward-workers", "0", "--seed", "1", "--max-new-tokens", "16",
                   "--adaptive-lam-alpha", "0.1")
    assert result.returncode == 0, result.stderr[-3000:]
    for row in metrics(tmp_path)[:2]:
        assert 0 <= row["policy/lam_min"] <= row["policy/lam_mean"] <= row["policy/lam_max"] <= 1 - 1 / 1.6 + 1e-6
        assert row["policy/lam_max"] > 0 and row["critic/value_loss"] > 0


def test_warmup_counts_rl_steps_and_lr_is_the_one_used(tmp_path, tiny_base):
    """--warmup-steps 4: steps 0, 1, 2 train at 1/4, 2/4, 3/4 of the rate, for the policy and for a critic
    making 2 optimizer steps per RL step; the logged rates are the ones each step used."""
    result = train("train_ppo.py", tmp_path, "--max-steps", "3", "--prompts-per-step", "4", "--num-generations", "4",
                   "--eval-every", "0", "--reward-workers", "0", "--warmup-steps", "4", "--critic-mini-batches", "2",
                   "--lr", "1e-4", "--critic-lr", "2e-4")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metrics(tmp_path)
    assert [r["lr"] for r in rows] == pytest.approx([1e-4 * k / 4 for k in (1, 2, 3)])
    assert [r["critic/lr"] for r in rows] == pytest.approx([2e-4 * k / 4 for k in (1, 2, 3)])


WATCH_TORCH_IMPORT = """
import importlib.abc, os, sys
class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch":
            print("at torch import:", os.environ.get("GOMP_SPINCOUNT"), os.environ.get("OMP_WAIT_POLICY"))
sys.meta_path.insert(0, Watch())
import {module}
"""


@pytest.mark.parametrize("module", ["train_ppo", "train_grpo", "rollout"])
@pytest.mark.parametrize("env,expected", [({}, "1000 None"), ({"GOMP_SPINCOUNT": "77"}, "77 None"),
                                          ({"OMP_WAIT_POLICY": "PASSIVE"}, "None PASSIVE")])
def test_openmp_spin_count_is_set_before_torch_loads(module, env, expected):
    """A run beside another CPU-heavy process must not lose most of its time to OpenMP threads spinning
    (benchmark.py load): the entry points set a short spin count before torch loads libgomp, which reads
    it once, unless the user chose one."""
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    result = subprocess.run([sys.executable, "-c", WATCH_TORCH_IMPORT.format(module=module)], cwd=ROOT,
                            env={**base, **env}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[0] == f"at torch import: {expected}"
