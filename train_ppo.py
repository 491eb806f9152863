"""Train a base LM to reason with PPO and a rule-based reward, the Open-Reasoner-Zero way.

Algorithm: PPO (Schulman et al., arXiv:1707.06347v2) with a learned critic and GAE, as Open-Reasoner-Zero
runs it (arXiv:2503.24290v2): gamma = lambda = 1, no KL, a critic built from the base model, reward 1 for
a correct final `\\boxed{}` answer of a response that stopped on its own. The advantage estimator is a
flag on this one loop: `--advantage gae` (PPO, the default here), `grpo` (group baseline, DeepSeekMath
arXiv:2402.03300v3; `train_grpo.py` only changes defaults) or `rloo` (leave-one-out, arXiv:2402.14740v2).

Deviations from ORZ, numbered:
  1. The defaults train the built-in tiny model on the built-in arithmetic task on a CPU in minutes, so
     learning rates, batch sizes and lengths are small-model values; ORZ's own hyperparameters are in the
     README. ORZ: 128 prompts x 64 samples, lr 1e-6 (policy) / 5e-6 (critic), 8000 new tokens.
  2. Loss aggregation is a true token-mean over the whole optimizer batch across processes; ORZ's is a
     mean per packed row of up to 16k tokens, then averaged (close to, not exactly, a token-mean).
  3. No reference model is loaded when the KL coefficient is 0 (ORZ loads one only to log KL).
  4. The math checker is math-verify plus normalisation (reward.py); ORZ trained with its own checker.

Run it:
    python train_ppo.py                                  # built-in default: tiny model, CPU, ~5 minutes
    python train_ppo.py --help                           # every argument
    python train_ppo.py --config my_run.yaml --lr 1e-6   # a config file, overridden on the command line
    accelerate launch --num_processes 8 train_ppo.py --model Qwen/Qwen2.5-7B --dataset orz_math_57k.json
"""

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import Literal

# Set before torch loads its OpenMP runtime (libgomp), which reads it once. An idle OpenMP thread spins up to
# 300,000 times before it sleeps: alone on the machine that saves a wake-up per parallel region, but beside
# another CPU-heavy process on the same cores each run's threads spin while the thread they wait for is
# descheduled, and the default GRPO run took 4x (once 20x) as long per step instead of about 2x. With 1000
# spins it takes 2x beside another run, and alone as long as before, within noise (`python benchmark.py load`).
# Setting GOMP_SPINCOUNT or OMP_WAIT_POLICY yourself overrides this.
OPENMP_SETTING_APPLIED = "torch" not in __import__("sys").modules  # imported first (a notebook): too late
if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "1000"

import torch  # noqa: E402 - after the OpenMP setting above

from critic import ValueModel, compute_gae_advantages, compute_value_loss, explained_variance, forward_values
from data.loading import ORZ_STOP_STRINGS
from reward import RewardPool
from rollout import (
    Experience,
    batched_logprobs,
    compute_grpo_advantages,
    compute_rloo_advantages,
    equal_reward_groups,
    forward_logprobs,
    generate_responses,
    generate_responses_refill,
    model_problems,
    plan_micro_batches,
    prepare_for_sampling,
    repetition_flags,
    response_mask_from_lengths,
    stop_positions,
    zero_degenerate,
)
from utils import JsonlWriter, disable_dropout, left_pad, masked_mean, masked_whiten, number_problems, parse_args

SUMMED_STATS = ("loss/policy", "critic/value_loss", "policy/kl")  # shares of one batch loss, not means
# Token means, computed per micro-batch and weighted by its share of the mini-batch's tokens (all processes),
# so that they too are summed: then they do not depend on how the batch is split.
TOKEN_STATS = ("policy/clipfrac", "policy/approx_kl", "policy/ratio", "policy/entropy",
               "critic/clipfrac", "critic/values")


