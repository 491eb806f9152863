"""Unit tests of reward.py: the judged cases, extraction, bad and pathological input, security, the worker pool,
reward-function loading, the command line (`python reward.py`, no model), the control rewards, deciding a
response's reward (`decide_rewards`: the rule, controls, truncation) and the audit's judge, DAPO's overlong
penalty, and the repetition check (the tail-loop test, the compression test, the share, and the guard that
zeroes the reward of degenerate responses; hand-made responses, both outcomes).

Run: python -m pytest tests/test_reward.py -q
"""

import json
import logging
import os
import subprocess
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_script

import reward
from reward import (
    RewardPool,
    answers_match,
    compression_ratio,
    extract_answer,
    format_reward,
    load_reward_fn,
    math_reward,
    math_verify_baseline,
    overlong_penalty,
    repetition_flags,
    repetition_rate,
    tail_loop_flags,
    zero_degenerate,
)

REPO = ROOT

CASES_FILE = REPO / "tests" / "reward_cases.jsonl"
# Wall-clock bounds here catch a hang (a judge stuck for minutes, a deadline that never fires), not slowness:
# they are far above the normal time so that a loaded machine cannot fail them. Speed is benchmark.py's.
HANG_S = 45.0
CASES = [json.loads(line) for line in CASES_FILE.read_text().splitlines() if line.strip()]

# Reward functions that misbehave in every way a user's function can; loaded by path in the workers.
BAD_REWARDS = """
import math, os, signal, sys, time
from fractions import Fraction

def by_response(response, ground_truth, **extras):
    if response == "raise":
        raise KeyError("boom")
    if response == "string":
        return "1.0"
    if response == "none":
        return None
    if response == "nan":
        return math.nan
    if response == "inf":
        return -math.inf
    if response == "sleep":  # interruptible: the worker's soft deadline stops it
        time.sleep(60)
    if response == "hang":  # signals ignored, like a big-integer loop in C: only a kill stops it
        signal.signal(signal.SIGALRM, signal.SIG_IGN)
        time.sleep(60)
    if response == "crash":
        os._exit(3)
    if response == "pid":  # modulo: pids can exceed the largest valid reward (reward.MAX_ABS_REWARD)
        return float(os.getpid() % 1_000_000)
    if response == "fork":  # a child that returns as its parent does, without os._exit
        os.fork()
        return 4.0
    if response == "exit":
        sys.exit(3)
    return float(len(response)) + extras.get("bonus", 0)

class FloatFails:
    def __float__(self):
        raise RuntimeError("no float")

def odd_value(response, ground_truth, **extras):  # each way a value is no reward; "ok:<x>" returns x
    if response.startswith("ok:"):
        return float(response[3:])
    if response == "true":  # a reward written as `answer == truth`
        return True
    return {"huge-int": 10**400, "huge-fraction": Fraction(10**400), "1e30": 1e30, "-1e7": -1e7,
            "inf": math.inf, "nan": math.nan, "string": "1.0", "bytes": b"1", "list": [1.0],
            "complex": 1j, "float-fails": FloatFails(), "none": None}[response]

def by_extra(response, ground_truth, **extras):  # a record's field decides; the truth adds 1 when it is "1"
    return extras["level"] + (ground_truth == "1")

def always_raises(response, ground_truth, **extras):
    raise KeyError("boom")

NOT_CALLABLE = 3
"""


@pytest.fixture(scope="module")
def bad_rewards_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rewards") / "bad_rewards.py"
    path.write_text(BAD_REWARDS)
    return path


@pytest.fixture(scope="module")
def math_pool():
    with RewardPool("math", num_workers=2, timeout=5.0) as pool:
        yield pool


@pytest.fixture(scope="module")
def bad_pool(bad_rewards_file):
    with RewardPool(f"{bad_rewards_file}:by_response", num_workers=2, timeout=2.0) as pool:
        yield pool


# ----------------------------------------------------------------------------------------------------
# The judged cases in tests/reward_cases.jsonl
# ----------------------------------------------------------------------------------------------------


def test_case_file_is_large_and_covers_both_outcomes():
    assert len(CASES) >= 150
    assert all(set(c) == {"response", "ground_truth", "expected", "category"} for c in CASES)
    by_category = Counter((c["category"], c["expected"]) for c in CASES)
    categories = {c["category"] for c in CASES}
    assert len(categories) >= 20
    # Most categories hold both a correct answer and a near miss, so a judge that always says 1 (or 0) fails.
    both = [cat for cat in categories if by_category[(cat, 0)] and by_category[(cat, 1)]]
    assert len(both) >= 18, sorted(categories - set(both))
    assert sum("<answer>" in c["response"] for c in CASES) >= 50
    assert sum(c["response"].count("\\boxed") >= 2 for c in CASES) >= 5


@pytest.mark.parametrize("case", CASES, ids=[f"{i}-{c['category']}" for i, c in enumerate(CASES)])
def test_judged_case(case):
    assert math_reward(case["response"], case["ground_truth"]) == case["expected"]


def test_judged_cases_through_the_pool_match_in_process(math_pool):
    rewards, counters = math_pool.score([c["response"] for c in CASES], [c["ground_truth"] for c in CASES])
    assert rewards == [float(c["expected"]) for c in CASES]
    assert counters == {"reward/errors": 0, "reward/timeouts": 0, "reward/invalid": 0}


def test_judge_beats_plain_math_verify_on_the_cases():
    judge = sum(math_reward(c["response"], c["ground_truth"]) == c["expected"] for c in CASES)
    base = sum(math_verify_baseline(c["response"], c["ground_truth"]) == c["expected"] for c in CASES)
    assert judge > base


