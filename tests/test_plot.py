"""Unit tests of plot.py, `plot.plot_runs` and `python plot.py`: a valid PNG with the expected panels, runs
with and without critic metrics, missing keys, and a directory without metrics.jsonl.

Run: python -m pytest tests/test_plot.py -q
"""

import json
from pathlib import Path

import pytest
from conftest import run_script

import plot
from plot import plot_runs, read_metrics


@pytest.fixture
def saved_figures(monkeypatch):
    """The matplotlib figures `plot_runs` saves, caught at `savefig`, so tests read lines, colours, limits
    and labels from the objects instead of pixels."""
    from matplotlib.figure import Figure

    figures, savefig = [], Figure.savefig

    def catch(self, *args, **kwargs):
        figures.append(self)
        return savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", catch)
    return figures


def panels(figure) -> dict:
    """Panel title -> its Axes."""
    return {ax.get_title(): ax for ax in figure.axes}


def run_of(line) -> str:
    """The run a line belongs to: lines are labelled "RUN" or "RUN: KEY"."""
    return line.get_label().split(": ")[0]


def texts(ax) -> list[str]:
    """The notes drawn in a panel and its legend entries."""
    legend = [t.get_text() for t in ax.get_legend().get_texts()] if ax.get_legend() else []
    return [t.get_text() for t in ax.texts] + legend

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BASE_PANELS = ["train reward", "eval accuracy", "response length", "entropy", "clip fraction"]


