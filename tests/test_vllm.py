"""The vLLM rollout engine (vllm_engine.py, --rollout-engine vllm): its weights follow the policy, it samples as HF
generate does (greedy rows equal, stop ids and strings, one seed per prompt whatever the batch), its log-probs
agree with the trainer's, and runs with it learn, resume exactly and match on 1 and 2 processes.

Needs requirements-vllm.txt (marker `vllm`, not in the default suite); without vLLM these tests fail, they do
not skip. Run: python -m pytest -m vllm. The refusals without vLLM are in the default suite (unmarked).
"""

import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_script, script_env, train

from data.loading import format_prompt
from rollout import forward_logprobs, generate_responses, prepare_for_sampling, stop_positions
from utils import left_pad

vllm = pytest.mark.vllm


def test_without_vllm_the_engine_is_refused_in_one_line_naming_the_install(monkeypatch):
    import sys

    from vllm_engine import engine_problems, vllm_problems

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError, as when it is missing
    problems = vllm_problems()
    assert len(problems) == 1 and "pip install --no-deps -r requirements-vllm.txt" in problems[0]

    class Args:
        rollout_engine, checkpoint_sampling = "vllm", True

    assert "use --rollout-engine hf" in engine_problems(Args)[0]
    Args.rollout_engine = "hf"
    assert engine_problems(Args) == []

QUESTIONS = ("What is 1 + 2?", "Tom has 12 apples and gets 7 more. How many apples does Tom have now?",
             "Compute 3 - 1.", "What is 40 + 2?")
STOPS = ["</answer>", "User:"]


@pytest.fixture(scope="module")
def setup(tiny_base):
    """One engine for the module (vLLM keeps one in-process engine at a time), the tiny base and prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_engine import VLLMEngine

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    stop_ids = prepare_for_sampling(tokenizer, model, log=lambda *_: None)
    ids, mask = left_pad([tokenizer(format_prompt(q, "orz", tokenizer))["input_ids"] for q in QUESTIONS],
                         tokenizer.pad_token_id)
    engine = VLLMEngine(str(tiny_base), max_model_len=512, seed=0)
    kw = dict(max_new_tokens=40, top_p=1.0, top_k=0, stop_token_ids=stop_ids, pad_token_id=tokenizer.pad_token_id,
              stop_strings=STOPS, tokenizer=tokenizer)
    yield engine, model, tokenizer, ids, mask, kw
    engine.close()


def responses(out: torch.Tensor, kw: dict) -> list[list[int]]:
    lengths, _ = stop_positions(out, kw["stop_token_ids"], kw["stop_strings"], kw["tokenizer"])
    return [row[:n] for row, n in zip(out.tolist(), lengths.tolist(), strict=True)]


def perturbed(model, seed: int, scale: float = 0.02):
    """`model` with every weight moved by seeded noise, as an update would move it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


@vllm
def test_weights_follow_the_policy_greedy_rows_equal_hf(setup):
    """After the policy changes, `following` gives the engine its weights: greedy rows equal HF generate's on
    the changed policy (and differ from the base's, so the check can fail); the same version is not reloaded."""
    import copy

    from vllm_engine import generate_responses as vllm_generate

    engine, base, tokenizer, ids, mask, kw = setup
    greedy = dict(kw, num_generations=1, temperature=0.0)
    before = responses(generate_responses(base, ids, mask, **greedy), kw)
    assert responses(vllm_generate(engine.following(base, 0), ids, mask, **greedy, seeds=[1]), kw) == before
    policy = perturbed(copy.deepcopy(base), seed=1)
    after = responses(generate_responses(policy, ids, mask, **greedy), kw)
    assert after != before, "the perturbation should change the greedy rows"
    assert responses(vllm_generate(engine.following(policy, 1), ids, mask, **greedy, seeds=[1]), kw) == after
    other = perturbed(copy.deepcopy(base), seed=2, scale=0.05)  # same version: the engine keeps what it has
    assert responses(vllm_generate(engine.following(other, 1), ids, mask, **greedy, seeds=[1]), kw) == after
    engine.following(base, 2)