# ----------------------------------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is $\\boxed{5}$.", "5"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\boxed{\\left\\{ x \\mid x > 0 \\right.}", "\\left\\{ x \\mid x > 0 \\right."),  # escaped braces only
        ("first \\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{1} and \\boxed{2}", "2"),  # extract_answer is the last box; math_reward reads the list
        ("so $\\boxed 7$.", "7"),
        ("\\boxed 7.", "7"),
        ("\\fbox{7}", "7"),
        ("\\boxed {7}", "7"),
        ("\\boxed{\\boxed{8}}", "8"),
        ("\\boxed{ x^{2} }", "x^{2}"),
        ("<think>\\boxed{1}</think> <answer>\\boxed{2}</answer>", "2"),
        ("<think>x</think> <answer>\\boxed{3}</answer> trailing \\boxed{4}", "3"),
        ("<answer>\\boxed{1}</answer> <answer>then \\boxed{5}</answer>", "5"),
        ("<think>x</think> <answer>\\boxed{6}", "6"),  # stopped before </answer>
        ("\\boxed{a}\\boxed{b}", "b"),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "no box at all",
        "\\boxed{}",
        "\\boxed{   }",
        "\\boxed{5",
        "\\boxed{5} then \\boxed{6",
        "\\boxed{\\frac{1}{2}",
        "<think>\\boxed{5}</think> <answer>5</answer>",
        "trailing \\boxed",
        "",
        None,
        5,
        ["\\boxed{5}"],
        b"\\boxed{5}",
    ],
)
def test_extract_answer_returns_none_without_a_complete_final_answer(text):
    assert extract_answer(text) is None


def test_adjacent_boxes_form_a_list_but_distant_boxes_do_not():
    assert reward.final_answer("roots $\\boxed{2}$ and $\\boxed{3}$") == "2, 3"
    assert reward.final_answer("$\\boxed{2}$ \\text{ or } $\\boxed{3}$") == "2, 3"
    assert reward.final_answer("first \\boxed{2}. Checking again, the answer is \\boxed{3}") == "3"
    assert reward.final_answer("\\boxed{2}\n\n\\boxed{3}") == "3"
    assert reward.final_answer("\\boxed{3}, \\boxed{3}") == "3"


# ----------------------------------------------------------------------------------------------------
# Bad, huge and pathological input
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response, truth",
    [
        ("", "5"),
        (None, "5"),
        (5, "5"),
        (["\\boxed{5}"], "5"),
        ({"a": 1}, "5"),
        ("\\boxed{5", "5"),
        ("}}}{{{\\boxed{", "5"),
        ("\\boxed{5}", None),
        ("\\boxed{5}", ""),
        ("\\boxed{5}", ["5"]),
        ("\\boxed{\\frac{1}{0}}", "5"),
        ("\\boxed{0^0}", "5"),
        ("\\boxed{\\left(}", "5"),
    ],
)
def test_bad_input_scores_zero(response, truth):
    assert math_reward(response, truth) == 0.0


def test_numeric_ground_truth_and_extras_are_accepted():
    assert math_reward("\\boxed{73}", 73, source="aime", level=5) == 1.0


def test_huge_responses_are_fast():
    start = time.perf_counter()
    assert math_reward("word " * 40_000 + "\\boxed{5}", "5") == 1.0
    assert math_reward("\\boxed{" * 30_000, "5") == 0.0
    assert math_reward("{" * 200_000, "5") == 0.0
    assert math_reward("\\boxed{5}" * 20_000, "5") == 1.0
    assert time.perf_counter() - start < HANG_S


PATHOLOGICAL = [
    "10^{10^{10^{10}}}",
    "9^{9^{9^{9}}}",
    "10^{10^{10}}",
    "2^{10000000}",
    "10^10^10^10",
    "(" * 500 + "1" + ")" * 500,
    "\\frac{" * 300 + "1" + "}{2}" * 300,
    "1000000!",
    "1" * 5000,
    "(1,2)," * 200 + "1",
    "\\sum_{n=1}^{10^{10}} n",
    "\\int_0^1 e^{x^2} dx",
]


@pytest.mark.parametrize("answer", PATHOLOGICAL, ids=range(len(PATHOLOGICAL)))
def test_pathological_answers_score_zero_quickly_in_process(answer):
    start = time.perf_counter()
    assert math_reward(f"So the answer is \\boxed{{{answer}}}.", "5") == 0.0
    assert time.perf_counter() - start < HANG_S


def test_pathological_answers_score_zero_quickly_through_the_pool(math_pool):
    responses = [f"<think>x</think> <answer>\\boxed{{{a}}}</answer>" for a in PATHOLOGICAL]
    responses.append("filler " * 30_000 + "\\boxed{" + "9^{" * 50 + "9" + "}" * 50 + "}")  # 200k characters
    start = time.perf_counter()
    rewards, counters = math_pool.score(responses, ["5"] * len(responses))
    assert rewards == [0.0] * len(responses)
    assert counters["reward/timeouts"] == 0  # refused by the pre-screen, not cut off by the 5 s timeout
    assert time.perf_counter() - start < HANG_S


def test_pre_screen_keeps_ordinary_answers():
    for answer in [
        "2^{2^{10}}",
        "e^{-x^2}",
        "10^{100}",
        "\\frac{\\sqrt{\\frac{1}{2}}}{3}",
        "((a+b)(c+d))",
        "20!",
    ]:
        assert not reward.too_costly(answer), answer
    for answer in ["10^{10^{10}}", "x^{x^{x^{x}}}", "2^3^4", "10^{1000000}", "100000!", "(" * 10 + ")" * 10]:
        assert reward.too_costly(answer), answer


