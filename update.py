"""The optimizer steps of one rollout, for the policy and for the critic: epochs of mini-batches, each
accumulated over micro-batches of rows of similar length, with the --policy-loss (and KL-Cov's penalty, the
KL in the loss, the entropy bonus) or the critic's value loss; and the tokens --entropy-control treats
apart. `train_ppo.main` calls `update_models` once per step; `replay.py` calls it on a dumped rollout.

The loss of a micro-batch is its exact share of the mini-batch's loss (`algos.loss_weights` normalise over
all processes' tokens), so the split into micro-batches and processes does not change the gradient."""

import os
from contextlib import nullcontext
from functools import partial

import torch

import algos
from critic import forward_values
from launch import accelerate_backward, deepspeed_backward, deepspeed_stage, reduce_sum
from rollout import Experience, forward_logprobs, local_rows, mini_batch_parts, plan_micro_batches
from utils import masked_mean, timer

SUMMED_STATS = ("loss/policy", "critic/value_loss", "policy/kl", "policy/kl_cov_penalty")  # shares of a batch loss
# Token means, computed per micro-batch and weighted by its share of the mini-batch's tokens (all processes),
# so that they too are summed: then they do not depend on how the batch is split.
TOKEN_STATS = ("policy/clipfrac", "policy/approx_kl", "policy/ratio", "policy/entropy", "policy/tis_weight",
               "critic/clipfrac", "critic/values", "rollout/logprob_diff_mean")
MAX_STATS = ("rollout/logprob_diff_max",)  # the largest over micro-batches and processes


def plan(exp: Experience, args, accelerator) -> list[torch.Tensor]:
    """This process's rows in micro-batches sorted by length, under --micro-batch-size rows and
    --max-tokens-per-microbatch padded tokens; every process gets the same number of micro-batches."""
    lengths = exp.attention_mask.sum(dim=1)
    limits = dict(max_rows=args.micro_batch_size, max_tokens=args.max_tokens_per_microbatch,
                  max_padding=args.max_padding, prompt_lengths=exp.prompt_mask.sum(dim=1))
    local = len(plan_micro_batches(lengths, **limits))
    count = int(accelerator.gather(torch.tensor([local], device=lengths.device)).max())
    return plan_micro_batches(lengths, num_batches=count, **limits)


def cov_tokens(run, exp: Experience, step: int, metrics: dict) -> torch.Tensor:
    """--entropy-control's tokens (B, R): Clip-Cov's random ones among those of covariance in (lower, upper)
    (`algos.clip_cov_tokens`) or KL-Cov's of largest covariance (`algos.kl_cov_tokens`). Chosen once per step
    over every process's tokens, from the rollout's log-probs (those of the first optimizer step exactly), so
    the choice does not depend on how the batch is split; veRL chooses per micro-batch from the current
    log-probs. Clip-Cov's random keys are seeded by (seed, step) and laid over the global rows."""
    from accelerate.utils import gather_object

    args, accelerator, rank = run.args, run.accelerator, run.accelerator.process_index
    sum_all = partial(reduce_sum, accelerator)
    cov = algos.token_covariance(exp.old_logprobs, exp.advantages, exp.response_mask, sum_all)
    num_tokens = sum_all(exp.response_mask.sum()).item()

    def gather(values):  # every process's candidates, in process order
        return torch.cat(gather_object([values.cpu()])).to(values.device)

    if args.entropy_control == "clip-cov":
        rows, width = len(exp.response_ids), exp.response_ids.shape[1]
        keys = torch.rand(rows * accelerator.num_processes, args.max_new_tokens,
                          generator=torch.Generator().manual_seed(args.seed * 1_000 + step))
        keys = keys[rank * rows:(rank + 1) * rows, :width].to(cov.device)
        chosen = algos.clip_cov_tokens(cov, exp.response_mask, keys, num_tokens, args.clip_cov_ratio,
                                       args.clip_cov_lower, args.clip_cov_upper, gather, rank)
    else:
        chosen = algos.kl_cov_tokens(cov, exp.response_mask, num_tokens, args.kl_cov_ratio, gather, rank)
    metrics["policy/cov_tokens"] = sum_all(chosen.sum().float()).item()
    metrics["policy/covariance"] = masked_mean(cov, exp.response_mask, sum_all).item()
    return chosen


