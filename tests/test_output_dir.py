"""End to end: output directories, one run per directory. `--overwrite` starts clean, a resume needs the same
training arguments, a finished or foreign run is never reused or wiped silently, and two runs cannot share a
directory at once. Every refusal is one line and changes nothing in the directory.
"""

import json
import signal
import subprocess
import time

from conftest import run_script, start_script

SMALL = ["--max-steps", "2", "--prompts-per-step", "4", "--num-generations", "4", "--max-new-tokens", "16",
         "--eval-every", "0", "--reward-workers", "0", "--save-every", "1", "--seed", "3"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def command(out, *args: str, script: str = "train_ppo.py") -> list[str]:
    return [script, "--output-dir", str(out), *SMALL, *args]  # later flags win


def run(out, *args: str, script: str = "train_ppo.py") -> subprocess.CompletedProcess:
    return run_script(*command(out, *args, script=script), env=ONE_THREAD, timeout=600)


def steps(out) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def snapshot(out) -> dict:
    """Every file under `out` (the lock file aside) with its bytes."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def refusal(result: subprocess.CompletedProcess) -> str:
    """The one-line error of a refused run (and no traceback)."""
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr[-3000:]
    return last


def test_overwrite_starts_a_clean_directory(tmp_path, tiny_base):
    out = tmp_path / "run"
    assert run(out, "--advantage", "gae").returncode == 0
    (out / "notes.txt").write_text("mine")  # not a run's file: kept
    (out / "reasoner-zero").mkdir()  # the tensorboard tracker's directory
    (out / "reasoner-zero" / "events.out.tfevents.old").write_text("old run")
    result = run(out, "--advantage", "grpo", "--max-steps", "1", "--save-every", "0", "--overwrite")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming" not in result.stdout
    assert not list(out.glob("checkpoints/*")), "the old run's checkpoints survived --overwrite"
    assert not (out / "critic").exists() and not (out / "reasoner-zero").exists()
    assert steps(out) == [0]
    assert json.loads((out / "config.json").read_text())["advantage"] == "grpo"
    assert (out / "notes.txt").read_text() == "mine"


def test_resume_with_other_training_arguments_is_refused(tmp_path, tiny_base):
    out = tmp_path / "run"
    assert run(out, script="train_grpo.py").returncode == 0
    before = snapshot(out)
    # a GRPO directory resumed by train_ppo.py: the estimator and the whitening differ
    last = refusal(run(out, script="train_ppo.py"))
    assert "--advantage grpo -> gae" in last and "--whiten-advantages false -> true" in last, last
    assert "--overwrite" in last and "--output-dir" in last, last
    last = refusal(run(out, "--lr", "5e-4", "--max-steps", "3", script="train_grpo.py"))
    assert "--lr 0.0001 -> 0.0005" in last and "max-steps" not in last, last
    assert snapshot(out) == before, "a refused run changed the directory"
    # the arguments listed as free to change on resume do not block it, and config.json records them
    result = run(out, "--max-steps", "3", "--save-every", "2", "--samples-per-step", "2",
                 script="train_grpo.py")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stdout and "step-000002" in result.stdout
    config = json.loads((out / "config.json").read_text())
    assert (config["max_steps"], config["save_every"], config["samples_per_step"]) == (3, 2, 2)
    assert steps(out) == [0, 1, 2]


def test_a_finished_run_asked_for_again_is_done_and_another_run_is_not_let_in(tmp_path, tiny_base):
    out = tmp_path / "run"
    assert run(out, "--save-every", "0", "--max-steps", "1").returncode == 0  # finished, no checkpoint
    before = snapshot(out)
    again = run(out, "--save-every", "0", "--max-steps", "1")  # a scheduler re-queuing the job that ended well
    assert again.returncode == 0, again.stderr[-3000:]
    assert "finished at step 1: nothing to do" in again.stdout and "resuming" not in again.stdout
    assert snapshot(out) == before
    last = refusal(run(out, "--save-every", "0", "--max-steps", "1", "--lr", "5e-4"))  # not the same run
    assert "finished" in last and "--overwrite" in last and "--output-dir" in last, last
    last = refusal(run(out, "--save-every", "0", "--max-steps", "2"))  # nothing to continue from
    assert "no usable checkpoint" in last, last
    assert snapshot(out) == before
    (out / "summary.json").unlink()  # a run's files, but neither finished nor resumable
    before = snapshot(out)
    last = refusal(run(out, "--save-every", "0", "--max-steps", "1"))
    assert "no usable checkpoint" in last and "--overwrite" in last, last
    assert snapshot(out) == before


def test_one_run_per_directory_and_a_dead_runs_lock_does_not_block(tmp_path, tiny_base):
    out = tmp_path / "run"
    first = start_script(*command(out, "--max-steps", "1000", "--save-every", "1000"), env=ONE_THREAD,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while first.poll() is None and time.time() < deadline and not (
                (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 1):
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended early"
        config = (out / "config.json").read_text()
        last = refusal(run(out, "--max-steps", "2"))
        assert f"pid {first.pid}" in last and "--output-dir" in last, last
        assert first.poll() is None and (out / "config.json").read_text() == config
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert str(first.pid) in (out / ".lock").read_text()  # the dead run's lock file is still there ...
    result = run(out, "--max-steps", "2")  # ... and does not block; no checkpoint yet: a fresh start
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming" not in result.stdout
    assert steps(out) == [0, 1]


def test_the_lock_is_released_when_main_returns_or_raises(tmp_path, tiny_base):
    """In one process (a notebook): a run, a refused run, then a run with --overwrite on the same directory."""
    import pytest

    from train_ppo import Args, main

    args = Args(output_dir=str(tmp_path / "run"), max_steps=1, prompts_per_step=4, num_generations=4,
                max_new_tokens=16, eval_every=0, reward_workers=0, save_every=0)
    first = main(args)
    assert main(args) == first  # the same run again: finished, nothing to do
    args.lr = 5e-4
    with pytest.raises(SystemExit, match="finished run"):
        main(args)
    args.overwrite = True
    assert main(args)["steps"] == 1


def test_a_link_in_the_output_directory_is_not_written_through(tmp_path, tiny_base):
    """The lock placed as a link to another file: the run refuses in one line and leaves that file as it was
    (it used to truncate it). The other names a run writes: `test_checkpoint.py`."""
    (tmp_path / "elsewhere").write_text("not the run's")
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").symlink_to(tmp_path / "elsewhere")
    last = refusal(run(out))
    assert f".lock is a symbolic link (to {tmp_path / 'elsewhere'})" in last and "--output-dir" in last, last
    assert (tmp_path / "elsewhere").read_text() == "not the run's"
    assert [p.name for p in out.iterdir()] == [".lock"], "a refused run wrote into the directory"


def test_overwrite_refuses_a_directory_that_is_not_a_runs(tmp_path, tiny_base):
    """`--output-dir some_model --overwrite` must not delete a model's config.json (or anything else)."""
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 8}))
    (out / "metrics.jsonl").write_text('{"loss": 1}\n')
    before = snapshot(out)
    line = refusal(run(out, "--overwrite"))
    assert "not a run's" in line
    assert snapshot(out) == before
