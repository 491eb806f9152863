"""Arguments: the command line and config files (`utils.parse_args`), and the checks every run passes
before any model loads (`train_ppo.check_args`). Every bad input ends in one line saying what to change.
"""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from cli import parse_args
from train_ppo import Args, check_args


def parse_error(capsys, argv: list[str], args_class=Args) -> str:
    """The one line `parse_args` prints when it rejects `argv` (it exits with status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        parse_args(args_class, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: "), err
    return err.strip()


def run_script(*argv: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


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


def test_unknown_flag_in_the_real_script_is_one_line_without_traceback():
    result = run_script("train_ppo.py", "--max-stesp", "5")
    assert result.returncode == 2
    expected = "error: unknown argument --max-stesp (did you mean --max-steps?)"
    assert result.stderr.strip() == expected, result.stderr


def test_flag_forms():
    args = parse_args(Args, ["--max-steps", "3", "--no-whiten-advantages", "--bf16", "--stop-strings", "a",
                             "b c", "--advantage", "rloo", "--lr", "-0.001"])
    got = (args.max_steps, args.whiten_advantages, args.bf16, args.stop_strings, args.advantage, args.lr)
    assert got == (3, False, True, ["a", "b c"], "rloo", -0.001)
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


def option_blocks(text: str) -> dict[str, str]:
    """Option name -> its help text, from an argparse help page."""
    blocks, name = {}, None
    for line in text.splitlines():
        stripped = line.strip()
        if line.startswith("  -"):
            name, _, rest = stripped.partition(" ")
            name = name.rstrip(",")
            first_word = rest.split("  ", 1)
            blocks[name] = first_word[1].strip() if len(first_word) > 1 else ""
        elif line.startswith("    ") and name:
            blocks[name] += " " + stripped
        else:
            name = None
    return blocks


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
    assert "{gae,grpo,rloo}" in text


def test_help_of_a_config_shows_its_values(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("max_steps: 7\n")
    with pytest.raises(SystemExit):
        parse_args(Args, ["--config", str(config), "--help"])
    assert "(default: 7)" in option_blocks(capsys.readouterr().out)["--max-steps"]


def test_grpo_help_keeps_the_groups_and_its_own_defaults():
    result = run_script("train_grpo.py", "--help")
    assert result.returncode == 0, result.stderr
    blocks = option_blocks(result.stdout)
    assert "(default: grpo)" in blocks["--advantage"] and "off for grpo" in blocks["--whiten-advantages"]
    lines = result.stdout.splitlines()
    assert lines.index("model and data:") < lines.index("rollout:")
    assert result.stdout.splitlines()[2].startswith("Train a base LM to reason with GRPO")


def test_evaluate_help_shows_its_own_usage():
    result = run_script("evaluate.py", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: evaluate.py "), result.stdout[:200]
    assert "--num-samples N" in result.stdout and "--num_samples" not in result.stdout
    result = run_script("evaluate.py", "--num-sample", "2")
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: unknown argument --num-sample (did you mean --num-samples?)"), result.stderr


# --------------------------------------------------------------------------------------------------
# check_args: what parsing cannot see, before any model loads
# --------------------------------------------------------------------------------------------------

def check_error(tmp_path, **changes) -> str:
    args = dataclasses.replace(Args(output_dir=str(tmp_path / "out")), **changes)
    with pytest.raises(SystemExit) as err:
        check_args(args, 1)
    message = str(err.value)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


@pytest.mark.parametrize("name,value", [
    ("lr", float("inf")), ("critic_lr", float("inf")), ("max_grad_norm", float("nan")),
    ("temperature", float("nan")), ("reward_timeout", float("inf")), ("kl_coef", float("nan")),
    ("entropy_coef", float("nan")), ("value_clip", float("nan")), ("format_reward_weight", float("inf")),
    ("seed", -1), ("seed", 2**32), ("synthetic_difficulty", 0),
])
def test_non_finite_and_out_of_range_values_are_rejected(name, value, tmp_path):
    message = check_error(tmp_path, **{name: value})
    assert "--" + name.replace("_", "-") in message, message


def test_largest_seed_is_accepted(tmp_path):
    check_args(Args(output_dir=str(tmp_path / "out"), seed=2**32 - 2), 2)
    with pytest.raises(SystemExit, match="--seed"):
        check_args(Args(output_dir=str(tmp_path / "out"), seed=2**32 - 1), 2)  # + the process index


def test_model_directory_without_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "config.json" in check_error(tmp_path, model=str(tmp_path / "empty"))
    (tmp_path / "weights.bin").write_text("x")
    assert "--model" in check_error(tmp_path, model=str(tmp_path / "weights.bin"))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    check_args(Args(output_dir=str(tmp_path / "out"), model=str(tmp_path / "model")), 1)


def test_gguf_models_that_cannot_load_are_one_line_before_any_model_loads(tmp_path):
    from rollout import gguf_file

    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not gguf")
    assert "model.gguf is not a GGUF file" in check_error(tmp_path, model=str(fake))
    assert "model.gguf is not a GGUF file" in check_error(tmp_path, model=str(tmp_path))  # its directory
    assert "no such path" in check_error(tmp_path, model=str(tmp_path / "missing.gguf"))
    (tmp_path / "other.gguf").write_bytes(b"GGUF")
    assert "2 .gguf files in this directory (model.gguf, other.gguf): name one" in check_error(
        tmp_path, model=str(tmp_path))
    assert gguf_file(str(tmp_path)) is None and gguf_file(str(tmp_path / "other.gguf")) == tmp_path / "other.gguf"
    check_args(Args(output_dir=str(tmp_path / "out"), model=str(tmp_path / "other.gguf")), 1)
    (tmp_path / "config.json").write_text("{}")  # a Hugging Face directory that also holds GGUF files
    assert gguf_file(str(tmp_path)) is None
    check_args(Args(output_dir=str(tmp_path / "out"), model=str(tmp_path)), 1)


def test_hub_id_that_cannot_be_resolved_offline_stops_before_any_model_loads(tmp_path):
    result = run_script("train_ppo.py", "--model", "nobody-here/no-such-model-xyz", "--output-dir",
                        str(tmp_path / "out"), env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: --model nobody-here/no-such-model-xyz"), result.stderr
    assert "HF_HUB_OFFLINE" in lines[0]


def test_reward_module_that_exits_at_import_is_one_line(tmp_path):
    (tmp_path / "exits.py").write_text("import os\nos._exit(9)\n\n"
                                       "def score(response, ground_truth, **extras):\n    return 1.0\n")
    (tmp_path / "raises.py").write_text("raise SystemExit('bye')\n")
    for name, expected in (("exits.py", "exit code 9"), ("raises.py", "bye")):
        result = run_script("train_ppo.py", "--reward", f"{tmp_path / name}:score", "--output-dir",
                            str(tmp_path / "out"))
        assert result.returncode == 1, (name, result.returncode, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert lines[-1].startswith("error: --reward") and expected in lines[-1], result.stderr
        assert name in lines[-1]
    args = Args(output_dir=str(tmp_path / "out"), reward=f"{tmp_path / 'exits.py'}:score")
    with pytest.raises(SystemExit, match="exit code 9"):
        check_args(args, 1)  # in this very process: the import is tried elsewhere


def test_data_file_errors_stop_the_run_before_any_model_loads(tmp_path):
    model = tmp_path / "model"  # passes the --model check, but no tokenizer or weights could load from it
    model.mkdir()
    (model / "config.json").write_text("{}")
    data = tmp_path / "bad.jsonl"
    data.write_text('{"question": "1+1?", "answer": "2"}\n{"question": "2+2?"}\n')
    result = run_script("train_ppo.py", "--model", str(model), "--dataset", str(data), "--output-dir",
                        str(tmp_path / "out"))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "bad.jsonl" in lines[-1], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------------------------------
# Tracking (--report-to)
# --------------------------------------------------------------------------------------------------

def test_report_to_a_tracker_that_is_not_installed(tmp_path, monkeypatch):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    message = check_error(tmp_path, report_to="wandb")
    assert "--report-to wandb" in message and "pip install wandb" in message
    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: False)
    assert "pip install tensorboard" in check_error(tmp_path, report_to="tensorboard")
    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: True)
    check_args(Args(output_dir=str(tmp_path / "out"), report_to="wandb"), 1)


def test_tensorboard_gets_every_row_of_metrics_jsonl(tmp_path, tiny_base):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    result = run_script("train_grpo.py", "--max-steps", "2", "--prompts-per-step", "4", "--num-generations",
                        "4", "--max-new-tokens", "16", "--eval-every", "1", "--eval-limit", "4",
                        "--eval-num-samples", "1", "--reward-workers", "0", "--report-to", "tensorboard",
                        "--output-dir", str(out), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(out / "reasoner-zero")).Reload()
    logged = [e.step for e in events.Scalars("eval/accuracy")]
    assert logged == [r["step"] for r in rows if "eval/accuracy" in r] == [0, 1, 2]  # the final eval too
    assert [e.step for e in events.Scalars("train/reward")] == [0, 1]


def test_math_reward_without_math_verify_is_one_line_before_any_model_loads(tmp_path):
    """Without math-verify every answer that is not a plain number would score 0: stop at the start."""
    code = ("import sys; sys.modules['math_verify'] = None; import train_ppo; "
            f"train_ppo.main(train_ppo.Args(output_dir={str(tmp_path / 'run')!r}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "math-verify" in last and "pip install" in last, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