# ----------------------------------------------------------------------------------------------------
# Security: model output is never executed
# ----------------------------------------------------------------------------------------------------


def _injections(marker: Path) -> list[str]:
    cmd = f"touch {marker}"
    return [
        f"__import__('os').system('{cmd}')",
        f"(lambda: __import__('os').system('{cmd}'))()",
        f"().__class__.__bases__[0].__subclasses__()[0]('{cmd}')",
        f"eval(\"__import__('os').system('{cmd}')\")",
        f"exec('import os; os.system(\"{cmd}\")')",
        f"\\text{{__import__('os').system('{cmd}')}}",
        f"1+__import__('os').system('{cmd}')",
        f"{{}}.__class__.__init__.__globals__['os'].system('{cmd}')",
    ]


def test_injected_code_is_never_run(tmp_path, math_pool):
    marker = tmp_path / "pwned_x"
    responses = [f"<think>hi</think> <answer>\\boxed{{{code}}}</answer>" for code in _injections(marker)]
    for response in responses:
        assert math_reward(response, "5") == 0.0
        assert math_verify_baseline(response, "5") == 0.0
    rewards, _ = math_pool.score(responses, ["5"] * len(responses))
    assert rewards == [0.0] * len(responses)
    assert not marker.exists()


def test_case_file_injections_did_not_run():
    for case in CASES:
        math_reward(case["response"], case["ground_truth"])
    assert not Path("/tmp/pwned_reward_case").exists()


# ----------------------------------------------------------------------------------------------------
# Equivalence details worth pinning
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pred, truth, expected",
    [
        ("0.0000671", "0.0000672", False),  # math-verify alone accepts this (6-decimal rounding)
        ("6.72\\times 10^{-5}", "0.0000672", True),
        ("0.3333333", "\\frac{1}{3}", True),
        ("0.3333", "\\frac{1}{3}", False),
        ("52_9", "52_8", False),
        ("52", "52_8", True),
        ("4 \\text{ t}", "4", True),
        ("4 t", "4", False),
        ("2 pi", "2", False),
        ("12 ways", "12", True),
        ("x \\in (3, \\infty)", "(3, \\infty)", True),
        ("\\langle 1, 2 \\rangle", "(1,2)", True),
        ("(B) \\text{ and } (C)", "B", False),
        ("\\text{neither}", "\\text{even}", False),
    ],
)
def test_answers_match(pred, truth, expected):
    assert answers_match(pred, truth) is expected


def test_format_reward():
    good = "reasoning here </think> <answer>So \\boxed{5}</answer>"
    assert format_reward(good) == 1.0
    assert format_reward("<think>" + good) == 1.0
    assert format_reward("reasoning </think> <answer>5</answer>") == 0.0  # no box
    assert format_reward("reasoning <answer>\\boxed{5}</answer>") == 0.0  # no </think>
    assert format_reward("</think> <answer>\\boxed{5}</answer>") == 0.0  # no reasoning
    assert format_reward(good + " extra text") == 0.0
    assert format_reward("a </think> b </think> <answer>\\boxed{5}</answer>") == 0.0
    assert format_reward(None) == 0.0
    start = time.perf_counter()
    assert format_reward("</think><answer></answer>" * 8000) == 0.0  # a tag flood: quadratic would take minutes
    assert time.perf_counter() - start < HANG_S


def test_answer_identical_to_the_truth_skips_the_cost_screen():
    tower = "10^{10^{10}}"
    assert reward.too_costly(tower)
    assert math_reward(f"\\boxed{{{tower}}}", tower) == 1.0
    assert math_reward("\\boxed{10^{10^{11}}}", tower) == 0.0


# ----------------------------------------------------------------------------------------------------
# The pool
# ----------------------------------------------------------------------------------------------------


def test_pool_counts_errors_invalid_values_and_keeps_going(bad_pool):
    responses = ["ab", "raise", "string", "none", "nan", "inf", "abcd"]
    rewards, counters = bad_pool.score(responses, [""] * 7, [{"bonus": 1}] + [{}] * 6)
    assert rewards == [3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 4.0]
    assert counters == {"reward/errors": 1, "reward/timeouts": 0, "reward/invalid": 4}


def test_pool_reuses_workers_across_calls(bad_pool):
    bad_pool.score(["a"], [""])
    pids = bad_pool.worker_pids()
    rewards, _ = bad_pool.score(["pid"] * 8, [""] * 8)
    assert bad_pool.worker_pids() == pids
    assert {int(r) for r in rewards} <= {pid % 1_000_000 for pid in pids}
    rewards, counters = bad_pool.score(["abc"] * 6, [""] * 6)
    assert rewards == [3.0] * 6 and sum(counters.values()) == 0
    assert bad_pool.worker_pids() == pids


def test_pool_soft_deadline_interrupts_without_a_restart(bad_pool):
    bad_pool.score(["a", "a"], ["", ""])
    pids = bad_pool.worker_pids()
    start = time.perf_counter()
    rewards, counters = bad_pool.score(["sleep", "ab"], ["", ""])
    assert rewards == [0.0, 2.0]
    assert counters["reward/timeouts"] == 1
    assert time.perf_counter() - start < 30.0  # the function sleeps 60 s: the deadline cut it short
    assert bad_pool.worker_pids() == pids


