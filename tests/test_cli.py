"""Unit tests of cli.py, the arguments: the command line and config files (`cli.parse_args`): kebab-case flags,
no prefix matching, values checked against the fields' types, --help, and every bad input in one line saying
what to change; and the shipped ORZ recipes (configs/recipes/), which load through `parse_args` (unknown keys
are an error) and pass `train_ppo.check_args` for the process counts of the accelerate configs named in their
launch lines.

Run: python -m pytest tests/test_cli.py -q
"""

import dataclasses
import json
import re

import pytest
from conftest import ACCEL_EXPECTED, RECIPE_DIR, RECIPES, model_dir_stub, option_blocks

from cli import parse_args
from train_ppo import Args


def parse_error(capsys, argv: list[str], args_class=Args) -> str:
    """The one line `parse_args` prints when it rejects `argv` (it exits with status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        parse_args(args_class, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: "), err
    return err.strip()

# --------------------------------------------------------------------------------------------------
# Config files: values are checked against the fields' types
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,key", [
    ('stop_strings: "</answer>"\n', "stop_strings"),  # a string where a list is expected
    ("stop_strings: [1, 2]\n", "stop_strings"),
    ("lr: fast\n", "lr"),  # a string where a number is expected
    ("max_steps: 2.5\n", "max_steps"),
    ("model: 7\n", "model"),  # a number where a string is expected
    ("bf16: 'yes please'\n", "bf16"),
    ("advantage: gpro\n", "advantage"),
    ("max-stepz: 7\n", "max-stepz"),  # unknown key
])
def test_config_values_of_the_wrong_type_are_one_line_naming_file_and_key(text, key, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    message = parse_error(capsys, ["--config", str(config)])
    assert str(config) in message and key in message, message


def test_config_unknown_key_suggests_the_closest(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("max_stepz: 7\n")
    assert "did you mean max_steps?" in parse_error(capsys, ["--config", str(config)])


@pytest.mark.parametrize("name,text", [
    ("list.yaml", "- lr: 1\n- max_steps: 2\n"), ("scalar.yaml", "42\n"), ("text.json", '"lr"'),
    ("list.json", "[1, 2]"),
])
def test_config_that_is_not_a_mapping_is_one_line(name, text, tmp_path, capsys):
    config = tmp_path / name
    config.write_text(text)
    message = parse_error(capsys, ["--config", str(config)])
    assert str(config) in message and "mapping" in message, message


@pytest.mark.parametrize("name,text", [
    ("broken.yaml", "lr: [1, 2\nmax_steps: 3\n"), ("broken.json", '{"lr": 1e-3,}'),
])
def test_config_with_a_syntax_error_is_one_line(name, text, tmp_path, capsys):
    config = tmp_path / name
    config.write_text(text)
    message = parse_error(capsys, ["--config", str(config)])
    assert str(config) in message and "line" in message, message


def test_config_values_keep_their_types_in_both_key_spellings(tmp_path):
    config = tmp_path / "run.yaml"
    # PyYAML reads 1e-6 (no dot) as a string: it is still a number for a float field
    config.write_text("lr: 1e-6\ncritic-lr: 2\nmax-steps: 7\nstop_strings: ['</answer>']\nbf16: true\n"
                      "eval_datasets: null\nadvantage: rloo\n")
    args = parse_args(Args, ["--config", str(config)])
    assert (args.lr, args.critic_lr, args.max_steps, args.stop_strings, args.bf16, args.eval_datasets,
            args.advantage) == (1e-6, 2.0, 7, ["</answer>"], True, None, "rloo")
    assert isinstance(args.critic_lr, float)
    config.write_text(json.dumps({"max_steps": 3, "stop-strings": []}))
    json_config = config.with_suffix(".json")
    config.rename(json_config)
    args = parse_args(Args, ["--config", str(json_config), "--max-steps", "4"])
    assert (args.max_steps, args.stop_strings) == (4, [])


def test_config_file_with_command_line_override(tmp_path):
    from cli import parse_args
    from train_grpo import Args

    config = tmp_path / "run.yaml"
    config.write_text("max_steps: 7\nlr: 0.001\nstop_strings: ['</answer>']\n")
    args = parse_args(Args, ["--config", str(config), "--lr", "0.002"])
    assert (args.max_steps, args.lr, args.stop_strings, args.advantage) == (7, 0.002, ["</answer>"], "grpo")
    config.write_text("max_stepz: 7\n")
    with pytest.raises(SystemExit):
        parse_args(Args, ["--config", str(config)])


# --------------------------------------------------------------------------------------------------
# The command line: kebab-case flags, no prefix matching, one line for an unknown flag
# --------------------------------------------------------------------------------------------------

def test_unknown_flag_is_one_line_with_the_closest_name(capsys):
    message = parse_error(capsys, ["--max-stesp", "5"])
    assert message == "error: unknown argument --max-stesp (did you mean --max-steps?)"
    assert "did you mean --max-steps?" in parse_error(capsys, ["--max-stesp=5"])


def test_no_prefix_matching(capsys):
    message = parse_error(capsys, ["--max-step", "5"])
    assert message == "error: unknown argument --max-step (did you mean --max-steps?)"
    parse_error(capsys, ["--temp", "0.5"])


def test_flag_forms():
    args = parse_args(Args, ["--max-steps", "3", "--no-whiten-advantages", "--bf16", "--stop-strings", "a",
                             "b c", "--advantage", "rloo", "--format-reward-weight", "-0.001"])
    got = (args.max_steps, args.whiten_advantages, args.bf16, args.stop_strings, args.advantage,
           args.format_reward_weight)
    assert got == (3, False, True, ["a", "b c"], "rloo", -0.001)  # a negative number is a value, not a flag
    assert parse_args(Args, []) == Args()
    assert parse_args(Args, ["--max_steps", "3", "--no_whiten_advantages"]).max_steps == 3  # old spelling


@pytest.mark.parametrize("argv,expected", [
    (["--advantage", "gpro"], "--advantage"), (["--max-steps", "x"], "--max-steps"), (["--lr"], "--lr"),
    (["--bf16", "true"], "--bf16"), (["--config"], "--config"),
    (["--max-steps", "3", "--whiten-advantages", "true"], "--whiten-advantages takes no value"),
])
def test_bad_values_are_one_line(argv, expected, capsys):
    assert expected in parse_error(capsys, argv)


# --------------------------------------------------------------------------------------------------
# --help
# --------------------------------------------------------------------------------------------------

def help_text(capsys, args_class=Args, **kwargs) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(args_class, ["--help"], **kwargs)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_help_is_grouped_kebab_case_with_one_default_per_option(capsys):
    import train_ppo

    text = help_text(capsys, description=train_ppo.__doc__)
    lines = text.splitlines()
    assert lines[0].startswith("usage: ") and len(lines[0]) <= 110
    assert train_ppo.__doc__.splitlines()[0] in text  # the description line
    for title in ("model and data:", "rollout:", "reward:", "advantages and losses:", "optimisation:",
                  "evaluation and logging:", "checkpoints and faults:"):
        assert title in lines, title
    assert lines.index("model and data:") < lines.index("rollout:") < lines.index("checkpoints and faults:")
    assert "--max_steps" not in text and "--max-steps N" in text
    blocks = option_blocks(text)
    fields = {f.name for f in dataclasses.fields(Args)}
    assert {"--" + name.replace("_", "-") for name in fields} <= blocks.keys()
    for name, block in blocks.items():
        assert block.count("default") <= 1, (name, block)
    assert blocks["--no-whiten-advantages"] != blocks["--whiten-advantages"]
    assert "(default: on)" in blocks["--scale-by-std"] and "(default: off)" in blocks["--bf16"]
    assert "(default: on for gae" in blocks["--whiten-advantages"]  # decided by --advantage
    assert "(default: 60)" in blocks["--max-steps"]
    assert "{gae,grpo,rloo,reinforce_pp}" in text


def test_help_of_a_config_shows_its_values(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("max_steps: 7\n")
    with pytest.raises(SystemExit):
        parse_args(Args, ["--config", str(config), "--help"])
    assert "(default: 7)" in option_blocks(capsys.readouterr().out)["--max-steps"]


# --------------------------------------------------------------------------------------------------
# The shipped recipes (configs/recipes/)
# --------------------------------------------------------------------------------------------------

def test_the_real_model_recipe_loads_and_its_prompt_ends_where_the_answer_starts():
    from cli import parse_args
    from data.loading import format_prompt
    from train_ppo import Args

    args = parse_args(Args, ["--config", str(RECIPE_DIR / "smollm2_cpu.yaml")])
    prompt = format_prompt("What is 6 + 12?", args.prompt_template)
    assert prompt.endswith("\n\nQuestion: What is 6 + 12?\nAnswer:") and prompt.count("\\boxed{") == 2
    assert args.stop_strings == ["\n\n", "Question:"] and args.lr == 1e-5


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
    up on the hub, out of reach of tests: a stub) and the output dir in tmp_path."""
    data = tmp_path / args.dataset
    data.write_text("[]")
    model = model_dir_stub(tmp_path / "model")
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


