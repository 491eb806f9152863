"""Unit tests of evaluate.py without a model: pass@k against hand-computed values, majority voting over
equivalent answers, aggregation, the paired bootstrap, comparing runs (`python evaluate.py compare`), the
command's own --help, and bad input, which stops before any model loads. Evaluations of a model run in
test_commands.py.

Run: python -m pytest tests/test_evaluate.py -q
"""

import json
from pathlib import Path

import pytest
from conftest import run_script

from evaluate import (
    EvalArgs,
    aggregate_eval,
    compare_runs,
    format_eval_table,
    majority_answer,
    paired_bootstrap,
    pass_at_k,
    pass_at_k_curve,
)
from evaluate import main as eval_main


@pytest.mark.parametrize("n, c, k, expected", [
    (5, 2, 1, 0.4),        # c / n
    (5, 2, 2, 0.7),        # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (5, 0, 3, 0.0),        # nothing correct
    (5, 3, 3, 1.0),        # n - c = 2 < k: every draw of 3 holds a correct one
    (4, 1, 4, 1.0),
    (10, 3, 2, 1 - 21 / 45),  # 1 - C(7,2)/C(10,2)
])
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_stable_for_large_n():
    # C(1000, 100) overflows a float; the product form does not: 1 - C(990,100)/C(1000,100).
    value = pass_at_k(1000, 10, 100)
    assert 0.65 < value < 0.66


@pytest.mark.parametrize("n, c, k", [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6), (5.0, 2, 1)])
def test_pass_at_k_bad_input(n, c, k):
    with pytest.raises(ValueError, match="pass_at_k needs"):
        pass_at_k(n, c, k)


def test_majority_groups_equivalent_answers():
    # \frac12, 1/2 and 0.5 are one answer with 3 votes; 3 has 2; None is ignored.
    assert majority_answer(["1/2", None, "3", "\\frac12", "3", "0.5"]) == "1/2"
    assert majority_answer(["3", "\\frac12", "0.5", "3", "3"]) == "3"


def test_majority_ties_and_empty():
    assert majority_answer(["4", "3", "3", "4"]) == "4"  # tie: the answer seen first
    assert majority_answer([None, "7", "8"]) == "7"
    assert majority_answer([None, None]) is None
    assert majority_answer([]) is None


def test_majority_multiple_choice_letters():
    assert majority_answer(["(B)", "A", "B", "\\text{B}"]) == "(B)"


def test_majority_custom_equivalence():
    same = lambda a, b: a.lower() == b.lower()  # noqa: E731
    assert majority_answer(["x", "Y", "y"], same=same) == "Y"


def test_aggregate_eval_hand_made_table():
    table = [{"n": 4, "correct": 0, "maj_correct": 0},   # avg 0,    pass@4 0
             {"n": 4, "correct": 1, "maj_correct": 0},   # avg 0.25, pass@4 1
             {"n": 4, "correct": 3, "maj_correct": 1},   # avg 0.75, pass@4 1
             {"n": 4, "correct": 4, "maj_correct": 1}]   # avg 1,    pass@4 1
    out = aggregate_eval(table)
    # pass@1 = avg; pass@2 = mean of 0, 1 - C(3,2)/C(4,2) = 1/2, 1 - 0 = 1, 1 -> 0.625
    assert out == {"avg@4": pytest.approx(0.5), "pass@4": pytest.approx(0.75), "maj@4": pytest.approx(0.5),
                   "problems": 4, "k": 4, "pass_at": {"1": pytest.approx(0.5), "2": pytest.approx(0.625),
                                                      "4": pytest.approx(0.75)}}
    table = format_eval_table({"toy": out, "overall": out})
    assert "avg@4" in table and "k=2" in table and "0.625" in table


@pytest.mark.parametrize("n, ks", [(1, ["1"]), (6, ["1", "2", "4", "6"]), (8, ["1", "2", "4", "8"])])
def test_pass_at_k_curve_powers_of_two_and_n(n, ks):
    # one problem with one correct sample of n: pass@k = k / n (1 - C(n-1, k) / C(n, k))
    curve = pass_at_k_curve([{"n": n, "correct": 1}])
    assert list(curve) == ks
    assert curve == {k: pytest.approx(int(k) / n) for k in ks}


def test_paired_bootstrap_known_answers():
    # a constant difference has no spread at all
    out = paired_bootstrap([0.9, 0.5, 0.7], [0.6, 0.2, 0.4])
    assert out["diff"] == pytest.approx(0.3) and out["low"] == pytest.approx(0.3) and out["high"] == pytest.approx(0.3)
    assert out["excludes_zero"] and out["problems"] == 3 and out["runs"] == (1, 1)
    # a - b is 1 on 50 of 100 problems: the resampled mean is Binomial(100, 1/2) / 100, whose 2.5% and
    # 97.5% quantiles are 0.40 and 0.60
    out = paired_bootstrap([1.0] * 50 + [0.0] * 50, [0.0] * 100, resamples=20_000)
    assert out["diff"] == 0.5 and out["low"] == pytest.approx(0.40, abs=0.011)
    assert out["high"] == pytest.approx(0.60, abs=0.011) and out["excludes_zero"]
    # no difference on average: the interval holds 0
    assert not paired_bootstrap([1.0, 0.0] * 20, [0.0, 1.0] * 20)["excludes_zero"]


