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
  3. No reference model is loaded when the KL coefficient is 0 (ORZ loads one only to log KL); with LoRA
     (`--lora-r`, not in ORZ, which fine-tunes fully) the reference is the policy with its adapters off.
  4. The math checker is math-verify plus normalisation (reward.py); ORZ trained with its own checker.

Run it:
    python train_ppo.py                                  # built-in default: tiny model, CPU, ~5 minutes
    python train_ppo.py --help                           # every argument
    python train_ppo.py --config my_run.yaml --lr 1e-6   # a config file, overridden on the command line
    accelerate launch --num_processes 8 train_ppo.py --model Qwen/Qwen2.5-7B --dataset orz_math_57k.json
"""

import json
import os
import time
from dataclasses import dataclass, field, replace
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

import algos
from checkpoint import (
    StopRequest,
    claim_output_dir,
    nonfinite_stop_message,
    open_logs,
    output_dir_problems,
    parameters_finite,
    prepare_output_dir,
    releases_output_locks,
    resume,
    save_checkpoint,
    save_experience,
    save_models,
)
from cli import parse_args
from critic import ValueModel, batched_values
from data.loading import DataArgs, load_data, read_data
from launch import (
    configure_deepspeed,
    describe_setup,
    end_launched_process,
    is_sharded,
    leave_process_group,
    leaves_the_process_as_found,
    make_accelerator,
    names_lost_processes,
    prepare_reference,
    read_weights_only,
    reduce_sum,
    stop_if_not_as_launched,
    stop_unless_same_weights,
    tracker_problems,
    zero_stage_of,
)
from reward import (
    RewardArgs,
    RewardPool,
    RewardRules,
    audit_verdicts,
    control_reward,
    decide_rewards,
    overlong_penalty,
    repetition_flags,
    reward_problems,
)
from rollout import (
    Experience,
    ModelArgs,
    RolloutArgs,
    SamplingArgs,
    batched_logprobs,
    call_seeds,
    generate_responses,
    generate_responses_refill,
    model_problems,
    padding_fraction,
    prepare_for_sampling,
    resolve_model,
    rollout_experience,
    step_prompts,
)
from rollout import (
    deal_groups as rollout_deal_groups,
)
from update import MAX_STATS, SUMMED_STATS, TOKEN_STATS, cov_tokens, plan, update_models
from utils import (
    RunError,
    disable_dropout,
    left_pad,
    lora_disabled,
    lora_merged,
    lora_problems,
    lora_summary,
    main_process_decides,
    masked_mean,
    number_problems,
    plain_args,
    timer,
    trainable_state_only,
    warmup_constant,
    with_lora,
)
from vllm_engine import VLLMEngine, vllm_problems
from vllm_engine import generate_responses as vllm_generate

FULL_LR = 1e-4  # the policy's rate on the built-in task; ORZ trains real models at 1e-6
# LoRA learns best at a larger rate than full fine-tuning, about 10x in Schulman et al. ("LoRA Without Regret",
# Thinking Machines, 2025). Rank 16 on the built-in task (GRPO, 60 steps): 72% at 1e-4, 90.2% at 1e-3, 93.8% at 2e-3.
LORA_LR = 20 * FULL_LR


@dataclass
class Args(RewardArgs, RolloutArgs, SamplingArgs, DataArgs, ModelArgs):
    """Arguments of a run: the model, data, sampling and reward arguments every command shares, then
    training's own. A field's "group" metadata starts a group of --help (it lasts until the next)."""

    dataset: str = field(default="synthetic", metadata={
        "group": "model and data", "help": "file (.json/.jsonl/.parquet), dataset dir or hub name, or 'synthetic'"})
    eval_datasets: str | None = field(default=None, metadata={
        "help": "comma-separated held-out sets (math500, aime2024, files, 'synthetic'); default: the synthetic test "
                "split when training on 'synthetic'"})
    max_prompt_tokens: int = field(default=512, metadata={"help": "longer prompts are skipped (counted and logged)"})
    output_dir: str = field(default="runs/ppo", metadata={"help": "where metrics, samples and the final model go"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    advantage: str = field(default="gae", metadata={"choices": lambda: algos.ADVANTAGE_ESTIMATORS,
        "group": "rollout", "help": "advantage estimator, a name in algos.ADVANTAGE_ESTIMATORS: gae (PPO critic), grpo "
                                    "(group mean/std), rloo (leave-one-out), reinforce_pp (REINFORCE++: group mean, "
                                    "then whitened over the batch); in Python also a function"})
    max_steps: int = field(default=60, metadata={"help": "RL steps (one rollout and its updates each)"})
    prompts_per_step: int = field(default=32, metadata={"help": "prompts per step, over all processes"})
    num_generations: int = field(default=8, metadata={"help": "samples per prompt"})
    format_reward_weight: float = field(default=0.0, metadata={
        "group": "reward", "help": "weight of the optional format reward"})
    zero_repetitive: bool = field(default=False, metadata={
        "help": "reward 0 for a response caught in a loop (reward.repetition_flags); repetition is always logged "
                "as train/repetition"})
    gamma: float = field(default=1.0, metadata={"group": "advantages and losses", "help": "GAE discount (ORZ: 1)"})
    lam: float = field(default=1.0, metadata={"help": "GAE lambda (ORZ: 1)"})
    adaptive_lam_alpha: float = field(default=0.0, metadata={
        "help": "VAPO's length-adaptive GAE: the policy's lambda is 1 - 1 / (alpha x length) per response "
                "(VAPO: 0.05), the critic's targets keep --lam (0: off)"})
    whiten_advantages: bool | None = field(default=None, metadata={
        "help": "whiten advantages over all response tokens of the batch (default: on for gae, as ORZ; off for "
                "grpo/rloo, whose groups with equal rewards then keep advantage 0)"})
    scale_by_std: bool = field(default=True, metadata={"help": "GRPO: divide by the group std (off: Dr. GRPO)"})
    drop_equal_groups: bool = field(default=False, metadata={
        "help": "leave groups whose rewards are all equal out of the update"})
    overlong_buffer: int = field(default=0, metadata={
        "help": "DAPO's overlong shaping: the reward falls linearly by up to --overlong-penalty over the last N "
                "tokens of --max-new-tokens (0: off)"})
    overlong_penalty: float = field(default=1.0, metadata={"help": "the shaping's largest penalty"})
    dynamic_sampling: bool = field(default=False, metadata={
        "help": "DAPO's dynamic sampling: draw more prompts until the step holds --prompts-per-step groups whose "
                "rewards differ (or --max-sampling-rounds rounds were drawn)"})
    max_sampling_rounds: int = field(default=4, metadata={
        "help": "dynamic sampling: at most this many rounds of --prompts-per-step prompts per step"})
    curriculum: Literal["none", "pass-rate"] = field(default="none", metadata={
        "help": "pass-rate: draw a prompt whose last group all failed or all passed with weight --curriculum-floor "
                "(others 1); the pass rates are saved in checkpoints"})
    curriculum_floor: float = field(default=0.1, metadata={"help": "pass-rate curriculum: the weight of such a prompt"})
    mask_truncated: bool = field(default=False, metadata={
        "help": "leave truncated responses out of the losses (DAPO's overlong filtering) instead of only "
                "scoring them 0; they still count in their group's baseline"})
    loss_agg: str = field(default="token-mean", metadata={"choices": lambda: algos.LOSS_AGGREGATIONS,
        "help": "loss aggregation, a name in algos.LOSS_AGGREGATIONS: token-mean over the batch, "
                "seq-mean-token-mean (mean of per-sequence means) or seq-mean-token-sum-norm (Dr. GRPO)"})
    policy_loss: str = field(default="ppo", metadata={"choices": lambda: algos.POLICY_LOSSES,
        "help": "policy loss, a name in algos.POLICY_LOSSES: ppo (the clipped surrogate) or cispo (MiniMax-M1: the "
                "clipped importance weight, detached, times the log-prob; no token loses its gradient)"})
    clip_low: float = field(default=0.2, metadata={"help": "ratio clip below: 1 - clip_low"})
    clip_high: float = field(default=0.2, metadata={
        "help": "ratio clip above: 1 + clip_high (DAPO's clip-higher: 0.28)"})
    ratio_level: Literal["token", "sequence"] = field(default="token", metadata={
        "help": "importance ratio per token (PPO) or per sequence, the exponent of the mean token log-ratio "
                "(GSPO; its paper clips at --clip-low 3e-4 --clip-high 4e-4, with --loss-agg seq-mean-token-mean)"})
    cispo_clip_low: float = field(default=1.0, metadata={
        "help": "cispo: the importance weight is at least 1 - this (1: no lower bound, as MiniMax-M1)"})
    cispo_clip_high: float = field(default=5.0, metadata={
        "help": "cispo: the importance weight is at most 1 + this (as SkyRL; the paper tunes only this bound)"})
    entropy_control: Literal["none", "clip-cov", "kl-cov"] = field(default="none", metadata={
        "help": "against entropy collapse (Cui et al. 2025): clip-cov drops the gradient of a few random tokens of "
                "high log-prob/advantage covariance; kl-cov puts a KL penalty on the tokens of highest covariance "
                "instead of the ratio clip (it acts from the second optimizer step of a rollout on)"})
    clip_cov_ratio: float = field(default=2e-4, metadata={"help": "clip-cov: share of the batch's tokens dropped"})
    clip_cov_lower: float = field(default=1.0, metadata={"help": "clip-cov: candidates' covariance is above this"})
    clip_cov_upper: float = field(default=5.0, metadata={"help": "clip-cov: and below this"})
    kl_cov_ratio: float = field(default=2e-4, metadata={"help": "kl-cov: share of the batch's tokens penalised"})
    kl_cov_coef: float = field(default=1.0, metadata={"help": "kl-cov: coefficient of the |log-ratio| penalty"})
    kl_coef: float = field(default=0.0, metadata={"help": "KL to the reference model (0: none loaded, as ORZ)"})
    kl_estimator: str = field(default="k3", metadata={"choices": lambda: algos.KL_ESTIMATORS,
        "help": "a name in algos.KL_ESTIMATORS: k3 in the loss (GRPO) or k1 in the reward (classic PPO)"})
    entropy_coef: float = field(default=0.0, metadata={"help": "entropy bonus (entropy is always logged)"})
    lr: float | None = field(default=None, metadata={
        "group": "optimisation", "help": f"policy learning rate (default {FULL_LR:g}, with --lora-r {LORA_LR:g}; "
                                         "ORZ on real models: 1e-6)"})
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
    critic_warmup_steps: int = field(default=0, metadata={
        "help": "train only the critic for the first N steps, on samples of the unchanged initial policy (VAPO's "
                "value pretraining: 50 steps)"})
    value_clip: float = field(default=0.2, metadata={
        "help": "clip of the value loss around old values (<= 0: plain loss)"})
    bf16: bool = field(default=False, metadata={"help": "bf16 mixed precision"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "trade compute for activation memory"})
    share_prompts: bool = field(default=False, metadata={
        "help": "the policy's passes over a micro-batch compute each distinct prompt once and its samples' responses "
                "on its keys and values: the same log-probs to float rounding, fewer tokens (one process or DDP; "
                "not with --gradient-checkpointing)"})
    lora_r: int = field(default=0, metadata={
        "group": "LoRA (peft)", "help": "train LoRA adapters of this rank on the policy and the critic's backbone "
                                       "(the value head trains whole); 0: full fine-tuning"})
    lora_alpha: float | None = field(default=None, metadata={
        "help": "LoRA alpha: the adapters' product is scaled by alpha / r (default: 2 x r)"})
    lora_dropout: float = field(default=0.0, metadata={
        "help": "dropout on the adapters' input in the update; needs one optimizer step per rollout"})
    lora_target_modules: str = field(default="all-linear", metadata={
        "help": "modules with adapters: all-linear (every linear layer of attention and MLP, not the LM head) "
                "or comma-separated names such as q_proj,v_proj"})
    merge_on_save: bool = field(default=False, metadata={
        "help": "LoRA: write the final policy/ and critic/ with the adapters merged into the weights (loadable "
                "without peft) instead of the adapters alone"})
    merge_for_generation: bool = field(default=False, metadata={
        "help": "LoRA: sample with the adapters merged into the weights (one matmul per layer, not three), "
                "unmerged for the update; not with --bf16 or FSDP"})
    eval_every: int = field(default=20, metadata={
        "group": "evaluation and logging", "help": "evaluate every N steps (and at the start and end; 0: never)"})
    eval_num_samples: int = field(default=4, metadata={
        "help": "samples per eval problem; accuracy is their mean (avg@k)"})
    eval_limit: int = field(default=64, metadata={"help": "eval problems (0: all)"})
    samples_per_step: int = field(default=4, metadata={"help": "responses written to samples.jsonl each step"})
    audit_samples: int = field(default=8, metadata={
        "help": "responses per process and step also judged by plain math-verify: reward/disagreement, and the "
                "main process's disagreeing ones to reward_audit.jsonl (0: no audit)"})
    report_to: Literal["none", "tensorboard", "wandb"] = field(default="none", metadata={
        "help": "also log metrics to TensorBoard (in OUTPUT_DIR/reasoner-zero) or Weights & Biases "
                "(project reasoner-zero)"})
    save_every: int = field(default=20, metadata={
        "group": "checkpoints and faults", "help": "checkpoint every N steps into output_dir/checkpoints (0: never)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "keep the last K checkpoints"})
    dump_rollouts: list[int] = field(default_factory=list, metadata={
        "help": "steps whose rollout (ids, masks, rewards, log-probs, advantages) and state before the update go to "
                "OUTPUT_DIR/rollouts/rollout-N, for `python replay.py OUTPUT_DIR/rollouts/rollout-N`"})
    resume: bool = field(default=False, metadata={
        "help": "resume from the last checkpoint (also automatic when one exists, unless --overwrite)"})
    overwrite: bool = field(default=False, metadata={
        "help": "start afresh: delete the previous run's outputs in output_dir (checkpoints, logs, models)"})
    max_nonfinite_updates: int = field(default=3, metadata={
        "help": "stop after this many updates in a row with a NaN/inf loss or gradient (each one is skipped)"})
    collective_timeout: float = field(default=1800.0, metadata={
        "help": "seconds a collective waits for the other processes (one that hangs or stops) before the run "
                "stops with a line naming them; a dead one ends it at once"})

    def __post_init__(self):  # checked when built, before anything is read or written
        if problems := value_problems(self):
            raise RunError("error: " + "; ".join(problems))


# --------------------------------------------------------------------------------------------------
# The training loop: `main` reads as its ten steps; the functions after it come in the order it calls
# them, so the file reads top to bottom.
# --------------------------------------------------------------------------------------------------

@dataclass
class Run:
    """What `setup` builds for the loop. `optimizers` and `schedulers` are keyed by role ("policy",
    "critic"); `logs` holds metrics.jsonl, samples.jsonl, eval_problems.jsonl and reward_audit.jsonl on the
    main process (empty elsewhere)."""

    args: Args
    accelerator: object
    tokenizer: object
    policy: torch.nn.Module
    critic: torch.nn.Module | None
    ref: torch.nn.Module | None
    optimizers: dict
    schedulers: dict
    pool: RewardPool
    train_records: list
    eval_records: dict
    stop_ids: list[int]
    out: Path
    start_step: int
    base_accuracy: float | None
    checkpoint: Path | None
    logs: dict
    t_start: float
    peft_policy: object = None  # with LoRA: the peft model around `policy`, which saves the adapters
    pass_rates: dict = field(default_factory=dict)  # --curriculum pass-rate: prompt id -> its last group's rate
    pass_rates_before: dict = field(default_factory=dict)  # as they were before this step's groups (dumps)
    engine: object = None  # --rollout-engine vllm: the vllm_engine.VLLMEngine


@releases_output_locks
@leaves_the_process_as_found
@names_lost_processes
def main(args: Args) -> dict:
    from tqdm.auto import tqdm

    run = setup(args)  # processes, checks, data, output directory, models, optimizers, reward workers, resume
    if isinstance(run, dict):  # this run had already finished: its summary
        return run
    args, accelerator, critic = run.args, run.accelerator, run.critic
    sum_all = partial(reduce_sum, accelerator)
    stop, nonfinite = StopRequest(), 0
    bar = tqdm(range(run.start_step, args.max_steps), desc=algos.estimator_name(args.advantage, short=True),
               initial=run.start_step, total=args.max_steps, disable=not accelerator.is_main_process)
    for step in bar:
        metrics, t_step = {"step": step}, time.time()
        # ---- 1. Evaluate: at the start and every --eval-every steps (the end is in `finish`) ----------------
        if args.eval_every and run.eval_records and step % args.eval_every == 0:
            with timer(metrics, "eval"):
                metrics.update(evaluate(run, step))
            run.base_accuracy = metrics["eval/accuracy"] if run.base_accuracy is None else run.base_accuracy
        # ---- 2. Rollout: this process's share of the step's prompts, --num-generations samples each, and --
        # ---- 3. Reward: one number per response (with --dynamic-sampling, rounds of both) --------------------
        exp, texts, drawn, reward_stats, repetitive = sample_and_score(run, step, metrics)
        # ---- 4. Log-probs of the rollout: the sampling policy's (old) and the reference model's -------------
        with timer(metrics, "logprobs"):
            micro = plan(exp, args, accelerator)
            exp.old_logprobs, exp.ref_logprobs = rollout_logprobs(run, exp, micro)
            metrics["perf/padding"] = padding_fraction(exp, micro)
            metrics.update(mismatch_metrics(accelerator, exp))  # without old log-probs `policy_loss` measures it
        # ---- 5. Values of every response token (PPO's critic) ----------------------------------------------
        with timer(metrics, "critic"):
            exp.values = batched_values(critic, exp, micro) if critic is not None else None
        # ---- 6. Advantages, once: the --advantage estimator (algos.ADVANTAGE_ESTIMATORS) ------------------
        equal = algos.equal_reward_groups(exp.rewards, exp.group_ids)
        lengths = exp.response_mask.sum(dim=1)
        if args.drop_equal_groups and critic is None:  # a group of equal rewards has no signal: left out
            exp.response_mask = exp.response_mask * (~equal)[:, None]
        if args.mask_truncated:  # after the baselines' rewards are fixed: truncated rows count there, not in the loss
            exp.response_mask = exp.response_mask * (~exp.truncated)[:, None]
        exp.advantages, exp.returns = compute_advantages(run, exp, lengths, metrics)
        if args.entropy_control != "none":  # Clip-Cov's or KL-Cov's tokens, chosen once over the whole batch
            exp.cov_tokens = cov_tokens(run, exp, step, metrics)
        if step in args.dump_rollouts:  # the rollout and the state before its update, for `python replay.py`
            save_state(run, run.out / "rollouts" / f"rollout-{step:06d}", step, keep=1, exp=exp)
        # ---- 7. Update the critic first (ORZ), then 8. the policy (once the critic has warmed up) -----------
        stats, policy_trains = update_models(run, exp, step, metrics)
        # ---- 9. Log, then advance the learning-rate schedules (once per RL step of updates) -------------------
        metrics.update(step_metrics(accelerator, exp, lengths, equal, repetitive, reward_stats, stats))
        metrics["lr"] = run.schedulers["policy"].get_last_lr()[0]  # the rates this step's updates used
        if critic is not None:
            metrics["critic/lr"] = run.schedulers["critic"].get_last_lr()[0]
            run.schedulers["critic"].step()
        if policy_trains:
            run.schedulers["policy"].step()
        metrics["time/step"] = time.time() - t_step
        write_logs(run, step, metrics, exp, texts, drawn, lengths, bar)
        # ---- 10. Checkpoint; stop when asked, or when updates keep failing ------------------------------------
        nonfinite = nonfinite + 1 if metrics["train/nonfinite_updates"] > 0 else 0
        signalled = sum_all(float(stop.signal is not None)).item() > 0
        if nonfinite >= args.max_nonfinite_updates:
            leave_process_group()
            raise RunError(nonfinite_stop_message(step, nonfinite, run.checkpoint))
        if (args.save_every and (step + 1) % args.save_every == 0) or signalled:
            run.checkpoint = checkpoint(run, step, nonfinite)
        if signalled:
            leave_process_group()
            raise RunError(f"stopped by signal {stop.signal} after step {step}: "
                           + (f"last checkpoint {run.checkpoint}; run the same command again to resume"
                                if run.checkpoint else "no checkpoint to resume from"))
    return finish(run)


def setup(args: Args) -> Run | dict:
    """Build what the loop uses: the processes (accelerate), the checked arguments, the data, the claimed
    output directory (refusals come before any model loads), the tokenizer and models, their optimizers,
    the reward workers, and the state of the checkpoint to resume from. Only the summary if the output
    directory holds this very run, finished."""
    from accelerate.utils import DistributedType, set_seed
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if args.whiten_advantages is None:  # resolved once, so that config.json records what trains
        args = replace(args, whiten_advantages=algos.uses_critic(args.advantage))
    if args.lora_r and args.lora_alpha is None:
        args = replace(args, lora_alpha=2.0 * args.lora_r)
    lora_lr = bool(args.lora_r and args.lr is None)
    if args.lr is None:
        args = replace(args, lr=LORA_LR if args.lora_r else FULL_LR)
    # A tracker that is not installed is check_args's one-line error; accelerate would warn about it first.
    log_with = None if args.report_to == "none" or tracker_problems(args.report_to) else args.report_to
    accelerator = make_accelerator(args.bf16, log_with, args.output_dir, args.collective_timeout)
    if lora_lr:
        accelerator.print(f"LoRA: learning rate {LORA_LR:g} (20x full fine-tuning's default; --lr sets another)")
    world = accelerator.num_processes
    main_process_decides(accelerator, check_args, args, world)  # hub and import checks: once, for all
    data = read_data(args)  # a bad data file stops the run here, before any model is built or loaded
    # LoRA's refusals, before any model loads
    if args.lora_r and accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise RunError("error: LoRA runs on one process, DDP or FSDP2; with DeepSpeed it is not supported yet")
    if args.share_prompts and is_sharded(accelerator):
        raise RunError("error: --share-prompts runs on one process or DDP; under FSDP and ZeRO-3 a second forward "
                       "pass before the backward is not supported here")
    if args.merge_for_generation and accelerator.distributed_type == DistributedType.FSDP:
        raise RunError("error: --merge-for-generation needs each process to hold whole weights (one process or "
                       "DDP); under FSDP each holds a shard")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        configure_deepspeed(accelerator, args.max_grad_norm)
    set_seed(args.seed, device_specific=True)  # each process samples differently
    out = Path(args.output_dir)
    start = claim_output_dir(accelerator, args)  # locked for this run; refusals come before any model loads
    if start["finished"] is not None:
        accelerator.print(f"{out} holds this run, finished at step {args.max_steps}: nothing to do")
        leave_process_group(accelerator)
        return start["finished"]
    with accelerator.local_main_process_first():  # the tiny base or a GGUF copy: made once per machine
        model_path = resolve_model(args.model, log=accelerator.print)
    stop_unless_same_weights(accelerator, model_path)
    t_start = time.time()  # a one-time build of the base (above) is not the run's time
    # Trained models load in fp32 and --bf16 autocasts their forward passes: AdamW on bf16 weights loses
    # updates of lr 1e-6 to rounding. Sharded setups (FSDP) keep fp32 masters the same way. With LoRA the
    # base weights are frozen, so with --bf16 they load in bf16 (half the memory); peft keeps the adapters in
    # fp32 (its autocast_adapter_dtype), and the value head is fp32 too.
    frozen_bf16 = bool(args.lora_r and args.bf16)
    load = dict(trust_remote_code=args.trust_remote_code, dtype=torch.bfloat16 if frozen_bf16 else torch.float32,
                use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=args.trust_remote_code)
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=args.trust_remote_code)
    train_records, eval_records = load_data(args, tokenizer, data, config)  # too long for it: before it loads
    policy = AutoModelForCausalLM.from_pretrained(model_path, **load)
    stop_ids = prepare_for_sampling(tokenizer, policy, log=accelerator.print)
    critic = ValueModel.from_base(model_path, **load) if algos.uses_critic(args.advantage) else None
    ref_load = {**load, "dtype": torch.bfloat16 if args.bf16 else torch.float32}  # never trained: bf16 is fine
    # With LoRA the reference is the policy with its adapters switched off (rollout_logprobs): no second copy.
    ref = (AutoModelForCausalLM.from_pretrained(model_path, **ref_load).eval().requires_grad_(False)
           if args.kl_coef > 0 and not args.lora_r else None)
    optimizers, schedulers, trained = {}, {}, {"policy": policy, "critic": critic}
    for role, lr in (("policy", args.lr), ("critic", args.critic_lr)):
        model = trained[role]
        if model is None:
            continue
        if disable_dropout(model):  # the update must score the model that sampled
            accelerator.print(f"dropout set to 0 in the {role} for training")
        if args.lora_r:  # after disable_dropout: --lora-dropout is the adapters' own
            model = trained[role] = with_lora(model, args)
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        optimizers[role] = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                             betas=(0.9, 0.95), weight_decay=0.0)  # ORZ's
        schedulers[role] = torch.optim.lr_scheduler.LambdaLR(optimizers[role], warmup_constant(args.warmup_steps))
    # With LoRA the policy trains as the transformers model with peft's layers in it, not as the PeftModel
    # around it: FSDP2 shards the prepared model as one root, and `generate` runs the inner model's forward.
    peft_policy = trained["policy"] if args.lora_r else None
    policy, critic = peft_policy.get_base_model() if peft_policy else trained["policy"], trained["critic"]
    for note in filter(None, (lora_summary(trained) if args.lora_r else None,
                              algos.gspo_note(args.ratio_level, args.clip_low, args.clip_high, args.loss_agg))):
        accelerator.print(note)
    policy, optimizers["policy"] = accelerator.prepare(policy, optimizers["policy"])
    if critic is not None:
        critic, optimizers["critic"] = accelerator.prepare(critic, optimizers["critic"])
    if ref is not None:  # frozen: no DDP wrapper; sharded like the others where they are
        ref = prepare_reference(accelerator, ref)
    models = {"policy": policy, "critic": critic, "reference model": ref}
    for model in (policy, critic):
        if zero_stage_of(model) is not None:
            read_weights_only(model)
    stop_if_not_as_launched(accelerator, models)  # and how each model is held
    accelerator.print(describe_setup(accelerator, models))
    # with a control reward the pool judges correctness all the same (train/correct, and evaluation)
    reward_fn, workers = "math" if control_reward(args.reward) else args.reward, args.reward_workers
    if callable(reward_fn) and workers and reward_fn.__module__ == "__main__":  # a worker process cannot import it
        accelerator.print("note: the reward function is defined in __main__ (a notebook): it is scored in this "
                          "process, without the workers' hard timeout; from a .py file it gets worker processes")
        workers = 0
    pool = RewardPool(reward_fn, num_workers=workers, timeout=args.reward_timeout)

    main_process_decides(accelerator, prepare_output_dir, out, start, args)
    with trainable_state_only([accelerator.unwrap_model(m) for m in (policy, critic) if m is not None and args.lora_r]):
        state = resume(accelerator, start["checkpoint"], list(schedulers.values()))
    logs = open_logs(accelerator, out, state["step"])
    longest = max(len(r["prompt_ids"]) for records in (train_records, *eval_records.values()) for r in records)
    engine = None if args.rollout_engine != "vllm" else VLLMEngine(  # given the policy's weights as they change
        model_path, dtype=args.rollout_dtype, seed=args.seed, max_model_len=longest + args.max_new_tokens)
    if args.report_to != "none":
        accelerator.init_trackers("reasoner-zero", config={k: str(v) for k, v in plain_args(args).items()})
    spin = os.environ.get("GOMP_SPINCOUNT", "from OMP_WAIT_POLICY")
    accelerator.print(f"threads per process: {torch.get_num_threads()} (OMP_NUM_THREADS), OpenMP spin count "
                      + (f"{spin} (GOMP_SPINCOUNT)" if OPENMP_SETTING_APPLIED else
                         "libgomp's own: torch was imported before train_ppo (set GOMP_SPINCOUNT before that)"))
    accelerator.print(f"training {algos.estimator_name(args.advantage)} on {len(train_records)} prompts, "
                      f"{world} process(es), {args.max_steps} steps of {args.prompts_per_step} x "
                      f"{args.num_generations}")
    if len(train_records) < args.prompts_per_step:
        accelerator.print(f"note: {len(train_records)} training prompts, fewer than --prompts-per-step "
                          f"{args.prompts_per_step}: each step draws some prompts more than once, and "
                          f"each draw's {args.num_generations} samples are a group of their own")
    return Run(args=args, accelerator=accelerator, tokenizer=tokenizer, policy=policy, critic=critic, ref=ref,
               optimizers=optimizers, schedulers=schedulers, pool=pool, train_records=train_records,
               eval_records=eval_records, stop_ids=stop_ids, out=out, start_step=state["step"],
               base_accuracy=state["base_accuracy"], checkpoint=start["checkpoint"], logs=logs, t_start=t_start,
               peft_policy=peft_policy, engine=engine,
               pass_rates={int(k): v for k, v in state.get("pass_rates", {}).items()})


def check_args(args: Args, num_processes: int = 1) -> None:
    """`value_problems`, and what depends on the process count, files, hub and imports: one line, then exit."""
    problems = []
    if args.prompts_per_step % num_processes or args.prompts_per_step < num_processes:
        problems.append(f"--prompts-per-step {args.prompts_per_step} must divide by the {num_processes} processes")
    rows = args.prompts_per_step // max(num_processes, 1) * args.num_generations
    for name, parts in (("num_mini_batches", args.num_mini_batches), ("critic_mini_batches", args.critic_mini_batches)):
        if parts < 1 or rows % parts:
            problems.append(f"--{name.replace('_', '-')} {parts} must split the {rows} rollout rows per process evenly")
    problems += value_problems(args)
    for name, spec in [("--dataset", args.dataset),
                       *(("--eval-datasets", s) for s in (args.eval_datasets or "").split(","))]:
        if (spec.strip().lower().endswith((".json", ".jsonl", ".parquet"))
                and not Path(spec.strip()).expanduser().is_file()):
            problems.append(f"{name} {spec.strip()}: no such file")
    problems += [p for p in number_problems(args, num_processes) if p.startswith("--seed")]  # with the processes
    problems += model_problems(args.model)
    problems += reward_problems(args.reward) if isinstance(args.reward, str) else []
    problems += tracker_problems(args.report_to)
    problems += output_dir_problems(args.output_dir)
    problems += vllm_problems() if args.rollout_engine == "vllm" else []
    if problems:
        raise RunError("error: " + "; ".join(problems))


def value_problems(args: Args) -> list[str]:
    """What is wrong with the arguments on any launch, from their values alone (`Args` checks it when built)."""
    problems = []
    if not 0 < args.refill_fraction < 1:
        problems.append("--refill-fraction must be in (0, 1)")
    if args.share_prompts and args.gradient_checkpointing:
        problems.append("--share-prompts needs the KV cache in training, which --gradient-checkpointing turns off")
    if args.tis_cap < 0:
        problems.append(f"--tis-cap {args.tis_cap} must be > 0 (or 0: off)")
    if not 0 < args.max_padding <= 1:
        problems.append(f"--max-padding {args.max_padding} must be in (0, 1]")
    if args.micro_batch_size < 1 or args.max_tokens_per_microbatch < 0:
        problems.append("--micro-batch-size must be >= 1 and --max-tokens-per-microbatch >= 0")
    if not 0 <= args.overlong_buffer <= args.max_new_tokens or args.overlong_penalty < 0:
        problems.append(f"--overlong-buffer {args.overlong_buffer} must be in [0, --max-new-tokens] and "
                        f"--overlong-penalty {args.overlong_penalty} >= 0")
    if args.dynamic_sampling and (args.num_generations < 2 or args.max_sampling_rounds < 1):
        problems.append("--dynamic-sampling needs --num-generations >= 2 (groups) and --max-sampling-rounds >= 1")
    if args.adaptive_lam_alpha and (args.advantage != "gae" or args.adaptive_lam_alpha < 0):  # VAPO's is GAE's
        problems.append("--adaptive-lam-alpha needs --advantage gae (it sets GAE's lambda) and a value > 0")
    for flag, table, value in (("--advantage", algos.ADVANTAGE_ESTIMATORS, args.advantage),
                               ("--policy-loss", algos.POLICY_LOSSES, args.policy_loss),
                               ("--kl-estimator", algos.KL_ESTIMATORS, args.kl_estimator),
                               ("--loss-agg", algos.LOSS_AGGREGATIONS, args.loss_agg)):
        if not callable(value) and value not in table:
            problems.append(f"{flag} {value}: not one of {', '.join(table)}")
    if args.advantage in algos.GROUP_ESTIMATORS and args.num_generations < 2:
        problems.append(f"--advantage {args.advantage} needs --num-generations >= 2")
    if not (0 <= args.clip_low < 1 and args.clip_high >= 0):
        problems.append("clip ranges must satisfy 0 <= --clip-low < 1 and --clip-high >= 0")
    if not (0 <= args.cispo_clip_low <= 1 and args.cispo_clip_high >= 0):
        problems.append("--cispo-clip-low must be in [0, 1] and --cispo-clip-high >= 0")
    if not (0 < args.clip_cov_ratio <= 1 and 0 < args.kl_cov_ratio <= 1 and args.kl_cov_coef >= 0
            and args.clip_cov_lower < args.clip_cov_upper):
        problems.append("--clip-cov-ratio and --kl-cov-ratio must be in (0, 1], --kl-cov-coef >= 0 and "
                        "--clip-cov-lower < --clip-cov-upper")
    if not 0 < args.curriculum_floor <= 1:
        problems.append(f"--curriculum-floor {args.curriculum_floor} must be in (0, 1]")
    if any(not 0 <= s < args.max_steps for s in args.dump_rollouts):
        problems.append(f"--dump-rollouts {args.dump_rollouts}: steps are counted from 0 to --max-steps - 1")
    if args.temperature <= 0:
        problems.append("--temperature must be > 0 for RL sampling")
    if min(args.max_steps, args.max_new_tokens, args.num_generations, args.prompts_per_step) < 1:
        problems.append("--max-steps, --max-new-tokens, --num-generations and --prompts-per-step must be >= 1")
    for name, value in (("--lr", args.lr), ("--critic-lr", args.critic_lr), ("--reward-timeout", args.reward_timeout),
                        ("--collective-timeout", args.collective_timeout)):
        if value is not None and not value > 0:
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
           args.warmup_steps, args.critic_warmup_steps, args.reward_workers, args.audit_samples) < 0:
        problems.append("counts (--eval-every, --save-every, --eval-limit, --generation-batch-size, ...) must be >= 0")
    problems += [p for p in number_problems(args) if not p.startswith("--seed")]  # NaN, inf
    if args.synthetic_difficulty < 1:
        problems.append(f"--synthetic-difficulty {args.synthetic_difficulty} must be >= 1")
    problems += lora_problems(args)
    return problems


# --------------------------------------------------------------------------------------------------
# Steps 1-3: evaluation, rollout and reward.
# --------------------------------------------------------------------------------------------------

def evaluate(run: Run, step: int) -> dict:
    """avg@k, pass@k and maj@k on each held-out set, as `python evaluate.py` computes them; each process
    samples its share of the batches (the same batches and seeds whatever the process count) and the
    per-problem counts are gathered (and written to eval_problems.jsonl). `eval/accuracy` is the avg@k over
    all sets pooled."""
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    from evaluate import evaluate_datasets

    args, tokenizer, stop_ids, accelerator = run.args, run.tokenizer, run.stop_ids, run.accelerator
    generate_kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                           top_k=args.top_k, stop_token_ids=stop_ids, pad_token_id=tokenizer.pad_token_id,
                           stop_strings=args.stop_strings, tokenizer=tokenizer, synced_gpus=is_sharded(accelerator))
    policy, generate = current_sampler(run, generate_responses)
    with accelerator.autocast(), lora_merged(policy, args.merge_for_generation and run.engine is None):
        result = evaluate_datasets(policy, tokenizer, run.eval_records, pool=run.pool, generate=generate,
                                   generate_kwargs=generate_kwargs, gather=gather_object,
                                   num_samples=args.eval_num_samples, batch_size=args.prompts_per_step,
                                   seed=args.seed * 1_000 + step + 1, score_truncated=args.score_truncated,
                                   progress=False, rank=accelerator.process_index, world=accelerator.num_processes)
    metrics = {f"eval/{name}/{k}": v for name in run.eval_records
               for k, v in result["metrics"][name].items() if "@" in k}
    metrics["eval/accuracy"] = result["metrics"]["overall"][f"avg@{args.eval_num_samples}"]
    if accelerator.is_main_process:  # what `python evaluate.py compare` bootstraps over
        run.logs["eval_problems.jsonl"].write({"step": step, "per_problem": result["per_problem"]})
        sets = [f"{name} {metrics[f'eval/{name}/avg@{args.eval_num_samples}']:.1%}" for name in run.eval_records]
        tqdm.write(f"step {step}: held-out accuracy {metrics['eval/accuracy']:.1%}"  # a line that stays
                   + (f" ({', '.join(sets)})" if len(sets) > 1 else ""))
    return metrics


def current_sampler(run: Run, hf_generate) -> tuple:
    """(sampler, generate) of the current policy: the vLLM engine, given the policy's weights when they changed
    since it last sampled, with its generate; or the policy itself with `hf_generate`."""
    policy = run.accelerator.unwrap_model(run.policy)
    if run.engine is None:
        return policy, hf_generate
    return run.engine.following(policy, run.schedulers["policy"].last_epoch), vllm_generate


def sample_and_score(run: Run, step: int, metrics: dict):
    """The step's experience with its rewards: (exp, texts, drawn records, reward stats, repetition flags),
    this process's share; with --curriculum the prompts are drawn by their pass rates, and every group
    drawn records its own. One round of `rollout` and `score_rollout`; with --dynamic-sampling (DAPO,
    arXiv:2503.14476v1, sec. 3.2) more rounds of fresh prompts until the step holds --prompts-per-step
    groups whose outcomes differ (0 < accuracy < 1), or --max-sampling-rounds were drawn. The batch is then
    the first groups with signal, in the order (round, place among all processes' prompts), topped up with
    groups without signal if too few (advantage 0 from a group baseline), and dealt out to the processes in
    that order: the same batch for 1 and N processes. Round r > 0 draws its prompts from a permutation of
    its own and seeds generation with salt r. Logs train/sampling_rounds and train/signal_groups (the
    share of the batch's groups with signal)."""
    args, accelerator = run.args, run.accelerator
    per_step, samples = args.prompts_per_step, args.num_generations
    world, rank = accelerator.num_processes, accelerator.process_index
    rounds, with_signal, weights = [], 0, None
    if args.curriculum == "pass-rate":
        run.pass_rates_before = dict(run.pass_rates)
        weights = algos.curriculum_weights([run.pass_rates.get(r["id"]) for r in run.train_records],
                                           args.curriculum_floor)
    for r in range(args.max_sampling_rounds if args.dynamic_sampling else 1):
        with timer(metrics, "generate"):
            records = step_prompts(run.train_records, step, per_step, args.seed + r * 1_000_003, rank, world,
                                   weights)
            exp, texts = rollout(run, records, step, salt=r)
        with timer(metrics, "reward"):
            drawn = [records[i // samples] for i in range(len(texts))]  # each row's record
            exp.rewards, stats, repetitive, per_response = score_rollout(run, exp, texts, drawn, key=(step, r))
        if args.curriculum != "none":  # every group drawn, also those dynamic sampling leaves out
            metrics.update(record_pass_rates(run, exp, drawn, per_response["correct"]))
        if not args.dynamic_sampling:
            return exp, texts, drawn, stats, repetitive
        # DAPO keeps a group whose accuracy is strictly between 0 and 1: its outcomes differ, whatever the
        # format or length shaping added (veRL's recipe filters on acc)
        signal = ~algos.equal_reward_groups(per_response["outcome"], exp.group_ids)
        rounds.append((exp, texts, drawn, stats, repetitive, signal, per_response["correct"]))
        with_signal += int(reduce_sum(accelerator, signal.sum().float()).item()) // samples
        if with_signal >= per_step:
            break
    return deal_groups(run, rounds, metrics)


def rollout(run: Run, records: list, step: int, salt: int = 0) -> tuple[Experience, list[str]]:
    """--num-generations responses per record, sampled by the policy: the experience batch (no rewards yet,
    on the training device) and the texts. Each generate call is seeded by `call_seeds`.

    Each record's responses are one group, keyed by the record's place in `records` rather than its id: a
    record drawn twice in a step gives two groups, each with its own baseline, as two distinct prompts
    would."""
    args, tokenizer, stop_ids, accelerator = run.args, run.tokenizer, run.stop_ids, run.accelerator
    num_generations, synced = args.num_generations, is_sharded(accelerator)
    first = accelerator.process_index * len(records)  # this process's first prompt among all processes'
    seeds = call_seeds(args.seed, step, first, len(records), args.generation_batch_size or len(records), salt)
    prompt_ids, prompt_mask = left_pad([r["prompt_ids"] for r in records], tokenizer.pad_token_id)
    # refill cannot keep processes in lockstep, which sharded (FSDP) generation needs: plain generate there
    refill = args.generation == "refill" and not synced
    generate = (partial(generate_responses_refill, refill_fraction=args.refill_fraction) if refill
                else generate_responses)
    (policy, generate), sampler = current_sampler(run, generate), {}
    with accelerator.autocast(), lora_merged(policy, args.merge_for_generation and run.engine is None):
        response_ids = generate(
            policy, prompt_ids, prompt_mask, num_generations=num_generations, logprobs_out=sampler,
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
            stop_token_ids=stop_ids, pad_token_id=tokenizer.pad_token_id, stop_strings=args.stop_strings,
            tokenizer=tokenizer, batch_size=args.generation_batch_size or None, seeds=seeds, synced_gpus=synced)
    exp, texts = rollout_experience(prompt_ids, prompt_mask, response_ids, sampler["logprobs"], num_generations,
                                    stop_ids, args.stop_strings, tokenizer)
    return Experience(**{k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in vars(exp).items()}), texts


def score_rollout(run: Run, exp: Experience, texts: list[str], drawn: list[dict], key: tuple = (0, 0)):
    """Rewards (B,) of a rollout on the training device, as `reward.decide_reward` decides them from the
    pool's verdicts, the reward stats, the repetition flags (B,), which are always logged, and per response
    its outcome (`reward.outcome_reward`) and whether the judge found it correct. `key` (step, sampling round)
    seeds the random control reward and the audit's choice of responses."""
    import random

    args, answers = run.args, [r["answer"] for r in drawn]
    seed = f"{args.seed}/{key[0]}/{key[1]}/{run.accelerator.process_index}"
    verdicts, stats = run.pool.score(texts, answers, [r.get("extras") or {} for r in drawn])
    failed, scored = reduce_sum(run.accelerator, [sum(stats.values()), len(texts)]).tolist()
    if failed == scored:  # a broken reward function, not noise: stop before an update learns from it
        leave_process_group()
        raise RunError(f"error: step {key[0]}: the reward function failed on all {int(scored)} responses (first: "
                       f"{run.pool.first_failure}); nothing was trained on them; fix it and run the same command")
    lengths, truncated = exp.response_mask.sum(dim=1).long().cpu(), exp.truncated.cpu().tolist()
    repetitive = repetition_flags(exp.response_ids.cpu(), lengths, texts)
    rewards, outcomes, rule_stats = decide_rewards(
        verdicts, texts, answers, truncated=truncated, lengths=lengths.tolist(), repetitive=repetitive.tolist(),
        rules=RewardRules.of(args), rng=random.Random("reward/" + seed))
    stats.update(rule_stats)  # train/correct and train/overlong_penalty: sums, means per response once logged
    if args.audit_samples:  # plain math-verify judges a few responses again: reward/disagreement
        rng = random.Random("audit/" + seed)
        picked = sorted(rng.sample(range(len(texts)), min(args.audit_samples, len(texts))))
        audited, skipped, differ = audit_verdicts(texts, answers, verdicts, picked, key[0], truncated)
        stats.update({"reward/audited": float(audited), "reward/audit_skipped": float(skipped),
                      "reward/audit_disagreed": float(len(differ))})
        for row in differ if run.accelerator.is_main_process else []:
            run.logs["reward_audit.jsonl"].write(row)
    device = run.accelerator.device
    per_response = {"outcome": torch.tensor(outcomes, device=device),  # dynamic sampling's signal
                    "correct": torch.tensor([v > 0 for v in verdicts], device=device)}  # the judge's, for the log
    return torch.tensor(rewards, dtype=torch.float32, device=device), stats, repetitive.to(device), per_response


def deal_groups(run: Run, rounds: list, metrics: dict):
    """Dynamic sampling's batch from its rounds (`rollout.deal_groups`), with the reward stats of the rounds:
    the pool's counts over every response scored, the per-response sums over the batch's rows."""
    args, accelerator = run.args, run.accelerator
    exp, texts, drawn, repetitive, correct, signal_share = rollout_deal_groups(
        rounds, rank=accelerator.process_index, world=accelerator.num_processes, per_step=args.prompts_per_step,
        pad_token_id=run.tokenizer.pad_token_id, device=accelerator.device)
    metrics["train/sampling_rounds"], metrics["train/signal_groups"] = len(rounds), signal_share
    stats = {}
    for _, _, _, round_stats, *_ in rounds:
        for key, value in round_stats.items():
            stats[key] = stats.get(key, 0) + value
    if "train/correct" in stats:  # these two become means over the batch's rows
        stats["train/correct"] = float(sum(correct))
    if "train/overlong_penalty" in stats:
        stats["train/overlong_penalty"] = sum(overlong_penalty(n, args.max_new_tokens, args.overlong_buffer,
                                                               args.overlong_penalty)
                                              for n in exp.response_mask.sum(dim=1).long().tolist())
    return exp, texts, drawn, stats, repetitive


def record_pass_rates(run: Run, exp: Experience, drawn: list[dict], correct: torch.Tensor) -> dict:
    """The curriculum's state after a round of sampling: each group's pass rate (the judge's verdicts) under
    its prompt's id in `run.pass_rates`, gathered from all processes in the order of the global batch, so it
    is the same for any process count; a prompt drawn twice keeps the later group's rate. Returns its
    metrics."""
    from accelerate.utils import gather_object

    groups = {}
    for i, g in enumerate(exp.group_ids.tolist()):
        groups.setdefault(g, []).append(i)
    mine = [(drawn[rows[0]]["id"], correct[rows].float().mean().item()) for rows in groups.values()]
    run.pass_rates.update(gather_object(mine))
    rates = list(run.pass_rates.values())
    return {"curriculum/seen": len(rates), "curriculum/all_failed": sum(r == 0.0 for r in rates) / len(rates),
            "curriculum/all_passed": sum(r == 1.0 for r in rates) / len(rates)}


# --------------------------------------------------------------------------------------------------
# Steps 4-6: log-probs, values and advantages.
# --------------------------------------------------------------------------------------------------

def rollout_logprobs(run: Run, exp: Experience, micro: list[torch.Tensor]):
    """(old, ref): the sampling policy's log-probs of the rollout when the update needs them (several
    optimizer steps per rollout, the k1 KL in the reward, or --entropy-control's choice of tokens; with one
    update on one batch the update's own log-probs, detached, are exactly the old ones), and the reference
    model's when a KL is on. (B, R) or None."""
    args, old, ref = run.args, None, None
    if (args.ppo_epochs * args.num_mini_batches > 1 or (args.kl_coef > 0 and args.kl_estimator == "k1")
            or args.entropy_control != "none"):
        run.policy.eval()
        old = batched_logprobs(run.policy, exp, args.temperature, micro, args.share_prompts)
        run.policy.train()
    if run.ref is not None:
        ref = batched_logprobs(run.ref, exp, args.temperature, micro, args.share_prompts)
    elif args.kl_coef > 0:  # LoRA: the reference is the policy without its adapters
        with lora_disabled(run.policy):
            ref = batched_logprobs(run.policy, exp, args.temperature, micro, args.share_prompts)
    return old, ref


def mismatch_metrics(accelerator, exp: Experience) -> dict:
    """rollout/logprob_diff_mean and _max: |old - sampler's log-prob| over all processes' response tokens."""
    if exp.old_logprobs is None or exp.sampler_logprobs is None:
        return {}
    total, count, biggest = algos.logprob_mismatch(exp.old_logprobs, exp.sampler_logprobs, exp.response_mask)
    sums = reduce_sum(accelerator, torch.stack([total, count]))
    return {"rollout/logprob_diff_mean": (sums[0] / sums[1].clamp(min=1)).item(),
            "rollout/logprob_diff_max": accelerator.gather(biggest[None]).max().item()}


def compute_advantages(run: Run, exp: Experience, lengths: torch.Tensor, metrics: dict):
    """(advantages, returns) of the rollout by --advantage (`algos.compute_advantages`), with the k1 KL as a
    per-token penalty in the reward when it is on (classic PPO); logs the range of VAPO's lambda."""
    args, accelerator = run.args, run.accelerator
    kl_penalty = None
    if args.kl_coef > 0 and args.kl_estimator == "k1":
        kl_penalty = args.kl_coef * algos.compute_kl(exp.old_logprobs, exp.ref_logprobs, "k1") * exp.response_mask
    if args.adaptive_lam_alpha:  # the range of VAPO's per-response lambda this step
        lam = accelerator.gather(algos.length_adaptive_lam(lengths, args.adaptive_lam_alpha))
        metrics.update({"policy/lam_min": lam.min().item(), "policy/lam_mean": lam.mean().item(),
                        "policy/lam_max": lam.max().item()})
    return algos.compute_advantages(
        args.advantage, exp.rewards, exp.response_mask, exp.group_ids, exp.values, kl_penalty,
        whiten=args.whiten_advantages, reduce=partial(reduce_sum, accelerator), gamma=args.gamma, lam=args.lam,
        adaptive_lam_alpha=args.adaptive_lam_alpha, scale_by_std=args.scale_by_std)



# --------------------------------------------------------------------------------------------------
# Steps 9-10: logs and checkpoints, and the end of the run.
# --------------------------------------------------------------------------------------------------

def step_metrics(accelerator, exp: Experience, lengths: torch.Tensor, equal: torch.Tensor,
                 repetitive: torch.Tensor, reward_stats: dict, update_stats: dict[str, list]) -> dict:
    """The step's metrics over all processes: rollout means per response, the reward pool's counts, and the
    updates' stats (means of per-process means; shares of one batch loss and token means are summed)."""
    sum_all, world = partial(reduce_sum, accelerator), accelerator.num_processes
    totals = sum_all(torch.stack([exp.rewards.sum(), lengths.sum().float(), exp.truncated.float().sum(),
                                  equal.float().sum(), repetitive.float().sum(),
                                  torch.tensor(float(len(lengths)), device=lengths.device)]))
    n = totals[5].item()
    metrics = {"train/reward": totals[0].item() / n, "train/response_length": totals[1].item() / n,
               "train/truncated": totals[2].item() / n, "train/equal_reward_groups": totals[3].item() / n,
               "train/repetition": totals[4].item() / n,
               "train/advantage_abs": masked_mean(exp.advantages.abs(), exp.response_mask, sum_all).item()}
    # per-response sums become means; the pool's counts stay counts
    metrics.update({k: sum_all(v).item() / (n if k in ("train/overlong_penalty", "train/correct") else 1)
                    for k, v in reward_stats.items()})
    if metrics.get("reward/audited"):
        metrics["reward/disagreement"] = metrics["reward/audit_disagreed"] / metrics["reward/audited"]
    update_stats = dict(update_stats)
    metrics["train/nonfinite_updates"] = sum(update_stats.pop("train/nonfinite_updates", []))
    for k, v in update_stats.items():
        metrics[k] = (accelerator.gather(torch.tensor([max(v)], device=lengths.device)).max().item() if k in MAX_STATS
                      else sum_all(sum(v) / len(v)).item() / (1 if k in SUMMED_STATS + TOKEN_STATS else world))
    return metrics


def write_logs(run: Run, step: int, metrics: dict, exp: Experience, texts: list[str], drawn: list[dict],
               lengths: torch.Tensor, bar) -> None:
    """metrics.jsonl, the first --samples-per-step responses of all processes to samples.jsonl, the
    progress bar and the tracker (TensorBoard / W&B)."""
    from accelerate.utils import gather_object

    args, accelerator = run.args, run.accelerator
    take = min(-(-args.samples_per_step // accelerator.num_processes), len(texts))  # this process's part
    samples = gather_object([{"step": step, "prompt_id": drawn[i]["id"], "prompt": drawn[i]["question"],
                              "response": texts[i], "ground_truth": drawn[i]["answer"],
                              "reward": exp.rewards[i].item(),
                              "advantage": exp.advantages[i, int(lengths[i]) - 1].item()} for i in range(take)])
    if accelerator.is_main_process:
        for sample in samples[:args.samples_per_step]:
            run.logs["samples.jsonl"].write(sample)
        run.logs["metrics.jsonl"].write(metrics)
        bar.set_postfix(reward=f"{metrics['train/reward']:.2f}",
                        **({"acc": f"{metrics['eval/accuracy']:.2f}"} if "eval/accuracy" in metrics else {}))
    if args.report_to != "none":
        accelerator.log(metrics, step=step)


def checkpoint(run: Run, step: int, nonfinite: int) -> Path | None:
    """Save the state after `step` and return the newest checkpoint. None is written during a streak of
    non-finite updates, nor with non-finite weights: the update before a streak may already have wrecked
    the weights, and a checkpoint would then replace good ones."""
    accelerator = run.accelerator
    finite = reduce_sum(accelerator, float(parameters_finite(run.policy, run.critic))).item()
    finite = finite == accelerator.num_processes
    if nonfinite or not finite:
        why = "the last update was not finite" if nonfinite else "the weights are not finite"
        accelerator.print(f"warning: step {step}: no checkpoint written ({why}); the last one is "
                          f"{run.checkpoint or 'none'}")
        return run.checkpoint
    for log in run.logs.values():  # on disk before the checkpoint that a resume keeps their rows for
        log.sync()
    return save_state(run, run.out / "checkpoints", step + 1, run.args.keep_checkpoints)


def save_state(run: Run, root: Path, step: int, keep: int, exp: Experience | None = None) -> Path:
    """A checkpoint in `root` of the state that continues at `step` (`checkpoint.save_checkpoint`); with `exp`
    also each process's rollout, experience-rank<N>.safetensors beside it: a --dump-rollouts dump, which
    `python replay.py ROOT` updates from. With LoRA a checkpoint holds what trains (adapters, value head,
    their optimizer states); the frozen base is the model the run starts from."""
    accelerator = run.accelerator
    tied = getattr(accelerator.unwrap_model(run.policy), "all_tied_weights_keys", None) or {}
    with trainable_state_only([accelerator.unwrap_model(m) for m in (run.policy, run.critic)
                               if m is not None and run.args.lora_r]):
        saved = save_checkpoint(accelerator, root, {
            "step": step, "base_accuracy": run.base_accuracy, "args": plain_args(run.args),
            "schedulers": [s.state_dict() for s in run.schedulers.values()],
            # a dump continues at `step`: the rates before its groups; those after them are the replay's
            "pass_rates": run.pass_rates_before if exp is not None else run.pass_rates,
            **({"pass_rates_after": run.pass_rates} if exp is not None else {})}, keep, tied)
    if exp is not None:
        save_experience(root / f"experience-rank{accelerator.process_index}.safetensors", exp)
        accelerator.wait_for_everyone()
        accelerator.print(f"step {step}: rollout and state saved in {root} (python replay.py {root})")
    return saved


def finish(run: Run) -> dict:
    """The final evaluation, the trained models (policy/, critic/) and summary.json; returns the summary."""
    args, accelerator, out = run.args, run.accelerator, run.out
    final = {"step": args.max_steps}
    if args.eval_every and run.eval_records:
        final.update(evaluate(run, args.max_steps))
        if accelerator.is_main_process:
            run.logs["metrics.jsonl"].write(final)
        if args.report_to != "none":
            accelerator.log(final, step=args.max_steps)
    accelerator.wait_for_everyone()
    save_models(accelerator, out, run.policy, run.critic, run.tokenizer, peft_policy=run.peft_policy,
                merge_lora=bool(args.lora_r and args.merge_on_save))
    run.pool.close()
    summary = {"base_accuracy": run.base_accuracy, "final_accuracy": final.get("eval/accuracy"),
               "steps": args.max_steps, "minutes": (time.time() - run.t_start) / 60, "output_dir": str(out)}
    if accelerator.is_main_process:
        for log in run.logs.values():
            log.close()
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        acc = (f"held-out accuracy {summary['base_accuracy']:.1%} -> {summary['final_accuracy']:.1%}"
               if summary["final_accuracy"] is not None else "no evaluation set")
        print(f"done: {algos.estimator_name(args.advantage)}, {acc}, {args.max_steps} steps in "
              f"{summary['minutes']:.1f} min; outputs "
              f"in {out}/ (metrics.jsonl, samples.jsonl, policy/{', critic/' if run.critic is not None else ''})")
    leave_process_group(accelerator)  # and its trackers
    return summary


if __name__ == "__main__":
    main(parse_args(Args, description=__doc__))
    end_launched_process()
