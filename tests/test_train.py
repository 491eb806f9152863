"""End to end: the real training scripts (train_ppo.py, train_grpo.py) run on the built-in task with small
budgets, as a user runs them (a subprocess, through the shared runner in conftest.py) or through `main`: learning,
the files a run writes, estimators and algorithm options, rewards, LoRA, the trainers' command line and every
input refused in one line before any model loads, and the process setup of the entry points. Resuming and output
directories are in test_resume.py, several processes in test_distributed.py, the real model in test_real_model.py.

The learning tests (one per estimator) run in CI; the full default runs are marked slow.
"""

import json
import math
import os
import re
from collections import Counter

import pytest
import torch
from conftest import dropout_model, model_dir_stub, option_blocks, run_script, train
from safetensors.torch import load_file

from train_ppo import Args, check_args

ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def metrics(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def comparable(run_dir) -> list[dict]:
    """The metrics rows of a run without their timings: what a resumed run must reproduce exactly."""
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in metrics(run_dir)]


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


def write_jsonl(path, rows: list[dict]):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------
# Learning, and the files a run writes
# --------------------------------------------------------------------------------------------------

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


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train_grpo.py", "train_ppo.py"])
def test_default_run_reaches_90_percent(script, tmp_path, tiny_base):
    """The no-argument default: base at most 50%, final at least 90% held-out accuracy."""
    result = train(script, tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["base_accuracy"] <= 0.5 and summary["final_accuracy"] >= 0.9, summary


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


def test_tensorboard_gets_every_row_of_metrics_jsonl(tmp_path, tiny_base):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    result = run_script("train_grpo.py", "--max-steps", "2", "--prompts-per-step", "4", "--num-generations",
                        "4", "--max-new-tokens", "16", "--eval-every", "1", "--eval-limit", "4",
                        "--eval-num-samples", "1", "--reward-workers", "0", "--report-to", "tensorboard",
                        "--output-dir", str(out), env=ONE_THREAD, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(out / "reasoner-zero")).Reload()
    logged = [e.step for e in events.Scalars("eval/accuracy")]
    assert logged == [r["step"] for r in rows if "eval/accuracy" in r] == [0, 1, 2]  # the final eval too
    assert [e.step for e in events.Scalars("train/reward")] == [0, 1]


# --------------------------------------------------------------------------------------------------
# Rewards: a custom function, the draws of a prompt, controls, a function that misbehaves
# --------------------------------------------------------------------------------------------------

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


def test_a_control_run_logs_the_rule_next_to_its_reward(tmp_path, tiny_base):
    result = train("train_grpo.py", tmp_path, "--reward", "random:1", "--max-steps", "2", "--eval-every", "2",
                   "--eval-limit", "8")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metrics(tmp_path)
    for r in rows[:-1]:  # every response that stopped scores 1; the rule's verdicts are logged apart
        assert r["train/reward"] == pytest.approx(1 - r["train/truncated"])
        assert 0 <= r["train/correct"] <= 1
    assert rows[0]["eval/accuracy"] < 1  # evaluation judges with the rule, not the control


BAD_REWARD = '''
import os
import time
from pathlib import Path

CALLS = 0


def score(response, ground_truth, **extras):
    """In each worker: raises on its 1st call, returns junk on its 2nd; the first call of the run that
    finds no marker file hangs; every other call returns 1.0."""
    global CALLS
    CALLS += 1
    if CALLS == 1:
        raise RuntimeError("boom")
    if CALLS == 2:
        return "not a number"
    marker = Path(os.environ["BAD_REWARD_MARKER"])
    if not marker.exists():
        marker.write_text("hung once")
        time.sleep(60)
    return 1.0
'''


def test_a_reward_function_that_raises_hangs_or_returns_junk_costs_only_those_samples(tmp_path, tiny_base):
    (tmp_path / "bad_reward.py").write_text(BAD_REWARD)
    out = tmp_path / "run"
    result = run_script("train_grpo.py", "--output-dir", str(out), "--reward",
                        str(tmp_path / "bad_reward.py") + ":score", "--reward-timeout", "1", "--max-steps", "1",
                        "--prompts-per-step", "4", "--num-generations", "4", "--eval-every", "0",
                        env={"BAD_REWARD_MARKER": str(tmp_path / "hung")}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    totals = {k: sum(r[k] for r in rows) for k in ("reward/errors", "reward/timeouts", "reward/invalid")}
    assert all(v > 0 for v in totals.values()), totals
    assert all(0.0 <= r["train/reward"] <= 1.0 for r in rows)
    assert all(r["time/reward"] < 30 for r in rows)  # a hang costs the timeout, not the step


def test_a_reward_function_that_fails_on_every_response_stops_the_run_before_the_update(tmp_path, tiny_base):
    (tmp_path / "exits.py").write_text("import sys\n\ndef score(response, ground_truth, **extras):\n    sys.exit(0)\n")
    out = tmp_path / "run"
    result = run_script("train_grpo.py", "--output-dir", str(out), "--reward", str(tmp_path / "exits.py") + ":score",
                        "--max-steps", "2", "--prompts-per-step", "4", "--num-generations", "4", "--eval-every", "0",
                        env=ONE_THREAD, timeout=600)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"error: step 0: the reward function failed on all 16 responses \(first: item \d+: error, "
                        r"SystemExit\); nothing was trained on them; fix it and run the same command", last), last
    assert not (out / "metrics.jsonl").read_text() and not (out / "policy").exists()


# --------------------------------------------------------------------------------------------------
# Estimators and algorithm options on the loop
# --------------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------------
# REINFORCE++, CISPO, Clip-Cov / KL-Cov, the pass-rate curriculum, rollout dumps and their replay
# --------------------------------------------------------------------------------------------------

ALL_ROWS = ["--samples-per-step", "16"]  # SHORT's 4 x 4 rows, every one written to samples.jsonl


def test_reinforce_pp_learns_and_whitens_over_every_token_of_the_batch(tmp_path, tiny_base):
    """REINFORCE++ learns as the other estimators do (their learning test's budget). Each response's
    advantage (the same on each of its tokens without a KL) is its reward minus its group's mean, whitened
    over all the batch's response tokens: one map (c - mean) / std for every group, not one per group, and
    not the identity."""
    steps = 20
    result = train("train_grpo.py", tmp_path, "--advantage", "reinforce_pp", "--max-steps", str(steps),
                   "--eval-every", str(steps), "--lr", "3e-4", "--samples-per-step", "256")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training REINFORCE++" in result.stdout
    rows = check_outputs(tmp_path, steps, critic=False)
    assert rows[-1]["eval/accuracy"] >= rows[0]["eval/accuracy"] + 0.3, (rows[0], rows[-1])
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    checked = 0
    for step in range(steps):
        batch = [s for s in samples if s["step"] == step]
        adv, rewards = torch.tensor([s["advantage"] for s in batch]), torch.tensor([s["reward"] for s in batch])
        centred = rewards - rewards.view(32, 8).mean(dim=1).repeat_interleave(8)
        if len(set(centred.tolist())) < 2:
            continue
        i, j = 0, next(k for k in range(len(batch)) if centred[k] != centred[0])
        slope = (adv[i] - adv[j]) / (centred[i] - centred[j])
        intercept = adv[i] - slope * centred[i]
        torch.testing.assert_close(adv, slope * centred + intercept, atol=1e-4, rtol=0)
        assert slope > 0 and (abs(slope - 1) > 1e-2 or abs(intercept) > 1e-2)
        checked += 1
    assert checked >= steps // 2, checked


@pytest.mark.parametrize("flags,check", [
    (["--policy-loss", "cispo", "--num-mini-batches", "2", "--cispo-clip-high", "1e-4", "--lr", "1e-2"], "cispo"),
    (["--entropy-control", "clip-cov", "--clip-cov-ratio", "0.05", "--clip-cov-lower", "0.0",
      "--clip-cov-upper", "100"], "clip-cov"),
    (["--entropy-control", "kl-cov", "--kl-cov-ratio", "0.05", "--num-mini-batches", "2", "--lr", "1e-2"], "kl-cov"),
])
def test_cispo_and_the_entropy_controls_on_the_loop(flags, check, tmp_path, tiny_base):
    """On the loop: CISPO caps the second mini-batch's importance weights (its policy moved, at rate 1e-2,
    past 1 + 1e-4) and trains; Clip-Cov drops int(ratio x tokens) tokens at most (those inside its bounds);
    KL-Cov penalises exactly int(ratio x tokens) tokens, with a penalty that is > 0 once the policy moved."""
    result = train("train_grpo.py", tmp_path, *SHORT, *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    for r in metrics(tmp_path):
        assert math.isfinite(r["loss/policy"])
        tokens = round(r["train/response_length"] * 16)
        if check == "cispo":
            assert r["policy/clipfrac"] > 0  # the first mini-batch is at ratio 1; the second is capped
        elif check == "clip-cov":
            assert 1 <= r["policy/cov_tokens"] <= max(1, int(0.05 * tokens)), (r, tokens)
        else:
            assert r["policy/cov_tokens"] == max(1, int(0.05 * tokens)) and r["policy/kl_cov_penalty"] > 0, r


CURRICULUM_REWARD = """
def odd_length(response, ground_truth, **extras):  # some groups all pass, some all fail, some between
    return float(len(response) % 2)
"""


def test_the_curriculum_records_each_groups_pass_rate_and_resumes_exactly(tmp_path, tiny_base):
    """--curriculum pass-rate on 6 prompts (4 a step, so they come back): the checkpoint holds each drawn
    prompt's last pass rate, as the samples show it; a run stopped after step 2 and resumed draws the same
    prompts and ends with the same metrics and weights as the uninterrupted run."""
    data = write_jsonl(tmp_path / "six.jsonl", [{"question": f"What is {a} + {a}?", "answer": str(2 * a)}
                                                for a in range(1, 7)])
    (tmp_path / "odd.py").write_text(CURRICULUM_REWARD)
    args = [*SHORT, *ALL_ROWS, "--dataset", str(data), "--reward", f"{tmp_path / 'odd.py'}:odd_length",
            "--curriculum", "pass-rate", "--curriculum-floor", "0.2", "--max-steps", "4", "--save-every", "1",
            "--keep-checkpoints", "5"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert train("train_grpo.py", whole, *args).returncode == 0
    samples = [json.loads(line) for line in (whole / "samples.jsonl").read_text().splitlines()]
    for step in range(4):
        state = json.loads((whole / "checkpoints" / f"step-{step + 1:06d}" / "trainer_state.json").read_text())
        expected = {}
        for st in range(step + 1):
            batch = [s for s in samples if s["step"] == st]
            for g in range(4):
                group = batch[4 * g:4 * g + 4]
                expected[str(group[0]["prompt_id"])] = sum(s["reward"] > 0 for s in group) / 4
        assert state["pass_rates"] == expected, (step, state["pass_rates"], expected)
    rows = metrics(whole)
    assert rows[-1]["curriculum/seen"] == len(expected) <= 6
    assert train("train_grpo.py", resumed, *args, "--max-steps", "2").returncode == 0
    result = train("train_grpo.py", resumed, *args)
    assert result.returncode == 0 and "resuming from" in result.stdout, result.stderr[-3000:]

    assert comparable(resumed) == comparable(whole)
    a, b = load_file(resumed / "policy" / "model.safetensors"), load_file(whole / "policy" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_replayed_update_equals_the_original_bit_for_bit(tmp_path, tiny_base):
    """--dump-rollouts 1 saves step 1's rollout and the state before its update; `python replay.py` on it
    updates again: the weights and optimizer states equal the run's checkpoint after step 1, and the
    update's metrics its row of metrics.jsonl, and its trainer state (arguments, schedules in warm-up, the
    curriculum's rates) the run's. PPO, so the critic's update and values are replayed too."""
    out = tmp_path / "run"
    result = train("train_ppo.py", out, *SHORT, "--max-steps", "3", "--save-every", "1", "--keep-checkpoints", "5",
                   "--dump-rollouts", "1", "--num-mini-batches", "2", "--curriculum", "pass-rate",
                   "--warmup-steps", "5")
    assert result.returncode == 0, result.stderr[-3000:]
    dump = out / "rollouts" / "rollout-000001"
    assert f"python replay.py {dump}" in result.stdout
    threads = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}  # as `train` ran it: the same sums
    replayed = run_script("replay.py", dump, env=threads)
    assert replayed.returncode == 0, replayed.stderr[-3000:]
    after, original = dump / "replay" / "checkpoints" / "step-000002", out / "checkpoints" / "step-000002"
    for name in ("model.safetensors", "model_1.safetensors"):  # the policy, the critic
        a, b = load_file(after / name), load_file(original / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    for name in ("optimizer.bin", "optimizer_1.bin"):
        a, b = (torch.load(p / name, weights_only=True)["state"] for p in (after, original))
        assert all(torch.equal(a[i][k], b[i][k]) for i in a for k in a[i]), name
    # and the rest of the state: the run's arguments, the warm-up schedules stepped once, the curriculum's rates
    state, expected = (json.loads((p / "trainer_state.json").read_text()) for p in (after, original))
    assert state == expected and expected["pass_rates"]
    before = json.loads(next(dump.glob("step-*/trainer_state.json")).read_text())  # what continues at step 1
    assert before["pass_rates"] == json.loads((out / "checkpoints" / "step-000001" / "trainer_state.json")
                                              .read_text())["pass_rates"]
    row = metrics(out)[1]
    update = json.loads((dump / "replay" / "update.json").read_text())
    for k in ("loss/policy", "policy/entropy", "critic/value_loss", "critic/values", "policy/ratio"):
        assert update[k] == row[k], k
    # something that is not a dump, and a dump of another process count, are one line each
    bad = run_script("replay.py", out)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith(f"error: {out}: not a rollout dump")


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


def test_dynamic_sampling_logs_the_means_of_its_batch_not_of_every_round(tmp_path, tiny_base):
    """At 8 new tokens almost every response is cut off (outcome 0, ORZ's rule) and none is right: no group
    has signal, so all 3 rounds are drawn, though the lengths, and so the overlong penalties, differ (they
    made signal before). The logged penalty is the mean over the batch's responses, each in [-1, 0], not the
    sum over the rounds divided by the batch (about -2.9 before). With the curriculum on, every group of
    every round records its pass rate, not only the batch's: 3 rounds of 4 prompts, 12 groups."""
    result = train("train_grpo.py", tmp_path, "--max-steps", "1", "--prompts-per-step", "4", "--num-generations",
                   "4", "--eval-every", "0", "--reward-workers", "0", "--max-new-tokens", "8", "--overlong-buffer",
                   "8", "--dynamic-sampling", "--max-sampling-rounds", "3", "--curriculum", "pass-rate")
    assert result.returncode == 0, result.stderr[-3000:]
    row = metrics(tmp_path)[0]
    assert row["train/truncated"] > 0.9 and row["train/sampling_rounds"] == 3
    assert -1.0 <= row["train/overlong_penalty"] < -0.9 and row["train/reward"] == row["train/overlong_penalty"]
    assert row["curriculum/seen"] == 12 and row["curriculum/all_failed"] == 1.0, row


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


# --------------------------------------------------------------------------------------------------
# LoRA (peft): adapters on the policy and on the critic's backbone, the reference model for free, saving
# adapters or merged weights, checkpoints of what trains, exact resume
# --------------------------------------------------------------------------------------------------

LORA = ["--lora-r", "4", "--lora-alpha", "8"]  # scaling alpha / r = 2
LORA_LR = "3e-3"  # the learning tests' rate with LoRA rank 16 (full fine-tuning: 3e-4)
SHORT = ["--max-steps", "2", "--prompts-per-step", "4", "--num-generations", "4", "--eval-every", "0",
         "--reward-workers", "0", "--seed", "3"]


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


@pytest.mark.parametrize("advantage", ["grpo", "gae"])
def test_a_run_that_shares_prompts_samples_and_trains_as_a_plain_run(advantage, tmp_path, tiny_base):
    """--share-prompts changes how the policy's passes are computed, not what: the same responses at every
    step (the updates in between included), the same rewards, and the losses and weights to float rounding.
    PPO with 2 mini-batches and a KL: the old and reference log-probs are taken that way too."""
    runs = {}
    extra = ["--num-mini-batches", "2", "--kl-coef", "0.05", "--kl-estimator", "k3"] if advantage == "gae" else []
    for share in (False, True):
        out = tmp_path / str(share)
        result = train("train_ppo.py", out, *SHORT, "--advantage", advantage, "--max-steps", "3",
                       "--samples-per-step", "16", *extra, *(["--share-prompts"] * share))
        assert result.returncode == 0, result.stderr[-3000:]
        samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
        runs[share] = ([(r["step"], r["response"]) for r in samples], metrics(out))
    assert {step for step, _ in runs[False][0]} == {0, 1, 2} and runs[True][0] == runs[False][0]
    for plain, shared in zip(runs[False][1], runs[True][1], strict=True):
        assert shared["train/reward"] == plain["train/reward"]
        for k in ("loss/policy", "policy/entropy", "policy/kl") if "loss/policy" in plain else ():
            assert shared.get(k, 0.0) == pytest.approx(plain.get(k, 0.0), rel=1e-4, abs=1e-6), (plain["step"], k)
    a, b = load_file(tmp_path / "False" / "policy" / "model.safetensors"), load_file(
        tmp_path / "True" / "policy" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    refused = train("train_ppo.py", tmp_path / "ckpt", "--share-prompts", "--gradient-checkpointing", timeout=120)
    assert refused.returncode != 0 and refused.stderr.strip().splitlines()[-1] == (
        "error: --share-prompts needs the KV cache in training, which --gradient-checkpointing turns off")


def test_lora_with_dropout_checkpointing_and_bf16_starts_at_ratio_one(tmp_path, tiny_base):
    result = train("train_grpo.py", tmp_path, *SHORT, *LORA, "--lora-dropout", "0.3", "--gradient-checkpointing",
                   "--bf16")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LoRA: learning rate 0.002 (20x full fine-tuning's default" in result.stdout  # no --lr: LoRA's
    rows = metrics(tmp_path)
    assert [r["lr"] for r in rows] == [2e-3, 2e-3]
    assert json.loads((tmp_path / "config.json").read_text())["lr"] == 2e-3
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


@pytest.mark.parametrize("script,critic", [pytest.param("train_grpo.py", False, marks=pytest.mark.slow),
                                           pytest.param("train_ppo.py", True, marks=pytest.mark.slow)])
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
    """The default with --lora-r 16, at LoRA's default learning rate (README: LoRA)."""
    result = train(script, tmp_path, "--lora-r", "16", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["base_accuracy"] <= 0.5 and summary["final_accuracy"] >= 0.9, summary


# --------------------------------------------------------------------------------------------------
# The trainers' command line, and bad input stopping the run in one line before any model loads
# --------------------------------------------------------------------------------------------------

def test_unknown_flag_in_the_real_script_is_one_line_without_traceback():
    result = run_script("train_ppo.py", "--max-stesp", "5", env=ONE_THREAD, timeout=300)
    assert result.returncode == 2
    expected = "error: unknown argument --max-stesp (did you mean --max-steps?)"
    assert result.stderr.strip() == expected, result.stderr


def test_grpo_help_keeps_the_groups_and_its_own_defaults():
    result = run_script("train_grpo.py", "--help", env=ONE_THREAD, timeout=300)
    assert result.returncode == 0, result.stderr
    blocks = option_blocks(result.stdout)
    assert "(default: grpo)" in blocks["--advantage"] and "off for grpo" in blocks["--whiten-advantages"]
    lines = result.stdout.splitlines()
    assert lines.index("model and data:") < lines.index("rollout:")
    assert result.stdout.splitlines()[2].startswith("Train a base LM to reason with GRPO")


@pytest.mark.parametrize("bad,message", [
    (["--prompts-per-step", "5", "--num-mini-batches", "3"], "must split"),
    (["--advantage", "grpo", "--num-generations", "1"], "--num-generations >= 2"),
    (["--clip-low", "1.5"], "clip ranges"),
    (["--curriculum-floor", "0"], "--curriculum-floor 0.0 must be in (0, 1]"),
    (["--dump-rollouts", "60"], "--dump-rollouts [60]: steps are counted from 0"),
    (["--entropy-control", "clip-cov", "--clip-cov-lower", "5"], "--clip-cov-lower < --clip-cov-upper"),
    (["--model", "./no/such/model"], "no such path"),
])
def test_bad_arguments_fail_fast_with_one_line(bad, message, tmp_path):
    result = train("train_ppo.py", tmp_path, *bad, timeout=120)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and message in last, result.stderr[-2000:]


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


def test_hub_id_that_cannot_be_resolved_offline_stops_before_any_model_loads(tmp_path):
    result = run_script("train_ppo.py", "--model", "nobody-here/no-such-model-xyz", "--output-dir",
                        str(tmp_path / "out"), timeout=300,
                        env={**ONE_THREAD, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: --model nobody-here/no-such-model-xyz"), result.stderr
    assert "HF_HUB_OFFLINE" in lines[0]


def test_reward_module_that_exits_at_import_is_one_line(tmp_path):
    (tmp_path / "exits.py").write_text("import os\nos._exit(9)\n\n"
                                       "def score(response, ground_truth, **extras):\n    return 1.0\n")
    (tmp_path / "raises.py").write_text("raise SystemExit('bye')\n")
    for name, expected in (("exits.py", "exit code 9"), ("raises.py", "bye")):
        result = run_script("train_ppo.py", "--reward", f"{tmp_path / name}:score", "--output-dir",
                            str(tmp_path / "out"), env=ONE_THREAD, timeout=300)
        assert result.returncode == 1, (name, result.returncode, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert lines[-1].startswith("error: --reward") and expected in lines[-1], result.stderr
        assert name in lines[-1]
    args = Args(output_dir=str(tmp_path / "out"), reward=f"{tmp_path / 'exits.py'}:score")
    with pytest.raises(SystemExit, match="exit code 9"):
        check_args(args, 1)  # in this very process: the import is tried elsewhere


def test_data_file_errors_stop_the_run_before_any_model_loads(tmp_path):
    model = model_dir_stub(tmp_path / "model")  # passes the --model check, but nothing could load from it
    data = tmp_path / "bad.jsonl"
    data.write_text('{"question": "1+1?", "answer": "2"}\n{"question": "2+2?"}\n')
    result = run_script("train_ppo.py", "--model", str(model), "--dataset", str(data), "--output-dir",
                        str(tmp_path / "out"), env=ONE_THREAD, timeout=300)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "bad.jsonl" in lines[-1], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_math_reward_without_math_verify_is_one_line_before_any_model_loads(tmp_path):
    """Without math-verify every answer that is not a plain number would score 0: stop at the start."""
    code = ("import sys; sys.modules['math_verify'] = None; import train_ppo; "
            f"train_ppo.main(train_ppo.Args(output_dir={str(tmp_path / 'run')!r}))")
    result = run_script("-c", code, timeout=300)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "math-verify" in last and "pip install" in last, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_unwritable_output_dir_and_unknown_reward_stop_before_any_model_loads(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = run_script("train_ppo.py", "--output-dir", str(blocker / "out"), "--reward", "my_rewards.py:score",
                        timeout=120)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "--output-dir" in last and "my_rewards.py" in last
    assert "training" not in result.stdout and "Loading weights" not in result.stderr


# --------------------------------------------------------------------------------------------------
# The process setup of the entry points
# --------------------------------------------------------------------------------------------------

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
    result = run_script("-c", WATCH_TORCH_IMPORT.format(module=module), env=env,
                        unset=("GOMP_SPINCOUNT", "OMP_WAIT_POLICY"), timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[0] == f"at torch import: {expected}"