def test_pool_kills_and_replaces_a_hung_worker(bad_pool):
    bad_pool.score(["a", "a"], ["", ""])
    pids = bad_pool.worker_pids()
    start = time.perf_counter()
    rewards, counters = bad_pool.score(["hang", "ab", "abc"], [""] * 3)
    assert time.perf_counter() - start < 30.0  # the function sleeps 60 s, deaf to signals: the kill ended it
    assert rewards == [0.0, 2.0, 3.0]
    assert counters == {"reward/errors": 0, "reward/timeouts": 1, "reward/invalid": 0}
    assert len(set(bad_pool.worker_pids()) - set(pids)) == 1  # only the hung worker was replaced
    rewards, counters = bad_pool.score(["abcd"] * 4, [""] * 4)  # and the pool still works
    assert rewards == [4.0] * 4 and sum(counters.values()) == 0


def test_pool_survives_a_worker_crash_and_unpicklable_extras(bad_pool):
    rewards, counters = bad_pool.score(["crash", "ab", "abc"], [""] * 3, [{}, {"f": lambda: 1}, {}])
    assert rewards == [0.0, 0.0, 3.0]
    assert counters["reward/errors"] == 2
    rewards, _ = bad_pool.score(["ab"] * 3, [""] * 3)
    assert rewards == [2.0] * 3


def test_pool_scores_a_function_that_forks_and_one_that_calls_sys_exit(bad_pool):
    """A forked child that returns into the worker is ended there: it answered for the worker and then read
    its next items (wrong rewards, a truncated message, the next call hung). sys.exit is an error of its item:
    it ended the worker, and every item after it."""
    bad_pool.score(["a", "a"], ["", ""])
    pids = bad_pool.worker_pids()
    for _ in range(2):
        rewards, counters = bad_pool.score(["fork", "ab", "fork", "abc", "fork", "a"], [""] * 6)
        assert rewards == [4.0, 2.0, 4.0, 3.0, 4.0, 1.0] and sum(counters.values()) == 0
    start = time.perf_counter()
    rewards, counters = bad_pool.score(["exit", "ab", "exit", "abc"], [""] * 4)
    assert rewards == [0.0, 2.0, 0.0, 3.0] and counters["reward/errors"] == 2
    assert bad_pool.first_failure == "item 0: error, SystemExit"
    assert bad_pool.worker_pids() == pids and time.perf_counter() - start < 10


def test_in_process_pool_counts_and_rate_limits_warnings(bad_rewards_file, caplog):
    pool = RewardPool(f"{bad_rewards_file}:always_raises", num_workers=0)
    with caplog.at_level(logging.WARNING, logger="reward"):
        rewards, counters = pool.score(["x"] * 50, [""] * 50)
    assert rewards == [0.0] * 50 and counters["reward/errors"] == 50
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert 1 <= len(warnings) <= 5
    assert "item 0" in warnings[0] and "KeyError" in warnings[0]


@pytest.mark.parametrize("workers", [0, 2])
def test_extras_reach_the_reward_function(workers, bad_rewards_file):
    """Each item's extras arrive as keyword arguments, in process and in workers; a record field named like
    an argument the call fills (response, ground_truth) is left out instead of failing every call."""
    extras = [{"level": 2}, {"level": 5, "ground_truth": "1", "response": "x"}, {"level": 0.5, "note": "\udfff"}]
    with RewardPool(f"{bad_rewards_file}:by_extra", num_workers=workers, timeout=5.0) as pool:
        rewards, counters = pool.score(["a", "b\ud800", "c"], ["1", "0", "1"], extras)  # any str travels
    assert rewards == [3.0, 5.0, 1.5]
    assert sum(counters.values()) == 0


ODD_VALUES = ["huge-int", "huge-fraction", "1e30", "-1e7", "inf", "nan", "string", "bytes", "list",
              "complex", "float-fails", "none"]


@pytest.mark.parametrize("workers", [0, 2])
def test_absurd_reward_values_are_invalid_and_kill_nothing(workers, bad_rewards_file):
    """Huge ints (float() overflows), 1e30 (squared, inf in float32), non-finite values and non-numbers
    all score 0 and are counted invalid; no exception in the check, no worker replaced."""
    limit = reward.MAX_ABS_REWARD
    good = ["ok:0.5", f"ok:{limit}", f"ok:{-limit}", "true"]
    with RewardPool(f"{bad_rewards_file}:odd_value", num_workers=workers, timeout=5.0) as pool:
        pids = pool.worker_pids()
        rewards, counters = pool.score(ODD_VALUES + good, [""] * (len(ODD_VALUES) + len(good)))
        assert rewards == [0.0] * len(ODD_VALUES) + [0.5, limit, -limit, 1.0]  # a bool is 0 or 1
        assert counters == {"reward/errors": 0, "reward/timeouts": 0, "reward/invalid": len(ODD_VALUES)}
        assert pool.worker_pids() == pids


def test_in_process_pool_with_a_callable():
    pool = RewardPool(lambda response, truth, **extras: "not a number", num_workers=0)
    rewards, counters = pool.score(["a", "b"], ["", ""])
    assert rewards == [0.0, 0.0] and counters["reward/invalid"] == 2
    pool = RewardPool(math_reward, num_workers=0)
    assert pool.score(["\\boxed{5}", "\\boxed{6}"], ["5", "5"])[0] == [1.0, 0.0]


def test_pool_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_workers"):
        RewardPool("math", num_workers=-1)
    with pytest.raises(ValueError, match="timeout"):
        RewardPool("math", timeout=0)
    with pytest.raises(ValueError, match="cannot be sent"):
        RewardPool(lambda r, t: 1.0, num_workers=1)
    with pytest.raises(ValueError, match="no_such_module"):
        RewardPool("no_such_module:f", num_workers=1)
    pool = RewardPool("math", num_workers=0)
    with pytest.raises(ValueError, match="lengths must match"):
        pool.score(["a", "b"], ["a"])


