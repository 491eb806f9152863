"""Fuzzing bad input: hundreds of malformed data files and argument combinations. Each one must end in
records that are well formed, or in one clear line (`DataError` / `error: ...`) that names the file or
the argument; never in a traceback from deep inside a library.
"""

import dataclasses
import json
import os
import random
import subprocess
import sys

import pytest
from conftest import ROOT

from data.loading import DataError, load_records
from train_ppo import Args, check_args

VALID_ORZ = json.dumps([
    [{"from": "human", "value": f"What is {i} + {i}?"}, {"from": "assistant", "ground_truth": {"value": str(2 * i)}}]
    for i in range(4)])
VALID_JSONL = "\n".join(json.dumps({"question": f"What is {i} + 1?", "answer": i + 1}) for i in range(4))
ODD_VALUES = [None, 0, -1.5, True, [], {}, [1, 2], {"value": None}, "", "\x00", "é" * 3, {"nested": {"x": 1}}]


def mutate(text: str, rng: random.Random) -> str:
    """One random corruption of a file's text."""
    kind = rng.randrange(7)
    if kind == 0:  # truncated at a random byte
        return text[:rng.randrange(len(text))]
    if kind == 1:  # a character deleted or duplicated
        i = rng.randrange(len(text))
        return text[:i] + text[i + 1:] if rng.random() < 0.5 else text[:i] + text[i] * 2 + text[i:]
    if kind == 2:  # garbage inserted
        i = rng.randrange(len(text))
        return text[:i] + rng.choice(["}", "]", "{", "\"", ",", "\\", "\n", "nul", "\ufeff"]) + text[i:]
    if kind == 3:  # empty or blank
        return rng.choice(["", " ", "\n\n", "[]", "{}", "null", "42", "\"text\""])
    if kind == 4:  # a value replaced by one of the wrong type
        data = [json.loads(line) for line in text.splitlines()] if text.lstrip()[0] == "{" else json.loads(text)
        return json.dumps(replace_random_value(data, rng)) if text.lstrip()[0] == "[" else "\n".join(
            json.dumps(d) for d in replace_random_value(data, rng))
    if kind == 5:  # a key removed or renamed
        return text.replace(rng.choice(["\"question\"", "\"answer\"", "\"value\"", "\"ground_truth\"", "\"from\""]),
                            rng.choice(["\"q\"", "\"\"", "\"Question \""]), 1)
    return text.replace("\n", rng.choice(["\n\n", "\n{\n", "\n[1]\n"]), 1)  # a bad JSONL line


def replace_random_value(data, rng: random.Random):
    """A copy of `data` with one scalar or container somewhere inside replaced by an odd value."""
    data = json.loads(json.dumps(data))
    node, path = data, []
    while isinstance(node, (list, dict)) and node and rng.random() < 0.8:
        key = rng.randrange(len(node)) if isinstance(node, list) else rng.choice(list(node))
        path.append((node, key))
        node = node[key]
    if path:
        parent, key = path[-1]
        parent[key] = rng.choice(ODD_VALUES)
    return data


@pytest.mark.parametrize("base,suffix", [(VALID_ORZ, ".json"), (VALID_JSONL, ".jsonl")])
def test_malformed_data_files_give_records_or_one_line_errors(base, suffix, tmp_path):
    rng = random.Random(0)
    outcomes = {"records": 0, "errors": 0}
    for case in range(150):
        text = mutate(base, rng)
        path = tmp_path / f"case{case}{suffix}"
        path.write_text(text, encoding="utf-8")
        try:
            records = load_records(str(path))
        except DataError as err:
            message = str(err)
            assert "\n" not in message and str(path) in message, (text, message)
            outcomes["errors"] += 1
            continue
        except Exception as err:  # noqa: BLE001 - exactly what must not happen
            pytest.fail(f"case {case}: {type(err).__name__}: {err}\n--- input ---\n{text}")
        for r in records:
            assert isinstance(r["question"], str) and r["question"].strip(), (text, r)
            assert isinstance(r["answer"], str) and r["answer"].strip(), (text, r)
        outcomes["records"] += 1
    assert outcomes["errors"] > 50 and outcomes["records"] > 10, outcomes  # both kinds of outcome were exercised


