"""End to end: a run killed at a random instant (SIGKILL, also in the middle of a checkpoint write) and started
again with the same command ends exactly where an uninterrupted run ends: the same metrics.jsonl values (timings
aside) and the same final parameters. Also SIGTERM, NaN losses, damaged checkpoints and a full disk.
"""

import json
import os
import random
import resource
import signal
import subprocess
import time

import pytest
from conftest import run_script, start_script
from safetensors.torch import load_file

STEPS = 5
COMMON = ["--max-steps", str(STEPS), "--save-every", "1", "--keep-checkpoints", "2", "--prompts-per-step", "4",
          "--num-generations", "4", "--max-new-tokens", "24", "--eval-every", "3", "--eval-limit", "8",
          "--eval-num-samples", "2", "--reward-workers", "0", "--samples-per-step", "4", "--seed", "5"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def command(out, advantage: str) -> list[str]:
    return ["train_ppo.py", "--output-dir", str(out), "--advantage", advantage, *COMMON]


def run(out, advantage: str, *args: str, **extra) -> subprocess.CompletedProcess:
    """The run with `args` added to COMMON (later flags win) and `extra` in its environment."""
    return run_script(*command(out, advantage), *args, env={**ONE_THREAD, **extra}, timeout=600)


def metric_lines(out) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def killed_run(out, advantage: str, when: str, rng: random.Random) -> str:
    """Start a run and SIGKILL it: after a random number of finished steps plus a random delay, or as
    soon as a checkpoint is being written. Returns a description of the kill point."""
    proc = start_script(*command(out, advantage), env=ONE_THREAD, stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)
    target, delay = rng.randint(1, STEPS - 2), rng.uniform(0.0, 1.0)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if (when == "checkpoint-write" and len(metric_lines(out)) >= target
                    and list((out / "checkpoints").glob(".tmp-*"))):
                break
            if when == "random" and len(metric_lines(out)) >= target:
                time.sleep(delay)
                break
            time.sleep(0.005)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    if when == "checkpoint-write":
        return f"during the checkpoint write after {len(metric_lines(out))} logged steps"
    return f"after {target} logged steps + {delay:.2f} s"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_base):
    """Uninterrupted runs of both estimators."""
    out = {}
    for advantage in ("grpo", "gae"):
        path = tmp_path_factory.mktemp(f"reference-{advantage}")
        result = run(path, advantage)
        assert result.returncode == 0, result.stderr[-3000:]
        out[advantage] = path
    return out


def assert_same_run(resumed, reference, advantage: str) -> None:
    assert comparable(metric_lines(resumed)) == comparable(metric_lines(reference))
    parts = ["policy/model.safetensors"] + (["critic/value_head.safetensors"] if advantage == "gae" else [])
    for part in parts:
        a, b = load_file(resumed / part), load_file(reference / part)
        assert all((a[k] == b[k]).all() for k in a), part


def check_kill_and_resume(tmp_path, reference, advantage: str, when: str, seed: int) -> None:
    out = tmp_path / f"{advantage}-{when}-{seed}"
    point = killed_run(out, advantage, when, random.Random(seed))
    had_checkpoint = bool(list((out / "checkpoints").glob("step-*")))
    finished = (out / "summary.json").exists()  # killed after its last write, while exiting
    result = run(out, advantage)  # the same command: resumes on its own, or says the run is done
    if finished:
        assert result.returncode == 0 and "nothing to do" in result.stdout, (point, result.stderr[-3000:])
    else:
        assert result.returncode == 0, (point, result.stderr[-3000:])
        assert ("resuming from" in result.stdout) == had_checkpoint
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert len(list((out / "checkpoints").glob("step-*"))) <= 2  # --keep-checkpoints
    assert_same_run(out, reference[advantage], advantage)
    print(f"{advantage}: killed {point}: resumed run matches exactly")


@pytest.mark.parametrize("advantage,when", [("grpo", "random"),
                                            pytest.param("gae", "checkpoint-write", marks=pytest.mark.slow)])
