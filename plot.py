"""Plots of runs and evaluations: `python plot.py RUN_DIR [RUN_DIR ...] --out FILE.png` draws training
curves (one line per run); given `evaluate.py` outputs instead, it draws their pass@k curves.
"""

import json
import math
import os
from pathlib import Path

# (title, keys or a test on the key): one panel each, in this order. Eval accuracies are every eval/
# key that is an accuracy: eval/accuracy and eval/<dataset>/avg@k, pass@k, maj@k.
PLOT_PANELS = [
    ("train reward", ["train/reward"]),
    ("eval accuracy",
     lambda key: key.startswith("eval/") and any(s in key for s in ("accuracy", "avg@", "pass@", "maj@"))),
    ("response length", ["train/response_length"]),
    ("entropy", ["policy/entropy"]),
    ("clip fraction", ["policy/clipfrac"]),
    ("value loss", ["critic/value_loss"]),
    ("explained variance", ["critic/explained_var"]),
]


OPTIONAL_PANELS = ("value loss", "explained variance")  # drawn only when some run has them (PPO's critic)


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl (one JSON object per line; blank and malformed lines, such as
    a last line cut off by a kill, are skipped). Raises SystemExit with one line if the file is missing."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: {run_dir}: no metrics.jsonl (is it a run directory?)")
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _series(records: list[dict], key: str) -> tuple[list, list]:
    """(steps, values) of the records that have a number under `key`; the step is the record's `step`,
    or its line number when it has none."""
    points = [(r.get("step", i), r[key]) for i, r in enumerate(records)
              if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    return [p[0] for p in points], [p[1] for p in points]


def _same_series(a: tuple[list, list], b: tuple[list, list]) -> bool:
    """Equal steps and values (to rounding): two such lines would be drawn exactly on top of each other."""
    return a[0] == b[0] and len(a[1]) == len(b[1]) and all(
        math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12) for x, y in zip(a[1], b[1], strict=True))


def _merge_duplicate_keys(keys: list[str], runs: dict[str, list[dict]]) -> list[list[str]]:
    """`keys` grouped so that each group is one series in every run: [[eval/accuracy, eval/x/avg@4], ...].

    With one eval set, eval/accuracy (avg@k pooled over all sets) is the same series as that set's avg@k;
    drawn twice, one line would hide the other. A key joins an earlier group only when it equals that
    group's first key in every run that logged either of them.
    """
    groups: list[list[str]] = []
    for key in keys:
        for group in groups:
            pairs = [(_series(records, group[0]), _series(records, key)) for records in runs.values()]
            pairs = [(a, b) for a, b in pairs if a[0] or b[0]]
            if pairs and all(_same_series(a, b) for a, b in pairs):
                group.append(key)
                break
        else:
            groups.append([key])
    return groups


def figure_of_runs(run_dirs: list[str]):
    """The matplotlib figure `plot_runs` saves, and its panel titles; the caller closes the figure.

    Each run has one colour in every panel; the keys of a panel with several differ in line style (the
    first, e.g. eval/accuracy, solid and thicker). Keys whose series are identical are drawn once, with a
    legend entry naming all of them. Every panel spans the same steps. A panel whose values are all one
    number says so, and a run whose lines coincide with an earlier run's is labelled "(same as ...)",
    so a line on top of another is not read as a missing run.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    if not run_dirs:
        raise SystemExit("error: plot needs at least one run directory")
    names = [Path(d).resolve().name or str(d) for d in run_dirs]
    # Labelled by directory name; two runs with the same name (a/ppo, b/ppo) keep the path given.
    runs = {(name if names.count(name) == 1 else str(d)): read_metrics(d)
            for name, d in zip(names, run_dirs, strict=True)}
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if len(runs) > len(cycle):  # more runs than the default cycle: spread them over a colour map
        cycle = [matplotlib.colormaps["turbo"](i / (len(runs) - 1)) for i in range(len(runs))]
    colours = dict(zip(runs, cycle, strict=False))
    # Line styles and markers cycle at coprime lengths: 20 keys in one panel before a pair repeats.
    line_styles, markers = ("-", "--", ":", "-."), (".", "x", "^", "s", "d")
    present = {key for records in runs.values() for r in records for key in r}
    panels = []
    for title, keys in PLOT_PANELS:
        # The headline eval/accuracy first: it keeps the solid line and names any key merged into it.
        if callable(keys):
            keys = sorted((k for k in present if keys(k)), key=lambda k: (k != "eval/accuracy", k))
        if title in OPTIONAL_PANELS and not any(k in present for k in keys):
            continue
        panels.append((title, keys))
    steps = [s for records in runs.values() for _, keys in panels for k in keys
             for s in _series(records, k)[0]]
    low, high = (min(steps), max(steps)) if steps else (0, 1)
    pad = 0.04 * (high - low) or 0.5
    cols = 2
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.remove()
    for ax, (title, keys) in zip(axes.flat, panels, strict=False):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_xlim(low - pad, high + pad)
        groups = _merge_duplicate_keys(keys, runs)
        drawn, values, run_handles, key_handles = {}, [], [], []
        for run, records in runs.items():
            series = {group[0]: _series(records, group[0]) for group in groups}
            series = {k: v for k, v in series.items() if v[0]}
            if not series:
                continue
            for key, (x, y) in series.items():
                i = [g[0] for g in groups].index(key)
                # Markers tell keys apart when line styles repeat; alone, they only mark the points of a
                # short run.
                marker = markers[i % 5] if len(groups) > 1 or len(x) < 30 else None
                ax.plot(x, y, color=colours[run], linestyle=line_styles[i % 4], marker=marker,
                        markevery=max(1, len(x) // 15), linewidth=2.0 if i == 0 and len(groups) > 1 else 1.5,
                        label=run if len(keys) == 1 else f"{run}: {key}")
                values += y
            twin = next((other for other, s in drawn.items() if s.keys() == series.keys()
                         and all(_same_series(s[k], series[k]) for k in s)), None)
            drawn[run] = series
            label = run + (f" (same as {twin})" if twin else "")
            run_handles.append(Line2D([], [], color=colours[run], label=label))
        if len(groups) > 1 or any(len(g) > 1 for g in groups):
            for i, group in enumerate(groups):
                key_handles.append(Line2D([], [], color="gray", linestyle=line_styles[i % 4],
                                          marker=markers[i % 5], label=" = ".join(group)))
        if drawn:
            # A legend of several keys would cover the lines: it goes under the panel.
            below = dict(loc="upper center", bbox_to_anchor=(0.5, -0.24), ncol=2) if key_handles else {}
            ax.legend(handles=run_handles + key_handles, fontsize="small", **below)
            if max(values) == min(values):
                ax.text(0.5, 0.9, f"constant {values[0]:g}" + (" in every run" if len(drawn) > 1 else ""),
                        ha="center", va="top", transform=ax.transAxes, color="gray")
        else:
            ax.text(0.5, 0.5, f"no {' / '.join(keys) or title} in these runs", ha="center", va="center",
                    transform=ax.transAxes, color="gray")
    fig.tight_layout()
    return fig, [title for title, _ in panels]


def plot_runs(run_dirs: list[str], out_path: str | os.PathLike) -> list[str]:
    """Draw the metrics of one or more runs, overlaid, against step into one PNG; returns the panel titles.

    Panels: train reward, eval accuracy (every eval/ accuracy key), response length, entropy, clip
    fraction, and value loss / explained variance when any run logged them. A panel no run has data for
    is drawn empty with a note. Runs are labelled by the run directory's name; how they are told apart is
    in `figure_of_runs`. Uses matplotlib's Agg backend, so it needs no display.
    """
    fig, titles = figure_of_runs(run_dirs)
    import matplotlib.pyplot as plt  # after figure_of_runs chose the Agg backend

    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return titles


def is_evaluation(path: str | os.PathLike) -> bool:
    """Whether `path` is `python evaluate.py`'s output (a directory with results.json, or the file itself)."""
    path = Path(path)
    return (path / "results.json").is_file() or (path.is_file() and path.name.endswith(".json"))


