"""Tests of `utils.plot_runs` and `python utils.py plot`: a valid PNG with the expected panels, runs
with and without critic metrics, missing keys, and a directory without metrics.jsonl.

Run: python -m pytest tests/test_plot.py -q
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import utils
from utils import plot_runs, read_metrics

ROOT = Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BASE_PANELS = ["train reward", "eval accuracy", "response length", "entropy", "clip fraction"]


def write_run(directory: Path, steps: int = 5, critic: bool = False, evals: bool = True) -> Path:
    directory.mkdir(parents=True)
    lines = []
    for step in range(steps):
        record = {"step": step, "train/reward": 0.1 * step, "train/response_length": 20 - step,
                  "policy/entropy": 1.0 / (step + 1), "policy/clipfrac": 0.01}
        if critic:
            record.update({"critic/value_loss": 0.5 / (step + 1), "critic/explained_var": 0.1 * step})
        if evals and step % 2 == 0:
            record.update({"eval/accuracy": 0.2 * step, "eval/math500/avg@4": 0.1 * step})
        lines.append(json.dumps(record))
    (directory / "metrics.jsonl").write_text("\n".join(lines) + "\n{\"step\": 5, \"train/rew")  # cut-off last line
    return directory


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000


def test_plot_grpo_and_ppo_runs(tmp_path):
    grpo = write_run(tmp_path / "grpo")
    ppo = write_run(tmp_path / "ppo", critic=True)
    titles = plot_runs([grpo, ppo], tmp_path / "out.png")
    assert titles == BASE_PANELS + ["value loss", "explained variance"]
    assert_png(tmp_path / "out.png")


def test_plot_without_critic_or_eval_keys(tmp_path):
    run = write_run(tmp_path / "grpo", evals=False)
    titles = plot_runs([run], tmp_path / "out.png")
    assert titles == BASE_PANELS  # no critic panels; eval accuracy drawn empty with a note
    assert_png(tmp_path / "out.png")


def test_read_metrics_skips_a_cut_off_line(tmp_path):
    assert len(read_metrics(write_run(tmp_path / "run"))) == 5


def test_missing_metrics_file_is_a_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"^error: .*empty: no metrics.jsonl"):
        plot_runs([write_run(tmp_path / "run"), tmp_path / "empty"], tmp_path / "out.png")


def test_plot_command(tmp_path):
    run = write_run(tmp_path / "ppo", critic=True)
    out = tmp_path / "plots" / "runs.png"
    proc = subprocess.run([sys.executable, "utils.py", "plot", str(run), "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "7 panels" in proc.stdout
    assert_png(out)
    with pytest.raises(SystemExit) as err:  # in-process: a second interpreter would only cost time
        utils.main(["plot", str(tmp_path / "nope"), "--out", str(out)])
    assert str(err.value) == f"error: {tmp_path / 'nope'}: no metrics.jsonl (is it a run directory?)"
    with pytest.raises(SystemExit, match="must be a .png"):
        utils.main(["plot", str(run), "--out", str(tmp_path / "x.jpg")])