def test_sigkill_then_resume_matches_an_uninterrupted_run(advantage, when, tmp_path, reference):
    check_kill_and_resume(tmp_path, reference, advantage, when, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("advantage", ["grpo", "gae"])
@pytest.mark.parametrize("when", ["random", "checkpoint-write"])
def test_many_kill_points(advantage, when, tmp_path, reference):
    for seed in range(1, 5):
        check_kill_and_resume(tmp_path, reference, advantage, when, seed)


@pytest.mark.slow  # the process group's SIGTERM below covers this path too, with reward workers
def test_sigterm_checkpoints_and_exits_then_resumes(tmp_path, reference):
    out = tmp_path / "term"
    proc = start_script(*command(out, "grpo"), env=ONE_THREAD, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        text=True)
    while len(metric_lines(out)) < 1 and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "stopped by signal" in stderr and "run the same command again to resume" in stderr
    stopped_at = len(metric_lines(out))
    assert stopped_at < STEPS
    assert (out / "checkpoints" / f"step-{stopped_at:06d}" / "trainer_state.json").exists()
    result = run(out, "grpo")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(out, reference["grpo"], "grpo")


SLOW_REWARD = """
import os, time
from pathlib import Path

def score(response, ground_truth, **extras):
    Path(os.environ["REWARD_MARKER"]).touch()  # the reward phase has begun
    time.sleep(0.1)
    return float(len(response) % 2)
"""


def test_sigterm_to_the_process_group_in_the_reward_phase_then_resume_matches(tmp_path, tiny_base):
    """As `timeout`, `kill -TERM -PGID` and Slurm deliver it: to the reward workers too. They leave the signal
    to the trainer, which finishes the step with their rewards (they used to die, scoring that step's items
    0 into its checkpoint), saves and stops; the same command then ends as an uninterrupted run does."""
    (tmp_path / "slow.py").write_text(SLOW_REWARD)
    marker = tmp_path / "scoring"
    args = ("--reward", f"{tmp_path / 'slow.py'}:score", "--reward-workers", "2", "--max-steps", "3",
            "--eval-every", "0")
    env = {**ONE_THREAD, "REWARD_MARKER": str(marker)}
    assert run(tmp_path / "reference", "grpo", *args, **{"REWARD_MARKER": str(marker)}).returncode == 0
    out = tmp_path / "term"
    proc = start_script(*command(out, "grpo"), *args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        text=True, start_new_session=True)
    try:
        while len(metric_lines(out)) < 1 and proc.poll() is None:
            time.sleep(0.01)
        marker.unlink()
        while not marker.exists() and proc.poll() is None:  # step 1's rewards are being scored
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGTERM)
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1 and "stopped by signal 15 after step 1" in stderr, stderr[-3000:]
    rows = metric_lines(out)
    assert len(rows) == 2 and sum(r["reward/errors"] for r in rows) == 0, rows
    result = run(out, "grpo", *args, **{"REWARD_MARKER": str(marker)})
    assert result.returncode == 0 and "resuming from" in result.stdout, result.stderr[-3000:]
    assert_same_run(out, tmp_path / "reference", "grpo")