def update_models(run, exp: Experience, step: int, metrics: dict) -> tuple[dict[str, list], bool]:
    """Steps 7-8 of a training step: the critic's updates first (ORZ), then the policy's once the critic has
    warmed up (--critic-warmup-steps). Returns their stats (lists, one value per optimizer step) and whether
    the policy trained."""
    stats: dict[str, list] = {}
    with timer(metrics, "critic"):
        if run.critic is not None:
            stats = update(run, exp, "critic", step)
            metrics["critic/explained_var"] = algos.explained_variance(exp.values, exp.returns, exp.response_mask)
    policy_trains = run.critic is None or step >= run.args.critic_warmup_steps
    with timer(metrics, "update"):
        if policy_trains:
            for k, v in update(run, exp, "policy", step).items():
                stats[k] = stats.get(k, []) + v  # train/nonfinite_updates: the critic's and the policy's
    return stats, policy_trains


def update(run, exp: Experience, role: str, step: int) -> dict[str, list]:
    """Optimizer steps of the policy or the critic over one rollout: epochs of mini-batches, each accumulated
    over micro-batches. Returns lists of stats, one value per optimizer step."""
    args, accelerator = run.args, run.accelerator
    model, optimizer = (run.policy if role == "policy" else run.critic), run.optimizers[role]
    loss_fn, loss_agg = (policy_loss, args.loss_agg) if role == "policy" else (value_loss, "token-mean")
    epochs, mini_batches = ((args.ppo_epochs, args.num_mini_batches) if role == "policy"
                            else (args.critic_epochs, args.critic_mini_batches))
    rows, world, rank = len(exp.response_ids), accelerator.num_processes, accelerator.process_index
    device, deepspeed = exp.response_ids.device, deepspeed_stage(accelerator) is not None
    stats: dict[str, list] = {}
    model.train()
    for n, part in enumerate(mini_batch_parts(rows * world, mini_batches, args.seed, step, epochs)):
        mini = exp.select(local_rows(part, rank, rows).to(device))  # processes may get unequal shares
        # sequences are the rows with a token in the loss: rows left out (--drop-equal-groups) have none
        kept_rows = (mini.response_mask.sum(dim=1) > 0).sum().float()
        count = accelerator.reduce(torch.stack([mini.response_mask.sum(), kept_rows]), "sum")
        weights = algos.loss_weights(mini.response_mask, loss_agg, int(count[1].item()), count[0].item(),
                                     args.max_new_tokens)
        micro = plan(mini, args, accelerator)
        mini_stats: dict[str, list] = {}
        accelerator.gradient_accumulation_steps = len(micro)
        accelerator.step = 0  # align accumulation boundaries with this mini-batch
        for i, idx in enumerate(micro):
            # an empty micro-batch (another process has more) runs one row with zero weight, so that
            # every process makes the same number of forward and backward passes
            if len(idx):
                mb, w = mini.select(idx).trim(), weights[idx]
            else:
                mb = exp.select(torch.zeros(1, dtype=torch.long, device=device)).trim()
                w = torch.zeros_like(mb.response_mask)
            with nullcontext() if deepspeed else accelerator.accumulate(model):
                loss, s = loss_fn(model, mb, w[:, :mb.response_ids.shape[1]], args, first=n == 0)
                if step in injected_nan_steps():
                    loss = loss * float("nan")
                # the weights normalise over the whole mini-batch of all processes, so the averaging over
                # processes (DDP, ZeRO) is undone by `world`
                if deepspeed:  # the engine accumulates, clips and steps (or skips a non-finite step)
                    s.update(deepspeed_backward(model, loss * world, role, last=i == len(micro) - 1))
                else:
                    s.update(accelerate_backward(accelerator, model, optimizer, loss * world, role,
                                                 args.max_grad_norm))
            share = mb.response_mask.sum().item() * float(len(idx) > 0) / max(count[0].item(), 1.0)
            for k, v in s.items():
                mini_stats.setdefault(k, []).append(v * share if k in TOKEN_STATS else v)
        for k, v in mini_stats.items():  # one value per optimizer step
            stats.setdefault(k, []).append(max(v) if k in MAX_STATS else sum(v) if k in SUMMED_STATS + TOKEN_STATS
                                           else sum(v) / len(v))
    return stats


