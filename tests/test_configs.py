"""The shipped launch configs (configs/accelerate/) and ORZ recipes (configs/recipes/): fast, no GPU.

Each accelerate YAML is read by accelerate's own loader and run through the launcher's argument handling
and environment preparation, and the resulting environment builds accelerate's FSDP / DeepSpeed plugin,
so a misspelt or misplaced key fails here rather than on a GPU node. Each recipe loads through
`utils.parse_args` (which rejects unknown keys) and passes `train_ppo.check_args` for the process count of
the accelerate config named in its launch line. Launching for real needs CUDA GPUs and is skipped without.
"""

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
ACCEL_DIR = ROOT / "configs" / "accelerate"
RECIPE_DIR = ROOT / "configs" / "recipes"

# name -> (distributed_type, total processes, machines)
ACCEL_EXPECTED = {
    "1gpu": ("NO", 1, 1),
    "8gpu_ddp": ("MULTI_GPU", 8, 1),
    "fsdp": ("FSDP", 8, 1),
    "2node": ("MULTI_GPU", 16, 2),
    "zero2": ("DEEPSPEED", 8, 1),
    "zero3": ("DEEPSPEED", 8, 1),
    "zero3_offload": ("DEEPSPEED", 8, 1),
}
RECIPES = {"orz_0.5b": "Qwen/Qwen2.5-0.5B", "orz_1.5b": "Qwen/Qwen2.5-1.5B", "orz_7b": "Qwen/Qwen2.5-7B"}
LAUNCH_RE = re.compile(r"accelerate launch --config_file (configs/accelerate/\S+\.yaml)(?: --num_processes (\d+))?"
                       r" train_ppo\.py --config (configs/recipes/\S+\.yaml)")


def test_the_expected_files_are_there():
    assert sorted(p.stem for p in ACCEL_DIR.glob("*.yaml")) == sorted(ACCEL_EXPECTED)
    assert sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")) == sorted([*RECIPES, "smollm2_cpu"])


def test_the_real_model_recipe_loads_and_its_prompt_ends_where_the_answer_starts():
    from cli import parse_args
    from data.loading import format_prompt
    from train_ppo import Args

    args = parse_args(Args, ["--config", str(RECIPE_DIR / "smollm2_cpu.yaml")])
    prompt = format_prompt("What is 6 + 12?", args.prompt_template)
    assert prompt.endswith("\n\nQuestion: What is 6 + 12?\nAnswer:") and prompt.count("\\boxed{") == 2
    assert args.stop_strings == ["\n\n", "Question:"] and args.lr == 1e-5


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


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_loads_with_orz_values(name):
    from cli import parse_args
    from data.loading import ORZ_STOP_STRINGS
    from train_ppo import Args

    args = parse_args(Args, ["--config", str(RECIPE_DIR / f"{name}.yaml")])  # unknown keys are an error
    assert isinstance(args, Args)
    assert args.model == RECIPES[name]
    assert args.advantage == "gae"
    assert isinstance(args.lr, float) and args.lr == 1e-6
    assert isinstance(args.critic_lr, float) and args.critic_lr == 5e-6
    assert args.gamma == 1.0 and args.lam == 1.0
    assert args.kl_coef == 0.0
    assert args.warmup_steps == 50
    assert args.temperature == 1.0 and args.top_p == 1.0 and args.top_k == 0
    assert args.num_generations == 64 and args.max_new_tokens == 8000
    assert args.num_mini_batches == 1 and args.ppo_epochs == 1
    assert args.bf16 is True and args.gradient_checkpointing is True
    assert args.prompt_template == "orz" and args.stop_strings == ORZ_STOP_STRINGS
    assert args.dataset == "orz_math_57k_collected.json"
    if name != "orz_0.5b":
        assert args.prompts_per_step == 128


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_eval_set_is_shipped(name):
    from cli import parse_args
    from data.loading import list_eval_sets
    from train_ppo import Args

    args = parse_args(Args, ["--config", str(RECIPE_DIR / f"{name}.yaml")])
    for name in args.eval_datasets.split(","):
        assert name in list_eval_sets() and list_eval_sets()[name].is_file()


def recipe_launches(name: str) -> list[tuple[str, int]]:
    """(accelerate config, process count) of each `accelerate launch` line in a recipe's header."""
    launches = []
    for line in (RECIPE_DIR / f"{name}.yaml").read_text().splitlines():
        m = re.search(r"accelerate launch --config_file configs/accelerate/(\w+)\.yaml(?: --num_processes (\d+))? "
                      r"train_ppo\.py --config configs/recipes/" + re.escape(name), line)
        if m:
            launches.append((m[1], int(m[2]) if m[2] else ACCEL_EXPECTED[m[1]][1]))
    return launches


def with_local_paths(args, tmp_path):
    """The recipe's arguments with the dataset (which users download), the model (which check_args looks
    up on the hub, out of reach of tests) and the output dir in tmp_path."""
    data = tmp_path / args.dataset
    data.write_text("[]")
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    return dataclasses.replace(args, dataset=str(data), model=str(model), output_dir=str(tmp_path / "out"))


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_passes_check_args_for_its_launch_configs(name, tmp_path):
    from cli import parse_args
    from train_ppo import Args, check_args

    args = with_local_paths(parse_args(Args, ["--config", str(RECIPE_DIR / f"{name}.yaml")]), tmp_path)
    launches = recipe_launches(name)
    assert launches, f"{name}.yaml has no `accelerate launch ... --config` line in its header"
    for _, processes in launches:
        check_args(args, processes)  # raises SystemExit with the problem


def test_recipes_also_fit_two_nodes(tmp_path):
    from cli import parse_args
    from train_ppo import Args, check_args

    for name in ("orz_1.5b", "orz_7b"):
        args = with_local_paths(parse_args(Args, ["--config", str(RECIPE_DIR / f"{name}.yaml")]), tmp_path)
        check_args(args, 16)


def test_command_line_overrides_recipe():
    from cli import parse_args
    from train_ppo import Args

    args = parse_args(Args, ["--config", str(RECIPE_DIR / "orz_7b.yaml"), "--max_steps", "3"])
    assert args.max_steps == 3 and args.lr == 1e-6


# --------------------------------------------------------------------------------------------------
# Real launches: CUDA GPUs only (tiny built-in model, one step).
# --------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA GPUs")
@pytest.mark.parametrize("name", ["1gpu", "8gpu_ddp", "fsdp"])
def test_launch_tiny_run(name, tmp_path):
    processes = ACCEL_EXPECTED[name][1]
    if processes > 1 and torch.cuda.device_count() < 2:
        pytest.skip("needs at least 2 CUDA GPUs")
    processes = min(processes, torch.cuda.device_count())
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCEL_DIR / f"{name}.yaml"),
           "--num_processes", str(processes), str(ROOT / "train_ppo.py"), "--max_steps", "1",
           "--prompts_per_step", str(2 * processes), "--num_generations", "2", "--micro_batch_size", "2",
           "--critic_mini_batches", "1", "--eval_every", "0", "--bf16", "--output_dir", str(tmp_path)]
    if name == "fsdp":
        cmd[cmd.index("--config_file") + 2:cmd.index("--config_file") + 2] = ["--fsdp_transformer_layer_cls_to_wrap",
                                                                             "LlamaDecoderLayer"]  # the tiny model
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "policy" / "model.safetensors").is_file()