def test_log_rows_lost_after_a_stop_are_named_on_resume(tmp_path, tiny_base):
    """metrics.jsonl is synced before each checkpoint; cut mid-row or removed after the run stopped, the resumed
    run says which steps' rows are gone."""
    out = tmp_path / "cut"
    assert run(out, "grpo", "--max-steps", "3").returncode == 0
    text = (out / "metrics.jsonl").read_text()
    cut = text.index("\n") + 1 + text.splitlines()[1].index(",")  # in the middle of step 1's row
    (out / "metrics.jsonl").write_text(text[:cut])
    result = run(out, "grpo", "--max-steps", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "lacks the rows of 2 of the 3 steps before the checkpoint (steps 1-2)" in result.stdout, result.stdout
    assert [r["step"] for r in metric_lines(out)] == [0, 3, 4]  # the row of 3 evaluates; 4 is the final one


def test_nan_updates_are_skipped_and_counted(tmp_path):
    result = run(tmp_path, "grpo", REASONER_ZERO_NAN_STEPS="1")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metric_lines(tmp_path)
    assert [r["train/nonfinite_updates"] for r in rows if "train/nonfinite_updates" in r] == [0, 1, 0, 0, 0]
    policy = load_file(tmp_path / "policy" / "model.safetensors")
    assert all(v.isfinite().all() for v in policy.values())


def checkpoint_steps(out) -> list[int]:
    return sorted(int(p.name.removeprefix("step-")) for p in (out / "checkpoints").glob("step-*"))


@pytest.mark.parametrize("nan_steps,saved_before", [("1,2,3", 1), ("0,1,2", None)])
def test_nan_updates_in_a_row_stop_without_saving_and_name_the_last_checkpoint(nan_steps, saved_before,
                                                                                tmp_path):
    result = run(tmp_path, "grpo", REASONER_ZERO_NAN_STEPS=nan_steps)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    stop = int(nan_steps.split(",")[-1])
    assert last.startswith(f"error: step {stop}: 3 updates in a row had a NaN"), last
    if saved_before is None:
        assert "no checkpoint was saved before" in last and not checkpoint_steps(tmp_path), last
    else:
        assert checkpoint_steps(tmp_path) == [saved_before]  # none written during the failures
        assert f"step-{saved_before:06d}" in last, last
        state = load_file(tmp_path / "checkpoints" / f"step-{saved_before:06d}" / "model.safetensors")
        assert all(v.isfinite().all() for v in state.values())


def test_a_destroying_learning_rate_saves_nothing_after_the_failures_began(tmp_path):
    """--lr 1e6: the first update is finite but wrecks the weights, every later one is NaN. The stop must
    not save that state again, and must name the last checkpoint written before the failures."""
    result = run(tmp_path, "grpo", "--lr", "1e6")
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    rows = metric_lines(tmp_path)
    failing = [r["train/nonfinite_updates"] > 0 for r in rows]
    assert failing[-3:] == [True, True, True], failing
    first = len(failing) - failing[::-1].index(False)  # the streak's first step (0 if every step failed)
    assert last.startswith(f"error: step {rows[-1]['step']}: "), last
    assert max(checkpoint_steps(tmp_path), default=0) <= first  # nothing saved once the streak began
    if checkpoint_steps(tmp_path):
        assert f"step-{max(checkpoint_steps(tmp_path)):06d}" in last, last


def save_state_of(path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


DAMAGE = {
    "truncated-weights": lambda ckpt: os.truncate(ckpt / "model.safetensors",
                                                  (ckpt / "model.safetensors").stat().st_size // 2),
    "missing-state": lambda ckpt: (ckpt / "trainer_state.json").unlink(),
    "garbled-state": lambda ckpt: (ckpt / "trainer_state.json").write_text('{"step": 3, "sched'),
    "stray-file": lambda ckpt: (ckpt / "model_9.safetensors").write_bytes(b"not the run's"),
}


@pytest.mark.parametrize("damage", ["none", pytest.param("truncated-weights", marks=pytest.mark.slow),
                                    pytest.param("missing-state", marks=pytest.mark.slow),
                                    pytest.param("garbled-state", marks=pytest.mark.slow),
                                    pytest.param("stray-file", marks=pytest.mark.slow)])
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(damage, tmp_path, reference):
    """A finished 3-step run, continued to 5 steps (its newest checkpoint damaged or not), ends exactly where
    an uninterrupted 5-step run ends; a damaged checkpoint is skipped with one line saying why."""
    out = tmp_path / damage
    result = run(out, "grpo", "--max-steps", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    if damage != "none":
        DAMAGE[damage](out / "checkpoints" / "step-000003")
    result = run(out, "grpo")
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = [line for line in result.stdout.splitlines() if "resuming from" in line]
    assert len(resumed) == 1 and ("step-000003" if damage == "none" else "step-000002") in resumed[0], resumed
    skipped = [line for line in (result.stdout + result.stderr).splitlines() if "skipped checkpoint" in line]
    assert len(skipped) == (damage != "none"), skipped
    if skipped:
        assert "step-000003" in skipped[0], skipped
    assert_same_run(out, reference["grpo"], "grpo")
    assert checkpoint_steps(out) == [4, 5]


@pytest.mark.parametrize("fails", ["weights", pytest.param("optimizer", marks=pytest.mark.slow)])
def test_a_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_last_good_one(fails, tmp_path, reference):
    """A real write failure: the run continues under a file-size limit (RLIMIT_FSIZE, so a write past it
    fails with EFBIG as on a full disk) that the checkpoint's weights or its optimizer state exceed."""
    out = tmp_path / fails
    assert run(out, "grpo", "--max-steps", "2").returncode == 0
    good = save_state_of(out / "checkpoints")
    sizes = {p.name: p.stat().st_size for p in (out / "checkpoints" / "step-000002").iterdir()}
    limit = sizes["model.safetensors"] // 2 if fails == "weights" else sizes["optimizer.bin"] - 1
    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    result = run_script(*command(out, "grpo"), "--max-steps", "4", env=ONE_THREAD, timeout=600,
                        preexec_fn=limit_file_size)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "step-000003" in last and "step-000002" in last, last
    assert not list((out / "checkpoints").glob(".tmp-*")), "the partial checkpoint was left behind"
    assert save_state_of(out / "checkpoints") == good, "the last good checkpoints changed"
    result = run(out, "grpo")  # with space again, the same command resumes from the last good checkpoint
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step-000002" in result.stdout
    assert_same_run(out, reference["grpo"], "grpo")


def test_nan_updates_of_the_critic_are_counted_too(tmp_path):
    """Step 1's losses are NaN for both roles: 2 critic and 1 policy optimizer steps are skipped and all
    three are counted (the policy's count must not replace the critic's)."""
    result = run(tmp_path, "gae", REASONER_ZERO_NAN_STEPS="1")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metric_lines(tmp_path)
    assert [r["train/nonfinite_updates"] for r in rows if "train/nonfinite_updates" in r] == [0, 3, 0, 0, 0]
