"""Unit tests of train_ppo.py without a run: the checks every run passes before any model loads
(`check_args`: every bad value alone, hundreds of random combinations, each one line naming the argument),
and the mini-batches of the update. Runs of the trainers are in test_train.py.

Run: python -m pytest tests/test_train_ppo.py -q
"""

import dataclasses
import random

import pytest
import torch
from conftest import model_dir_stub

from train_ppo import Args, check_args

# --------------------------------------------------------------------------------------------------
# check_args: what parsing cannot see, before any model loads
# --------------------------------------------------------------------------------------------------

def check_error(tmp_path, **changes) -> str:
    with pytest.raises(SystemExit) as err:  # when Args is built (value_problems), or by check_args
        check_args(dataclasses.replace(Args(output_dir=str(tmp_path / "out")), **changes), 1)
    message = str(err.value)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


@pytest.mark.parametrize("name,value", [
    ("lr", float("inf")), ("critic_lr", float("inf")), ("max_grad_norm", float("nan")),
    ("temperature", float("nan")), ("reward_timeout", float("inf")), ("kl_coef", float("nan")),
    ("entropy_coef", float("nan")), ("value_clip", float("nan")), ("format_reward_weight", float("inf")),
    ("seed", -1), ("seed", 2**32), ("synthetic_difficulty", 0),
])
def test_non_finite_and_out_of_range_values_are_rejected(name, value, tmp_path):
    message = check_error(tmp_path, **{name: value})
    assert "--" + name.replace("_", "-") in message, message


def test_largest_seed_is_accepted(tmp_path):
    check_args(Args(output_dir=str(tmp_path / "out"), seed=2**32 - 2), 2)
    with pytest.raises(SystemExit, match="--seed"):
        check_args(Args(output_dir=str(tmp_path / "out"), seed=2**32 - 1), 2)  # + the process index


def test_model_directory_without_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "config.json" in check_error(tmp_path, model=str(tmp_path / "empty"))
    (tmp_path / "weights.bin").write_text("x")
    assert "--model" in check_error(tmp_path, model=str(tmp_path / "weights.bin"))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    assert "not a causal language model" in check_error(tmp_path, model=str(tmp_path / "model"))
    check_args(Args(output_dir=str(tmp_path / "out"), model=str(model_dir_stub(tmp_path / "model"))), 1)


def test_gguf_models_that_cannot_load_are_one_line_before_any_model_loads(tmp_path):
    from rollout import gguf_file

    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not gguf")
    assert "model.gguf is not a GGUF file" in check_error(tmp_path, model=str(fake))
    assert "model.gguf is not a GGUF file" in check_error(tmp_path, model=str(tmp_path))  # its directory
    assert "no such path" in check_error(tmp_path, model=str(tmp_path / "missing.gguf"))
    (tmp_path / "other.gguf").write_bytes(b"GGUF")
    assert "2 .gguf files in this directory (model.gguf, other.gguf): name one" in check_error(
        tmp_path, model=str(tmp_path))
    assert gguf_file(str(tmp_path)) is None and gguf_file(str(tmp_path / "other.gguf")) == tmp_path / "other.gguf"
    check_args(Args(output_dir=str(tmp_path / "out"), model=str(tmp_path / "other.gguf")), 1)
    model_dir_stub(tmp_path)  # a Hugging Face directory that also holds GGUF files
    assert gguf_file(str(tmp_path)) is None
    check_args(Args(output_dir=str(tmp_path / "out"), model=str(tmp_path)), 1)


# --------------------------------------------------------------------------------------------------
# Tracking (--report-to)
# --------------------------------------------------------------------------------------------------

def test_report_to_a_tracker_that_is_not_installed(tmp_path, monkeypatch):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    message = check_error(tmp_path, report_to="wandb")
    assert "--report-to wandb" in message and "pip install wandb" in message
    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: False)
    assert "pip install tensorboard" in check_error(tmp_path, report_to="tensorboard")
    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: True)
    check_args(Args(output_dir=str(tmp_path / "out"), report_to="wandb"), 1)


# --------------------------------------------------------------------------------------------------
# Fuzzing: bad argument combinations
# --------------------------------------------------------------------------------------------------