def test_close_is_idempotent_and_stops_workers():
    pool = RewardPool("math", num_workers=1, timeout=5.0)
    assert pool.score(["\\boxed{2}"], ["2"])[0] == [1.0]
    pids = pool.worker_pids()
    with pool:
        pass
    pool.close()
    for pid in pids:  # ended and reaped: the pid names no process of ours any more
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
    with pytest.raises(RuntimeError, match="closed"):
        pool.score(["\\boxed{2}"], ["2"])


def test_interpreter_exit_without_close_does_not_hang(bad_rewards_file, tmp_path):
    script = tmp_path / "leave_pool_open.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys, threading, time
            sys.path.insert(0, {str(REPO)!r})
            import reward
            if __name__ == "__main__":
                pool = reward.RewardPool({f"{bad_rewards_file}:by_response"!r}, num_workers=2, timeout=120.0)
                print(pool.score(["ab", "abc"], ["", ""])[0], flush=True)
                threading.Thread(target=pool.score, args=(["hang"], [""]), daemon=True).start()
                time.sleep(1)  # a worker is busy with an item that hangs when the interpreter exits
            """
        )
    )
    start = time.perf_counter()
    out = run_script(script, cwd=None, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "[2.0, 3.0]" in out.stdout
    assert time.perf_counter() - start < HANG_S  # the hung item sleeps 60 s: exit did not wait for it


# ----------------------------------------------------------------------------------------------------
# Loading reward functions
# ----------------------------------------------------------------------------------------------------


def test_load_reward_fn(bad_rewards_file):
    assert load_reward_fn("math") is math_reward
    assert load_reward_fn("reward:math_reward") is math_reward
    fn = load_reward_fn(f"{bad_rewards_file}:by_response")
    assert fn("abc", "", bonus=2) == 5.0


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no/such/file.py:f", "not found"),
        ("reward:no_such_function", "no attribute 'no_such_function'"),
        ("no_such_module_xyz:f", "cannot import module"),
        ("reward", "expected"),
        ("reward:", "expected"),
        (":f", "expected"),
        ("BAD_FILE:NOT_CALLABLE", "not a function"),
        ("BAD_FILE:missing", "no attribute"),
    ],
)
def test_load_reward_fn_errors_name_the_spec(spec, message, bad_rewards_file):
    spec = spec.replace("BAD_FILE", str(bad_rewards_file))
    with pytest.raises(ValueError) as info:
        load_reward_fn(spec)
    text = str(info.value)
    assert repr(spec) in text and message in text and "\n" not in text


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return run_script(REPO / "reward.py", *args, timeout=120)


def test_cli_scores_a_file_with_baseline(tmp_path):
    records = [
        {"response": "<think>3*4</think> <answer>\\boxed{12}</answer>", "ground_truth": "12", "expected": 1},
        {"response": "so \\boxed{4t}", "ground_truth": "4", "expected": 0, "source": "x"},
        {"response": "so \\boxed{1e3}", "ground_truth": "1000", "expected": 1},
        {"response": "no box", "ground_truth": "7", "expected": 0},
    ]
    path = tmp_path / "cases.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    out = _run_cli(str(path), "--reward-workers", "1", "--reward-timeout", "5", "--baseline")
    assert out.returncode == 0, out.stderr
    assert "accuracy: 0.500 (2/4)" in out.stdout
    agreement = next(line for line in out.stdout.splitlines() if line.startswith("agreement"))
    assert "1.000 (4/4)" in agreement and "0.500 (2/4)" in agreement  # judge vs math-verify baseline
    assert "slowest item" in out.stdout
    zero_lines = out.stdout.split("items scoring 0")[1].splitlines()
    assert any(line.split("|")[0].strip() == "1" and "4t" in line for line in zero_lines)
    assert any(line.split("|")[0].strip() == "3" and "None" in line for line in zero_lines)


def test_cli_compare_prints_every_disagreement_with_math_verify(tmp_path):
    records = [
        {"response": "\\boxed{5}", "ground_truth": "5"},                        # both 1
        {"response": "\\boxed{0.0000671}", "ground_truth": "0.0000672"},        # math-verify rounds to 6 places
        {"response": "\\boxed{0.\\overline{3}}", "ground_truth": "\\frac13"},   # math-verify misses the bar
        {"response": "no box", "ground_truth": "5"},                              # both 0
    ]
    path = tmp_path / "audit.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    out = _run_cli(str(path), "--reward-workers", "0", "--compare")
    assert out.returncode == 0, out.stderr
    assert ("judge vs math-verify on 4 records: both 1: 1, both 0: 1, judge only: 1, math-verify only: 1; "
            "disagreement 0.500") in out.stdout
    table = out.stdout.split("disagreements (index | judge | math-verify")[1].splitlines()[1:]
    rows = [[cell.strip() for cell in line.split("|")] for line in table if line.startswith("  ")]
    assert [r[:3] for r in rows] == [["1", "0", "1"], ["2", "1", "0"]]
    assert rows[0][3] == "0.0000671" and rows[1][4] == "\\frac13"


def test_control_rewards():
    import random

    # random: 1 with probability p, whatever the response; 20,000 draws are within 4 sd (0.013) of p
    rng = random.Random(0)
    draws = [reward.random_reward("\\boxed{5}", "5", p=0.3, rng=rng) for _ in range(20_000)]
    assert set(draws) == {0.0, 1.0} and abs(sum(draws) / len(draws) - 0.3) < 0.013
    again = [reward.random_reward("\\boxed{5}", "5", p=0.3, rng=random.Random(0)) for _ in range(1)]
    assert again == draws[:1]  # seeded: the same draws
    assert {reward.random_reward("x", "5", p=1.0), reward.random_reward("x", "5", p=0.0)} == {1.0, 0.0}
    # format: any complete final box scores 1, right or wrong; none scores 0
    fmt = reward.boxed_format_reward
    assert fmt("so \\boxed{7}", "5") == fmt("<answer>\\boxed{5}</answer>", "5") == 1.0
    assert fmt("the answer is 5", "5") == fmt("\\boxed{5", "5") == fmt("\\boxed{}", "5") == 0.0
    assert reward.control_reward("random") == ("random", 0.5) and reward.control_reward("random:0.2") == ("random", 0.2)
    assert reward.control_reward("format") == ("format", 1.0) and reward.control_reward("math") is None
    assert load_reward_fn("format") is fmt and load_reward_fn("random:1")("x", "y") == 1.0
    for bad in ("random:2", "random:x", "random:nan"):
        with pytest.raises(ValueError, match="probability P in"):
            load_reward_fn(bad)
        assert len(reward.reward_problems(bad)) == 1
    assert reward.reward_problems("random:0.1") == reward.reward_problems("format") == []


def test_cli_scores_a_truncated_record_0_unless_asked(tmp_path):
    """As in training: a record marked truncated scores 0, and --score-truncated scores it anyway."""
    path = tmp_path / "cases.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"response": "\\boxed{12}", "ground_truth": "12", "truncated": True},
        {"response": "\\boxed{7}", "ground_truth": "7", "truncated": False}]) + "\n")
    out = _run_cli(str(path), "--reward-workers", "0")
    assert out.returncode == 0, out.stderr
    assert "accuracy: 0.500 (1/2)" in out.stdout
    out = _run_cli(str(path), "--reward-workers", "0", "--score-truncated")
    assert "accuracy: 1.000 (2/2)" in out.stdout, out.stdout


def test_cli_reports_bad_input_with_exit_code_2(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"response": "\\\\boxed{1}", "ground_truth": "1"}\n{"response": oops}\n')
    out = _run_cli(str(bad), "--reward-workers", "0")
    assert out.returncode == 2 and f"{bad}:2:" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    missing = tmp_path / "missing.jsonl"
    out = _run_cli(str(missing))
    assert out.returncode == 2 and str(missing) in out.stderr
    no_truth = tmp_path / "no_truth.jsonl"
    no_truth.write_text('{"response": "x"}\n')
    out = _run_cli(str(no_truth))
    assert out.returncode == 2 and f"{no_truth}:1:" in out.stderr
    good = tmp_path / "good.jsonl"
    good.write_text('{"response": "\\\\boxed{1}", "ground_truth": "1"}\n')
    out = _run_cli(str(good), "--reward", "nowhere.py:f")
    assert out.returncode == 2 and "nowhere.py:f" in out.stderr


# ----------------------------------------------------------------------------------------------------
# Deciding a response's reward (decide_rewards) and the reward audit
# ----------------------------------------------------------------------------------------------------


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
    rewards, _, _ = decide_rewards(verdicts, texts, ["5"] * n, truncated=[False] * n, lengths=[48] * n,
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
    rule, outcomes, stats = decide_rewards(verdicts, texts, ["5"] * 4, rules=RewardRules(), **facts)
    assert outcomes == rule
    assert rule == [1.0, 0.0, 0.0, 0.0] and "train/correct" not in stats
    fmt, _, stats = decide_rewards(verdicts, texts, ["5"] * 4, rules=RewardRules(reward="format"), **facts)
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
    audited, skipped, rows = audit_verdicts(texts, answers, verdicts, list(range(5)), 3, [False] * 5)
    # a power tower is too costly to hand to math-verify in the trainer, also where only math-verify reads
    # it (the last box of the text, outside the answer): not audited, and counted
    assert (audited, skipped, len(rows)) == (3, 2, 2)
    assert [(r["step"], r["ground_truth"], r["reward"], r["math_verify"]) for r in rows] == [
        (3, "0.0000672", 0.0, 1.0), (3, "\\frac13", 1.0, 0.0)]
    assert audit_verdicts(texts, answers, verdicts, [1], 3, [False] * 5)[:2] == (1, 0)  # only the picked ones
    start = time.perf_counter()  # a 100 KB ground truth: math-verify took 30 s over a step's 8 responses
    assert audit_verdicts(["\\boxed{1}"] * 8, ["1+" * 50_000 + "1"] * 8, [0.0] * 8, list(range(8)), 3,
                          [False] * 8) == (0, 8, [])
    assert time.perf_counter() - start < 1


# ----------------------------------------------------------------------------------------------------
# DAPO's overlong penalty
# ----------------------------------------------------------------------------------------------------


def test_overlong_penalty_hand_computed():
    """DAPO eq. 13 with a budget of 100 tokens, a buffer of 20 and factor 0.5: nothing up to 80 tokens, then
    linear to -0.5 at 100 (truncated)."""
    lengths = [10, 80, 81, 90, 99, 100]
    expected = [0.0, 0.0, -0.025, -0.25, -0.475, -0.5]
    assert [overlong_penalty(n, 100, 20, 0.5) for n in lengths] == pytest.approx(expected, abs=1e-12)
    assert [overlong_penalty(n, 100, 100) for n in lengths] == pytest.approx([-n / 100 for n in lengths])  # all


# ----------------------------------------------------------------------------------------------------
# The repetition check
# ----------------------------------------------------------------------------------------------------


NORMAL = " 12 + 7 = 19 </think> <answer> \\boxed{19} </answer>"
COUNTING = " 1, 2, 3, 4, 5, 6"
PARAGRAPH = ("Let me reconsider the problem. We have x + y = 10 and x - y = 2, so adding gives 2x = 12 and x = 6. "
             "Then y = 4, and x y = 24. Checking: 6 + 4 = 10 and 6 - 4 = 2. ")
SOLUTION = (
    "We need the number of positive integers n below 100 such that n^2 + 3n + 2 is divisible by 6. Note that "
    "n^2 + 3n + 2 = (n+1)(n+2), a product of two consecutive integers, so it is always even. So we need "
    "(n+1)(n+2) to be divisible by 3, which happens when n is not a multiple of 3. Check: n = 1 gives 2 * 3 = 6, "
    "divisible; n = 3 gives 4 * 5 = 20, not divisible. Among 1, ..., 99 there are 33 multiples of 3, so the "
    "count is 99 - 33 = 66. </think> <answer> \\boxed{66} </answer>")


def word_ids(texts: list[str]) -> list[list[int]]:
    """A word-level 'tokenizer' shared by the texts: each distinct whitespace-separated word is one id."""
    vocab: dict[str, int] = {}
    return [[vocab.setdefault(w, len(vocab)) for w in t.split()] for t in texts]


def flags_of(texts: list[str], with_texts: bool = True) -> list[bool]:
    return repetition_flags(word_ids(texts), texts=texts if with_texts else None).tolist()


def test_normal_answers_pass():
    texts = [NORMAL, COUNTING, " " + ", ".join(str(i) for i in range(1, 150)), SOLUTION,
             " 1000000 + 2000000 = 3000000 </think> <answer> \\boxed{3000000} </answer>", ""]
    assert flags_of(texts) == [False] * len(texts)
    assert all(compression_ratio(t) > 0.4 for t in texts[2:4])  # ordinary text compresses to ~0.4-0.6


def test_loops_are_flagged():
    texts = [" the" * 30,                 # one-token span, 30 copies
             " = 5" * 10,                 # two-token span
             SOLUTION[:200] + " = 5" * 8,  # a loop at the end of a normal start
             PARAGRAPH * 6]               # cycling paragraphs: longer than max_span words, caught by compression
    assert flags_of(texts) == [True, True, True, True]
    # Without the texts only the tail test runs: the paragraph (40 words) loops 6 times, within max_span.
    assert flags_of(texts, with_texts=False) == [True, True, True, True]
    assert flags_of([PARAGRAPH * 6], with_texts=False) == [True]
    assert repetition_flags(word_ids([PARAGRAPH * 6]), max_span=16).tolist() == [False]  # span too long
    assert repetition_flags(word_ids([PARAGRAPH * 6]), texts=[PARAGRAPH * 6], max_span=16).tolist() == [True]


def test_thresholds_both_ways():
    # A one-token span needs min_loop_tokens (16) copies; a 2-token span needs 4 copies covering 16 tokens.
    assert flags_of([" the" * 15, " the" * 16]) == [False, True]
    assert flags_of([" = 5" * 7, " = 5" * 8]) == [False, True]
    # A longer span needs min_repeats (4) copies.
    unit = " a b c d e f g h i j"
    assert flags_of([unit * 3, unit * 4]) == [False, True]
    # Compression: a 160-character paragraph 4 times is 0.20 (kept), 5 times 0.17 (flagged); too short: kept.
    loose = repetition_flags(word_ids([PARAGRAPH * 4, PARAGRAPH * 5]), texts=[PARAGRAPH * 4, PARAGRAPH * 5],
                             max_span=16)
    assert loose.tolist() == [False, True]
    assert repetition_flags([[1]], texts=["ab" * 100]).tolist() == [False]  # 200 chars < min_chars
    assert repetition_flags([[1]], texts=["ab" * 150]).tolist() == [True]


def test_cut_off_copy_and_stop_after_loop():
    loop = word_ids([" x = 5 ;" * 6])[0]
    assert tail_loop_flags([loop[:-2]]).tolist() == [True]  # truncated inside the last copy
    # A loop that then stopped: the tail ends with the stop, so only the compression test can see it.
    text = " = 5" * 100 + " </answer>"
    ids = word_ids([text])
    assert tail_loop_flags(ids).tolist() == [False]
    assert repetition_flags(ids, texts=[text]).tolist() == [True]


def test_tensor_with_lengths_matches_lists():
    texts = [NORMAL, " the" * 30, " = 5" * 10, COUNTING]
    rows = word_ids(texts)
    width = max(len(r) for r in rows) + 5
    # Padding after each length is a run of one token: it must not count as a loop.
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    lengths = torch.tensor([len(r) for r in rows])
    from_tensor = repetition_flags(ids, lengths, texts=texts)
    assert from_tensor.tolist() == repetition_flags(rows, texts=texts).tolist() == [False, True, True, False]
    assert from_tensor.dtype == torch.bool and from_tensor.shape == (4,)
    # A list with lengths cuts each row; an empty batch is fine.
    assert repetition_flags([r + [0] * 20 for r in rows], lengths.tolist()).tolist() == [False, True, True, False]
    assert repetition_flags([]).tolist() == []
    assert repetition_rate([]) == 0.0
    with pytest.raises(ValueError, match="texts"):
        repetition_flags(rows, texts=texts[:2])


def test_rate_and_guard():
    texts = [NORMAL, " the" * 30, " = 5" * 10, COUNTING]
    assert repetition_rate(word_ids(texts), texts=texts) == 0.5
    flags = repetition_flags(word_ids(texts), texts=texts)
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0])
    assert zero_degenerate(rewards, flags).tolist() == [1.0, 0.0, 0.0, 1.0]
    assert rewards.tolist() == [1.0, 1.0, 0.0, 1.0]  # not modified in place
    assert zero_degenerate([1.0, 1.0, 0.5, 1.0], flags.tolist()) == [1.0, 0.0, 0.0, 1.0]


def test_with_the_tiny_tokenizer(tiny_base):
    """Token ids as a model samples them: a loop repeats the same ids (retokenised text may not)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    texts = [NORMAL, COUNTING, " = 5" * 10, " the" * 30]
    ids = [tok(NORMAL)["input_ids"], tok(COUNTING)["input_ids"], tok(" = 5")["input_ids"] * 10,
           tok(" the")["input_ids"] * 30]
    assert repetition_flags(ids, texts=texts).tolist() == [False, False, True, True]