def write_run(directory: Path, steps: int = 5, critic: bool = False, evals: bool = True,
              final_eval: bool = False, pooled_equals_avg: bool = False) -> Path:
    """A metrics.jsonl like the trainers': evals every 2 steps, and with `final_eval` a last record at step
    `steps` holding only the final evaluation. `pooled_equals_avg`: one eval set, so eval/accuracy equals
    its avg@4, as in a real run."""
    directory.mkdir(parents=True)
    lines = []
    for step in range(steps):
        record = {"step": step, "train/reward": 0.1 * step, "train/response_length": 20 - step,
                  "policy/entropy": 1.0 / (step + 1), "policy/clipfrac": 0.01}
        if critic:
            record.update({"critic/value_loss": 0.5 / (step + 1), "critic/explained_var": 0.1 * step})
        if evals and step % 2 == 0:
            accuracy = 0.1 * step if pooled_equals_avg else 0.2 * step
            record.update({"eval/accuracy": accuracy, "eval/math500/avg@4": 0.1 * step,
                           "eval/math500/pass@4": 0.3 * step})
        lines.append(json.dumps(record))
    if final_eval:
        avg = 0.5 if pooled_equals_avg else 0.4
        lines.append(json.dumps({"step": steps, "eval/accuracy": 0.5, "eval/math500/avg@4": avg,
                                 "eval/math500/pass@4": 0.9}))
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
    proc = run_script("plot.py", str(run), "--out", str(out), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "7 panels" in proc.stdout
    assert_png(out)
    with pytest.raises(SystemExit) as err:  # in-process: a second interpreter would only cost time
        plot.main([str(tmp_path / "nope"), "--out", str(out)])
    assert str(err.value) == f"error: {tmp_path / 'nope'}: no metrics.jsonl (is it a run directory?)"
    with pytest.raises(SystemExit, match="must be a .png"):
        plot.main([str(run), "--out", str(tmp_path / "x.jpg")])


def test_plot_one_colour_per_run_in_every_panel(tmp_path, saved_figures):
    runs = [write_run(tmp_path / "grpo"), write_run(tmp_path / "ppo", critic=True),
            write_run(tmp_path / "rloo")]
    plot_runs(runs, tmp_path / "out.png")
    colours = {}  # run -> the colours its lines have anywhere
    for ax in saved_figures[0].axes:
        for line in ax.get_lines():
            colours.setdefault(run_of(line), set()).add(line.get_color())
    assert sorted(colours) == ["grpo", "ppo", "rloo"]
    assert all(len(c) == 1 for c in colours.values()), colours  # same run, same colour, in every panel
    assert len({c.pop() for c in colours.values()}) == 3  # and runs told apart


def test_plot_keys_of_one_panel_differ_in_line_style(tmp_path, saved_figures):
    plot_runs([write_run(tmp_path / "grpo"), write_run(tmp_path / "ppo")], tmp_path / "out.png")
    ax = panels(saved_figures[0])["eval accuracy"]
    for run in ("grpo", "ppo"):
        lines = [line for line in ax.get_lines() if run_of(line) == run]
        assert len(lines) == 3  # eval/accuracy (pooled, differs here), avg@4, pass@4
        assert len({(line.get_linestyle(), line.get_marker()) for line in lines}) == 3


def test_plot_eval_accuracy_is_not_hidden_behind_the_identical_avg(tmp_path, saved_figures):
    """With one eval set, eval/accuracy is the same series as that set's avg@k: drawn once, and the legend
    says it is both."""
    plot_runs([write_run(tmp_path / "grpo", pooled_equals_avg=True, final_eval=True),
               write_run(tmp_path / "ppo", pooled_equals_avg=True, final_eval=True)], tmp_path / "out.png")
    ax = panels(saved_figures[0])["eval accuracy"]
    for run in ("grpo", "ppo"):
        data = [tuple(map(tuple, line.get_xydata())) for line in ax.get_lines() if run_of(line) == run]
        assert len(data) == len(set(data)), f"{run}: a line hidden behind an identical one"
    assert any("eval/accuracy" in t and "eval/math500/avg@4" in t for t in texts(ax)), texts(ax)


def test_plot_panels_share_the_x_range(tmp_path, saved_figures):
    """The final evaluation is logged one step after the last training step: every panel still spans it."""
    runs = [write_run(tmp_path / "grpo", final_eval=True), write_run(tmp_path / "ppo", critic=True, steps=3)]
    plot_runs(runs, tmp_path / "out.png")
    limits = {title: ax.get_xlim() for title, ax in panels(saved_figures[0]).items()}
    assert len(set(limits.values())) == 1, limits
    low, high = limits["train reward"]
    assert low <= 0 and high >= 5


def test_plot_flat_panels_are_labelled(tmp_path, saved_figures):
    """Clip fraction is 0.01 at every step of both runs: the lines coincide, and a note says so, so the panel
    is not read as a missing run."""
    plot_runs([write_run(tmp_path / "grpo"), write_run(tmp_path / "ppo")], tmp_path / "out.png")
    found = panels(saved_figures[0])
    assert any("constant 0.01" in t for t in texts(found["clip fraction"])), texts(found["clip fraction"])
    assert not any("constant" in t for t in texts(found["train reward"]))


def test_plot_identical_runs_are_labelled(tmp_path, saved_figures):
    plot_runs([write_run(tmp_path / "a"), write_run(tmp_path / "b")], tmp_path / "out.png")
    assert "b (same as a)" in texts(panels(saved_figures[0])["train reward"])


def write_evaluation(directory: Path, curves: dict[str, dict[str, float]]) -> Path:
    """results.json as evaluate.py writes it, with only what the plot reads."""
    directory.mkdir(parents=True)
    metrics = {name: {"pass_at": c} for name, c in curves.items()}
    (directory / "results.json").write_text(json.dumps({"metrics": metrics}))
    return directory


def test_plot_pass_at_k_of_base_and_rl(tmp_path, saved_figures):
    base = write_evaluation(tmp_path / "base", {"synthetic": {"1": 0.2, "2": 0.35, "4": 0.55, "8": 0.7},
                                                "math500": {"1": 0.0, "2": 0.0, "4": 0.0, "8": 0.01},
                                                "overall": {"1": 0.1, "2": 0.2, "4": 0.3, "8": 0.4}})
    rl = write_evaluation(tmp_path / "rl", {"synthetic": {"1": 0.6, "2": 0.65, "4": 0.68, "8": 0.69}})
    out = tmp_path / "passk.png"
    proc = run_script("plot.py", str(base), str(rl / "results.json"), "--out", str(out), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "3 panels: pass@k: synthetic, pass@k: math500, pass@k: overall" in proc.stdout
    assert_png(out)
    plot.main([str(base), str(rl), "--out", str(out)])
    axes = panels(saved_figures[-1])
    lines = {line.get_label(): line for line in axes["pass@k: synthetic"].get_lines()}
    assert list(lines) == ["base", "rl"] and axes["pass@k: synthetic"].get_xscale() == "log"
    assert list(lines["rl"].get_xdata()) == [1, 2, 4, 8] and list(lines["rl"].get_ydata()) == [0.6, 0.65, 0.68, 0.69]
    assert [line.get_label() for line in axes["pass@k: math500"].get_lines()] == ["base"]  # rl has no math500
    one = write_evaluation(tmp_path / "one", {"synthetic": {"1": 0.5}, "overall": {"1": 0.5}})
    assert plot.plot_pass_at_k([one], out) == ["pass@k: synthetic"]  # one set: its "overall" is the same curve
    with pytest.raises(SystemExit, match="either runs .* or evaluations"):
        plot.main([str(base), str(write_run(tmp_path / "run")), "--out", str(out)])
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"^error: .*broken: not an evaluation with pass@k"):
        plot.main([str(tmp_path / "broken"), "--out", str(out)])