@vllm
def test_lora_adapters_are_merged_into_the_engines_weights(setup):
    """A LoRA policy's engine samples the merged model: greedy rows equal HF's on the peft model, whose
    adapters (B set non-zero) change them."""
    import copy

    from peft import LoraConfig, get_peft_model

    from vllm_engine import generate_responses as vllm_generate
    from vllm_engine import policy_weights

    engine, base, tokenizer, ids, mask, kw = setup
    greedy = dict(kw, num_generations=1, temperature=0.0)
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    inner = peft.get_base_model()
    names = [n for n, _ in policy_weights(inner)]
    assert names == list(base.state_dict()) and not any("lora" in n or "base_layer" in n for n in names)
    hf = responses(generate_responses(inner, ids, mask, **greedy), kw)
    assert hf != responses(generate_responses(base, ids, mask, **greedy), kw)
    assert responses(vllm_generate(engine.following(inner, 10), ids, mask, **greedy, seeds=[1]), kw) == hf
    engine.following(base, 11)


@vllm
def test_sampled_rows_stop_as_hf_and_their_logprobs_match_the_trainers(setup):
    """Sampling at T = 0.8: every row ends at its first stop token or stop string (kept) or at the length
    limit; the engine's log-prob of each token is the trainer's softmax(logits / T) log-prob (fp32)."""
    from vllm_engine import generate_responses as vllm_generate

    engine, base, tokenizer, ids, mask, kw = setup
    engine.following(base, 20)
    got = {}
    out = vllm_generate(engine, ids, mask, **kw, num_generations=4, temperature=0.8, seeds=[5], logprobs_out=got)
    lengths, truncated = stop_positions(out, kw["stop_token_ids"], STOPS, tokenizer)
    stop = torch.tensor(kw["stop_token_ids"])
    for row, n, cut in zip(out, lengths.tolist(), truncated.tolist(), strict=True):
        assert not torch.isin(row[:n - 1], stop).any()
        assert (row[n:] == kw["pad_token_id"]).all(), "nothing after the first stop"
        if cut:
            assert n == kw["max_new_tokens"]
    mask_r = (torch.arange(out.shape[1])[None] < lengths[:, None]).float()
    rows = ids.repeat_interleave(4, 0), mask.repeat_interleave(4, 0)
    trainer, _ = forward_logprobs(base, torch.cat([rows[0], out], 1), torch.cat([rows[1], mask_r.long()], 1),
                                  out.shape[1], 0.8)
    diff = (trainer - got["logprobs"]).abs() * mask_r
    assert mask_r.sum() > 40 and diff.max() < 1e-3, diff.max()


@vllm
def test_a_prompts_samples_depend_on_its_seed_not_on_its_batch(setup):
    from vllm_engine import generate_responses as vllm_generate

    engine, base, tokenizer, ids, mask, kw = setup
    engine.following(base, 30)
    sample = dict(kw, num_generations=3, temperature=1.0)
    together = vllm_generate(engine, ids, mask, **sample, batch_size=1, seeds=[7, 8, 9, 10])
    alone = vllm_generate(engine, ids[2:3], mask[2:3], **sample, batch_size=1, seeds=[9])
    assert responses(together, kw)[6:9] == responses(alone, kw)
    again = vllm_generate(engine, ids, mask, **sample, batch_size=1, seeds=[7, 8, 9, 11])
    assert responses(again, kw)[:9] == responses(together, kw)[:9]
    assert responses(again, kw)[9:] != responses(together, kw)[9:]


# ---------------------------------------------------------------------------------------------
# Runs with the engine (subprocesses: each has its own engine)
# ---------------------------------------------------------------------------------------------

RUN = ("--rollout-engine", "vllm", "--prompts-per-step", "16", "--num-generations", "4", "--eval-limit", "64",
       "--eval-every", "2", "--generation-batch-size", "8")


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def same_run(a: list[dict], b: list[dict], skip=("time/", "perf/")) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b, strict=True):
        for k in x:
            if not k.startswith(skip):
                assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-7), (x["step"], k)


