"""Two processes under `accelerate launch` on the CPU against one, same global batch and seed.

(`accelerate launch --cpu --num_processes 2` starts a single process in accelerate 1.15; two CPU processes
need the multi-process launcher with ACCELERATE_USE_CPU set, which this test uses and checks.)

Generate calls are seeded by (seed, step, place of their first prompt), so both runs sample the same
responses; then every number that follows must agree up to float round-off: rewards, advantages, the
loss, and the parameters after the update. The runs differ only in how rows are spread over processes
and padded, which changes summation order, not values.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file

COMMON = ["--max-steps", "2", "--prompts-per-step", "4", "--num-generations", "4", "--generation-batch-size", "2",
          "--eval-every", "0", "--samples-per-step", "16", "--lr", "1e-3", "--critic-lr", "1e-3",
          "--micro-batch-size", "3", "--reward-workers", "0", "--seed", "3"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(out, processes: int, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    if processes == 1:
        cmd = [sys.executable, "train_ppo.py"]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "train_ppo.py"]
    result = subprocess.run([*cmd, "--output-dir", str(out), *COMMON, *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{processes} process(es)" in result.stdout
    return result.stdout


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("advantage", ["grpo", "gae"])
def test_two_processes_match_one(advantage, tmp_path, tiny_base):
    one, two = tmp_path / "one", tmp_path / "two"
    run(one, 1, "--advantage", advantage)
    run(two, 2, "--advantage", advantage)

    m1, m2 = lines(one / "metrics.jsonl"), lines(two / "metrics.jsonl")
    assert [r["step"] for r in m2] == [0, 1]  # written once, by the main process
    s1, s2 = lines(one / "samples.jsonl"), lines(two / "samples.jsonl")
    assert len(s1) == len(s2) == 32  # every row of both steps, gathered from both processes
    for a, b in zip(s1, s2, strict=True):
        assert (a["prompt_id"], a["response"], a["reward"]) == (b["prompt_id"], b["response"], b["reward"])
        assert a["advantage"] == pytest.approx(b["advantage"], abs=1e-4)
    assert len({s["reward"] for s in s1}) > 1  # the test means something only if advantages are not all 0
    keys = ["train/reward", "train/response_length", "train/advantage_abs", "loss/policy", "policy/entropy"]
    keys += ["critic/value_loss", "critic/values"] if advantage == "gae" else []
    for r1, r2 in zip(m1, m2, strict=True):
        for k in keys:
            print(f"{advantage} step {r1['step']} {k}: {r1[k]:.6g} vs {r2[k]:.6g}")
            assert r1[k] == pytest.approx(r2[k], rel=1e-4, abs=1e-5), k

    parts = ["policy/model.safetensors"] + (["critic/model.safetensors", "critic/value_head.safetensors"]
                                            if advantage == "gae" else [])
    for part in parts:
        p1, p2 = load_file(one / part), load_file(two / part)
        diff = max((p1[k] - p2[k]).abs().max().item() for k in p1)
        base = load_file(tiny_base / "model.safetensors") if part.startswith("policy") else None
        moved = max((p1[k] - base[k]).abs().max().item() for k in p1) if base else 1.0
        print(f"{advantage} {part}: largest difference 1 vs 2 processes {diff:.2e}")
        assert diff < 1e-4, (part, diff)
        assert moved > 1e-3  # and the update did change the parameters
    assert torch.isfinite(torch.tensor([m2[-1]["loss/policy"]]))


def test_process_whose_rows_are_all_in_the_first_critic_mini_batch(tmp_path, tiny_base):
    """Seed 0, step 0: the critic's first mini-batch of 4 global rows is [0, 1], all of process 0's rows,
    so process 0 has no rows left for the separate value pass and must still run the same passes as
    process 1. The run must finish and agree with one process."""
    from train_ppo import mini_batch_parts

    assert sorted(mini_batch_parts(4, 2, seed=0, step=0)[0].tolist()) == [0, 1]
    args = ["--advantage", "gae", "--max-steps", "1", "--prompts-per-step", "2", "--num-generations", "2",
            "--generation-batch-size", "1", "--seed", "0", "--samples-per-step", "4"]
    run(tmp_path / "one", 1, *args)
    run(tmp_path / "two", 2, *args)
    m1, m2 = lines(tmp_path / "one" / "metrics.jsonl"), lines(tmp_path / "two" / "metrics.jsonl")
    for k in ("train/reward", "critic/values", "critic/value_loss", "loss/policy"):
        assert m1[0][k] == pytest.approx(m2[0][k], rel=1e-4, abs=1e-5), k


def test_evaluation_does_not_depend_on_the_process_count(tmp_path, tiny_base):
    """The step-0 evaluation (before any update) of the same model scores the same samples with one and two
    processes: 3 eval batches of 4 problems, so one process gets two batches and the other one."""
    args = ["--advantage", "grpo", "--max-steps", "1", "--eval-every", "1", "--eval-limit", "12",
            "--eval-num-samples", "2", "--samples-per-step", "0"]
    run(tmp_path / "one", 1, *args)
    run(tmp_path / "two", 2, *args)
    e1, e2 = (lines(tmp_path / n / "metrics.jsonl")[0] for n in ("one", "two"))
    keys = [k for k in e1 if k.startswith("eval/")]
    assert "eval/synthetic/avg@2" in keys
    assert {k: e1[k] for k in keys} == {k: e2[k] for k in keys}