def test_paired_bootstrap_resamples_runs_too():
    # two seeds of a at +-0.2 around b on every problem: resampling the problems alone would give a zero-width
    # interval at 0; the run level draws both seeds of a with replacement, so the mean is +0.2 (1/4), 0 (1/2)
    # or -0.2 (1/4), and the 95% interval is (-0.2, +0.2)
    out = paired_bootstrap([[0.7] * 10, [0.3] * 10], [[0.5] * 10])
    assert out["diff"] == pytest.approx(0.0, abs=1e-12) and out["runs"] == (2, 1)
    assert out["low"] == pytest.approx(-0.2) and out["high"] == pytest.approx(0.2) and not out["excludes_zero"]


def test_paired_bootstrap_bad_input():
    with pytest.raises(ValueError, match="same problems"):
        paired_bootstrap([1.0, 0.0], [1.0])
    with pytest.raises(ValueError, match="finite"):
        paired_bootstrap([float("nan")], [1.0])


def write_results(path: Path, correct: list[int], n: int = 4) -> Path:
    path.mkdir(parents=True)
    rows = [{"id": i, "n": n, "correct": c, "maj_correct": 0, "majority": None} for i, c in enumerate(correct)]
    (path / "results.json").write_text(json.dumps({"per_problem": {"toy": rows}}))
    return path


def test_compare_runs_and_command(tmp_path):
    a = write_results(tmp_path / "a", [4, 4, 4, 4, 0])
    b = write_results(tmp_path / "b", [0, 0, 0, 0, 0, 4])  # one more problem: compared on the shared five
    run = tmp_path / "run"  # a training run: its last evaluation counts
    run.mkdir()
    (run / "eval_problems.jsonl").write_text("\n".join(json.dumps(
        {"step": step, "per_problem": {"toy": [{"id": i, "n": 4, "correct": c, "maj_correct": 0} for i, c in
                                              enumerate([step] * 5)]}}) for step in (0, 2)) + "\n")
    out = compare_runs([a], [b])
    assert out["problems"] == 5 and out["mean_a"] == pytest.approx(0.8) and out["mean_b"] == 0.0
    assert out["diff"] == pytest.approx(0.8) and out["excludes_zero"]
    assert compare_runs([run], [b])["mean_a"] == pytest.approx(0.5)  # step 2: 2 of 4 on each problem
    assert compare_runs([run], [b], step=0)["mean_a"] == 0.0
    proc = run_script("evaluate.py", "compare", str(a), "--vs", str(b), str(run), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("a 0.800 vs b (+1) 0.250: +0.550") and "5 problems, 1 vs 2 runs" in proc.stdout
    proc = run_script("evaluate.py", "compare", str(a), "--vs", str(tmp_path), timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip().startswith("error: ") and "results.json" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_aggregate_eval_bad_input():
    with pytest.raises(ValueError, match="no problems"):
        aggregate_eval([])
    with pytest.raises(ValueError, match="0 <= correct <= n"):
        aggregate_eval([{"n": 2, "correct": 3, "maj_correct": 1}])


@pytest.mark.parametrize("changes, message", [
    (dict(temperature=0.0, num_samples=2), "greedy"),
    (dict(num_samples=0), "--num-samples"),
    (dict(datasets="/no/such/file.jsonl"), "no such file"),
    (dict(datasets=" , "), "--datasets is empty"),
    (dict(model="./no/such/model"), "no such path"),
    (dict(temperature=float("nan")), "--temperature nan must be a finite number"),
    (dict(reward_timeout=float("inf")), "--reward-timeout inf"),
    (dict(seed=-1), "--seed"),
])
def test_eval_bad_arguments(changes, message, tmp_path):
    # All of these fail before any model loads.
    with pytest.raises(SystemExit, match=message) as err:
        eval_main(EvalArgs(output_dir=str(tmp_path), **changes))
    assert str(err.value).startswith("error: ") and "\n" not in str(err.value)


def test_eval_model_directory_without_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no config.json"):
        eval_main(EvalArgs(model=str(tmp_path / "empty"), output_dir=str(tmp_path / "out")))


def test_a_reward_that_cannot_load_is_one_line(tmp_path):
    """Checked with the other arguments, before the datasets and the model load."""
    with pytest.raises(SystemExit, match=r"^error: --reward: reward spec .*nope\.py") as err:
        eval_main(EvalArgs(model="tiny", reward=f"{tmp_path}/nope.py:score", output_dir=str(tmp_path / "out")))
    assert "\n" not in str(err.value)


def test_evaluate_help_shows_its_own_usage():
    result = run_script("evaluate.py", "--help", env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: evaluate.py "), result.stdout[:200]
    assert "--num-samples N" in result.stdout and "--num_samples" not in result.stdout
    result = run_script("evaluate.py", "--num-sample", "2", env={"OMP_NUM_THREADS": "1"},
                        timeout=300)
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: unknown argument --num-sample (did you mean --num-samples?)"), result.stderr
