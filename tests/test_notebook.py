"""The notebook shipped in the repo, and the scripts pasted into notebook cells, run in a real Jupyter kernel
(nbclient + ipykernel): the way a researcher uses them, not an imitation of it."""

import json

import pytest
from conftest import ROOT

nbformat = pytest.importorskip("nbformat", reason="nbclient/ipykernel/nbformat come with requirements-dev.txt")
from nbclient import NotebookClient  # noqa: E402


def run_cells(cells: list[str], cwd, timeout: int = 900):
    """Execute code cells in a fresh kernel started in `cwd`; returns the executed notebook."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


pytestmark = pytest.mark.notebook


def test_the_shipped_notebook_runs_grpo_with_its_own_reward_and_advantage_and_plots(tiny_base, tmp_path):
    nb = nbformat.read(ROOT / "notebook.ipynb", as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    out = ROOT / "runs" / "notebook"
    config = json.loads((out / "config.json").read_text())
    assert config["reward"] == "python:__main__.brief_and_right" and config["advantage"] == "loo-mean"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(8)) + [8]
    # the notebook's reward pays 0.1 on top of the rule for a short response: rewards that are not 0/1 show it ran
    assert any(round(r["train/reward"] * 16 * 8) != r["train/reward"] * 16 * 8 for r in rows[:-1])
    assert (ROOT / "runs" / "notebook.png").stat().st_size > 10_000
    images = [o for o in nb.cells[-1].outputs if "image/png" in o.get("data", {})]
    assert images, nb.cells[-1].outputs


def test_a_script_pasted_whole_into_a_cell_runs_as_the_command_and_restores_signal_handlers(tiny_base, tmp_path):
    """train_grpo.py pasted unchanged into a cell runs as `python train_grpo.py` in that directory would (the
    default run, 60 steps), with the kernel's own `-f kernel.json` argument ignored; after `main` returns,
    SIGINT is the kernel's handler again (an interrupt reaches the kernel)."""
    nb = run_cells([f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
                    "import signal; before = signal.getsignal(signal.SIGINT)",
                    (ROOT / "train_grpo.py").read_text(),
                    "import json; print(json.dumps({'argv': sys.argv[1:], "
                    "'same': signal.getsignal(signal.SIGINT) is before}))"], tmp_path)
    seen = json.loads(nb.cells[-1].outputs[-1]["text"])
    assert "-f" in seen["argv"] and seen["same"], seen  # the kernel's argument was there, and ignored
    summary = json.loads((tmp_path / "runs" / "grpo" / "summary.json").read_text())
    assert summary["steps"] == 60 and summary["final_accuracy"] > summary["base_accuracy"] + 0.3, summary


def test_notebook_launcher_after_main_in_the_same_kernel_runs_two_cpu_processes(tiny_base, tmp_path):
    """main() in a kernel, then accelerate's notebook_launcher with 2 processes in the same kernel, on a machine
    without a GPU and without ACCELERATE_USE_CPU set by hand: the launcher starts (no Accelerator is left
    behind by main) and the two processes train as one run of 2 processes (gloo)."""
    common = ("max_steps=2, eval_every=0, prompts_per_step=4, num_generations=2, num_mini_batches=1, "
              "critic_mini_batches=1, save_every=0, reward_workers=0")
    nb = run_cells([f"import os, sys; sys.path.insert(0, {str(ROOT)!r})\n"
                    "from train_grpo import Args\nfrom train_ppo import main\n"
                    f"main(Args(output_dir={str(tmp_path / 'one')!r}, {common}))",
                    "from accelerate import notebook_launcher\n"
                    f"notebook_launcher(main, (Args(output_dir={str(tmp_path / 'two')!r}, {common}),), "
                    "num_processes=2)\nprint('ACCELERATE_USE_CPU' in os.environ)"], tmp_path)
    assert nb.cells[-1].outputs[-1]["text"].strip().endswith("False")
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    log = "".join(o.get("text", "") for o in nb.cells[-1].outputs)
    assert "2 process(es), backend gloo" in log, log[-2000:]


def test_an_interrupt_in_a_notebook_stops_at_a_checkpoint_and_the_same_call_resumes_exactly(tiny_base, tmp_path):
    """The stop button (SIGINT to the kernel) during main(args): the step ends, a checkpoint is written and
    main raises a RunError saying so; main(args) again resumes and ends as the uninterrupted run does."""
    import time

    from jupyter_client.manager import start_new_kernel

    common = ("max_steps=12, eval_every=0, prompts_per_step=8, num_generations=4, num_mini_batches=1, "
              "critic_mini_batches=1, save_every=100, reward_workers=0")
    km, kc = start_new_kernel(kernel_name="python3", cwd=str(tmp_path))
    try:
        def run(code: str, timeout: float = 600) -> dict:
            msg_id = kc.execute(code)
            return kc.get_shell_msg(timeout=timeout)["content"] if msg_id else {}

        run(f"import sys; sys.path.insert(0, {str(ROOT)!r})\nfrom train_grpo import Args\nfrom train_ppo import main\n"
            f"args = Args(output_dir={str(tmp_path / 'cut')!r}, {common})")
        kc.execute("main(args)")
        metrics = tmp_path / "cut" / "metrics.jsonl"
        deadline = time.time() + 300
        while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
            time.sleep(0.2)
        km.interrupt_kernel()
        reply = kc.get_shell_msg(timeout=300)["content"]
        assert reply["status"] == "error" and "stopped by signal 2" in reply["evalue"], reply
        assert reply["ename"] == "RunError"
        cut = len(metrics.read_text().splitlines())
        assert cut < 12
        assert run("summary = main(args)")["status"] == "ok"
        assert run(f"main(Args(output_dir={str(tmp_path / 'whole')!r}, {common}))")["status"] == "ok"
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    cut_rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    whole_rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in cut_rows] == list(range(12))
    assert [r["train/reward"] for r in cut_rows] == [r["train/reward"] for r in whole_rows]
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / d / "policy" / "model.safetensors") for d in ("cut", "whole"))
    assert all(a[k].equal(b[k]) for k in a)