def plot_pass_at_k(eval_paths: list[str], out_path: str | os.PathLike) -> list[str]:
    """pass@k against k (log2 axis) of several evaluations (`python evaluate.py` outputs, e.g. the base model
    and its RL checkpoint), one panel per dataset, one line per evaluation, into one PNG; returns the panel
    titles. RL that only sharpens the base model's distribution shows as a higher pass@1 and a curve that
    meets or falls under the base's at large k (arXiv:2504.13837)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {}  # label -> {dataset: {k: pass@k}}
    for path in eval_paths:
        path = Path(path)
        try:
            metrics = json.loads((path / "results.json" if path.is_dir() else path).read_text())["metrics"]
            curves[path.name if path.is_dir() else path.parent.name] = {
                name: {int(k): v for k, v in m["pass_at"].items()} for name, m in metrics.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise SystemExit(f"error: {path}: not an evaluation with pass@k curves (results.json of evaluate.py)"
                             ) from None
    # "overall" pools the sets: a panel of its own only when there are several
    datasets = [d for d in dict.fromkeys(name for c in curves.values() for name in c) if d != "overall"]
    datasets = datasets + ["overall"] if len(datasets) != 1 else datasets
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 3.6), squeeze=False)
    for ax, name in zip(axes.flat, datasets, strict=True):
        for label, per_set in curves.items():
            if name in per_set:
                ks = sorted(per_set[name])
                ax.plot(ks, [per_set[name][k] for k in ks], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ks = sorted({k for c in curves.values() for k in c.get(name, {})})
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_title(f"pass@k: {name}")
        ax.set_xlabel("k (samples per problem)")
        ax.set_ylabel("pass@k")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return [f"pass@k: {name}" for name in datasets]


def main(argv: list[str] | None = None) -> None:
    """`python plot.py RUN_DIR [RUN_DIR ...] --out FILE.png`; given evaluations (`python evaluate.py`
    outputs) instead of runs, their pass@k curves."""
    import argparse

    parser = argparse.ArgumentParser(prog="plot.py", description="Plot the metrics.jsonl of one or more runs into "
                                     "one PNG, or the pass@k curves of evaluate.py's outputs.")
    parser.add_argument("run_dirs", nargs="+", help="run directories holding metrics.jsonl, or evaluate.py output "
                                                    "directories (results.json) for pass@k against k")
    parser.add_argument("--out", default="runs.png", help="PNG file to write (default runs.png)")
    args = parser.parse_args(argv)
    if not str(args.out).lower().endswith(".png"):
        raise SystemExit(f"error: --out {args.out}: must be a .png file")
    evaluations = [is_evaluation(d) for d in args.run_dirs]
    if any(evaluations) and not all(evaluations):
        which = ", ".join(d for d, e in zip(args.run_dirs, evaluations, strict=True) if e)
        raise SystemExit("error: plot draws either runs (metrics.jsonl) or evaluations (results.json), not both: "
                         f"{which} are evaluations")
    titles = (plot_pass_at_k if all(evaluations) else plot_runs)(args.run_dirs, args.out)
    print(f"wrote {args.out} ({len(titles)} panels: {', '.join(titles)})")


if __name__ == "__main__":
    main()