def test_binary_and_wrong_format_files(tmp_path):
    cases = {"garbage.parquet": b"PAR1 not really", "binary.json": bytes(range(256)),
             "latin1.jsonl": "é".encode("latin-1"), "notes.txt": b"hello"}
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(DataError) as err:
            load_records(str(path))
        assert "\n" not in str(err.value) and name in str(err.value)


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
}


def test_bad_argument_combinations_fail_with_one_line(tmp_path):
    rng = random.Random(1)
    base = dict(output_dir=str(tmp_path / "out"))
    for name, values in BAD_ARGS.items():  # every bad value alone is caught
        for value in values:
            args = dataclasses.replace(Args(**base), **{name: value})
            if name == "prompts_per_step" and value == 3:
                args = dataclasses.replace(args, num_mini_batches=1, critic_mini_batches=1)
                check_args(args, 1)  # 3 prompts are fine on one process ...
                with pytest.raises(SystemExit, match=r"^error: .*must divide by the 2 processes"):
                    check_args(args, 2)  # ... but not on two
                continue
            with pytest.raises(SystemExit) as err:
                check_args(args, 1)
            message = str(err.value)
            assert message.startswith("error: ") and "\n" not in message, (name, value, message)
    for _ in range(200):  # and random combinations give one line listing the problems
        chosen = rng.sample(sorted(BAD_ARGS), rng.randint(2, 5))
        args = dataclasses.replace(Args(**base), **{n: rng.choice(BAD_ARGS[n]) for n in chosen})
        try:
            check_args(args, rng.choice([1, 2, 4]))
        except SystemExit as err:
            assert str(err).startswith("error: ") and "\n" not in str(err), (chosen, err)
        else:
            pytest.fail(f"accepted {chosen}")


def test_unwritable_output_dir_and_unknown_reward_stop_before_any_model_loads(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = subprocess.run([sys.executable, "train_ppo.py", "--output-dir", str(blocker / "out"), "--reward",
                             "my_rewards.py:score"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "--output-dir" in last and "my_rewards.py" in last
    assert "training" not in result.stdout and "Loading weights" not in result.stderr


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
    result = subprocess.run([sys.executable, "train_grpo.py", "--output-dir", str(out), "--reward",
                             str(tmp_path / "bad_reward.py") + ":score", "--reward-timeout", "1", "--max-steps", "1",
                             "--prompts-per-step", "4", "--num-generations", "4", "--eval-every", "0"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "BAD_REWARD_MARKER": str(tmp_path / "hung")})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    totals = {k: sum(r[k] for r in rows) for k in ("reward/errors", "reward/timeouts", "reward/invalid")}
    assert all(v > 0 for v in totals.values()), totals
    assert all(0.0 <= r["train/reward"] <= 1.0 for r in rows)
    assert all(r["time/reward"] < 30 for r in rows)  # a hang costs the timeout, not the step


def test_records_whose_answer_cannot_be_checked_are_skipped_and_counted(tmp_path, tiny_base, capsys):
    from transformers import AutoTokenizer

    from data.loading import load_data

    path = tmp_path / "mixed.jsonl"
    answers = ["4", "\\frac{1}{2", "\\{1, 2\\}", "x}", "7"]
    path.write_text("\n".join(json.dumps({"question": f"q{i}?", "answer": a}) for i, a in enumerate(answers)))
    args = Args(dataset=str(path), output_dir=str(tmp_path / "out"))
    train, _ = load_data(args, AutoTokenizer.from_pretrained(tiny_base))
    assert [r["answer"] for r in train] == ["4", "\\{1, 2\\}", "7"]
    assert "skipped 2 of 5 training records whose answer cannot be checked" in capsys.readouterr().out