def test_a_flag_reads_its_choices_from_the_table_when_it_is_parsed(monkeypatch, tmp_path):
    import algos
    from cli import field_choices

    assert field_choices(Args, "advantage") == ["gae", "grpo", "rloo", "reinforce_pp"]
    monkeypatch.setitem(algos.ADVANTAGE_ESTIMATORS, "mine", lambda **_: None)
    assert parse_args(Args, ["--advantage", "mine"]).advantage == "mine"  # registered before parsing: a choice
    config = tmp_path / "run.yaml"
    config.write_text("advantage: mine\nloss_agg: token-mean\n")
    assert parse_args(Args, ["--config", str(config)]).advantage == "mine"
    from train_grpo import Args as GRPOArgs  # redeclares the field for its default and keeps the choices

    assert field_choices(GRPOArgs, "advantage") == ["gae", "grpo", "rloo", "reinforce_pp", "mine"]


def test_in_a_jupyter_kernel_the_kernels_own_arguments_are_not_ours(monkeypatch):
    import sys
    import types

    from cli import script_argv

    monkeypatch.setattr(sys, "argv", ["ipykernel_launcher.py", "-f", "/tmp/kernel-1.json"])
    assert script_argv() == ["-f", "/tmp/kernel-1.json"]
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    assert script_argv() == [] and parse_args(Args).max_steps == Args().max_steps


def test_a_yaml_alias_nest_is_one_short_line(tmp_path):
    """A few hundred bytes of YAML aliases stand for 9**9 strings ("billion laughs"): the error shows the value
    as far as it fits in one line, without expanding it (it was a 312 MB line, at 1.7 GB of memory)."""
    import resource

    from cli import read_config

    levels = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        levels.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    path = tmp_path / "laughs.yaml"
    path.write_text("stop_strings: {" + ", ".join(levels) + "}\n")
    assert len(path.read_bytes()) < 600
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError) as err:
        read_config(str(path), Args)
    message = str(err.value)
    assert message.startswith(f"{path}: stop_strings: expected a list of strings, got {{\"a\": [\"lol\", ")
    assert len(message) < 300 and "\n" not in message and message.endswith("..."), message
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # KiB
    from cli import _spelled

    assert [_spelled([1, 2]), _spelled(True), _spelled(["x"]), _spelled("x", json_like=False),
            _spelled({"a": [1]}), _spelled([[[1] * 100]], width=8)] == [
        '[1, 2]', 'true', '["x"]', "'x'", '{"a": [1]}', '[[[1, 1,...']