@dataclass
class Args:
    """Arguments of a run. A field's "group" metadata starts a group of --help (it lasts until the next)."""

    model: str = field(default="tiny", metadata={
        "group": "model and data", "help": "hub id, local path, or 'tiny' (built-in, made offline)"})
    dataset: str = field(default="synthetic", metadata={
        "help": "file (.json/.jsonl/.parquet), dataset dir or hub name, or 'synthetic'"})
    eval_datasets: str | None = field(default=None, metadata={
        "help": "comma-separated held-out sets (math500, aime2024, files, 'synthetic'); default: the synthetic test "
                "split when training on 'synthetic'"})
    question_field: str | None = field(default=None, metadata={"help": "field holding the question (default: auto)"})
    answer_field: str | None = field(default=None, metadata={"help": "field holding the final answer (default: auto)"})
    prompt_template: str = field(default="orz", metadata={
        "help": "'orz' (ORZ's plain-text template), 'chat', 'raw', or a string with {question}"})
    synthetic_difficulty: int = field(default=1, metadata={"help": "difficulty of the built-in task (1: a+b under 20)"})
    max_prompt_tokens: int = field(default=512, metadata={"help": "longer prompts are skipped (counted and logged)"})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "allow model code from the hub (off: it runs arbitrary code)"})
    output_dir: str = field(default="runs/ppo", metadata={"help": "where metrics, samples and the final model go"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    advantage: Literal["gae", "grpo", "rloo"] = field(default="gae", metadata={
        "group": "rollout", "help": "gae (PPO critic), grpo (group mean/std), rloo (leave-one-out)"})
    max_steps: int = field(default=60, metadata={"help": "RL steps (one rollout and its updates each)"})
    prompts_per_step: int = field(default=32, metadata={"help": "prompts per step, over all processes"})
    num_generations: int = field(default=8, metadata={"help": "samples per prompt"})
    max_new_tokens: int = field(default=32, metadata={"help": "response length limit; longer responses are truncated"})
    temperature: float = field(default=1.0, metadata={
        "help": "sampling temperature (also divides the training logits)"})
    top_p: float = field(default=1.0, metadata={"help": "keep 1.0 for training: log-probs do not replay truncation"})
    top_k: int = field(default=0, metadata={"help": "keep 0 for training: log-probs do not replay truncation"})
    stop_strings: list[str] = field(default_factory=lambda: list(ORZ_STOP_STRINGS), metadata={
        "help": "strings that end a response (kept in it)"})
    generation: Literal["generate", "refill"] = field(default="refill", metadata={
        "help": "refill: rows still running when most have stopped continue in a smaller call, so little decoding "
                "is spent on finished rows (rollout.generate_responses_refill; same sampling); generate: plain batched "
                "HF generate (also used under FSDP, and for models with linear-attention or convolution layers)"})
    refill_fraction: float = field(default=0.85, metadata={
        "help": "refill: end a call when at most this share of its rows is still running"})
    generation_batch_size: int = field(default=0, metadata={
        "help": "prompts per generate call (0: all of the process's prompts at once); each call is seeded from "
                "(seed, step, its first prompt's place), so with a size that divides every process's share, 1 and N "
                "processes sample the same tokens"})
    reward: str = field(default="math", metadata={
        "group": "reward", "help": "'math', module:function or path/file.py:function"})
    score_truncated: bool = field(default=False, metadata={"help": "score truncated responses too (ORZ: they get 0)"})
    format_reward_weight: float = field(default=0.0, metadata={"help": "weight of the optional format reward"})
    zero_repetitive: bool = field(default=False, metadata={
        "help": "reward 0 for a response caught in a loop (rollout.repetition_flags); repetition is always logged "
                "as train/repetition"})
    reward_workers: int = field(default=2, metadata={"help": "reward worker processes per training process"})
    reward_timeout: float = field(default=5.0, metadata={"help": "seconds per item before it scores 0"})
    gamma: float = field(default=1.0, metadata={"group": "advantages and losses", "help": "GAE discount (ORZ: 1)"})
    lam: float = field(default=1.0, metadata={"help": "GAE lambda (ORZ: 1)"})
    whiten_advantages: bool | None = field(default=None, metadata={
        "help": "whiten advantages over all response tokens of the batch (default: on for gae, as ORZ; off for "
                "grpo/rloo, whose groups with equal rewards then keep advantage 0)"})
    scale_by_std: bool = field(default=True, metadata={"help": "GRPO: divide by the group std (off: Dr. GRPO)"})
    drop_equal_groups: bool = field(default=False, metadata={
        "help": "leave groups whose rewards are all equal out of the update"})
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = field(
        default="token-mean", metadata={"help": "token-mean over the batch, mean of per-sequence means, or "
                                                "Dr. GRPO's constant normaliser"})
    clip_low: float = field(default=0.2, metadata={"help": "ratio clip below: 1 - clip_low"})
    clip_high: float = field(default=0.2, metadata={
        "help": "ratio clip above: 1 + clip_high (DAPO's clip-higher: 0.28)"})
    kl_coef: float = field(default=0.0, metadata={"help": "KL to the reference model (0: none loaded, as ORZ)"})
    kl_estimator: Literal["k3", "k1"] = field(default="k3", metadata={
        "help": "k3 in the loss (GRPO) or k1 in the reward (classic PPO)"})
    entropy_coef: float = field(default=0.0, metadata={"help": "entropy bonus (entropy is always logged)"})
    lr: float = field(default=1e-4, metadata={
        "group": "optimisation", "help": "policy learning rate (ORZ on real models: 1e-6)"})
    warmup_steps: int = field(default=0, metadata={
        "help": "linear warm-up over this many RL steps with updates, then constant; policy and critic alike "
                "(ORZ: 50)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping"})
    ppo_epochs: int = field(default=1, metadata={"help": "passes over each rollout"})
    num_mini_batches: int = field(default=1, metadata={"help": "policy optimizer steps per epoch (ORZ: 1)"})
    micro_batch_size: int = field(default=64, metadata={
        "help": "at most this many rows per forward/backward pass (rows are sorted by length first)"})
    max_tokens_per_microbatch: int = field(default=0, metadata={
        "help": "and at most this many padded tokens (rows x (longest prompt + longest response)) per pass "
                "(0: no token limit)"})
    max_padding: float = field(default=0.1, metadata={
        "help": "and a new micro-batch starts where padding would exceed this share of its tokens (1: no limit)"})
    critic_lr: float = field(default=5e-4, metadata={"help": "critic learning rate (ORZ: 5e-6)"})
    critic_epochs: int = field(default=1, metadata={"help": "critic passes over each rollout"})
    critic_mini_batches: int = field(default=2, metadata={"help": "critic optimizer steps per epoch (ORZ: 12)"})
    critic_warmup_steps: int = field(default=0, metadata={"help": "train only the critic for the first N steps"})
    value_clip: float = field(default=0.2, metadata={
        "help": "clip of the value loss around old values (<= 0: plain loss)"})
    bf16: bool = field(default=False, metadata={"help": "bf16 mixed precision"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "trade compute for activation memory"})
    eval_every: int = field(default=20, metadata={
        "group": "evaluation and logging", "help": "evaluate every N steps (and at the start and end; 0: never)"})
    eval_num_samples: int = field(default=4, metadata={
        "help": "samples per eval problem; accuracy is their mean (avg@k)"})
    eval_limit: int = field(default=64, metadata={"help": "eval problems (0: all)"})
    samples_per_step: int = field(default=4, metadata={"help": "responses written to samples.jsonl each step"})
    report_to: Literal["none", "tensorboard", "wandb"] = field(default="none", metadata={
        "help": "also log metrics to TensorBoard (in OUTPUT_DIR/reasoner-zero) or Weights & Biases "
                "(project reasoner-zero)"})
    save_every: int = field(default=20, metadata={
        "group": "checkpoints and faults", "help": "checkpoint every N steps into output_dir/checkpoints (0: never)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "keep the last K checkpoints"})
    resume: bool = field(default=False, metadata={
        "help": "resume from the last checkpoint (also automatic when one exists, unless --overwrite)"})
    overwrite: bool = field(default=False, metadata={
        "help": "start afresh: delete the previous run's outputs in output_dir (checkpoints, logs, models)"})
    max_nonfinite_updates: int = field(default=3, metadata={
        "help": "stop after this many updates in a row with a NaN/inf loss or gradient (each one is skipped)"})


# --------------------------------------------------------------------------------------------------
# The math of the update: pure functions, tensors in and tensors out.
# --------------------------------------------------------------------------------------------------

def loss_weights(response_mask: torch.Tensor, mode: str, num_sequences: int, num_tokens: float,
                 max_new_tokens: int) -> torch.Tensor:
    """Per-token weights (B, R) that make `sum(per_token_loss * weights)` the chosen average.

    `num_sequences` and `num_tokens` count the whole optimizer batch over all processes, so the loss of a
    micro-batch is its exact share and gradient accumulation does not change the objective. Modes:
    "token-mean" (DAPO, arXiv:2503.14476v1, eq. 12), "seq-mean-token-mean" (GRPO as written,
    arXiv:2402.03300v3 eq. 3), "seq-mean-token-sum-norm" (Dr. GRPO's constant normaliser
    B * max_new_tokens, arXiv:2503.20783v1 sec. 3.2). Example: masks [1,1,0],[1,0,0] in token-mean ->
    [1/3,1/3,0],[1/3,0,0]; in seq-mean-token-mean -> [1/4,1/4,0],[1/2,0,0].
    """
    mask = response_mask.float()
    if mode == "token-mean":
        return mask / max(num_tokens, 1.0)
    if mode == "seq-mean-token-mean":
        return mask / mask.sum(dim=1, keepdim=True).clamp(min=1) / num_sequences
    if mode == "seq-mean-token-sum-norm":
        return mask / (num_sequences * max_new_tokens)
    raise ValueError(f"unknown loss aggregation {mode!r}")


def compute_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        loss_weights: torch.Tensor, clip_low: float = 0.2,
                        clip_high: float = 0.2) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate, with separate lower and upper clip ranges, aggregated by `loss_weights`.

    arXiv:1707.06347v2 eq. 7; clip-higher from DAPO (arXiv:2503.14476v1, sec. 3.1). The log-ratio is
    clamped to +-20 before exp so one bad token cannot overflow. All (B, R).
    Example: logratio log(1.5), advantage 1, clip 0.2 -> ratio 1.5, loss per token -min(1.5, 1.2) = -1.2.
    """
    log_ratio = (logprobs - old_logprobs).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    loss = (per_token * loss_weights).sum()
    mask = (loss_weights > 0).float()
    stats = {"policy/clipfrac": masked_mean((clipped > unclipped).float(), mask).item(),
             "policy/approx_kl": masked_mean(0.5 * log_ratio.detach() ** 2, mask).item(),
             "policy/ratio": masked_mean(ratio.detach(), mask).item()}
    return loss, stats


def compute_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from sampled tokens (Schulman, "Approximating KL
    divergence", 2020). k1 = log p - log q; k3 = q/p - 1 - log(q/p) >= 0, unbiased in value but not in
    gradient; both clamped. (B, R) -> (B, R). Example: log p = 0, log q = -1 ->
    k1 = 1, k3 = e^-1 + 1 - 1 = 0.368.
    """
    log_ratio = (ref_logprobs - logprobs).clamp(-20.0, 20.0)
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        return (torch.exp(log_ratio) - log_ratio - 1.0).clamp(max=10.0)
    raise ValueError(f"unknown KL estimator {estimator!r}")


def outcome_token_rewards(rewards: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Place each sequence's reward on its last valid response token, the one whose next state is terminal
    (value 0), not one slot after it. (B,) -> (B, R)."""
    last = (response_mask.sum(dim=1).long() - 1).clamp(min=0)
    token_rewards = torch.zeros_like(response_mask, dtype=rewards.dtype)
    token_rewards[torch.arange(len(rewards)), last] = rewards
    return token_rewards * response_mask


# --------------------------------------------------------------------------------------------------
# Setup helpers.
# --------------------------------------------------------------------------------------------------

def check_args(args: Args, num_processes: int = 1) -> None:
    """Catch settings that cannot work before any model loads; one line saying what to change."""
    problems = []
    if args.prompts_per_step % num_processes or args.prompts_per_step < num_processes:
        problems.append(f"--prompts-per-step {args.prompts_per_step} must divide by the {num_processes} processes")
    rows = args.prompts_per_step // max(num_processes, 1) * args.num_generations
    for name, parts in (("num_mini_batches", args.num_mini_batches), ("critic_mini_batches", args.critic_mini_batches)):
        if parts < 1 or rows % parts:
            problems.append(f"--{name.replace('_', '-')} {parts} must split the {rows} rollout rows per process evenly")
    if not 0 < args.refill_fraction < 1:
        problems.append("--refill-fraction must be in (0, 1)")
    if not 0 < args.max_padding <= 1:
        problems.append(f"--max-padding {args.max_padding} must be in (0, 1]")
    if args.micro_batch_size < 1 or args.max_tokens_per_microbatch < 0:
        problems.append("--micro-batch-size must be >= 1 and --max-tokens-per-microbatch >= 0")
    if args.advantage in ("grpo", "rloo") and args.num_generations < 2:
        problems.append(f"--advantage {args.advantage} needs --num-generations >= 2")
    if not (0 <= args.clip_low < 1 and args.clip_high >= 0):
        problems.append("clip ranges must satisfy 0 <= --clip-low < 1 and --clip-high >= 0")
    if args.temperature <= 0:
        problems.append("--temperature must be > 0 for RL sampling")
    if min(args.max_steps, args.max_new_tokens, args.num_generations, args.prompts_per_step) < 1:
        problems.append("--max-steps, --max-new-tokens, --num-generations and --prompts-per-step must be >= 1")
    for name, value in (("--lr", args.lr), ("--critic-lr", args.critic_lr), ("--reward-timeout", args.reward_timeout)):
        if not value > 0:
            problems.append(f"{name} must be > 0")
    if not (0 < args.top_p <= 1) or args.top_k < 0:
        problems.append("--top-p must be in (0, 1] and --top-k >= 0")
    if not (0 <= args.gamma <= 1 and 0 <= args.lam <= 1):
        problems.append("--gamma and --lam must be in [0, 1]")
    if args.kl_coef < 0 or args.entropy_coef < 0 or args.max_grad_norm <= 0:
        problems.append("--kl-coef and --entropy-coef must be >= 0 and --max-grad-norm > 0")
    if min(args.eval_num_samples, args.keep_checkpoints, args.max_prompt_tokens, args.ppo_epochs,
           args.critic_epochs, args.max_nonfinite_updates) < 1:
        problems.append("--eval-num-samples, --keep-checkpoints, --max-prompt-tokens, --ppo-epochs, --critic-epochs "
                        "and --max-nonfinite-updates must be >= 1")
    if min(args.eval_every, args.save_every, args.eval_limit, args.generation_batch_size, args.samples_per_step,
           args.warmup_steps, args.critic_warmup_steps, args.reward_workers) < 0:
        problems.append("counts (--eval-every, --save-every, --eval-limit, --generation-batch-size, ...) must be >= 0")
    for name, spec in [("--dataset", args.dataset),
                       *(("--eval-datasets", s) for s in (args.eval_datasets or "").split(","))]:
        if (spec.strip().lower().endswith((".json", ".jsonl", ".parquet"))
                and not Path(spec.strip()).expanduser().is_file()):
            problems.append(f"{name} {spec.strip()}: no such file")
    problems += number_problems(args, num_processes)  # NaN passes every comparison above, inf most of them
    if args.synthetic_difficulty < 1:
        problems.append(f"--synthetic-difficulty {args.synthetic_difficulty} must be >= 1")
    problems += model_problems(args.model)
    problems += reward_problems(args.reward)
    problems += tracker_problems(args.report_to)
    problems += output_dir_problems(args.output_dir)
    if problems:
        raise SystemExit("error: " + "; ".join(problems))


# Run in a child process by `reward_problems`: resolves the spec as this process would (same sys.path)
# and prints the outcome as the last line of its output.
_REWARD_CHECK = """
import json, sys
sys.path[:] = json.loads(sys.argv[1])
from reward import load_reward_fn
try:
    load_reward_fn(sys.argv[2])
    result = {}
except ValueError as err:
    result = {"error": str(err)}
except BaseException as err:
    result = {"error": f"reward spec {sys.argv[2]!r}: importing it raised {type(err).__name__}: {err}"}
print()  # the result on a line of its own, whatever the module printed
print(json.dumps(result))
"""


def reward_problems(spec: str, timeout: float = 120.0) -> list[str]:
    """[] if the reward `spec` resolves to a function; else one message. A custom reward is imported in a
    child process, so that a module that ends the process at import (os._exit, a crash) is reported with
    its exit code instead of ending this one silently. (It is imported again where it is used.)"""
    import subprocess
    import sys

    if spec == "math":
        from reward import load_reward_fn

        try:
            load_reward_fn(spec)
        except ValueError as err:
            return [f"--reward: {err}"]
        return []
    try:
        result = subprocess.run([sys.executable, "-c", _REWARD_CHECK, json.dumps(sys.path), spec],
                                capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [f"--reward: reward spec {spec!r}: importing it took more than {timeout:.0f} s"]
    try:
        error = json.loads(result.stdout.strip().splitlines()[-1]).get("error")
        if result.returncode != 0:  # it printed its verdict, then died (an exit hook, a crash at shutdown)
            raise ValueError
    except (IndexError, ValueError, AttributeError):
        how = f"signal {-result.returncode}" if result.returncode < 0 else f"exit code {result.returncode}"
        last = result.stderr.strip().splitlines()[-1:] or [""]
        error = (f"reward spec {spec!r}: importing it ended the process with {how}"
                 + (f" ({last[0][:200]})" if last[0] else ""))
    return [f"--reward: {error}"] if error else []


def tracker_problems(report_to: str) -> list[str]:
    """[] if the --report-to tracker is installed (accelerate would only warn and log nowhere)."""
    from accelerate import utils

    available = {"none": lambda: True, "tensorboard": utils.is_tensorboard_available,
                 "wandb": utils.is_wandb_available}[report_to]
    if available():
        return []
    return [f"--report-to {report_to}: {report_to} is not installed "
            f"(pip install {report_to}, or --report-to none)"]


def output_dir_problems(path: str) -> list[str]:
    """[] if `path` can be created and written, else one message."""
    import tempfile

    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        return [f"--output-dir {path}: cannot write there ({err.strerror or err})"]
    return []


def read_data(args: Args) -> tuple[list, dict]:
    """(train records, {eval set name: records}) as read from their files, before any tokenizer or model
    is needed; a bad file stops the run with one line."""
    from data.loading import DataError, load_dataset

    load = partial(load_dataset, seed=args.seed, difficulty=args.synthetic_difficulty,
                   question_field=args.question_field, answer_field=args.answer_field)
    specs = [s.strip() for s in (args.eval_datasets or ("synthetic" if args.dataset == "synthetic" else "")).split(",")
             if s.strip()]
    try:
        train = load(args.dataset, "train")
        evals = {spec.partition(":")[0]: load(spec, "test") for spec in specs}
    except DataError as err:
        raise SystemExit(f"error: {err}") from None
    return train, evals


def load_data(args: Args, tokenizer, data: tuple[list, dict] | None = None):
    """Train and eval records (`data` from `read_data`, read now if not given), each with `prompt_ids`;
    prompts over the limit are skipped and counted."""
    from data.loading import DataError, format_prompt

    train, evals = read_data(args) if data is None else data
    try:
        for records in (train, *evals.values()):
            for r in records:
                r["prompt_ids"] = tokenizer(format_prompt(r["question"], args.prompt_template, tokenizer))["input_ids"]
    except DataError as err:
        raise SystemExit(f"error: {err}") from None
    unusable = [r for r in train if not answer_is_usable(r["answer"])]
    if unusable:
        print(f"warning: skipped {len(unusable)} of {len(train)} training records whose answer cannot be checked "
              f"(empty or unbalanced braces; first: record {unusable[0]['id']}, answer {unusable[0]['answer'][:40]!r})")
        train = [r for r in train if answer_is_usable(r["answer"])]
    kept = [r for r in train if len(r["prompt_ids"]) <= args.max_prompt_tokens]
    if len(kept) < len(train):
        print(f"warning: skipped {len(train) - len(kept)} of {len(train)} training prompts longer than "
              f"--max-prompt-tokens {args.max_prompt_tokens} "
              f"(first: record {next(r['id'] for r in train if r not in kept)})")
    if not kept:
        raise SystemExit(f"error: {args.dataset}: no training prompt fits in "
                         f"--max-prompt-tokens {args.max_prompt_tokens}")
    for name, records in evals.items():
        records = [r for r in records if len(r["prompt_ids"]) <= args.max_prompt_tokens]
        evals[name] = records[:args.eval_limit] if args.eval_limit else records
    return kept, {name: records for name, records in evals.items() if records}


def answer_is_usable(answer: str) -> bool:
    """False for a ground truth no response could match: empty, or with unbalanced braces."""
    from reward import ground_truth_answer

    text = answer.replace("\\{", "").replace("\\}", "")
    depth = 0
    for ch in text:
        depth += (ch == "{") - (ch == "}")
        if depth < 0:
            return False
    return depth == 0 and ground_truth_answer(answer) is not None


def step_prompts(records: list, step: int, per_step: int, seed: int, rank: int, world: int) -> list:
    """This process's share of the prompts of `step`: a fresh permutation per epoch, a pure function of
    (step, seed), so a resumed run sees the same prompts. A step may draw a record twice (a dataset
    smaller than `per_step`, or a step across the end of an epoch); `rollout` makes each draw its own
    group."""
    local = per_step // world
    chosen = []
    for g in range(step * per_step + rank * local, step * per_step + (rank + 1) * local):
        epoch, pos = divmod(g, len(records))
        perm = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        chosen.append(records[perm[pos]])
    return chosen


def plan(exp: Experience, args: Args, accelerator) -> list[torch.Tensor]:
    """This process's rows in micro-batches sorted by length, under --micro-batch-size rows and
    --max-tokens-per-microbatch padded tokens; every process gets the same number of micro-batches."""
    lengths = exp.attention_mask.sum(dim=1)
    limits = dict(max_rows=args.micro_batch_size, max_tokens=args.max_tokens_per_microbatch,
                  max_padding=args.max_padding, prompt_lengths=exp.prompt_mask.sum(dim=1))
    local = len(plan_micro_batches(lengths, **limits))
    count = int(accelerator.gather(torch.tensor([local], device=lengths.device)).max())
    return plan_micro_batches(lengths, num_batches=count, **limits)


def padding_fraction(exp: Experience, micro: list[torch.Tensor]) -> float:
    """Share of the tokens computed in `micro` that are padding (trimmed micro-batches)."""
    computed = sum(len(idx) * exp.select(idx).trim().input_ids.shape[1] for idx in micro if len(idx))
    return 1.0 - exp.attention_mask.sum().item() / max(computed, 1)


def clip_gradients(accelerator, model, max_norm: float) -> float:
    """Clip `model`'s gradients to `max_norm`, returning the norm before clipping. Under FSDP, accelerate
    finds the model by comparing parameter lists with ==, which raises when the policy and the critic have
    as many parameters; clip the given model directly instead."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.FSDP:
        return float(accelerator.clip_grad_norm_(model.parameters(), max_norm))
    if hasattr(model, "clip_grad_norm_"):  # FSDP1 wrapper
        return float(model.clip_grad_norm_(max_norm))
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)  # FSDP2: DTensor gradients
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


CHECKPOINT_PREFIX = "step-"
MANIFEST = "manifest.json"  # in each checkpoint: its files' sizes and xxh3-128 hashes, written last
LOCK_FILE = ".lock"  # in the output directory: flocked by the run that uses it, holds its pid
# What a run writes in its output directory; --overwrite removes these and nothing else (the lock file and
# the user's own files stay). "reasoner-zero" is tensorboard's directory (the project name of init_trackers).
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "samples.jsonl", "policy", "critic", "summary.json",
               "config.json", "reasoner-zero")
# The arguments that may differ between a checkpoint and the run resuming from it; all others shape
# training and must match. Free: the length of the run (max_steps: after warm-up the learning rate is
# constant, so a longer run continues the same schedule) and its bookkeeping (eval_every, save_every,
# keep_checkpoints, samples_per_step, report_to, max_nonfinite_updates, resume, overwrite, output_dir: a
# moved directory); resources that do not change the objective: reward_workers, gradient_checkpointing,
# and how a batch is split (micro_batch_size, max_tokens_per_microbatch, max_padding: float round-off
# only) or generated (generation, refill_fraction, generation_batch_size: other draws from the same
# distribution). Not free, on purpose: eval_limit, eval_num_samples and eval_datasets define what
# eval/accuracy measures, so changing them mid-run would make one curve (and the summary's base -> final)
# compare two different measures; reward_timeout decides which rewards are 0.
RESUMABLE_ARGS = frozenset({
    "max_steps", "eval_every", "save_every", "keep_checkpoints", "samples_per_step", "report_to",
    "max_nonfinite_updates", "resume", "overwrite", "output_dir", "reward_workers", "gradient_checkpointing",
    "micro_batch_size", "max_tokens_per_microbatch", "max_padding", "generation", "refill_fraction",
    "generation_batch_size"})
_HELD_LOCKS: list[int] = []  # file descriptors of the output-directory locks this process holds


def file_hash(path: Path) -> str:
    """xxh3-128 of a file's bytes: it catches torn or altered files as well as sha256 (no adversary here) at
    several GB/s, so that checking the tens of GB of a 7B run's checkpoint is bound by the disk."""
    import xxhash

    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint directory `path` cannot be trusted, or None if it is intact: its manifest (written
    last, before the directory got its name) lists every file with its size and hash, each file matches,
    and trainer_state.json holds the step of the directory's name, the schedulers and the arguments."""
    try:
        files = json.loads((path / MANIFEST).read_text(encoding="utf-8"))["files"]
        entries = {name: (int(e["size"]), str(e["xxh3_128"])) for name, e in files.items()}
    except FileNotFoundError:
        return f"no {MANIFEST} (an incomplete write, or a checkpoint of an older version)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} is unreadable"
    for name, (size, digest) in entries.items():
        file = path / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            return f"{MANIFEST} names a file outside the checkpoint ({name})"
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {size}"
        if file_hash(file) != digest:
            return f"{name} does not match its hash in the manifest"
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        ok = (state["step"] == int(path.name[len(CHECKPOINT_PREFIX):]) and "schedulers" in state
              and isinstance(state["args"], dict))
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    return None if ok else "trainer_state.json lacks the step of its name, the schedulers or the arguments"


def latest_checkpoint(root: Path) -> tuple[Path | None, list[str]]:
    """The newest intact checkpoint under `root` (a `step-N` directory that `checkpoint_problem` accepts),
    and one line for each newer one skipped, saying why."""
    found = [(int(p.name[len(CHECKPOINT_PREFIX):]), p) for p in root.glob(CHECKPOINT_PREFIX + "*")
             if p.is_dir() and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    skipped = []
    for _, path in sorted(found, reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, skipped
        skipped.append(f"skipped checkpoint {path}: {problem}")
    return None, skipped


def arg_differences(saved: dict, args: Args) -> list[str]:
    """`--flag saved -> now` for each argument outside RESUMABLE_ARGS whose value in `args` differs from
    `saved` (the arguments a checkpoint or config.json recorded); an argument `saved` lacks counts as
    its default. Example: saved lr 1e-4, now 5e-4 -> ["--lr 0.0001 -> 0.0005"]."""
    from dataclasses import MISSING

    def show(value) -> str:
        return value if isinstance(value, str) else json.dumps(value)

    now = json.loads(json.dumps(asdict(args)))  # compared as saved: through JSON
    defaults = {f.name: f.default if f.default_factory is MISSING else f.default_factory() for f in fields(args)}
    return [f"--{name.replace('_', '-')} {show(saved.get(name, defaults[name]))} -> {show(value)}"
            for name, value in now.items()
            if name not in RESUMABLE_ARGS and saved.get(name, defaults[name]) != value]


def lock_output_dir(out: Path) -> None:
    """Lock `out` for this process until `main` ends (flock on out/.lock, which records the holder's pid
    and host). The kernel drops a flock when its process ends, however it ends, so a killed run leaves no
    lock behind; the file stays (removing it would let two runs lock different files). Raises SystemExit
    naming the holder if another run has the lock."""
    import errno
    import fcntl
    import socket

    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").split()
        os.close(fd)
        who = f"pid {holder[0]} on {holder[1]}" if len(holder) >= 2 else "a process that has just started"
        raise SystemExit(f"error: --output-dir {out} is in use by another run ({who}); wait for it to end, "
                         "or choose another --output-dir") from None
    except OSError as err:  # file systems without flock (Lustre mounted noflock, some NFS): run unlocked
        if err.errno not in (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP):
            raise
        os.close(fd)
        print(f"warning: --output-dir {out}: its file system cannot lock files ({err.strerror}); nothing stops "
              "a second run from using it at the same time")
        return
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    _HELD_LOCKS.append(fd)


def releases_output_locks(fn):
    """Decorator: the output-directory locks taken during `fn` are released when it returns or raises, so
    that a notebook can call `main` again (a process that ends releases them anyway)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        held = len(_HELD_LOCKS)
        try:
            return fn(*args, **kwargs)
        finally:
            while len(_HELD_LOCKS) > held:
                os.close(_HELD_LOCKS.pop())
    return wrapper


def plan_output_dir(args: Args, out: Path) -> dict:
    """How this run starts in `out`, decided before any model loads: {"checkpoint": the one to resume from
    or None, "clean": remove RUN_OUTPUTS first, "continue_finished": a finished run continued to a larger
    --max-steps, "notes": lines to print}. A directory is reused only for the same run: resuming needs the
    checkpoint's training arguments (`arg_differences`), and without a usable checkpoint only the leftovers
    of this run killed before its first checkpoint are replaced. Everything else (a finished run, a run of
    other arguments, a run whose checkpoints are all damaged or that saved none) is refused with one line,
    unless --overwrite."""
    ways_out = "start afresh there with --overwrite, or choose another --output-dir"
    if args.overwrite and args.resume:
        raise SystemExit("error: --overwrite (start afresh) and --resume contradict each other; choose one")
    present = [name for name in RUN_OUTPUTS if (out / name).exists() and not (
        (out / name).is_dir() and not any((out / name).iterdir()))]
    saved = read_run_config(out)
    if args.overwrite:
        if (out / "config.json").exists() and saved is None:  # e.g. a model directory: not ours to clean
            raise SystemExit(f"error: --overwrite: {out} holds a config.json that is not a run's; choose "
                             "another --output-dir")
        return {"checkpoint": None, "clean": bool(present), "continue_finished": False, "notes": []}
    ckpt, skipped = latest_checkpoint(out / "checkpoints")
    why = f" ({'; '.join(skipped)})" if skipped else ""
    finished = (out / "summary.json").exists()
    try:
        finished_steps = json.loads((out / "summary.json").read_text())["steps"] if finished else None
    except (OSError, ValueError, KeyError, TypeError):
        finished_steps = None
    if ckpt is None:
        if args.resume:
            raise SystemExit(f"error: --resume: no usable checkpoint in {out / 'checkpoints'}{why}")
        if finished:
            raise SystemExit(f"error: {out} holds a finished run (summary.json) and no usable checkpoint to "
                             f"continue it from{why}; {ways_out}")
        if present and not killed_before_first_checkpoint(out, args, skipped, saved):
            diffs = arg_differences(saved, args) if saved is not None else []
            other = f", of other training arguments ({'; '.join(diffs)})," if diffs else ""
            raise SystemExit(f"error: {out} holds a run ({', '.join(present)}){other} but no usable checkpoint "
                             f"to resume from{why}; {ways_out}")
        return {"checkpoint": None, "clean": bool(present), "continue_finished": False, "notes": skipped}
    state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
    diffs = arg_differences(state["args"], args)
    if diffs:
        raise SystemExit(f"error: {out} holds a run with other training arguments ({'; '.join(diffs)}); "
                         f"resume it with the same ones, {ways_out}")
    if state["step"] > args.max_steps:
        raise SystemExit(f"error: --max-steps {args.max_steps} is below the step of the checkpoint to resume "
                         f"from ({ckpt}); raise it, {ways_out}")
    if finished and finished_steps is None:
        raise SystemExit(f"error: {out} holds a finished run (summary.json, unreadable); {ways_out}")
    if finished and args.max_steps <= finished_steps:
        raise SystemExit(f"error: {out} holds a finished run ({finished_steps} steps); to train it further "
                         f"from {ckpt}, raise --max-steps above {finished_steps}; or {ways_out}")
    return {"checkpoint": str(ckpt), "clean": False, "continue_finished": finished, "notes": skipped}


def read_run_config(out: Path) -> dict | None:
    """The arguments recorded in out/config.json if it is a run's (it names an advantage estimator and a
    step count), else None (missing, unreadable, or another tool's config.json, such as a model's)."""
    try:
        saved = json.loads((out / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) and {"advantage", "max_steps"} <= saved.keys() else None


def killed_before_first_checkpoint(out: Path, args: Args, skipped: list[str], saved: dict | None) -> bool:
    """Whether `out` holds only what a run of these training arguments writes before its first checkpoint
    (it was killed early): its config.json (`saved`, from `read_run_config`) agrees with `args`, no checkpoint
    (even a damaged one) nor final output exists, and every logged step precedes the first checkpoint.
    Starting again loses nothing more."""
    if saved is None:
        return False
    try:
        first_checkpoint = int(saved["save_every"])
        logged = read_jsonl_before(out / "metrics.jsonl", math.inf)
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return (not skipped and not arg_differences(saved, args) and first_checkpoint > 0
            and not any((out / name).exists() for name in ("policy", "critic", "summary.json"))
            and all(row["step"] < first_checkpoint for row in logged))


def main_process_decides(accelerator, fn, *args, what: str = "error"):
    """`fn(*args)` run on the main process only, its result sent to every process; its one-line error
    (SystemExit) or an OSError (prefixed with `what`) stops every process together, printed once. For checks
    that may not agree between processes (the hub, a reward module's import) and for file operations done
    once, which the others must not wait on forever."""
    from accelerate.utils import broadcast_object_list

    outcome = [None]  # (result, error)
    if accelerator.is_main_process:
        try:
            outcome[0] = (fn(*args), None)
        except SystemExit as err:
            outcome[0] = (None, str(err.code))
        except OSError as err:
            outcome[0] = (None, f"{what}: {err}")
    broadcast_object_list(outcome)
    result, error = outcome[0]
    if error is not None:
        raise SystemExit(error if accelerator.is_main_process else 1)
    return result


def claim_output_dir(accelerator, args: Args) -> dict:
    """Lock the output directory and decide how to start in it (`plan_output_dir`), on the main process
    before any model loads; every process gets the decision, and all stop together on a refusal."""
    out = Path(args.output_dir)

    def lock_and_plan() -> dict:
        lock_output_dir(out)
        return plan_output_dir(args, out)

    decision = main_process_decides(accelerator, lock_and_plan, what=f"error: --output-dir {out}")
    for note in decision["notes"]:
        accelerator.print(f"warning: {note}")
    return decision


def prepare_output_dir(out: Path, plan: dict, args: Args) -> None:
    """Carry out `plan_output_dir`'s plan (main process, once the models have loaded): remove the outputs of
    the previous run for a fresh start, the summary of a finished run that is continued, and partial
    checkpoints of a killed write; then record this run's arguments in config.json."""
    import shutil

    if plan["clean"]:
        for name in RUN_OUTPUTS:
            path = out / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
    if plan["continue_finished"]:  # no longer finished: a killed continuation must read as a plain resume
        (out / "summary.json").unlink(missing_ok=True)
    for tmp in (out / "checkpoints").glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    tmp = out / ".config.json.tmp"
    tmp.write_text(json.dumps(asdict(args), indent=2))
    os.replace(tmp, out / "config.json")


def parameters_finite(*models) -> bool:
    """Whether every parameter of `models` (this process's shards; None entries ignored) is finite."""
    return all(bool(torch.isfinite(p).all()) for m in models if m is not None for p in m.parameters())


def nonfinite_stop_message(step: int, count: int, last_saved: Path | None) -> str:
    """The error of a run stopped after `count` non-finite updates in a row ending at `step`. Nothing is
    saved then (the finite update just before the streak may already have wrecked the weights); the
    message names the newest checkpoint, which predates the streak since none is written during one."""
    first = step - count + 1
    if last_saved is None:
        where = "no checkpoint was saved before they began"
    else:
        after = int(last_saved.name[len(CHECKPOINT_PREFIX):]) - 1
        where = (f"the last checkpoint saved before they began is {last_saved}, the state after step {after}"
                 + (" (whose update came just before the first failure: check it before resuming)"
                    if after == first - 1 else ""))
    return (f"error: step {step}: {count} updates in a row had a NaN or infinite loss or gradient and were "
            f"skipped (steps {first}-{step}); stopping without saving this state; {where}")


def save_checkpoint(accelerator, root: Path, state: dict, keep: int) -> Path:
    """Everything needed to continue at `state["step"]`: models, optimizers, every process's RNG states
    (accelerate's `save_state`: weights as safetensors, the rest read back with torch's weights-only
    loader), `state` as JSON (with the schedulers: nothing is unpickled on resume) and, last, a manifest of
    every file's size and hash. Written to a temporary directory, fsynced, then renamed, so a kill at any
    instant leaves the previous checkpoint whole. A failed write (a full disk) removes the temporary
    directory and stops every process with one line; the previous checkpoints are untouched."""
    import shutil

    from accelerate.utils import gather_object
    from safetensors import SafetensorError

    final = root / f"{CHECKPOINT_PREFIX}{state['step']:06d}"
    tmp = root / f".tmp-{final.name}"
    # torch.save reports a failed write as a RuntimeError
    write_errors = (OSError, RuntimeError, SafetensorError)

    def attempt(write) -> None:  # run `write`; then every process knows whether any write failed
        try:
            write()
            problem = None
        except write_errors as err:
            problem = " ".join(f"{type(err).__name__}: {err}".split())[:300]
        problems = [p for p in gather_object([problem]) if p]
        if problems and not accelerator.is_main_process:
            raise SystemExit(1)  # the main process says why
        if problems:
            shutil.rmtree(tmp, ignore_errors=True)
            older = sorted(p.name for p in root.glob(CHECKPOINT_PREFIX + "*") if p != final)
            last = f"the last checkpoint, {older[-1]}, is untouched" if older else "there is no earlier one"
            free = shutil.disk_usage(next(p for p in (root, *root.parents) if p.exists())).free / 2**30
            raise SystemExit(f"error: writing checkpoint {final} failed ({problems[0]}; {free:.1f} GiB "
                             f"free there): the partial copy is removed and {last}; free some space and run "
                             "the same command again to resume")

    def prepare() -> None:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)

    def finish() -> None:
        if not accelerator.is_main_process:
            return
        (tmp / "trainer_state.json").write_text(json.dumps(state))
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {str(p.relative_to(tmp)): {"size": p.stat().st_size, "xxh3_128": file_hash(p)}
                    for p in files}
        (tmp / MANIFEST).write_text(json.dumps({"files": manifest}, indent=1))
        for path in [*tmp.rglob("*"), tmp]:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fd = os.open(root, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)

    attempt(prepare)
    attempt(lambda: accelerator.save_state(str(tmp), safe_serialization=True))
    attempt(finish)
    if accelerator.is_main_process:
        done = sorted((p for p in root.glob(CHECKPOINT_PREFIX + "*") if p != final), key=lambda p: p.name)
        for old in done[:max(len(done) - keep + 1, 0)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def read_jsonl_before(path: Path, step: float) -> list[dict]:
    """The records of a JSONL file with "step" < `step`. Lines a kill tore (also inside a multi-byte
    character) or that hold no record are dropped."""
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] < step:
                rows.append(row)
    return rows


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the end of the step and exits."""

    def __init__(self):
        import signal
        import threading

        self.signal = None
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        if self.signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum


def injected_nan_steps() -> set[int]:
    """Fault injection for tests: REASONER_ZERO_NAN_STEPS="3,4" makes the losses of those steps NaN."""
    import os

    return {int(x) for x in os.environ.get("REASONER_ZERO_NAN_STEPS", "").split(",") if x.strip()}


def warmup_constant(warmup_steps: int):
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


# --------------------------------------------------------------------------------------------------
# Rollout and evaluation.
# --------------------------------------------------------------------------------------------------

def call_seeds(seed: int, step: int, first: int, count: int, chunk: int, salt: int = 0) -> list[int]:
    """One seed per generate call of `chunk` prompts, from the run's seed, the step and the place of the
    call's first prompt among all processes' prompts of the step: independent of the process count."""
    return [(seed * 1_000_003 + salt * 7_919 + step * 100_003 + first + i) % 2**62 for i in range(0, count, chunk)]


def is_sharded(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def rollout(model, tokenizer, records: list, args: Args, num_generations: int, stop_ids: list[int],
            seeds: list[int] | None = None, synced: bool = False) -> tuple[Experience, list[str]]:
    """Generate `num_generations` responses per record; the experience batch (no rewards yet) and the texts.

    Each record's responses are one group, keyed by the record's place in `records` rather than its id: a
    record drawn twice in a step gives two groups, each with its own baseline, as two distinct prompts
    would."""
    prompt_ids, prompt_mask = left_pad([r["prompt_ids"] for r in records], tokenizer.pad_token_id)
    # refill cannot keep processes in lockstep, which sharded (FSDP) generation needs: plain generate there
    refill = args.generation == "refill" and not synced
    generate = (partial(generate_responses_refill, refill_fraction=args.refill_fraction) if refill
                else generate_responses)
    response_ids = generate(
        model, prompt_ids, prompt_mask, num_generations=num_generations, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        stop_token_ids=stop_ids, pad_token_id=tokenizer.pad_token_id, stop_strings=args.stop_strings,
        tokenizer=tokenizer, batch_size=args.generation_batch_size or None, seeds=seeds, synced_gpus=synced)
    lengths, truncated = stop_positions(response_ids, stop_ids, args.stop_strings, tokenizer)
    width = int(lengths.max())
    response_ids = response_ids[:, :width]
    mask = response_mask_from_lengths(lengths, width)
    response_ids = torch.where(mask.bool(), response_ids, tokenizer.pad_token_id)  # nothing after a stop
    texts = tokenizer.batch_decode([ids[:n] for ids, n in zip(response_ids.tolist(), lengths.tolist(), strict=True)],
                                   skip_special_tokens=True)
    exp = Experience(prompt_ids=prompt_ids.repeat_interleave(num_generations, 0),
                     prompt_mask=prompt_mask.repeat_interleave(num_generations, 0),
                     response_ids=response_ids, response_mask=mask, truncated=truncated,
                     group_ids=torch.arange(len(records)).repeat_interleave(num_generations))
    return exp, texts


def score(pool: RewardPool, texts: list[str], answers: list[str], truncated: torch.Tensor, args: Args,
          extras: list[dict] | None = None):
    """Rewards (B,) with ORZ's rule: a truncated response scores 0 unless --score-truncated. `extras` are
    the other fields of each response's record, passed to the reward function as keyword arguments."""
    from reward import format_reward

    rewards, stats = pool.score(texts, answers, extras)
    rewards = torch.tensor(rewards, dtype=torch.float32)
    if args.format_reward_weight:
        rewards += args.format_reward_weight * torch.tensor([format_reward(t) for t in texts])
    if not args.score_truncated:
        rewards = torch.where(truncated, torch.zeros_like(rewards), rewards)
    return rewards, stats


def evaluate(model, tokenizer, datasets: dict[str, list], pool: RewardPool, args: Args, stop_ids: list[int],
             accelerator, step: int) -> dict:
    """avg@k, pass@k and maj@k on each held-out set, as `python rollout.py eval` computes them; each process
    samples its share of the batches (the same batches and seeds whatever the process count) and the
    per-problem counts are gathered. `eval/accuracy` is the avg@k over all sets pooled."""
    from accelerate.utils import gather_object

    from rollout import aggregate_eval, evaluate_datasets

    generate_kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                           top_k=args.top_k, stop_token_ids=stop_ids, pad_token_id=tokenizer.pad_token_id,
                           stop_strings=args.stop_strings, tokenizer=tokenizer, synced_gpus=is_sharded(accelerator))
    with accelerator.autocast():
        result = evaluate_datasets(model, tokenizer, datasets, pool=pool, generate_kwargs=generate_kwargs,
                                   num_samples=args.eval_num_samples, batch_size=args.prompts_per_step,
                                   seed=args.seed * 1_000 + step + 1, score_truncated=args.score_truncated,
                                   progress=False, rank=accelerator.process_index, world=accelerator.num_processes)
    metrics, pooled = {}, []
    for name in datasets:
        rows = gather_object(result["per_problem"][name])
        agg = aggregate_eval(rows)
        metrics.update({f"eval/{name}/{k}": v for k, v in agg.items() if "@" in k})
        pooled += rows
    metrics["eval/accuracy"] = aggregate_eval(pooled)[f"avg@{args.eval_num_samples}"]
    return metrics


# --------------------------------------------------------------------------------------------------
# The training loop.
# --------------------------------------------------------------------------------------------------

@releases_output_locks
def main(args: Args) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import gather_object, set_seed
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data.synthetic import build_tiny_base

    # ---- 0. Setup: processes, models, data, reward workers, optimizers --------------------------------
    if args.whiten_advantages is None:  # resolved once, so that config.json records what trains
        args = replace(args, whiten_advantages=args.advantage == "gae")
    # A tracker that is not installed is check_args's one-line error; accelerate would warn about it first.
    log_with = None if args.report_to == "none" or tracker_problems(args.report_to) else args.report_to
    accelerator = Accelerator(mixed_precision="bf16" if args.bf16 else "no", log_with=log_with,
                              project_dir=args.output_dir)
    world, rank = accelerator.num_processes, accelerator.process_index
    main_process_decides(accelerator, check_args, args, world)  # hub and import checks: once, for all
    data = read_data(args)  # a bad data file stops the run here, before any model is built or loaded
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise SystemExit("error: DeepSpeed is not supported yet (one engine per model and its own gradient "
                         "accumulation are not wired in); launch with configs/accelerate/fsdp.yaml to shard instead")
    set_seed(args.seed, device_specific=True)  # each process samples differently
    out = Path(args.output_dir)
    start = claim_output_dir(accelerator, args)  # locked for this run; refusals come before any model loads
    t_start = time.time()
    with accelerator.main_process_first():
        model_path = str(build_tiny_base(log=accelerator.print)) if args.model == "tiny" else args.model
    # Trained models load in fp32 and --bf16 autocasts their forward passes: AdamW on bf16 weights loses
    # updates of lr 1e-6 to rounding. Sharded setups (FSDP) keep fp32 masters the same way.
    load = dict(trust_remote_code=args.trust_remote_code, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=args.trust_remote_code)
    train_records, eval_records = load_data(args, tokenizer, data)  # prompts too long: before the model too
    policy = AutoModelForCausalLM.from_pretrained(model_path, **load)
    stop_ids = prepare_for_sampling(tokenizer, policy, log=accelerator.print)

    critic = ValueModel.from_base(model_path, **load) if args.advantage == "gae" else None
    ref_load = {**load, "dtype": torch.bfloat16 if args.bf16 else torch.float32}  # never trained: bf16 is fine
    ref = (AutoModelForCausalLM.from_pretrained(model_path, **ref_load).eval().requires_grad_(False)
           if args.kl_coef > 0 else None)
    for name, m in (("policy", policy), ("critic", critic)):
        if m is not None and disable_dropout(m):  # the update must score the model that sampled
            accelerator.print(f"dropout set to 0 in the {name} for training")
    if args.gradient_checkpointing:
        for m in (policy, critic):
            if m is not None:
                m.gradient_checkpointing_enable()
    adam = dict(betas=(0.9, 0.95), weight_decay=0.0)  # ORZ's AdamW settings
    opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, **adam)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_constant(args.warmup_steps))
    policy, opt = accelerator.prepare(policy, opt)
    if critic is not None:
        critic_opt = torch.optim.AdamW(critic.parameters(), lr=args.critic_lr, **adam)
        critic_sched = torch.optim.lr_scheduler.LambdaLR(critic_opt, warmup_constant(args.warmup_steps))
        critic, critic_opt = accelerator.prepare(critic, critic_opt)
    if ref is not None:
        ref = accelerator.prepare_model(ref, evaluation_mode=True)
    fused = critic is not None and critic_fusable(accelerator.unwrap_model(critic))  # see `update`
    schedulers = [sched] + ([critic_sched] if critic is not None else [])  # saved as JSON in the checkpoint
    pool = RewardPool(args.reward, num_workers=args.reward_workers, timeout=args.reward_timeout)

    # ---- Resume from the newest intact checkpoint of this run, or start clean (see `plan_output_dir`) ----
    ckpt_root, start_step, base_accuracy, nonfinite = out / "checkpoints", 0, None, 0
    main_process_decides(accelerator, prepare_output_dir, out, start, args)
    ckpt = last_saved = Path(start["checkpoint"]) if start["checkpoint"] else None
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        state = json.loads((ckpt / "trainer_state.json").read_text())
        start_step, base_accuracy = state["step"], state["base_accuracy"]
        for scheduler, saved in zip(schedulers, state["schedulers"], strict=True):
            scheduler.load_state_dict(saved)
        accelerator.print(f"resuming from {ckpt} at step {start_step} (--overwrite starts afresh)")
    kept = {name: read_jsonl_before(out / name, start_step) for name in ("metrics.jsonl", "samples.jsonl")}
    accelerator.wait_for_everyone()
    metrics_file = JsonlWriter(out / "metrics.jsonl") if accelerator.is_main_process else None
    samples_file = JsonlWriter(out / "samples.jsonl") if accelerator.is_main_process else None
    if accelerator.is_main_process:  # drop what a killed run wrote after its last checkpoint
        for f, name in ((metrics_file, "metrics.jsonl"), (samples_file, "samples.jsonl")):
            f.file.truncate(0)
            for row in kept[name]:
                f.write(row)
    stop = StopRequest()
    if args.report_to != "none":
        accelerator.init_trackers("reasoner-zero", config={k: str(v) for k, v in asdict(args).items()})
    rows = args.prompts_per_step // world * args.num_generations  # rollout rows per process
    sum_all = lambda x: accelerator.reduce(torch.as_tensor(x, dtype=torch.float32, device=accelerator.device), "sum")  # noqa: E731
    unwrapped = accelerator.unwrap_model(policy)
    spin = os.environ.get("GOMP_SPINCOUNT", "from OMP_WAIT_POLICY")
    accelerator.print(f"threads per process: {torch.get_num_threads()} (OMP_NUM_THREADS), OpenMP spin count "
                      + (f"{spin} (GOMP_SPINCOUNT)" if OPENMP_SETTING_APPLIED else
                         "libgomp's own: torch was imported before train_ppo (set GOMP_SPINCOUNT before that)"))
    accelerator.print(f"training {args.advantage} on {len(train_records)} prompts, {world} process(es), "
                      f"{args.max_steps} steps of {args.prompts_per_step} x {args.num_generations}")
    if len(train_records) < args.prompts_per_step:
        accelerator.print(f"note: {len(train_records)} training prompts, fewer than --prompts-per-step "
                          f"{args.prompts_per_step}: each step draws some prompts more than once, and "
                          f"each draw's {args.num_generations} samples are a group of their own")

    bar = tqdm(range(start_step, args.max_steps), disable=not accelerator.is_main_process, desc=args.advantage,
               initial=start_step, total=args.max_steps)
    for step in bar:
        t_step = time.time()
        metrics = {"step": step}
        # ---- 1. Evaluate (at the start, every eval_every steps; the end is after the loop) ----------
        if args.eval_every and eval_records and step % args.eval_every == 0:
            t = time.time()
            metrics.update(evaluate(unwrapped, tokenizer, eval_records, pool, args, stop_ids, accelerator, step))
            base_accuracy = metrics["eval/accuracy"] if base_accuracy is None else base_accuracy
            metrics["time/eval"] = time.time() - t

        # ---- 2. Rollout: this process's prompts, num_generations samples each --------------------
        t = time.time()
        records = step_prompts(train_records, step, args.prompts_per_step, args.seed, rank, world)
        seeds = call_seeds(args.seed, step, rank * len(records), len(records),
                           args.generation_batch_size or len(records))
        with accelerator.autocast():
            exp, texts = rollout(unwrapped, tokenizer, records, args, args.num_generations, stop_ids, seeds,
                                 is_sharded(accelerator))
        exp = Experience(**{k: (v.to(accelerator.device) if torch.is_tensor(v) else v) for k, v in vars(exp).items()})
        metrics["time/generate"] = time.time() - t

        # ---- 3. Reward ---------------------------------------------------------------------------
        t = time.time()
        drawn = [records[i // args.num_generations] for i in range(len(texts))]  # each row's record
        answers = [r["answer"] for r in drawn]
        rewards, reward_stats = score(pool, texts, answers, exp.truncated.cpu(), args,
                                      [r.get("extras") or {} for r in drawn])
        repetitive = repetition_flags(exp.response_ids.cpu(), exp.response_mask.sum(dim=1).long().cpu(), texts)
        if args.zero_repetitive:  # a guard against drifting into repetition; ORZ's code only logs a repeat score
            rewards = zero_degenerate(rewards, repetitive)
        exp.rewards = rewards.to(accelerator.device)
        metrics["time/reward"] = time.time() - t

        # ---- 4. Log-probs and values of the rollout ----------------------------------------------
        t = time.time()
        mask = exp.response_mask
        lengths = mask.sum(dim=1)
        needs_old = args.ppo_epochs * args.num_mini_batches > 1 or (args.kl_coef > 0 and args.kl_estimator == "k1")
        micro = plan(exp, args, accelerator)
        if needs_old:  # otherwise one update on one batch: old = logprobs.detach() is exact (ratio 1)
            policy.eval()
            exp.old_logprobs = batched_logprobs(policy, exp, args.temperature, micro)
            policy.train()
        if ref is not None:
            exp.ref_logprobs = batched_logprobs(ref, exp, args.temperature, micro)
        metrics["perf/padding"] = padding_fraction(exp, micro)
        metrics["time/logprobs"] = time.time() - t
        t = time.time()
        seq_rewards = exp.rewards
        if args.kl_coef > 0 and args.kl_estimator == "k1":  # classic PPO: KL as a per-token penalty in the reward
            kl_penalty = args.kl_coef * compute_kl(exp.old_logprobs, exp.ref_logprobs, "k1") * mask
        else:
            kl_penalty = torch.zeros_like(mask)
        if critic is not None:
            # The rows of the critic's first mini-batch get their values from that update's own forward
            # pass (before any step, so they are the rollout's values): only the other rows need a pass here.
            first = (local_rows(mini_batch_parts(rows * world, args.critic_mini_batches, args.seed, step)[0],
                                rank, rows)
                     if fused else mask.new_zeros(0, dtype=torch.long))
            rest = torch.ones(len(mask), dtype=torch.bool, device=mask.device)
            rest[first] = False
            rest = rest.nonzero().squeeze(1)
            exp.values = torch.zeros_like(mask)
            with torch.no_grad():
                critic.eval()
                rest_exp = exp.select(rest)
                for idx in plan(rest_exp, args, accelerator):
                    # a process may have no rows outside the first mini-batch: its empty micro-batches run
                    # row 0 of the whole batch, so that every process runs the same passes
                    mb = (rest_exp.select(idx) if len(idx) else exp.select(idx.new_zeros(1))).trim()
                    values = forward_values(critic, mb.input_ids, mb.attention_mask, mb.response_ids.shape[1])
                    if len(idx):
                        exp.values[rest[idx], :values.shape[1]] = values.float()
                exp.values *= mask
                critic.train()
            token_rewards = outcome_token_rewards(seq_rewards, mask) - kl_penalty
            # the first mini-batch's rows are filled in by the critic update (see `update`)
            exp.advantages, exp.returns = compute_gae_advantages(token_rewards, exp.values, mask, args.gamma, args.lam)

        # ---- 5. Update the critic first (ORZ), then advantages for the policy --------------------------
        update_stats: dict[str, list] = {}
        if critic is not None:
            critic_stats = update(accelerator, critic, critic_opt, exp, args, "critic",
                                  args.critic_epochs, args.critic_mini_batches, step,
                                  token_rewards=token_rewards if fused else None)
            update_stats.update(critic_stats)
            metrics["critic/explained_var"] = explained_variance(exp.values, exp.returns, mask)
            metrics["time/critic"] = time.time() - t
        else:
            seq_rewards = seq_rewards - kl_penalty.sum(dim=1)
            if args.advantage == "grpo":
                adv = compute_grpo_advantages(seq_rewards, exp.group_ids, args.scale_by_std)
            else:
                adv = compute_rloo_advantages(seq_rewards, exp.group_ids)
            exp.advantages = adv[:, None] * mask
        equal = equal_reward_groups(exp.rewards, exp.group_ids)
        if args.drop_equal_groups and args.advantage != "gae":
            exp.response_mask = mask = mask * (~equal)[:, None]
        if args.whiten_advantages:
            exp.advantages = masked_whiten(exp.advantages, mask, reduce=sum_all)

        # ---- 6. Update the policy ------------------------------------------------------------------
        t = time.time()
        policy_trains = critic is None or step >= args.critic_warmup_steps  # a critic may warm up first
        if policy_trains:
            policy_stats = update(accelerator, policy, opt, exp, args, "policy", args.ppo_epochs,
                                  args.num_mini_batches, step)
            # both roles report skipped updates under one key: count the critic's and the policy's
            policy_stats["train/nonfinite_updates"] += update_stats.get("train/nonfinite_updates", [])
            update_stats.update(policy_stats)
        metrics["time/update"] = time.time() - t

        # ---- 7. Log ------------------------------------------------------------------------------
        totals = sum_all(torch.stack([exp.rewards.sum(), lengths.sum().float(), exp.truncated.float().sum(),
                                      equal.float().sum(), torch.tensor(float(rows), device=accelerator.device),
                                      repetitive.float().sum().to(accelerator.device)]))
        n = totals[4].item()
        metrics["train/repetition"] = totals[5].item() / n
        metrics.update({"train/reward": totals[0].item() / n, "train/response_length": totals[1].item() / n,
                        "train/truncated": totals[2].item() / n, "train/equal_reward_groups": totals[3].item() / n,
                        "train/advantage_abs": masked_mean(exp.advantages.abs(), exp.response_mask, sum_all).item()})
        for k, v in reward_stats.items():
            metrics[k] = sum_all(v).item()
        metrics["train/nonfinite_updates"] = sum(update_stats.pop("train/nonfinite_updates", []))
        for k, v in update_stats.items():  # per-process means, averaged; losses are shares of one loss: summed
            metrics[k] = sum_all(sum(v) / len(v)).item() / (1 if k in SUMMED_STATS + TOKEN_STATS else world)
        # the learning rates this step's updates used; the schedules then advance once per RL step of
        # updates, so that --warmup-steps means the same for the policy and for a critic of M mini-batches
        metrics["lr"] = sched.get_last_lr()[0]
        if critic is not None:
            metrics["critic/lr"] = critic_sched.get_last_lr()[0]
            critic_sched.step()
        if policy_trains:
            sched.step()
        metrics["time/step"] = time.time() - t_step
        take = min(-(-args.samples_per_step // world), len(texts))  # each process's part of the sample
        samples = gather_object([{"step": step, "prompt_id": drawn[i]["id"],
                                  "prompt": drawn[i]["question"], "response": texts[i],
                                  "ground_truth": answers[i], "reward": exp.rewards[i].item(),
                                  "advantage": exp.advantages[i, int(lengths[i]) - 1].item()} for i in range(take)])
        if accelerator.is_main_process:
            for sample in samples[:args.samples_per_step]:
                samples_file.write(sample)
            metrics_file.write(metrics)
            bar.set_postfix(reward=f"{metrics['train/reward']:.2f}",
                            **({"acc": f"{metrics['eval/accuracy']:.2f}"} if "eval/accuracy" in metrics else {}))
        if args.report_to != "none":
            accelerator.log(metrics, step=step)

        # ---- 8. Checkpoint, and stop when asked or when updates keep failing -----------------------
        # No checkpoint during a streak of non-finite updates, nor of non-finite weights: the update before
        # a streak may already have wrecked the weights, and a checkpoint would then replace good ones.
        nonfinite = nonfinite + 1 if metrics.get("train/nonfinite_updates", 0) > 0 else 0
        signalled = sum_all(float(stop.signal is not None)).item() > 0
        if nonfinite >= args.max_nonfinite_updates:
            raise SystemExit(nonfinite_stop_message(step, nonfinite, last_saved))
        if (args.save_every and (step + 1) % args.save_every == 0) or signalled:
            finite = sum_all(float(parameters_finite(policy, critic))).item() == world
            if nonfinite or not finite:
                why = "the last update was not finite" if nonfinite else "the weights are not finite"
                accelerator.print(f"warning: step {step}: no checkpoint written ({why}); the last one is "
                                  f"{last_saved or 'none'}")
            else:
                last_saved = save_checkpoint(accelerator, ckpt_root, {
                    "step": step + 1, "base_accuracy": base_accuracy, "args": asdict(args),
                    "schedulers": [s.state_dict() for s in schedulers]}, args.keep_checkpoints)
            if signalled:
                raise SystemExit(f"stopped by signal {stop.signal} after step {step}: "
                                 + (f"last checkpoint {last_saved}; run the same command again to resume"
                                    if last_saved else "no checkpoint to resume from"))

    # ---- 9. Final evaluation and save --------------------------------------------------------------
    final = {"step": args.max_steps}
    if args.eval_every and eval_records:
        final.update(evaluate(unwrapped, tokenizer, eval_records, pool, args, stop_ids, accelerator, args.max_steps))
        if accelerator.is_main_process:
            metrics_file.write(final)
        if args.report_to != "none":
            accelerator.log(final, step=args.max_steps)
    accelerator.wait_for_everyone()
    # the saved policy keeps the checkpoint's own generation settings for whoever uses it next
    unwrapped.generation_config = getattr(unwrapped, "reasoner_zero_original_generation_config",
                                          unwrapped.generation_config)
    save_kw = dict(is_main_process=accelerator.is_main_process, save_function=accelerator.save, safe_serialization=True)
    unwrapped.save_pretrained(out / "policy", state_dict=accelerator.get_state_dict(policy), **save_kw)
    if critic is not None:
        accelerator.unwrap_model(critic).save_pretrained(
            str(out / "critic"), state_dict=accelerator.get_state_dict(critic), **save_kw)
    if accelerator.is_main_process:
        tokenizer.save_pretrained(out / "policy")
    pool.close()
    summary = {"base_accuracy": base_accuracy, "final_accuracy": final.get("eval/accuracy"), "steps": args.max_steps,
               "minutes": (time.time() - t_start) / 60, "output_dir": str(out)}
    if accelerator.is_main_process:
        metrics_file.close()
        samples_file.close()
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        acc = (f"held-out accuracy {summary['base_accuracy']:.1%} -> {summary['final_accuracy']:.1%}"
               if summary["final_accuracy"] is not None else "no evaluation set")
        print(f"done: {args.advantage}, {acc}, {args.max_steps} steps in {summary['minutes']:.1f} min; "
              f"outputs in {out}/ (metrics.jsonl, samples.jsonl, policy/{', critic/' if critic is not None else ''})")
    accelerator.end_training()
    return summary


def mini_batch_parts(total: int, mini_batches: int, seed: int, step: int, epochs: int = 1) -> list[torch.Tensor]:
    """The global rows of each mini-batch, epoch after epoch: a fresh shuffle per epoch, seeded by
    (seed, step). Mini-batches are drawn from the rows of all processes (process r holds global rows
    r*rows ..), so they hold the same rows whatever the process count."""
    generator = torch.Generator().manual_seed(seed * 1000 + step)
    parts = []
    for _ in range(epochs):
        order = torch.randperm(total, generator=generator) if mini_batches > 1 else torch.arange(total)
        parts += list(order.chunk(mini_batches))
    return parts


def local_rows(part: torch.Tensor, rank: int, rows: int) -> torch.Tensor:
    """This process's rows of a mini-batch of global rows, as indices into its own batch."""
    return part[(part >= rank * rows) & (part < (rank + 1) * rows)] - rank * rows


def critic_fusable(critic) -> bool:
    """Whether the first critic update's forward pass (in train mode) gives the same values as the no-grad
    value pass (in eval mode): true unless the model has active dropout."""
    dropout = [v for k, v in critic.backbone.config.to_dict().items() if "dropout" in k or k.endswith("pdrop")]
    return not any(isinstance(v, (int, float)) and v > 0 for v in dropout) and not any(
        isinstance(m, torch.nn.Dropout) and m.p > 0 for m in critic.modules())


def update(accelerator, model, optimizer, exp: Experience, args: Args, role: str, epochs: int,
           mini_batches: int, step: int, token_rewards: torch.Tensor | None = None) -> dict[str, list]:
    """Optimizer steps of the policy or the critic over one rollout: `epochs` passes of `mini_batches`
    mini-batches, each accumulated over micro-batches. Returns lists of stats, one value per optimizer step.

    Critic with `token_rewards`: the rows of the first mini-batch have no values yet; the forward pass of
    that first update, taken before any optimizer step, is their value pass. It writes `exp.values`,
    `exp.advantages` and `exp.returns` of those rows (GAE is per row), and the loss uses them as the old
    values, exactly as a separate value pass would, saving that pass's cost for 1 / `mini_batches` of the rows."""
    rows = len(exp.response_ids)
    world, rank = accelerator.num_processes, accelerator.process_index
    device = exp.response_ids.device
    stats: dict[str, list] = {}
    model.train()
    for number, part in enumerate(mini_batch_parts(rows * world, mini_batches, args.seed, step, epochs)):
        local = local_rows(part, rank, rows).to(device)  # a process may get more or fewer rows than another
        mini = exp.select(local)
        fill = token_rewards is not None and number == 0
        # sequences are the rows with a token in the loss: rows left out (--drop-equal-groups) have none
        kept_rows = (mini.response_mask.sum(dim=1) > 0).sum().float()
        count = accelerator.reduce(torch.stack([mini.response_mask.sum(), kept_rows]), "sum")
        weights_all = loss_weights(mini.response_mask, args.loss_agg if role == "policy" else "token-mean",
                                   int(count[1].item()), count[0].item(), args.max_new_tokens)
        micro = plan(mini, args, accelerator)
        mini_stats: dict[str, list] = {}
        accelerator.gradient_accumulation_steps = len(micro)
        accelerator.step = 0  # align accumulation boundaries with this mini-batch
        for idx in micro:
            # an empty micro-batch (another process has more) runs one row with zero weight, so that
            # every process makes the same number of forward and backward passes
            if len(idx):
                mb, w = mini.select(idx).trim(), weights_all[idx]
            else:
                mb = exp.select(torch.zeros(1, dtype=torch.long, device=device)).trim()
                w = torch.zeros_like(mb.response_mask)
            w = w[:, :mb.response_ids.shape[1]]
            with accelerator.accumulate(model):
                if role == "critic":
                    values = forward_values(model, mb.input_ids, mb.attention_mask, mb.response_ids.shape[1])
                    if fill:  # this forward is these rows' value pass (see the docstring)
                        rows_in_exp, width = local[idx] if len(idx) else idx.new_zeros(1), values.shape[1]
                        mb.values = values.detach() * mb.response_mask
                        advantages, mb.returns = compute_gae_advantages(token_rewards[rows_in_exp, :width], mb.values,
                                                                        mb.response_mask, args.gamma, args.lam)
                        if len(idx):
                            exp.values[rows_in_exp, :width], exp.returns[rows_in_exp, :width] = mb.values, mb.returns
                            exp.advantages[rows_in_exp, :width] = advantages
                    loss, s = compute_value_loss(values, mb.values, mb.returns, w,
                                                 args.value_clip if args.value_clip > 0 else None)
                    s["critic/value_loss"] = loss.item()
                else:
                    logprobs, entropy = forward_logprobs(model, mb.input_ids, mb.attention_mask,
                                                         mb.response_ids.shape[1], args.temperature, with_entropy=True,
                                                         entropy_grad=args.entropy_coef > 0)
                    old = mb.old_logprobs if mb.old_logprobs is not None else logprobs.detach()
                    loss, s = compute_policy_loss(logprobs, old, mb.advantages, w, args.clip_low, args.clip_high)
                    s["loss/policy"] = loss.item()
                    s["policy/entropy"] = masked_mean(entropy.detach(), mb.response_mask).item()
                    if args.kl_coef > 0 and args.kl_estimator == "k3":
                        kl = (compute_kl(logprobs, mb.ref_logprobs, "k3") * w).sum()
                        loss = loss + args.kl_coef * kl
                        s["policy/kl"] = kl.item()
                    if args.entropy_coef:
                        loss = loss - args.entropy_coef * (entropy * w).sum()
                if step in injected_nan_steps():
                    loss = loss * float("nan")
                # accelerate divides by the accumulation steps and DDP averages over processes; the
                # weights already normalise over the whole batch, so undo both.
                accelerator.backward(loss * accelerator.gradient_accumulation_steps * world)
                if accelerator.sync_gradients:
                    norm = clip_gradients(accelerator, model, args.max_grad_norm)  # global: same on all processes
                    s[f"{role}/grad_norm"] = norm
                    s["train/nonfinite_updates"] = float(not math.isfinite(norm))
                    if math.isfinite(norm):  # a NaN/inf loss or gradient: skip this update, counted
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            share = mb.response_mask.sum().item() * float(len(idx) > 0) / max(count[0].item(), 1.0)
            for k, v in s.items():
                mini_stats.setdefault(k, []).append(v * share if k in TOKEN_STATS else v)
        for k, v in mini_stats.items():  # one value per optimizer step
            stats.setdefault(k, []).append(sum(v) if k in SUMMED_STATS + TOKEN_STATS else sum(v) / len(v))
    return stats


if __name__ == "__main__":
    main(parse_args(Args, description=__doc__))
