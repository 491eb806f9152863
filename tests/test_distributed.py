"""End to end: two processes under `accelerate launch` on the CPU against one, same global batch and seed; and
real launches of the shipped accelerate configs on CUDA GPUs (skipped without).

(`accelerate launch --cpu --num_processes 2` starts a single process in accelerate 1.15; two CPU processes
need the multi-process launcher with ACCELERATE_USE_CPU set, which this test uses and checks. DeepSpeed
runs on CPU processes with its CPU accelerator, DS_ACCELERATOR=cpu, and without ACCELERATE_USE_CPU.)

Generate calls are seeded by (seed, step, place of their first prompt), so both runs sample the same
responses; then every number that follows must agree up to float round-off: rewards, advantages, the
loss, and the parameters after the update. The runs differ only in how rows are spread over processes
and padded, which changes summation order, not values.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import time

import pytest
import torch
from conftest import ACCEL_DIR, ACCEL_EXPECTED, ROOT, needs_deepspeed, run_script, start_script
from safetensors.torch import load_file

pytestmark = pytest.mark.processes

COMMON = ["--max-steps", "2", "--prompts-per-step", "4", "--num-generations", "4", "--generation-batch-size", "2",
          "--eval-every", "0", "--samples-per-step", "16", "--lr", "1e-3", "--critic-lr", "1e-3",
          "--micro-batch-size", "3", "--reward-workers", "0", "--seed", "3"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# How each sharded mode is launched on CPU processes: the shipped GPU config, with the process count, the
# precision and the tiny model's decoder layer given on the command line, and ACCELERATE_USE_CPU set
# (DeepSpeed: DS_ACCELERATOR=cpu instead).
LAUNCH = {
    "ddp": ["--multi_gpu"],
    "fsdp2": ["--config_file", "configs/accelerate/fsdp.yaml", "--fsdp_transformer_layer_cls_to_wrap",
              "LlamaDecoderLayer"],
    "zero2": ["--config_file", "configs/accelerate/zero2.yaml"],
    "zero3": ["--config_file", "configs/accelerate/zero3.yaml"],
    "zero3-flags": ["--use_deepspeed", "--zero_stage", "3"],  # accelerate's flags, no config file
}
MODES = ["ddp", "fsdp2", pytest.param("zero2", marks=needs_deepspeed), pytest.param("zero3", marks=needs_deepspeed)]
# The default test command runs each mode at least once; the repeats of a check in other modes are slow.
slow = pytest.mark.slow


def launch(out, processes: int, *args: str, mode: str = "ddp", **env_extra: str) -> tuple[list, dict, tuple]:
    """The command line, environment and variables to unset of a training run on `processes` CPU processes."""
    env, unset = {"OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", **env_extra}, ()
    if processes > 1 and mode.startswith("zero"):
        del env["ACCELERATE_USE_CPU"]
        unset = ("ACCELERATE_USE_CPU",)
        env["DS_ACCELERATOR"] = "cpu"
    if processes == 1:
        cmd = ["train_ppo.py"]
    else:
        cmd = ["-m", "accelerate.commands.launch", *LAUNCH[mode], "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "train_ppo.py"]
    return [*cmd, "--output-dir", str(out), *COMMON, *args], env, unset


def run(out, processes: int, *args: str, mode: str = "ddp", expect_error: bool = False, **env_extra: str) -> str:
    cmd, env, unset = launch(out, processes, *args, mode=mode, **env_extra)
    result = run_script(*cmd, env=env, unset=unset, timeout=600)
    if expect_error:
        assert result.returncode != 0
        return result.stderr
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{processes} process(es)" in result.stdout
    return result.stdout


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# What the trainer's setup line must say each mode got: the distributed type and how the policy is held.
GOT = {"ddp": ("distributed setup: MULTI_CPU, 2 process(es)", "policy DistributedDataParallel"),
       "fsdp2": ("distributed setup: FSDP, 2 process(es)", "policy sharded (FSDP2, DTensor parameters)"),
       "zero2": ("distributed setup: DEEPSPEED, 2 process(es), backend gloo", "policy DeepSpeedEngine (ZeRO-2)"),
       "zero3": ("distributed setup: DEEPSPEED, 2 process(es), backend gloo", "policy DeepSpeedEngine (ZeRO-3)")}
# how the frozen reference model is held when it is sharded (ZeRO-2 partitions no weights: it stays whole)
REFERENCE = {"fsdp2": "reference model sharded (FSDP2, DTensor parameters)",
             "zero3": "reference model DeepSpeedEngine (ZeRO-3)", "zero2": "reference model whole"}


@pytest.mark.parametrize("advantage,mode", [
    pytest.param("grpo", "ddp", marks=slow), ("gae", "ddp"), pytest.param("grpo", "fsdp2", marks=slow),
    ("gae", "fsdp2"),
    pytest.param("grpo", "zero2", marks=needs_deepspeed), pytest.param("gae", "zero3", marks=needs_deepspeed),
    pytest.param("gae", "zero2", marks=[needs_deepspeed, slow]),
    pytest.param("grpo", "zero3", marks=[needs_deepspeed, slow])])
def test_two_processes_match_one(advantage, mode, tmp_path, tiny_base):
    one, two = tmp_path / "one", tmp_path / "two"
    # PPO with a KL term: the critic and the frozen reference model are prepared too
    extra = ["--kl-coef", "0.05"] if advantage == "gae" else []
    run(one, 1, "--advantage", advantage, *extra)
    out = run(two, 2, "--advantage", advantage, *extra, mode=mode)
    assert all(part in out for part in GOT[mode]), out[:2000]
    if advantage == "gae":
        assert GOT[mode][1].replace("policy", "critic") in out
        if mode in REFERENCE:
            assert REFERENCE[mode] in out

    m1, m2 = lines(one / "metrics.jsonl"), lines(two / "metrics.jsonl")
    assert [r["step"] for r in m2] == [0, 1]  # written once, by the main process
    s1, s2 = lines(one / "samples.jsonl"), lines(two / "samples.jsonl")
    assert len(s1) == len(s2) == 32  # every row of both steps, gathered from both processes
    for a, b in zip(s1, s2, strict=True):
        assert (a["prompt_id"], a["response"], a["reward"]) == (b["prompt_id"], b["response"], b["reward"])
        assert a["advantage"] == pytest.approx(b["advantage"], abs=1e-4)
    assert len({s["reward"] for s in s1}) > 1  # the test means something only if advantages are not all 0
    keys = ["train/reward", "train/response_length", "train/advantage_abs", "loss/policy", "policy/entropy"]
    keys += ["critic/value_loss", "critic/values", "policy/kl"] if advantage == "gae" else []
    for r1, r2 in zip(m1, m2, strict=True):
        for k in keys:
            print(f"{advantage} step {r1['step']} {k}: {r1[k]:.6g} vs {r2[k]:.6g}")
            assert r1[k] == pytest.approx(r2[k], rel=1e-4, abs=1e-5), k

    parts = ["policy/model.safetensors"] + (["critic/model.safetensors", "critic/value_head.safetensors"]
                                            if advantage == "gae" else [])
    for part in parts:
        p1, p2 = load_file(one / part), load_file(two / part)
        assert p1.keys() == p2.keys(), part  # e.g. tied embeddings written once, as one process writes them
        diff = max((p1[k] - p2[k]).abs().max().item() for k in p1)
        base = load_file(tiny_base / "model.safetensors") if part.startswith("policy") else None
        moved = max((p1[k] - base[k]).abs().max().item() for k in p1) if base else 1.0
        print(f"{mode} {advantage} {part}: largest difference 1 vs 2 processes {diff:.2e}")
        assert diff < 1e-4, (part, diff)
        assert moved > 1e-3  # and the update did change the parameters
    assert torch.isfinite(torch.tensor([m2[-1]["loss/policy"]]))


@pytest.mark.parametrize("mode", [pytest.param("ddp", marks=slow), pytest.param("fsdp2", marks=slow)])
def test_two_processes_match_one_with_lora(mode, tmp_path, tiny_base):
    """PPO with LoRA adapters on the policy and the critic's backbone and a KL to the policy without its
    adapters: two processes against one give the same metrics, adapters and value head. Under DDP both sample
    with the adapters merged (--merge-for-generation); FSDP refuses that in one line."""
    args = ["--advantage", "gae", "--lora-r", "4", "--kl-coef", "0.05"]
    if mode == "ddp":
        args.append("--merge-for-generation")
    else:
        err = run(tmp_path / "merged", 2, *args, "--merge-for-generation", mode=mode, expect_error=True)
        assert "error: --merge-for-generation needs each process to hold whole weights" in err, err[-2000:]
    one, two = tmp_path / "one", tmp_path / "two"
    run(one, 1, *args)
    out = run(two, 2, *args, mode=mode)
    assert all(part in out for part in GOT[mode]) and "reference model" not in out, out[:2000]
    m1, m2 = lines(one / "metrics.jsonl"), lines(two / "metrics.jsonl")
    assert len({s["reward"] for s in lines(one / "samples.jsonl")}) > 1
    assert m1[0]["policy/kl"] == 0.0 and m2[0]["policy/kl"] == 0.0
    for r1, r2 in zip(m1, m2, strict=True):
        for k in ["train/reward", "train/advantage_abs", "loss/policy", "policy/entropy", "critic/value_loss",
                  "critic/values", "policy/kl"]:
            assert r1[k] == pytest.approx(r2[k], rel=1e-4, abs=1e-5), (r1["step"], k)
    for part in ("policy/adapter_model.safetensors", "critic/adapter_model.safetensors",
                 "critic/value_head.safetensors"):
        p1, p2 = load_file(one / part), load_file(two / part)
        assert p1.keys() == p2.keys(), part
        diff = max((p1[k] - p2[k]).abs().max().item() for k in p1)
        print(f"{mode} LoRA {part}: largest difference 1 vs 2 processes {diff:.2e}")
        assert diff < 1e-4, (part, diff)
        assert max(v.abs().max().item() for k, v in p1.items() if "lora_A" not in k) > 1e-4  # they trained


@pytest.mark.parametrize("mode", ["ddp", pytest.param("zero3", marks=[needs_deepspeed, slow])])
def test_process_whose_rows_are_all_in_the_first_critic_mini_batch(mode, tmp_path, tiny_base):
    """Seed 0, step 0: the critic's first mini-batch of 4 global rows is [0, 1], all of process 0's rows,
    so in that mini-batch process 1 has no rows and must still run the same forward and backward passes as
    process 0 (under ZeRO-3 each forward gathers the weights from both). The run must finish and agree with
    one process."""
    from rollout import mini_batch_parts

    assert sorted(mini_batch_parts(4, 2, seed=0, step=0)[0].tolist()) == [0, 1]
    args = ["--advantage", "gae", "--max-steps", "1", "--prompts-per-step", "2", "--num-generations", "2",
            "--generation-batch-size", "1", "--seed", "0", "--samples-per-step", "4"]
    run(tmp_path / "one", 1, *args)
    run(tmp_path / "two", 2, *args, mode=mode)
    m1, m2 = lines(tmp_path / "one" / "metrics.jsonl"), lines(tmp_path / "two" / "metrics.jsonl")
    for k in ("train/reward", "critic/values", "critic/value_loss", "loss/policy"):
        assert m1[0][k] == pytest.approx(m2[0][k], rel=1e-4, abs=1e-5), k


@pytest.mark.parametrize("mode", ["ddp", pytest.param("fsdp2", marks=slow),
                                  pytest.param("zero3", marks=[needs_deepspeed, slow])])
def test_evaluation_does_not_depend_on_the_process_count(mode, tmp_path, tiny_base):
    """The step-0 evaluation (before any update) of the same model scores the same samples with one and two
    processes: 3 eval batches of 4 problems, so one process gets two batches and the other one (under FSDP2
    and ZeRO-3, whose generation runs in lockstep, it repeats one and discards it)."""
    args = ["--advantage", "grpo", "--max-steps", "1", "--eval-every", "1", "--eval-limit", "12",
            "--eval-num-samples", "2", "--samples-per-step", "0"]
    run(tmp_path / "one", 1, *args)
    run(tmp_path / "two", 2, *args, mode=mode)
    e1, e2 = (lines(tmp_path / n / "metrics.jsonl")[0] for n in ("one", "two"))
    keys = [k for k in e1 if k.startswith("eval/")]
    assert "eval/synthetic/avg@2" in keys
    assert {k: e1[k] for k in keys} == {k: e2[k] for k in keys}


@pytest.mark.parametrize("mode", [pytest.param("ddp", marks=slow), "fsdp2",
                                  pytest.param("zero2", marks=[needs_deepspeed, slow]),
                                  pytest.param("zero3", marks=[needs_deepspeed, slow])])
def test_sharded_resume_matches_an_uninterrupted_run(mode, tmp_path, tiny_base):
    """Two processes, PPO (policy and critic): a run stopped after 2 steps and continued from its checkpoint
    to 3 steps logs the same metrics and ends with the same weights as a run of 3 steps. Under FSDP2 the
    checkpoint holds each process's shards and optimizer states; under DeepSpeed each engine's checkpoint
    (each process's optimizer partition)."""
    args = ["--advantage", "gae", "--save-every", "1", "--max-steps", "3"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run(whole, 2, *args, mode=mode)
    run(resumed, 2, *args[:-1], "2", mode=mode)
    out = run(resumed, 2, *args, mode=mode)
    assert "resuming from" in out and all(part in out for part in GOT[mode]), out[:2000]
    if mode.startswith("zero"):  # the policy's engine, then the critic's, each with both processes' partitions
        saved = resumed / "checkpoints" / "step-000002"
        for engine in ("pytorch_model", "pytorch_model_1"):
            for rank in (0, 1):
                assert (saved / engine / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").is_file()

    def comparable(run_dir):
        return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in lines(run_dir / "metrics.jsonl")]

    assert comparable(resumed) == comparable(whole)
    for part in ("policy/model.safetensors", "critic/model.safetensors", "critic/value_head.safetensors"):
        a, b = load_file(resumed / part), load_file(whole / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


def test_dynamic_sampling_deals_the_same_batch_to_one_and_two_processes(tmp_path, tiny_base):
    """DAPO's dynamic sampling: the rounds drawn, the batch chosen from them and so the metrics are the
    same with 1 and 2 (DDP) processes."""
    args = ["--advantage", "grpo", "--dynamic-sampling", "--max-sampling-rounds", "3"]
    one, two = tmp_path / "one", tmp_path / "two"
    run(one, 1, *args)
    run(two, 2, *args)
    m1, m2 = lines(one / "metrics.jsonl"), lines(two / "metrics.jsonl")
    assert any(r["train/sampling_rounds"] > 1 for r in m1), m1
    for r1, r2 in zip(m1, m2, strict=True):
        assert r1["train/sampling_rounds"] == r2["train/sampling_rounds"]
        for k in ["train/reward", "train/signal_groups", "train/response_length", "loss/policy"]:
            assert r1[k] == pytest.approx(r2[k], rel=1e-4, abs=1e-5), (r1["step"], k)
    assert sorted(s["response"] for s in lines(one / "samples.jsonl")) == \
        sorted(s["response"] for s in lines(two / "samples.jsonl"))


def assert_same_runs(one, two, keys: list[str], parts=("policy/model.safetensors",)) -> None:
    """Runs `one` and `two` logged the same rows (samples and `keys` of metrics) and ended with the same weights."""
    s1, s2 = lines(one / "samples.jsonl"), lines(two / "samples.jsonl")
    assert [(a["prompt_id"], a["response"]) for a in s1] == [(b["prompt_id"], b["response"]) for b in s2]
    for r1, r2 in zip(lines(one / "metrics.jsonl"), lines(two / "metrics.jsonl"), strict=True):
        for k in keys:
            assert r1[k] == pytest.approx(r2[k], rel=1e-4, abs=1e-5), (r1["step"], k, r1[k], r2[k])
    for part in parts:
        p1, p2 = load_file(one / part), load_file(two / part)
        assert max((p1[k] - p2[k]).abs().max().item() for k in p1) < 1e-4, part


def test_reinforce_pp_cispo_clip_cov_and_the_curriculum_match_on_one_and_two_processes(tmp_path, tiny_base):
    """REINFORCE++ whitens over both processes' tokens, Clip-Cov chooses its tokens over both, the curriculum
    draws the same prompts from the same gathered pass rates, CISPO's second mini-batch holds the same rows:
    1 and 2 (DDP) processes log the same samples and metrics and end with the same weights."""
    args = ["--advantage", "reinforce_pp", "--policy-loss", "cispo", "--entropy-control", "clip-cov",
            "--clip-cov-ratio", "0.05", "--clip-cov-lower", "0", "--clip-cov-upper", "100", "--curriculum",
            "pass-rate", "--num-mini-batches", "2"]
    one, two = tmp_path / "one", tmp_path / "two"
    run(one, 1, *args)
    run(two, 2, *args)
    m1 = lines(one / "metrics.jsonl")
    assert all(r["policy/cov_tokens"] >= 1 and r["curriculum/seen"] > 0 for r in m1), m1
    assert_same_runs(one, two, ["train/reward", "train/advantage_abs", "loss/policy", "policy/clipfrac",
                                "policy/cov_tokens", "policy/covariance", "curriculum/seen", "curriculum/all_failed"])


def replay(dump, processes: int) -> subprocess.CompletedProcess:
    """`python replay.py DUMP` as `launch` runs the trainer: 1 process, or `processes` DDP CPU processes."""
    cmd, env, unset = launch(dump, processes)
    cmd = cmd[:cmd.index("train_ppo.py")] + ["replay.py", str(dump)]
    return run_script(*cmd, env=env, unset=unset, timeout=600)


def test_kl_cov_matches_on_two_processes_and_a_two_process_dump_replays_bit_for_bit(tmp_path, tiny_base):
    """KL-Cov's tokens chosen over both processes and its penalty on the second mini-batch: 1 and 2 processes
    agree (one step: without the ratio clip, a later step's samples can differ by a token drawn from weights
    that differ in the last bits). The 2-process run's dump of the step replayed on 2 processes gives the
    weights of its checkpoint after the step exactly; on 1 process it is refused in one line."""
    args = ["--advantage", "grpo", "--entropy-control", "kl-cov", "--kl-cov-ratio", "0.05", "--num-mini-batches",
            "2", "--dump-rollouts", "0", "--save-every", "1", "--max-steps", "1"]
    one, two = tmp_path / "one", tmp_path / "two"
    run(one, 1, *args)
    run(two, 2, *args)
    assert all(r["policy/kl_cov_penalty"] > 0 for r in lines(two / "metrics.jsonl"))
    assert_same_runs(one, two, ["train/reward", "loss/policy", "policy/cov_tokens", "policy/kl_cov_penalty"])
    dump = two / "rollouts" / "rollout-000000"
    result = replay(dump, 2)
    assert result.returncode == 0, result.stderr[-3000:]
    a = load_file(dump / "replay" / "checkpoints" / "step-000001" / "model.safetensors")
    b = load_file(two / "checkpoints" / "step-000001" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    refused = replay(dump, 1)
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1] == (f"error: {dump} was dumped by 2 process(es); replay it with "
                                                       "as many (this launch has 1)")


@pytest.mark.parametrize("mode", [pytest.param("ddp", marks=slow), "fsdp2"])
def test_lora_checkpoints_hold_what_trains_and_resume_exactly(mode, tmp_path, tiny_base):
    """Two processes, PPO with LoRA: the checkpoint holds only the adapters and the value head (and their
    optimizer states), and a run stopped after 2 steps and resumed ends as a run of 3 steps did."""
    args = ["--advantage", "gae", "--lora-r", "4", "--save-every", "1", "--max-steps", "3"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run(whole, 2, *args, mode=mode)
    run(resumed, 2, *args[:-1], "2", mode=mode)
    saved = resumed / "checkpoints" / "step-000002"
    if mode == "fsdp2":  # accelerate's FSDP format (the config's FULL_STATE_DICT: one file per model)
        policy, critic = (torch.load(saved / name, weights_only=True)
                          for name in ("pytorch_model_fsdp.bin", "pytorch_model_fsdp_1.bin"))
    else:
        policy, critic = load_file(saved / "model.safetensors"), load_file(saved / "model_1.safetensors")
    assert policy and all(".lora_A." in k or ".lora_B." in k for k in policy), sorted(policy)[:5]
    assert "value_head.weight" in critic and all("lora_" in k or k == "value_head.weight" for k in critic)
    out = run(resumed, 2, *args, mode=mode)
    assert "resuming from" in out and all(part in out for part in GOT[mode]), out[:2000]

    def comparable(run_dir):
        return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in lines(run_dir / "metrics.jsonl")]

    assert comparable(resumed) == comparable(whole)
    for part in ("policy/adapter_model.safetensors", "critic/adapter_model.safetensors",
                 "critic/value_head.safetensors"):
        a, b = load_file(resumed / part), load_file(whole / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


@pytest.mark.parametrize("mode", [pytest.param("zero2", marks=needs_deepspeed),
                                  pytest.param("zero3", marks=needs_deepspeed)])
def test_deepspeed_skips_and_counts_a_nonfinite_update(mode, tmp_path, tiny_base):
    """A NaN loss in step 1 under DeepSpeed: its optimizer step is skipped (DeepSpeed's own check of the
    gradient norm), counted once per skipped step, and the run trains on with finite weights."""
    run(tmp_path, 2, "--advantage", "grpo", "--max-steps", "3", mode=mode, REASONER_ZERO_NAN_STEPS="1")
    rows = lines(tmp_path / "metrics.jsonl")
    assert [r["train/nonfinite_updates"] for r in rows] == [0, 1, 0]
    assert all(r["policy/grad_norm"] > 0 for r in (rows[0], rows[2]))
    policy = load_file(tmp_path / "policy" / "model.safetensors")
    assert all(v.isfinite().all() for v in policy.values())


def test_a_launch_that_is_not_what_it_asked_stops_with_one_line(tmp_path, tiny_base):
    """A CPU copy of the FSDP config (use_cpu: true, 2 processes) launched without ACCELERATE_USE_CPU starts
    two processes that accelerate each sees as a lone process: they would both train as rank 0 on the same
    data into one directory. The run stops before any model loads, naming both differences."""
    config = tmp_path / "cpu.yaml"
    text = (ROOT / "configs" / "accelerate" / "fsdp.yaml").read_text()
    config.write_text(text.replace("use_cpu: false", "use_cpu: true").replace("num_processes: 8", "num_processes: 2"))
    result = run_script("-m", "accelerate.commands.launch", "--config_file", str(config), "--mixed_precision", "no",
                        "--main_process_port", str(free_port()), "train_grpo.py", "--output-dir", str(tmp_path / "out"),
                        *COMMON, unset=("ACCELERATE_USE_CPU",), env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode != 0
    errors = {line for line in result.stderr.splitlines() if line.startswith("error: ")}
    assert len(errors) == 1, result.stderr[-3000:]  # one line (printed by each process)
    line = errors.pop()
    assert "2 processes were launched (WORLD_SIZE) but accelerate sees 1" in line
    assert "the launch asked for FSDP but the processes run NO" in line
    assert not (tmp_path / "out" / "config.json").exists()


# --------------------------------------------------------------------------------------------------
# Real launches of the shipped accelerate configs: CUDA GPUs only (tiny built-in model, one step).
# --------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA GPUs")
@pytest.mark.parametrize("name", ["1gpu", "8gpu_ddp", "fsdp"])
def test_launch_tiny_run(name, tmp_path):
    processes = ACCEL_EXPECTED[name][1]
    if processes > 1 and torch.cuda.device_count() < 2:
        pytest.skip("needs at least 2 CUDA GPUs")
    processes = min(processes, torch.cuda.device_count())
    cmd = ["-m", "accelerate.commands.launch", "--config_file", str(ACCEL_DIR / f"{name}.yaml"),
           "--num_processes", str(processes), str(ROOT / "train_ppo.py"), "--max_steps", "1",
           "--prompts_per_step", str(2 * processes), "--num_generations", "2", "--micro_batch_size", "2",
           "--critic_mini_batches", "1", "--eval_every", "0", "--bf16", "--output_dir", str(tmp_path)]
    if name == "fsdp":
        cmd[cmd.index("--config_file") + 2:cmd.index("--config_file") + 2] = ["--fsdp_transformer_layer_cls_to_wrap",
                                                                             "LlamaDecoderLayer"]  # the tiny model
    result = run_script(*cmd, timeout=1800)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "policy" / "model.safetensors").is_file()


@needs_deepspeed
def test_zero3_launched_with_accelerates_flags_saves_its_model(tmp_path, tiny_base):
    """`accelerate launch --use_deepspeed --zero_stage 3` leaves stage3_gather_16bit_weights_on_model_save off,
    as `accelerate config`'s default answer does; the run sets it, so its final save gathers the weights."""
    from safetensors.torch import load_file

    run(tmp_path / "out", 2, "--advantage", "grpo", "--max-steps", "2", mode="zero3-flags")
    weights = load_file(tmp_path / "out" / "policy" / "model.safetensors")
    assert weights and all(t.numel() > 0 for t in weights.values())


# --------------------------------------------------------------------------------------------------
# Faults of the processes: one dies or stops mid-run
# --------------------------------------------------------------------------------------------------

FAULT_RUN = ["--advantage", "grpo", "--max-steps", "4", "--save-every", "1"]


def comparable(path) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in lines(path)]


def assert_same_run(out, reference) -> None:
    assert comparable(out / "metrics.jsonl") == comparable(reference / "metrics.jsonl")
    a, b = load_file(out / "policy" / "model.safetensors"), load_file(reference / "policy" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b)


def faulted_run(out, mode: str, sig: int, *args: str, launch_flags: tuple = (), **env_extra: str):
    """Launch 2 processes, send `sig` to rank 1 once 2 steps are logged; (launcher's exit code, stderr, pid)."""
    import psutil

    cmd, env, unset = launch(out, 2, *FAULT_RUN, *args, mode=mode, **env_extra)
    cmd[cmd.index("train_ppo.py"):cmd.index("train_ppo.py")] = launch_flags
    log = out.parent / f"{out.name}.stderr"
    with open(log, "w") as stderr:  # a file: a pipe read only at the end could fill and block the launch
        proc = start_script(*cmd, env=env, unset=unset, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not (
                (out / "metrics.jsonl").exists() and len(lines(out / "metrics.jsonl")) >= 2):
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before the fault"
        rank1 = next(p for p in psutil.Process(proc.pid).children(recursive=True)
                     if "train_ppo.py" in " ".join(p.cmdline()) and p.environ().get("RANK") == "1")
        start = time.time()
        os.kill(rank1.pid, sig)
        proc.wait(timeout=300)
        print(f"{mode}: signal {sig} to rank 1; the launch ended {time.time() - start:.1f} s later")
    finally:
        for p in psutil.Process().children(recursive=True):  # the launch, and a rank it left behind
            if p.pid == proc.pid or "train_ppo.py" in " ".join(safe_cmdline(p)):
                with contextlib.suppress(psutil.Error):
                    p.kill()
    return proc.returncode, log.read_text(), rank1.pid


def safe_cmdline(process) -> list[str]:
    import psutil

    try:
        return process.cmdline()
    except psutil.Error:  # gone, or a zombie
        return []


@pytest.mark.parametrize("mode", ["ddp", "fsdp2", pytest.param("zero3", marks=needs_deepspeed)])
def test_a_process_killed_mid_run_is_named_in_one_line_and_the_rerun_resumes_exactly(mode, tmp_path, tiny_base):
    """SIGKILL of one of 2 processes: the other stops with one line naming it (not a traceback of the collective
    that failed), and the same command resumes from the last checkpoint to the uninterrupted run's metrics and
    weights."""
    reference, out = tmp_path / "reference", tmp_path / "killed"
    run(reference, 2, *FAULT_RUN, mode=mode)
    code, stderr, pid = faulted_run(out, mode, signal.SIGKILL)
    assert code != 0 and "[rank0]: Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"process 1 (pid {pid}) is gone" in errors[0], stderr[-3000:]
    assert errors[0].endswith("run the same command again to resume from the last checkpoint"), errors
    assert "resuming from" in run(out, 2, *FAULT_RUN, mode=mode)
    assert_same_run(out, reference)


def test_a_stopped_process_is_named_after_the_collective_timeout(tmp_path, tiny_base):
    """SIGSTOP of one of 2 processes: nothing breaks a connection, so the other waits in its next collective
    for --collective-timeout seconds, then stops with one line naming the stopped process."""
    reference, out = tmp_path / "reference", tmp_path / "stopped"
    run(reference, 2, *FAULT_RUN)
    start = time.time()
    code, stderr, pid = faulted_run(out, "ddp", signal.SIGSTOP, "--collective-timeout", "15")
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert code != 0 and len(errors) == 1 and f"process 1 (pid {pid}) is stopped" in errors[0], stderr[-3000:]
    assert time.time() - start < 120
    assert "resuming from" in run(out, 2, *FAULT_RUN)
    assert_same_run(out, reference)


def test_an_elastic_restart_resumes_by_itself_to_the_uninterrupted_run(tmp_path, tiny_base):
    """`--max_restarts 1 --rdzv_backend c10d` with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: the launcher restarts both
    processes after one is killed, and they resume from the last checkpoint to the same metrics and weights,
    the launch ending well by itself. (With the default static rendezvous the restarted processes fail to
    connect, "Gloo connectFullMesh failed ... Connection refused", in a plain accelerate script too; with c10d
    sharing its store they hung in connecting in 2 of 3 tries.)"""
    reference, out = tmp_path / "reference", tmp_path / "restarted"
    run(reference, 2, *FAULT_RUN)
    code, stderr, pid = faulted_run(out, "ddp", signal.SIGKILL, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1",
                                    launch_flags=("--max_restarts", "1", "--rdzv_backend", "c10d"))
    assert code == 0, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"process 1 (pid {pid}) is gone" in errors[0], stderr[-3000:]
    assert "the launcher restarts the processes (restart 1 of 1) and they resume" in errors[0], errors
    assert_same_run(out, reference)


# --------------------------------------------------------------------------------------------------
# Two machines on one host: 2 launches x 1 process, each with its own home and cache, one output directory
# --------------------------------------------------------------------------------------------------

def machines(out, homes: list, *args: str) -> list:
    """Start one launch per home, as machines 0 and 1 of a 2-machine launch on this host; the launches."""
    port = free_port()
    launches = []
    for rank, home in enumerate(homes):
        cmd = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "2",
               "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
               "--mixed_precision", "no", "--dynamo_backend", "no", "train_ppo.py", "--output-dir", str(out),
               *COMMON, *args]
        env = {"OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "HOME": str(home)}
        log = open(home / "launch.log", "w")  # noqa: SIM115 - the launch's; a pipe read later would fill and block
        launches.append(start_script(*cmd, env=env, unset=("REASONER_ZERO_CACHE", "XDG_CACHE_HOME"),
                                     stdout=log, stderr=subprocess.STDOUT))
    return launches


def finished(launches: list, homes: list, timeout: float) -> list[str]:
    """Wait for the launches; their output."""
    for launch in launches:
        launch.wait(timeout=timeout)
    return [(home / "launch.log").read_text() for home in homes]


def home_with_base(home, tiny_base, change: float = 0.0):
    """A home whose cache holds the tiny base (one weight moved by `change`), or none if `tiny_base` is None."""
    import shutil

    from safetensors.torch import save_file

    cache = home / ".cache" / "reasoner-zero"
    cache.mkdir(parents=True)
    if tiny_base is not None:
        shutil.copytree(tiny_base, cache / tiny_base.name)
        if change:
            weights = load_file(cache / tiny_base.name / "model.safetensors")
            weights["model.norm.weight"][0] += change
            save_file(weights, cache / tiny_base.name / "model.safetensors", metadata={"format": "pt"})
    return home


def test_two_machines_on_one_host_equal_two_processes_on_one(tmp_path, tiny_base):
    """Machine 1 builds the tiny base in its own cache (transformers used to save nothing there, off global rank
    0, and the empty build went into the cache) while machine 0 has it; the run equals 2 processes on one
    machine (the KL reference too: exactly 0 at step 0), and the shared output directory holds what a
    one-machine run writes, each file once."""
    args = ("--advantage", "gae", "--kl-coef", "0.05")
    reference, out = tmp_path / "one-machine", tmp_path / "two-machines"
    run(reference, 2, *args)
    homes = [home_with_base(tmp_path / "m0", tiny_base), home_with_base(tmp_path / "m1", None)]
    launches = machines(out, homes, *args)
    logs = finished(launches, homes, timeout=900)
    assert [launch.returncode for launch in launches] == [0, 0], [log[-3000:] for log in logs]
    built = list((tmp_path / "m1" / ".cache" / "reasoner-zero").glob("tiny-base-*/model.safetensors"))
    assert len(built) == 1 and built[0].read_bytes() == (tiny_base / "model.safetensors").read_bytes()
    assert lines(out / "metrics.jsonl")[0]["policy/kl"] == 0.0
    assert_same_run(out, reference)
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert files == {str(p.relative_to(reference)) for p in reference.rglob("*") if p.is_file()}


def test_machines_with_different_bases_stop_in_one_line(tmp_path, tiny_base):
    homes = [home_with_base(tmp_path / "m0", tiny_base), home_with_base(tmp_path / "m1", tiny_base, change=0.22)]
    launches = machines(tmp_path / "out", homes)
    logs = finished(launches, homes, timeout=600)
    assert all(launch.returncode != 0 for launch in launches)
    last = [line for line in logs[0].splitlines() if line.startswith("error: ")]
    assert len(last) == 1 and last[0].startswith("error: the processes would not start from the same model: its "
                                                 "weight files ("), logs[0][-3000:]
    assert "on process 1" in last[0] and "differ from process 0's" in last[0], last
    assert not (tmp_path / "out" / "metrics.jsonl").exists() or not lines(tmp_path / "out" / "metrics.jsonl")
