"""Unit tests of launch.py and the shipped launch configs (configs/accelerate/): fast, no GPU.

Each accelerate YAML is read by accelerate's own loader and run through the launcher's argument handling
and environment preparation, and the resulting environment builds accelerate's FSDP / DeepSpeed plugin,
so a misspelt or misplaced key fails here rather than on a GPU node. Then the checks that a launch is what
it asked for (`launch_problems`) and the weights-only loader of DeepSpeed checkpoints (`read_weights_only`).
Launching for real is in test_distributed.py.

Run: python -m pytest tests/test_launch.py -q
"""

import os
import re
import shutil

import pytest
import torch
from conftest import ACCEL_DIR, ACCEL_EXPECTED, RECIPE_DIR, RECIPES, needs_deepspeed, start_script


def test_the_expected_files_are_there():
    assert sorted(p.stem for p in ACCEL_DIR.glob("*.yaml")) == sorted(ACCEL_EXPECTED)
    assert sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")) == sorted([*RECIPES, "smollm2_cpu"])


# --------------------------------------------------------------------------------------------------
# accelerate launch configs
# --------------------------------------------------------------------------------------------------

def load_accelerate_config(name: str):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    config = load_config_from_file(str(ACCEL_DIR / f"{name}.yaml"))  # raises on unknown top-level keys
    assert isinstance(config, ClusterConfig)
    return config


def launcher_env(name: str, monkeypatch) -> tuple[object, dict]:
    """What `accelerate launch --config_file NAME.yaml train_ppo.py` computes before starting processes:
    the validated arguments and the environment the training processes get (no process is started)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(ACCEL_DIR / f"{name}.yaml"), "train_ppo.py"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    if args.use_deepspeed:
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        monkeypatch.setattr(shutil, "which", lambda *a, **k: "/usr/bin/deepspeed")  # multi-node check only
        _, env = prepare_deepspeed_cmd_env(args)
    elif args.multi_gpu or args.use_fsdp:
        env = prepare_multi_gpu_env(args)
    else:
        env = {}
    return args, env


@pytest.mark.parametrize("name", sorted(ACCEL_EXPECTED))
def test_accelerate_config_loads_with_accelerates_loader(name):
    from accelerate.utils import DistributedType

    distributed_type, processes, machines = ACCEL_EXPECTED[name]
    config = load_accelerate_config(name)
    assert config.distributed_type == DistributedType(distributed_type)
    assert config.num_processes == processes
    assert config.num_machines == machines
    assert config.mixed_precision == "bf16"
    assert config.use_cpu is False
    assert config.compute_environment.value == "LOCAL_MACHINE"


@pytest.mark.parametrize("name", sorted(ACCEL_EXPECTED))
def test_launcher_accepts_config(name, monkeypatch):
    args, env = launcher_env(name, monkeypatch)
    _, processes, machines = ACCEL_EXPECTED[name]
    assert args.num_processes == processes and args.num_machines == machines
    assert args.mixed_precision == "bf16"
    if env:
        assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"


def test_two_node_config():
    config = load_accelerate_config("2node")
    assert config.machine_rank == 0  # the second machine passes --machine_rank 1
    assert config.main_process_port == 29500
    assert re.fullmatch(r"\d+\.\d+\.\d+\.\d+", config.main_process_ip)
    assert "--machine_rank 1" in (ACCEL_DIR / "2node.yaml").read_text()


def use_launcher_env(monkeypatch, env: dict, prefix: str) -> None:
    """This process's environment as the launcher prepares it for a training process: the variables with
    `prefix` replaced by `env`'s."""
    for key in [k for k in os.environ if k.startswith(prefix)]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def test_fsdp_config_builds_the_fsdp2_plugin(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin

    config = load_accelerate_config("fsdp")
    assert config.fsdp_config["fsdp_version"] == 2
    _, env = launcher_env("fsdp", monkeypatch)
    assert env["ACCELERATE_USE_FSDP"] == "true"
    use_launcher_env(monkeypatch, env, "FSDP_")
    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* environment, as in each training process
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True  # FSDP2's FULL_SHARD
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"  # full weights for save_pretrained
    assert plugin.cpu_ram_efficient_loading is True
    assert type(plugin.cpu_offload).__name__ == "OffloadPolicy"  # the no-offload policy (not CPUOffloadPolicy)
    assert plugin.transformer_cls_names_to_wrap == ["Qwen2DecoderLayer"]


@pytest.mark.parametrize("name, stage, offload", [("zero2", 2, "none"), ("zero3", 3, "none"),
                                                  ("zero3_offload", 3, "cpu")])
def test_deepspeed_configs_build_the_plugin(name, stage, offload, monkeypatch):
    from accelerate.utils import DeepSpeedPlugin

    _, env = launcher_env(name, monkeypatch)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    use_launcher_env(monkeypatch, env, "ACCELERATE_")
    plugin = DeepSpeedPlugin()  # reads the ACCELERATE_DEEPSPEED_* environment, as in each training process
    zero = plugin.deepspeed_config["zero_optimization"]
    assert zero["stage"] == stage and zero["offload_optimizer"]["device"] == offload
    assert zero["offload_param"]["device"] == "none"
    assert plugin.zero3_init_flag is False  # the critic's value head is built outside zero.Init
    if stage == 3:  # the final save_pretrained needs the gathered weights
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True


# --------------------------------------------------------------------------------------------------
# A launch that is not what it asked for
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("env, got, processes, expected", [
    ({"ACCELERATE_USE_FSDP": "true", "WORLD_SIZE": "2"}, "MULTI_CPU", 2, "asked for FSDP but the processes run "
                                                                          "MULTI_CPU"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "WORLD_SIZE": "2"}, "MULTI_CPU", 2, "asked for DEEPSPEED"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_USE_CPU": "true", "WORLD_SIZE": "2"}, "MULTI_CPU", 2,
     "DeepSpeed runs on CPU processes without ACCELERATE_USE_CPU"),
    ({"WORLD_SIZE": "2"}, "NO", 1, "2 processes were launched (WORLD_SIZE) but accelerate sees 1"),
    ({"WORLD_SIZE": "2"}, "MULTI_CPU", 2, None),
    ({}, "NO", 1, None),
])
def test_launch_problems(env, got, processes, expected, monkeypatch):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from launch import launch_problems

    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_CPU", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    accelerator = SimpleNamespace(distributed_type=DistributedType(got), num_processes=processes)
    problems = launch_problems(accelerator, {})
    assert (problems == []) if expected is None else any(expected in p for p in problems), problems