def test_cheap_for_a_large_batch():
    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (512, 4096))
    ids[:8, -200:] = torch.tensor([7, 8, 9, 10]).repeat(50)  # 8 looping rows
    start = time.perf_counter()
    flags = repetition_flags(ids, torch.full((512,), 4096))
    assert flags.sum().item() == 8 and flags[:8].all()
    assert time.perf_counter() - start < 60  # ~0.2 s here; a hang, not slowness (benchmark.py times speed)


# --------------------------------------------------------------------------------------------------
# decide_reward: the rules after the judge, in their order
# --------------------------------------------------------------------------------------------------

WELL_FORMED = "12 + 7 = 19 </think> <answer> \\boxed{19} </answer>"  # format_reward 1.0


@pytest.mark.parametrize("verdict,truncated,repetitive,length,rules,expected", [
    (1.0, False, False, 10, {}, 1.0),
    (1.0, True, False, 10, {}, 0.0),  # ORZ: a truncated response scores 0
    (1.0, True, False, 10, {"score_truncated": True}, 1.0),
    (1.0, False, False, 10, {"format_reward_weight": 0.5}, 1.5),  # format after the rule
    (0.0, True, False, 10, {"format_reward_weight": 0.5}, 0.0),  # ... but not for a truncated one
    (1.0, False, True, 10, {"format_reward_weight": 0.5}, 1.5),  # repetition logged, off by default
    (1.0, False, True, 10, {"format_reward_weight": 0.5, "zero_repetitive": True}, 0.0),  # loses rule + format
    # overlong shaping last, on every response: budget 100, buffer 20, length 90 -> -0.5 x 2
    (1.0, False, False, 90, {"overlong_buffer": 20, "overlong_penalty": 2.0, "max_new_tokens": 100}, 0.0),
    (1.0, False, True, 90, {"overlong_buffer": 20, "overlong_penalty": 2.0, "max_new_tokens": 100,
                            "zero_repetitive": True}, -1.0),
    (1.0, True, False, 100, {"overlong_buffer": 20, "max_new_tokens": 100}, -1.0),
    (1.0, False, False, 10, {"reward": "format"}, 1.0),  # a control in the judge's place
    (0.0, False, False, 10, {"reward": "format"}, 1.0),
    (0.0, True, False, 10, {"reward": "format"}, 0.0),  # and the truncation rule after it
])
def test_decide_reward_applies_the_rules_in_order(verdict, truncated, repetitive, length, rules, expected):
    from reward import RewardRules, decide_reward

    got = decide_reward(verdict, WELL_FORMED, "19", truncated=truncated, length=length, repetitive=repetitive,
                        rules=RewardRules(**rules))
    assert got == pytest.approx(expected, abs=1e-12)