@vllm
@pytest.mark.parametrize("script", ["train_grpo.py", "train_ppo.py"])
def test_a_run_with_the_engine_learns_logs_its_mismatch_and_resumes_exactly(script, tmp_path):
    """6 steps straight, and 4 steps then the same command with --max-steps 6: the same metrics at every step
    and bitwise the same policy. The mismatch is logged every step, small and finite (fp32 engine)."""
    straight = train(script, tmp_path / "a", *RUN, "--max-steps", "6", "--save-every", "2")
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = train(script, tmp_path / "b", *RUN, "--max-steps", "4", "--save-every", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = train(script, tmp_path / "b", *RUN, "--max-steps", "6", "--save-every", "2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = rows(tmp_path / "a"), rows(tmp_path / "b")
    same_run(a, b)
    steps = [r for r in a if "train/reward" in r]
    assert len(steps) == 6 and all(0 <= r["rollout/logprob_diff_mean"] < 1e-4 for r in steps)
    assert all(0 <= r["rollout/logprob_diff_max"] < 1e-2 for r in steps)
    assert a[-1]["eval/accuracy"] > a[0]["eval/accuracy"]
    assert ((tmp_path / "a" / "policy" / "model.safetensors").read_bytes()
            == (tmp_path / "b" / "policy" / "model.safetensors").read_bytes())


@vllm
def test_two_processes_sample_and_train_as_one(tmp_path):
    import subprocess
    import sys

    one = train("train_grpo.py", tmp_path / "one", *RUN, "--max-steps", "2", "--eval-every", "0")
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          str(ROOT / "train_grpo.py"), "--output-dir", str(tmp_path / "two"), *RUN,
                          "--max-steps", "2", "--eval-every", "0"],
                         cwd=ROOT, env=script_env({"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}),
                         capture_output=True, text=True, timeout=900)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert [r["train/reward"] for r in a] == [r["train/reward"] for r in b]  # the same samples
    # each process audits --audit-samples of its own; the trainer's log-probs round with the batch's shape
    same_run(a, b, skip=("time/", "perf/", "reward/audit", "rollout/logprob_diff"))


# Sharded modes on 2 CPU processes: the shipped GPU config with the process count and the tiny model's layer.
SHARDED = {"fsdp2": ["--config_file", "configs/accelerate/fsdp.yaml", "--fsdp_transformer_layer_cls_to_wrap",
                     "LlamaDecoderLayer"],
           "zero3": ["--config_file", "configs/accelerate/zero3.yaml"]}


@vllm
@pytest.mark.parametrize("mode,extra", [("fsdp2", ()), ("zero3", ()), ("fsdp2", ("--lora-r", "8"))],
                         ids=["fsdp2", "zero3", "fsdp2-lora"])
def test_sharded_training_gathers_whole_weights_for_the_engine(mode, extra, tmp_path):
    """Under FSDP2 and ZeRO-3 each process holds a shard; the engine of each gets the whole weights, gathered
    after every update. Step 1 samples what one process samples (the same responses and rewards), and the
    engine's log-probs equal the trainer's: an engine with stale or partial weights would sample otherwise."""
    args = (*RUN, "--max-steps", "3", "--eval-every", "0", "--samples-per-step", "64", *extra)
    one = train("train_grpo.py", tmp_path / "one", *args)
    assert one.returncode == 0, one.stderr[-3000:]
    env = {"OMP_NUM_THREADS": "1", **({"DS_ACCELERATOR": "cpu"} if mode == "zero3" else {"ACCELERATE_USE_CPU": "true"})}
    two = run_script("-m", "accelerate.commands.launch", *SHARDED[mode], "--num_processes", "2", "--num_machines",
                     "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "train_grpo.py"),
                     "--output-dir", tmp_path / "two", *args, env=env, unset=("ACCELERATE_USE_CPU",), timeout=900)
    assert two.returncode == 0, two.stderr[-3000:]
    assert ("FSDP2" if mode == "fsdp2" else "ZeRO-3") in two.stdout
    a, b = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert [r["train/reward"] for r in a] == [r["train/reward"] for r in b]
    s1, s2 = (json_lines(out / "samples.jsonl") for out in (tmp_path / "one", tmp_path / "two"))
    assert [(s["step"], s["response"]) for s in s1] == [(s["step"], s["response"]) for s in s2]
    assert {s["step"] for s in s2} == {0, 1, 2}
    for r in b:
        assert 0 <= r["rollout/logprob_diff_mean"] < 1e-4 and r["rollout/logprob_diff_max"] < 1e-2, r["step"]


def json_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@vllm
@pytest.mark.parametrize("advantage,dtype", [("grpo", "float32"), ("gae", "bfloat16")])
def test_the_real_model_trains_with_the_engine(advantage, dtype, tmp_path):
    """SmolLM2-135M (requirements-model.txt), 2 steps with the engine in fp32 (GRPO) and bf16 (PPO): the run
    ends, the policy moved, and the logged mismatch is finite and small: fp32 within rounding, bf16 within
    bf16's (the sampler's probabilities are those of a bf16 model, the trainer's of fp32)."""
    from safetensors.torch import load_file
    from test_real_model import FLAGS

    from benchmark import smollm2_gguf

    gguf = smollm2_gguf()
    out = tmp_path / "run"
    done = train("train_ppo.py", out, "--model", str(gguf), "--advantage", advantage, *FLAGS,
                 "--rollout-engine", "vllm", "--rollout-dtype", dtype, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [r for r in rows(out) if "train/reward" in r]
    assert len(steps) == 2
    limit = 1e-3 if dtype == "float32" else 0.2
    assert all(0 <= r["rollout/logprob_diff_mean"] < limit for r in steps), steps
    assert all(r["rollout/logprob_diff_max"] < float("inf") for r in steps)
    from rollout import convert_gguf

    base, policy = load_file(convert_gguf(gguf) / "model.safetensors"), load_file(out / "policy" / "model.safetensors")
    assert any(not torch.equal(base[k], policy[k]) for k in policy)



@vllm
def test_evaluate_with_the_engine_judges_as_with_hf_generate(tmp_path):
    """Greedy evaluation (T = 0, 1 sample) of the tiny base: the engine's per-problem results equal HF
    generate's, so `evaluate.py --rollout-engine vllm` measures the same thing faster."""
    from conftest import run_script

    results = {}
    for engine in ("hf", "vllm"):
        out = tmp_path / engine
        done = run_script("evaluate.py", "--datasets", "synthetic", "--limit", "24", "--num-samples", "1",
                          "--temperature", "0", "--max-new-tokens", "32", "--output-dir", out,
                          "--rollout-engine", engine, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        results[engine] = json.loads((out / "results.json").read_text())["per_problem"]
    assert results["hf"] == results["vllm"]
    assert 0 < sum(p["correct"] for p in results["hf"]["synthetic"]) < 24


@vllm
def test_curation_with_the_engine_records_the_same_pass_rates_as_hf(tmp_path):
    """`python -m data.curate difficulty --rollout-engine vllm`, greedy: the pass rates equal HF generate's."""
    from conftest import run_script

    rates = {}
    for engine in ("hf", "vllm"):
        out = tmp_path / f"{engine}.jsonl"
        done = run_script("-m", "data.curate", "difficulty", "--model", "tiny", "--dataset", "synthetic",
                          "--limit", "6", "--num-samples", "1", "--temperature", "0", "--max-new-tokens", "24",
                          "--max-pass", "1", "--output", out, "--rollout-engine", engine, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        rows = [json.loads(line) for line in Path(str(out) + ".progress").read_text().splitlines()[1:]]
        rates[engine] = [(r["id"], r["pass_rate"]) for r in rows]
    assert len(rates["hf"]) == 6 and rates["hf"] == rates["vllm"]