def policy_loss(model, mb: Experience, w: torch.Tensor, args, first: bool = False) -> tuple[torch.Tensor, dict]:
    """The --policy-loss of a micro-batch (with the KL in the loss and the entropy bonus when on), and its
    stats. `w` (B, R) are the tokens' loss weights (`algos.loss_weights`); `first`: the micro-batch is in
    the rollout's first optimizer step, where the policy is still the one that sampled."""
    logprobs, entropy = forward_logprobs(model, mb.input_ids, mb.attention_mask, mb.response_ids.shape[1],
                                         args.temperature, with_entropy=True, entropy_grad=args.entropy_coef > 0,
                                         share_prompts=args.share_prompts)
    old = mb.old_logprobs if mb.old_logprobs is not None else logprobs.detach()
    sampler, tis, stats = mb.sampler_logprobs, 1.0, {}
    if mb.old_logprobs is None and sampler is not None:  # the one pass over these rows: old = these, measured here
        total, count, biggest = algos.logprob_mismatch(old, sampler, mb.response_mask)
        stats = {"rollout/logprob_diff_mean": (total / count.clamp(min=1)).item(),
                 "rollout/logprob_diff_max": biggest.item()}
    if args.tis_cap and sampler is not None:  # each token's policy loss weighed by pi_old / pi_sampler, capped
        tis = algos.tis_weights(old, sampler, args.tis_cap)
        stats["policy/tis_weight"] = masked_mean(tis, mb.response_mask).item()
    cispo = args.policy_loss == "cispo"
    clip = (args.cispo_clip_low, args.cispo_clip_high) if cispo else (args.clip_low, args.clip_high)
    weights = w * tis
    if args.entropy_control == "clip-cov":  # Clip-Cov: the chosen tokens give no gradient (still counted in w)
        weights = weights * ~mb.cov_tokens
    elif args.entropy_control == "kl-cov" and not cispo:  # KL-Cov: its penalty takes the place of PPO's clip
        clip = (float("inf"), float("inf"))  # (CISPO's bounds cap a weight, not a gradient: they stay)
    loss_fn = algos.lookup(algos.POLICY_LOSSES, args.policy_loss, "--policy-loss")
    loss, loss_stats = loss_fn(logprobs, old, mb.advantages, weights, clip_low=clip[0], clip_high=clip[1],
                               ratio_level=args.ratio_level)
    stats.update(loss_stats)
    if args.entropy_control == "kl-cov":
        # In the rollout's first optimizer step the policy is the one that sampled: its log-ratio is 0, and the
        # old log-probs of another pass (other batch shapes) differ from these by float noise, whose sign
        # |log-ratio| would turn into a gradient of full size.
        penalty = algos.kl_cov_penalty(logprobs, logprobs.detach() if first else old, mb.cov_tokens, w,
                                       args.kl_cov_coef)
        loss, stats["policy/kl_cov_penalty"] = loss + penalty, penalty.item()
    stats["loss/policy"] = loss.item()
    stats["policy/entropy"] = masked_mean(entropy.detach(), mb.response_mask).item()
    if args.kl_coef > 0 and args.kl_estimator != "k1":  # k1 is in the reward (`compute_advantages`)
        kl = (algos.compute_kl(logprobs, mb.ref_logprobs, args.kl_estimator) * w).sum()
        loss = loss + args.kl_coef * kl
        stats["policy/kl"] = kl.item()
    if args.entropy_coef:
        loss = loss - args.entropy_coef * (entropy * w).sum()
    return loss, stats


def value_loss(model, mb: Experience, w: torch.Tensor, args, first: bool = False) -> tuple[torch.Tensor, dict]:
    """The critic's clipped value loss of a micro-batch against the GAE returns, and its stats."""
    values = forward_values(model, mb.input_ids, mb.attention_mask, mb.response_ids.shape[1])
    clip = args.value_clip if args.value_clip > 0 else None
    loss, stats = algos.compute_value_loss(values, mb.values, mb.returns, w, clip)
    stats["critic/value_loss"] = loss.item()
    return loss, stats


def injected_nan_steps() -> set[int]:
    """Fault injection for tests: REASONER_ZERO_NAN_STEPS="3,4" makes the losses of those steps NaN."""
    return {int(x) for x in os.environ.get("REASONER_ZERO_NAN_STEPS", "").split(",") if x.strip()}