BAD_ARGS = {
    "prompts_per_step": [0, 3], "num_generations": [0], "num_mini_batches": [0, 3, 5],
    "critic_mini_batches": [0, 7], "micro_batch_size": [0, -1], "clip_low": [-0.1, 1.0, 2.0],
    "clip_high": [-0.5], "max_steps": [0, -3], "max_new_tokens": [0], "critic_lr": [0.0], "top_p": [0.0, 1.5],
    "top_k": [-1], "gamma": [-0.1, 1.5], "lam": [2.0], "eval_num_samples": [0], "keep_checkpoints": [0],
    "save_every": [-1], "reward": ["nope", "no_such_module:f", "./missing.py:f", "reward:NOPE"],
    "model": ["./no/such/dir", "/abs/missing", "a/b/c"], "dataset": ["missing.json", "gone.parquet"],
    "eval_datasets": ["math500,absent.jsonl"], "max_prompt_tokens": [0],
    "max_tokens_per_microbatch": [-5], "max_padding": [0.0, -0.1, 1.5],
    # NaN passes every comparison and inf most: each is caught on its own
    "max_grad_norm": [0.0, float("nan")], "temperature": [0.0, -1.0, float("nan")],
    "lr": [0.0, -1e-6, float("inf")],
    "reward_timeout": [0.0, float("inf")], "kl_coef": [-0.1, float("nan")], "entropy_coef": [float("nan")],
    "seed": [-1, 2**32], "synthetic_difficulty": [0],
    "cispo_clip_low": [-0.1, 1.5], "cispo_clip_high": [-1.0, float("nan")], "clip_cov_ratio": [0.0, 1.5],
    "kl_cov_ratio": [-0.1, float("inf")], "kl_cov_coef": [-1.0], "clip_cov_lower": [6.0],
    "curriculum_floor": [0.0, 2.0],
    "dump_rollouts": [[-1], [60], [3, 600]],
}


def test_bad_argument_combinations_fail_with_one_line(tmp_path):
    rng = random.Random(1)
    base = dict(output_dir=str(tmp_path / "out"))
    for name, values in BAD_ARGS.items():  # every bad value alone is caught
        for value in values:
            if name == "prompts_per_step" and value == 3:
                args = dataclasses.replace(Args(**base), prompts_per_step=3, num_mini_batches=1, critic_mini_batches=1)
                check_args(args, 1)  # 3 prompts are fine on one process ...
                with pytest.raises(SystemExit, match=r"^error: .*must divide by the 2 processes"):
                    check_args(args, 2)  # ... but not on two
                continue
            with pytest.raises(SystemExit) as err:  # when Args is built, or by check_args
                check_args(dataclasses.replace(Args(**base), **{name: value}), 1)
            message = str(err.value)
            assert message.startswith("error: ") and "\n" not in message, (name, value, message)
    for _ in range(200):  # and random combinations give one line listing the problems
        chosen = rng.sample(sorted(BAD_ARGS), rng.randint(2, 5))
        try:
            check_args(dataclasses.replace(Args(**base), **{n: rng.choice(BAD_ARGS[n]) for n in chosen}),
                       rng.choice([1, 2, 4]))
        except SystemExit as err:
            assert str(err).startswith("error: ") and "\n" not in str(err), (chosen, err)
        else:
            pytest.fail(f"accepted {chosen}")


# --------------------------------------------------------------------------------------------------
# The mini-batches of the update
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mini_batches,world", [(1, 1), (2, 1), (4, 2)])
def test_mini_batch_parts_cover_each_row_once_per_epoch(mini_batches, world):
    from rollout import local_rows, mini_batch_parts

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


def test_args_are_checked_when_built_before_anything_is_read_or_written(tmp_path):
    """Args with a value that cannot work on any launch raises when it is built, in Python (a notebook
    catches it as an Exception) and from the command line (one line); nothing is created."""
    from cli import parse_args
    from utils import RunError

    with pytest.raises(RunError, match=r"^error: --lr must be > 0$"):
        Args(output_dir=str(tmp_path / "out"), lr=-1.0)
    with pytest.raises(Exception, match=r"--advantage nope: not one of gae, grpo, rloo"):
        Args(output_dir=str(tmp_path / "out"), advantage="nope")
    with pytest.raises(SystemExit, match=r"^error: clip ranges must satisfy 0 <= --clip-low < 1"):
        parse_args(Args, ["--clip-low", "1.5", "--output-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# The prompts of a step, with the curriculum's weights
# --------------------------------------------------------------------------------------------------

def test_weighted_prompts_follow_the_weights_and_do_not_depend_on_the_process_count():
    from rollout import step_prompts

    records = [{"id": i} for i in range(8)]
    weights = torch.tensor([1.0, 0.1, 1.0, 0.1, 1.0, 0.1, 1.0, 0.1], dtype=torch.float64)
    counts = [0] * 8
    for step in range(400):
        one = step_prompts(records, step, 4, seed=5, rank=0, world=1, weights=weights)
        two = [r for rank in (0, 1) for r in step_prompts(records, step, 4, seed=5, rank=rank, world=2,
                                                          weights=weights)]
        assert one == two and len({r["id"] for r in one}) == 4  # the same draw, without replacement
        assert one == step_prompts(records, step, 4, seed=5, rank=0, world=1, weights=weights)  # a resume's
        for r in one:
            counts[r["id"]] += 1
    heavy, light = sum(counts[0::2]), sum(counts[1::2])
    # 4 of weight 1 and 4 of 0.1, 4 drawn without replacement: the light ones are drawn about 1/6 as often
    assert 0.08 < light / heavy < 0.3, counts
    # more prompts than records: drawn with replacement, still in proportion
    many = step_prompts(records[:2], 0, 6, seed=1, rank=0, world=1, weights=torch.tensor([1.0, 1.0]).double())
    assert len(many) == 6
