"""Shared test setup: the repo root on sys.path, one cached tiny base model for the whole session, the one way
tests run a script in a subprocess (`run_script`, `start_script`, and `train` for a trainer run), and the few
helpers and tables more than one test file uses. Where a new test goes: tests/README.md."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# One cache for the whole session (and across sessions on a machine), so the tiny base is built once.
os.environ.setdefault("REASONER_ZERO_CACHE", str(Path.home() / ".cache" / "reasoner-zero"))


@pytest.fixture(scope="session")
def tiny_base():
    """Directory of the built-in tiny base model (built on first use, about 2 minutes on 2 cores)."""
    from data.synthetic import build_tiny_base

    return build_tiny_base()


# --------------------------------------------------------------------------------------------------
# Running a script in a subprocess
# --------------------------------------------------------------------------------------------------

def script_env(env: dict | None = None, unset=()) -> dict:
    """This process's environment without the variables named in `unset`, with `env` on top."""
    return {**{k: v for k, v in os.environ.items() if k not in unset}, **(env or {})}


def run_script(*argv, env: dict | None = None, unset=(), cwd=ROOT, timeout: float = 600,
               **kwargs) -> subprocess.CompletedProcess:
    """`python *argv` in a subprocess and wait for it: a script of the checkout (`"train_ppo.py", "--max-steps",
    "2"`), `"-m", "module"` or `"-c", code`. It runs in `cwd` (the repo root, as a user runs the scripts; None:
    this process's directory) with this process's environment plus `env` and without `unset`; stdout and stderr
    are captured as text; a run longer than `timeout` seconds fails the test (TimeoutExpired). Other keyword
    arguments go to subprocess.run (e.g. preexec_fn)."""
    return subprocess.run([sys.executable, *map(str, argv)], cwd=cwd, env=script_env(env, unset),
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def start_script(*argv, env: dict | None = None, unset=(), cwd=ROOT, **kwargs) -> subprocess.Popen:
    """`run_script` without waiting, for a test that stops or kills the script: keyword arguments go to
    subprocess.Popen (stdout=subprocess.PIPE, text=True, ...); nothing is captured unless asked."""
    return subprocess.Popen([sys.executable, *map(str, argv)], cwd=cwd, env=script_env(env, unset), **kwargs)


def train(script: str, out, *args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """A run of a trainer (`train_ppo.py` or `train_grpo.py`) writing to `out`, with `args` after --output-dir,
    and 2 OpenMP threads unless the environment sets OMP_NUM_THREADS."""
    threads = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    return run_script(ROOT / script, "--output-dir", out, *args, env={**threads, **(env or {})}, timeout=timeout)


# --------------------------------------------------------------------------------------------------
# Helpers and tables more than one test file uses
# --------------------------------------------------------------------------------------------------

def model_dir_stub(path: Path) -> Path:
    """A directory with the files the --model check looks for (a causal LM's config.json, empty weights and
    tokenizer files), for tests of what comes before any model loads."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text('{"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}')
    for name in ("model.safetensors", "tokenizer.json"):
        (path / name).write_text("")
    return path


needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed is not installed (pip install deepspeed==0.19.8)")

# The shipped launch configs (configs/accelerate/) and ORZ recipes (configs/recipes/).
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


def dropout_model(tiny_base, out):
    """A small random GPT-2 with dropout everywhere (embeddings, attention, residuals), the tiny tokenizer."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=256,
                        resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, eos_token_id=tokenizer.eos_token_id,
                        bos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    GPT2LMHeadModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