def test_reward_rules_of_a_run_skip_a_function_given_as_the_reward():
    from types import SimpleNamespace

    from reward import RewardRules

    args = SimpleNamespace(reward=lambda response, ground_truth: 1.0, score_truncated=True, format_reward_weight=0.2,
                           zero_repetitive=False, overlong_buffer=4, overlong_penalty=0.5, max_new_tokens=32)
    rules = RewardRules.of(args)
    assert rules == RewardRules(reward="math", score_truncated=True, format_reward_weight=0.2, overlong_buffer=4,
                                overlong_penalty=0.5, max_new_tokens=32)


def test_the_outcome_is_the_rule_before_the_shaping_so_a_group_all_wrong_has_no_signal():
    """DAPO keeps a group when 0 < accuracy < 1: four wrong answers of different lengths inside the overlong
    buffer get different rewards, but the same outcome, so dynamic sampling sees no signal in them."""
    from algos import equal_reward_groups
    from reward import RewardRules, decide_rewards

    rules = RewardRules(overlong_buffer=10, max_new_tokens=20, format_reward_weight=0.5)
    texts = ["\\boxed{4} </think> <answer> \\boxed{4} </answer>", "\\boxed{3}", "\\boxed{2}", "no box"]
    rewards, outcomes, _ = decide_rewards([0.0] * 4, texts, ["5"] * 4, truncated=[False] * 4, lengths=[12, 14, 16, 18],
                                          repetitive=[False] * 4, rules=rules)
    assert rewards == pytest.approx([0.5 - 0.2, -0.4, -0.6, -0.8]) and outcomes == [0.0] * 4
    groups = torch.zeros(4, dtype=torch.long)
    assert not equal_reward_groups(torch.tensor(rewards), groups).any()  # what the signal read before
    assert equal_reward_groups(torch.tensor(outcomes), groups).all()