def test_launch_problems_names_a_model_deepspeed_does_not_hold(monkeypatch):
    """Under DeepSpeed every trained model must be an engine of the stage the launch asked for, and so must
    the reference model under ZeRO-3 (under ZeRO-2 it stays whole)."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from launch import launch_problems

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)

    def accelerator(stage):
        plugin = SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": stage}})
        return SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=2,
                               state=SimpleNamespace(deepspeed_plugin=plugin))

    def engine(stage):
        return SimpleNamespace(zero_optimization_stage=lambda: stage)

    plain = torch.nn.Linear(1, 1)
    held = {"policy": engine(3), "critic": engine(3), "reference model": engine(3)}
    assert launch_problems(accelerator(3), held) == []
    assert launch_problems(accelerator(2), {"policy": engine(2), "critic": None, "reference model": plain}) == []
    problems = launch_problems(accelerator(3), {"policy": engine(2), "critic": plain, "reference model": plain})
    assert problems == ["the launch asked for DeepSpeed ZeRO-3 but the policy is held by a ZeRO-2 engine",
                        "the launch asked for DeepSpeed ZeRO-3 but the critic is held by Linear",
                        "the launch asked for DeepSpeed ZeRO-3 but the reference model is held by Linear"]


# --------------------------------------------------------------------------------------------------
# DeepSpeed checkpoints are read weights-only
# --------------------------------------------------------------------------------------------------

class Payload:  # stands for any class a tampered checkpoint file might name
    pass


@needs_deepspeed
def test_deepspeed_checkpoint_files_are_read_weights_only(tmp_path):
    """The engines' loader (`read_weights_only`) reads tensors and DeepSpeed's own data classes, and refuses
    a file that names any other class, where DeepSpeed's loader would unpickle it."""
    import pickle
    from types import SimpleNamespace

    from deepspeed.runtime.zero.config import ZeroStageEnum

    from launch import read_weights_only

    engine = SimpleNamespace(checkpoint_engine=SimpleNamespace(load=None))
    read_weights_only(engine)
    torch.save({"w": torch.ones(2), "stage": ZeroStageEnum(2)}, tmp_path / "good.pt")
    loaded = engine.checkpoint_engine.load(str(tmp_path / "good.pt"))
    assert torch.equal(loaded["w"], torch.ones(2)) and loaded["stage"] == ZeroStageEnum(2)
    torch.save({"w": torch.ones(2), "x": Payload()}, tmp_path / "bad.pt")
    with pytest.raises(pickle.UnpicklingError, match="Payload"):
        engine.checkpoint_engine.load(str(tmp_path / "bad.pt"))


def test_a_lost_process_is_named_and_other_errors_pass_through(monkeypatch):
    """`names_lost_processes` turns a failed collective into one line naming the processes that are gone or
    stopped, and leaves our own errors and plain bugs as they are."""
    import os
    import signal
    import socket
    import time

    import pytest

    import launch
    from utils import RunError

    host = socket.gethostname()
    dead = start_script("-c", "pass")
    dead.wait()
    stopped = start_script("-c", "import time; time.sleep(60)")
    try:
        os.kill(stopped.pid, signal.SIGSTOP)
        for _ in range(500):
            if launch.process_state(stopped.pid) == "stopped":
                break
            time.sleep(0.01)
        assert launch.process_state(stopped.pid) == "stopped" and launch.process_state(dead.pid) == "gone"
        assert launch.process_state(os.getpid()) == "running"
        monkeypatch.setattr(launch, "PEERS", [(0, os.getpid(), host), (1, dead.pid, host), (2, stopped.pid, host),
                                              (3, 1, "other-host")])

        def fails(err):
            @launch.names_lost_processes
            def main():
                raise err
            return main

        with pytest.raises(RunError) as caught:
            fails(RuntimeError("[../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:26010: Connection reset "
                               "by peer. This is typically caused by a remote worker hanging"))()
        assert str(caught.value) == (
            f"error: a collective with the other 3 process(es) failed: process 1 (pid {dead.pid}) is gone; process 2 "
            f"(pid {stopped.pid}) is stopped; processes on other-host cannot be looked up from here (Read error "
            "[127.0.0.1]:26010: Connection reset by peer); run the same command again to resume from the last "
            "checkpoint")
        ours = RunError("error: step 3: stopped by signal 15")
        with pytest.raises(RunError) as caught:
            fails(ours)()
        assert caught.value is ours
        monkeypatch.setattr(launch, "PEERS", [(0, os.getpid(), host), (1, os.getppid(), host)])
        with pytest.raises(RuntimeError, match="a bug"):
            fails(RuntimeError("a bug"))()
    finally:
        stopped.kill()
        stopped.wait()
