"""The RL objective, in one place: advantage estimators, policy and value losses, KL estimators and loss
aggregation, each a plain tensor function, and the tables at the end that the flags read.

To change the algorithm, change a function here or add one and a line to its table; a notebook can register
its own without touching the trainer, which looks the name up in the table when it runs:

    import algos
    def my_advantages(rewards, response_mask, group_ids, values=None, **_):
        return (rewards - rewards.mean())[:, None] * response_mask, None
    algos.ADVANTAGE_ESTIMATORS["mine"] = my_advantages      # then Args(advantage="mine")

Shapes: B responses, R response tokens (right-padded); `response_mask` (B, R) marks the tokens in the loss.
"""

import torch

from utils import masked_mean, masked_whiten

# --------------------------------------------------------------------------------------------------
# Advantage kernels: group baselines and GAE, as their papers write them.
# --------------------------------------------------------------------------------------------------

def group_stats(rewards: torch.Tensor, group_ids: torch.Tensor):
    """Per-row group size, mean and sample std of the rewards of the row's group. (B,) -> 3 x (B,)."""
    # float64, so that a group of equal rewards such as [0.9, 0.9, 0.9] has a deviation of exactly ~0
    # and not float32 round-off that the std division would blow up.
    r = rewards.double()
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts), dtype=r.dtype, device=r.device).index_add_(0, inverse, r)
    means = sums / counts
    sq = torch.zeros_like(sums).index_add_(0, inverse, (r - means[inverse]) ** 2)
    stds = torch.sqrt(sq / (counts - 1).clamp(min=1))
    return counts[inverse], means[inverse], stds[inverse]


def compute_grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, scale_by_std: bool = True,
                            eps: float = 1e-6) -> torch.Tensor:
    """GRPO's group baseline: (r - mean(group)) / (std(group) + eps), per sequence.

    DeepSeekMath (arXiv:2402.03300v3, eq. in sec. 4.1.2), outcome supervision. Groups are the rows with
    the same `group_ids` (the prompt id), wherever they sit in the batch. The std is the sample std, as
    TRL computes it; `scale_by_std=False` is Dr. GRPO's unbiased variant (arXiv:2503.20783v1, sec. 3.2).
    rewards (B,), group_ids (B,) -> (B,). Example: rewards [1, 0, 0, 0] in one group -> mean 0.25,
    std 0.5 -> [1.5, -0.5, -0.5, -0.5].
    """
    counts, means, stds = group_stats(rewards, group_ids)
    adv = rewards.double() - means
    if scale_by_std:
        adv = adv / (stds + eps)
    return torch.where(counts > 1, adv, torch.zeros_like(adv)).to(rewards.dtype)


def compute_rloo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """REINFORCE leave-one-out: r_i minus the mean of the other samples of its prompt.

    Ahmadian et al., arXiv:2402.14740v2, eq. 7. Equals G/(G-1) * (r_i - group mean). (B,) -> (B,).
    Example: rewards [1, 0, 0, 0] -> [1, -1/3, -1/3, -1/3].
    """
    counts, means, _ = group_stats(rewards, group_ids)
    g = counts.double()
    adv = (rewards.double() - means) * g / (g - 1).clamp(min=1)
    return torch.where(counts > 1, adv, torch.zeros_like(adv)).to(rewards.dtype)


def equal_reward_groups(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """(B,) bool: the row's group has all rewards equal, so a group baseline gives it zero advantage."""
    _, inverse = torch.unique(group_ids, return_inverse=True)
    lo = torch.full((int(inverse.max()) + 1,), float("inf"), dtype=rewards.dtype, device=rewards.device)
    hi = torch.full_like(lo, float("-inf"))
    lo = lo.scatter_reduce(0, inverse, rewards, "amin")
    hi = hi.scatter_reduce(0, inverse, rewards, "amax")
    return (lo == hi)[inverse]


def compute_gae_advantages(rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor,
                           gamma: float = 1.0, lam: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens; returns (advantages, returns), both (B, R).

    Schulman et al., arXiv:1506.02438v6, eq. 16: A_t = sum_l (gamma lam)^l delta_{t+l}, with
    delta_t = r_t + gamma V_{t+1} - V_t. `rewards` (B, R) are per-token (the outcome sits on the last
    valid token); past the last valid token the value is 0 (terminal), as veRL and OpenRLHF do. Masked
    positions have no effect and come back as 0. returns = advantages + values.
    With gamma = lam = 1 (ORZ) this is A_t = sum of rewards from t on - V_t. Example: one response of 3
    tokens, reward 1 at the end, values [0.2, 0.5, 0.9] -> advantages [0.8, 0.5, 0.1], returns [1, 1, 1].
    `lam` may be one per sequence, (B,) (VAPO's length-adaptive lambda, `length_adaptive_lam`).
    """
    mask = response_mask.to(values.dtype)
    lam = torch.as_tensor(lam, dtype=values.dtype, device=values.device)
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


def length_adaptive_lam(lengths: torch.Tensor, alpha: float) -> torch.Tensor:
    """VAPO's lambda for the policy's advantages, one per sequence: 1 - 1 / (alpha * length), at least 0
    (arXiv:2504.05118v3, sec. 4.1; alpha 0.05 there), so that the sum of the TD errors' weights grows with
    the length. (B,) -> (B,). Example: alpha 0.05, lengths 10, 100, 1000 -> 0, 0.8, 0.98."""
    return (1.0 - 1.0 / (alpha * lengths.float().clamp(min=1))).clamp(min=0.0)


def outcome_token_rewards(rewards: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Place each sequence's reward on its last valid response token, the one whose next state is terminal
    (value 0), not one slot after it. (B,) -> (B, R)."""
    last = (response_mask.sum(dim=1).long() - 1).clamp(min=0)
    token_rewards = torch.zeros_like(response_mask, dtype=rewards.dtype)
    token_rewards[torch.arange(len(rewards)), last] = rewards
    return token_rewards * response_mask


# --------------------------------------------------------------------------------------------------
# Advantage estimators: one call each for the whole batch. Every estimator takes the same keyword
# arguments and ignores those it does not use (`**_`); it returns (advantages (B, R), returns (B, R) or None),
# returns being the critic's targets. rewards (B,) are the sequences' rewards; kl_penalty (B, R) the per-token
# k1 penalty when the KL goes in the reward (zeros otherwise); values (B, R) the critic's, for estimators in
# CRITIC_ESTIMATORS (the trainer builds a critic only for those).
# --------------------------------------------------------------------------------------------------

def gae_advantages(rewards: torch.Tensor, response_mask: torch.Tensor, values: torch.Tensor,
                   kl_penalty: torch.Tensor, *, gamma: float = 1.0, lam: float = 1.0,
                   adaptive_lam_alpha: float = 0.0, **_) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's GAE over the critic's values, the outcome reward on each response's last token (ORZ:
    gamma = lam = 1). With `adaptive_lam_alpha` (VAPO) the policy's advantages use each response's
    length-adaptive lambda, while the returns (the critic's targets) keep `lam`."""
    token_rewards = outcome_token_rewards(rewards, response_mask) - kl_penalty
    advantages, returns = compute_gae_advantages(token_rewards, values, response_mask, gamma, lam)
    if adaptive_lam_alpha:
        lam = length_adaptive_lam(response_mask.sum(dim=1), adaptive_lam_alpha)
        advantages, _ = compute_gae_advantages(token_rewards, values, response_mask, gamma, lam)
    return advantages, returns


def grpo_advantages(rewards: torch.Tensor, response_mask: torch.Tensor, group_ids: torch.Tensor,
                    kl_penalty: torch.Tensor, *, scale_by_std: bool = True, **_) -> tuple[torch.Tensor, None]:
    """GRPO's group baseline (`compute_grpo_advantages`) given to every token of the response."""
    advantages = compute_grpo_advantages(rewards - kl_penalty.sum(dim=1), group_ids, scale_by_std=scale_by_std)
    return advantages[:, None] * response_mask, None


def rloo_advantages(rewards: torch.Tensor, response_mask: torch.Tensor, group_ids: torch.Tensor,
                    kl_penalty: torch.Tensor, **_) -> tuple[torch.Tensor, None]:
    """The leave-one-out baseline (`compute_rloo_advantages`) given to every token of the response."""
    advantages = compute_rloo_advantages(rewards - kl_penalty.sum(dim=1), group_ids)
    return advantages[:, None] * response_mask, None


def reinforce_pp_advantages(rewards: torch.Tensor, response_mask: torch.Tensor, group_ids: torch.Tensor,
                            kl_penalty: torch.Tensor, *, reduce=None, **_) -> tuple[torch.Tensor, None]:
    """REINFORCE++ in its baseline form (Hu et al., arXiv:2501.03262v3, sec. 3; veRL's and OpenRLHF's
    `reinforce_plus_plus_baseline`): each token's return-to-go (gamma 1: the outcome reward minus the k1
    penalties from that token on, when the KL is in the reward) minus the mean reward of the response's
    group, then whitened over every response token of the global batch (all processes with `reduce`), not
    per group. Example: one group, rewards [1, 0, 0, 0], one token each, no KL -> centred [0.75, -0.25,
    -0.25, -0.25] -> population std 0.433 -> [1.732, -0.577, -0.577, -0.577]."""
    token_rewards = outcome_token_rewards(rewards, response_mask) - kl_penalty
    returns = token_rewards.flip(1).cumsum(1).flip(1)  # sum of the rewards from each token on
    _, means, _ = group_stats(rewards, group_ids)
    centred = (returns - means[:, None].to(returns.dtype)) * response_mask
    return masked_whiten(centred, response_mask, reduce=reduce), None


# --------------------------------------------------------------------------------------------------
# Losses: the policy's clipped surrogate and the critic's clipped value loss, each a sum of per-token
# terms weighted by the loss aggregation below.
# --------------------------------------------------------------------------------------------------

def compute_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        loss_weights: torch.Tensor, clip_low: float = 0.2, clip_high: float = 0.2,
                        ratio_level: str = "token") -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate, with separate lower and upper clip ranges, aggregated by `loss_weights`.

    arXiv:1707.06347v2 eq. 7; clip-higher from DAPO (arXiv:2503.14476v1, sec. 3.1). The log-ratio is
    clamped to +-20 before exp so one bad token cannot overflow. All (B, R).
    Example: logratio log(1.5), advantage 1, clip 0.2 -> ratio 1.5, loss per token -min(1.5, 1.2) = -1.2.

    `ratio_level` "sequence" is GSPO (arXiv:2507.18071v2, eq. 7): one ratio per sequence, the exponent of
    the mean token log-ratio over its tokens in the loss (weight > 0), given to each of its tokens and
    clipped as a whole. Example: token log-ratios [log 2, 0] -> sequence ratio 2^(1/2) = 1.414 for both
    tokens. GSPO's clip ranges are about 1000 times narrower than PPO's (3e-4 and 4e-4 in the paper).
    """
    log_ratio = importance_log_ratio(logprobs, old_logprobs, loss_weights, ratio_level)
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


def importance_log_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, loss_weights: torch.Tensor,
                         ratio_level: str = "token") -> torch.Tensor:
    """log(pi / pi_old) per token, clamped to +-20, or with "sequence" (GSPO) each sequence's mean over its
    tokens in the loss (weight > 0) given to all of its tokens. All (B, R)."""
    log_ratio = (logprobs - old_logprobs).clamp(-20.0, 20.0)
    if ratio_level == "sequence":
        in_loss = (loss_weights > 0).float()
        per_sequence = (log_ratio * in_loss).sum(dim=1, keepdim=True) / in_loss.sum(dim=1, keepdim=True).clamp(min=1)
        return per_sequence.expand_as(log_ratio)
    if ratio_level != "token":
        raise ValueError(f"unknown ratio level {ratio_level!r}")
    return log_ratio


def compute_cispo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                       loss_weights: torch.Tensor, clip_low: float = 1.0, clip_high: float = 5.0,
                       ratio_level: str = "token") -> tuple[torch.Tensor, dict]:
    """CISPO (MiniMax-M1, arXiv:2506.13585v1, eq. 4-5): per token -sg(clip(ratio, 1 - clip_low,
    1 + clip_high)) * A * log pi, aggregated by `loss_weights`. The clip bounds the importance weight, which
    is detached, so every token keeps its log-prob gradient, scaled; PPO's clip gives a clipped token no
    gradient at all. The paper sets no lower bound (clip_low 1: weights down to 0) and tunes the upper one;
    5 is SkyRL's default. At ratio 1 the gradient equals PPO's. All (B, R). Example: ratio 7, A 1,
    clip_high 5 -> weight 6; gradient -6 x d log pi where PPO's (clip 0.2) is 0."""
    ratio = torch.exp(importance_log_ratio(logprobs, old_logprobs, loss_weights, ratio_level))
    weight = ratio.clamp(1.0 - clip_low, 1.0 + clip_high).detach()
    loss = (-weight * advantages * logprobs * loss_weights).sum()
    mask = (loss_weights > 0).float()
    stats = {"policy/clipfrac": masked_mean((weight != ratio.detach()).float(), mask).item(),
             "policy/approx_kl": masked_mean(0.5 * (logprobs - old_logprobs).detach() ** 2, mask).item(),
             "policy/ratio": masked_mean(ratio.detach(), mask).item()}
    return loss, stats


def tis_weights(old_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance sampling: per token min(pi_old / pi_sampler, cap), detached. It corrects the
    policy loss for a sampler whose probabilities differ from the trainer's (another engine, another
    precision): Yao et al., "Your efficient RL framework secretly brings you off-policy RL training" (2025).
    Multiplies the tokens' loss weights. All (B, R). Example: old log 0.5, sampler log 0.25, cap 1.5 ->
    ratio 2, weight 1.5; old log 0.25, sampler log 0.5 -> 0.5."""
    return torch.exp((old_logprobs - sampler_logprobs).clamp(max=20.0)).clamp(max=cap).detach()


def logprob_mismatch(trainer_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor,
                     mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum, count, max) of |trainer - sampler| log-prob over the masked tokens, for
    `rollout/logprob_diff_mean` (sum / count over all processes) and `rollout/logprob_diff_max`."""
    diff = (trainer_logprobs - sampler_logprobs).abs() * mask
    return diff.sum(), mask.sum(), diff.max() if diff.numel() else diff.new_zeros(())


def compute_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       loss_weights: torch.Tensor, clip_range: float | None = 0.2) -> tuple[torch.Tensor, dict]:
    """PPO's value loss, clipped around the values of the rollout: 0.5 * max((V_clip - R)^2, (V - R)^2).

    As ORZ runs it (clip 0.2; OpenAI baselines ppo2). `clip_range=None` is the plain 0.5 (V - R)^2.
    `loss_weights` (B, R) is zero off the mask and sums to the loss normaliser's share of this micro-batch
    (see `loss_weights` below), so splitting a batch into micro-batches does not change the loss.
    Example: V=0.5, V_old=0.1, R=1, clip 0.2 -> V_clip=0.3; max(0.49, 0.25) * 0.5 = 0.245 per token.
    """
    unclipped = (values - returns) ** 2
    if clip_range is None:
        per_token, clipped_more = unclipped, torch.zeros_like(unclipped, dtype=torch.bool)
    else:
        v_clip = old_values + (values - old_values).clamp(-clip_range, clip_range)
        clipped = (v_clip - returns) ** 2
        per_token, clipped_more = torch.maximum(unclipped, clipped), clipped > unclipped
    loss = 0.5 * (per_token * loss_weights).sum()
    mask = (loss_weights > 0).float()
    stats = {"critic/clipfrac": masked_mean(clipped_more.float(), mask).item(),
             "critic/values": masked_mean(values.detach(), mask).item()}
    return loss, stats


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over the masked tokens; 1 is perfect, <= 0 is useless."""
    var_returns = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    diff = returns - values
    var_diff = masked_mean((diff - masked_mean(diff, mask)) ** 2, mask)
    return float("nan") if var_returns == 0 else (1 - var_diff / var_returns).item()


# --------------------------------------------------------------------------------------------------
# Entropy control by covariance (Cui et al., "The Entropy Mechanism of Reinforcement Learning for Reasoning
# Language Models", arXiv:2505.22617v1, sec. 5): the entropy falls with the covariance between a token's
# log-prob and its advantage, so the tokens of largest covariance are kept from the update (Clip-Cov) or
# held near the rollout's policy by a KL penalty (KL-Cov). Defaults are the paper's and veRL's.
# --------------------------------------------------------------------------------------------------

def token_covariance(logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                     reduce=None) -> torch.Tensor:
    """Each masked token's term of Cov(log pi, A): (log pi - mean log pi) * (A - mean A), the means over
    every masked token of the batch (all processes with `reduce`); 0 off the mask. (B, R). Example: log-probs
    [-1, -3], advantages [1, -1] -> means -2 and 0 -> [1, 1]."""
    lp, adv = logprobs.detach().double(), advantages.detach().double()
    cov = (lp - masked_mean(lp, mask, reduce)) * (adv - masked_mean(adv, mask, reduce))
    return (cov * mask).to(logprobs.dtype)


def top_tokens(scores: torch.Tensor, eligible: torch.Tensor, k: int, gather=None, rank: int = 0) -> torch.Tensor:
    """bool (B, R): the `k` eligible tokens of highest score over all processes. `gather` concatenates a 1-D
    tensor of every process's values in rank order (each sends only its own top k, then two counts), `rank`
    is this process's place. Ties at the k-th score go to the first tokens in (process, row, position)
    order, the order of one process's batch, so the choice does not depend on the process count. Example:
    scores [3, 1, 2], all eligible, k 2 -> [True, False, True]; scores [0, 0, 0], k 2 -> [True, True, False]."""
    gather = gather or (lambda values: values)
    local = scores[eligible].topk(min(k, int(eligible.sum()))).values
    pooled = gather(local)
    if k < 1 or len(pooled) == 0:
        return torch.zeros_like(eligible)
    threshold = pooled.topk(min(k, len(pooled))).values[-1]
    above, tied = eligible & (scores > threshold), eligible & (scores == threshold)
    counts = gather(torch.stack([above.sum(), tied.sum()]).cpu()).view(-1, 2)
    take = min(max(k - int(counts[:, 0].sum()) - int(counts[:rank, 1].sum()), 0), int(counts[rank, 1]))
    first = torch.zeros(tied.numel(), dtype=torch.bool, device=tied.device)
    first[tied.flatten().nonzero().flatten()[:take]] = True
    return above | first.view_as(tied)


def clip_cov_tokens(cov: torch.Tensor, mask: torch.Tensor, keys: torch.Tensor, num_tokens: float,
                    ratio: float = 2e-4, lower: float = 1.0, upper: float = 5.0, gather=None,
                    rank: int = 0) -> torch.Tensor:
    """Clip-Cov's tokens, bool (B, R): max(1, int(ratio x num_tokens)) tokens drawn at random (the smallest
    `keys`, uniform in [0, 1)) among those whose covariance lies strictly between `lower` and `upper`; their
    gradient is dropped. `num_tokens`: the batch's masked tokens over all processes. Example: cov [0.5, 2, 3,
    9], keys [.1, .8, .3, .2], 1 token -> the candidates are 2 and 3, and 3 has the smaller key."""
    k = max(1, int(ratio * num_tokens))
    return top_tokens(-keys, (mask > 0) & (cov > lower) & (cov < upper), k, gather, rank)


def kl_cov_tokens(cov: torch.Tensor, mask: torch.Tensor, num_tokens: float, ratio: float = 2e-4,
                  gather=None, rank: int = 0) -> torch.Tensor:
    """KL-Cov's tokens, bool (B, R): the max(1, int(ratio x num_tokens)) masked tokens of largest
    covariance over all processes (ties, such as the zeros of a batch without signal, by position); they
    get the penalty `kl_cov_penalty`."""
    return top_tokens(cov, mask > 0, max(1, int(ratio * num_tokens)), gather, rank)


def kl_cov_penalty(logprobs: torch.Tensor, old_logprobs: torch.Tensor, selected: torch.Tensor,
                   loss_weights: torch.Tensor, coef: float = 1.0) -> torch.Tensor:
    """KL-Cov's penalty: coef x |log pi - log pi_old| on the selected tokens, aggregated by `loss_weights`.
    Its gradient is 0 while the policy still equals the rollout's (one optimizer step per rollout); it acts
    from the second mini-batch or epoch on. Example: log-ratio -0.5 on a selected token of weight 1/2,
    coef 1 -> 0.25."""
    return coef * ((logprobs - old_logprobs).abs() * selected * loss_weights).sum()


# --------------------------------------------------------------------------------------------------
# Online curriculum: prompts whose last pass rate was 0 or 1 are drawn less often.
# --------------------------------------------------------------------------------------------------

def curriculum_weights(pass_rates: list, floor: float = 0.1) -> torch.Tensor:
    """Sampling weight of each prompt from its last group's pass rate (None: not drawn yet): 1 where the
    rate is strictly between 0 and 1 or unknown, `floor` where every sample failed or every one passed,
    which carries no signal for a group baseline. (N,). Example: [None, 0.0, 0.5, 1.0], floor 0.1 ->
    [1, 0.1, 1, 0.1]."""
    return torch.tensor([floor if r in (0.0, 1.0) else 1.0 for r in pass_rates], dtype=torch.float64)


# --------------------------------------------------------------------------------------------------
# KL estimators: KL(policy || reference) per sampled token.
# --------------------------------------------------------------------------------------------------

def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = log p - log q per token, clamped (Schulman, "Approximating KL divergence", 2020): unbiased,
    may be negative; the classic PPO penalty in the reward. (B, R) -> (B, R). Example: log p = 0, log q = -1
    -> 1."""
    return -(ref_logprobs - logprobs).clamp(-20.0, 20.0)


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = q/p - 1 - log(q/p) >= 0 per token, clamped (same note): unbiased in value but not in gradient;
    GRPO's KL in the loss. (B, R) -> (B, R). Example: log p = 0, log q = -1 -> e^-1 + 1 - 1 = 0.368."""
    log_ratio = (ref_logprobs - logprobs).clamp(-20.0, 20.0)
    return (torch.exp(log_ratio) - log_ratio - 1.0).clamp(max=10.0)


def compute_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from sampled tokens by the estimator named in
    KL_ESTIMATORS (k1, k3). (B, R) -> (B, R)."""
    if not callable(estimator) and estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}")
    return lookup(KL_ESTIMATORS, estimator, "--kl-estimator")(logprobs, ref_logprobs)


# --------------------------------------------------------------------------------------------------
# Loss aggregation: per-token weights whose weighted sum is the chosen average.
# --------------------------------------------------------------------------------------------------

def token_mean_weights(response_mask: torch.Tensor, num_sequences: int, num_tokens: float,
                       max_new_tokens: int) -> torch.Tensor:
    """A mean over every token of the batch (DAPO, arXiv:2503.14476v1, eq. 12). Example: masks [1,1,0],
    [1,0,0] -> [1/3,1/3,0],[1/3,0,0]."""
    return response_mask.float() / max(num_tokens, 1.0)


def seq_mean_token_mean_weights(response_mask: torch.Tensor, num_sequences: int, num_tokens: float,
                                max_new_tokens: int) -> torch.Tensor:
    """The mean over sequences of each sequence's token mean (GRPO as written, arXiv:2402.03300v3 eq. 3).
    Example: masks [1,1,0],[1,0,0] -> [1/4,1/4,0],[1/2,0,0]."""
    mask = response_mask.float()
    return mask / mask.sum(dim=1, keepdim=True).clamp(min=1) / num_sequences


def seq_mean_token_sum_norm_weights(response_mask: torch.Tensor, num_sequences: int, num_tokens: float,
                                    max_new_tokens: int) -> torch.Tensor:
    """Token sums over Dr. GRPO's constant normaliser B * max_new_tokens (arXiv:2503.20783v1, sec. 3.2)."""
    return response_mask.float() / (num_sequences * max_new_tokens)


def loss_weights(response_mask: torch.Tensor, mode: str, num_sequences: int, num_tokens: float,
                 max_new_tokens: int) -> torch.Tensor:
    """Per-token weights (B, R) that make `sum(per_token_loss * weights)` the average named `mode` in
    LOSS_AGGREGATIONS. `num_sequences` and `num_tokens` count the whole optimizer batch over all processes,
    so the loss of a micro-batch is its exact share and gradient accumulation does not change the objective."""
    if not callable(mode) and mode not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {mode!r}")
    return lookup(LOSS_AGGREGATIONS, mode, "--loss-agg")(response_mask, num_sequences, num_tokens, max_new_tokens)


# --------------------------------------------------------------------------------------------------
# The tables the flags read. The trainer looks names up here at every step, so an entry added or replaced
# (in a notebook too) is what runs. A flag may also be given a function itself: Args(advantage=my_fn).
# --------------------------------------------------------------------------------------------------

ADVANTAGE_ESTIMATORS = {  # --advantage
    "gae": gae_advantages,  # PPO with a critic (ORZ)
    "grpo": grpo_advantages,  # DeepSeekMath's group baseline; Dr. GRPO with scale_by_std=False
    "rloo": rloo_advantages,  # REINFORCE leave-one-out
    "reinforce_pp": reinforce_pp_advantages,  # REINFORCE++: group mean, then whitened over the global batch
}
CRITIC_ESTIMATORS = {"gae"}  # estimators that read the critic's values: a critic is built for these only
# estimators whose baseline is the group: they need 2+ samples per prompt
GROUP_ESTIMATORS = {"grpo", "rloo", "reinforce_pp"}
POLICY_LOSSES = {  # --policy-loss: (loss, stats) from log-probs, advantages, weights
    "ppo": compute_policy_loss,  # the clipped surrogate
    "cispo": compute_cispo_loss,  # the clipped, detached importance weight times the log-prob (MiniMax-M1)
}
ENTROPY_CONTROLS = ("none", "clip-cov", "kl-cov")  # --entropy-control: `clip_cov_tokens`, `kl_cov_tokens`
KL_ESTIMATORS = {"k1": kl_k1, "k3": kl_k3}  # --kl-estimator: k1 goes in the reward, k3 in the loss
LOSS_AGGREGATIONS = {  # --loss-agg: per-token weights that make the loss a sum
    "token-mean": token_mean_weights,
    "seq-mean-token-mean": seq_mean_token_mean_weights,
    "seq-mean-token-sum-norm": seq_mean_token_sum_norm_weights,
}


def lookup(table: dict, name_or_fn, flag: str):
    """The function a flag names in `table`, or the flag's value itself when it is a function."""
    if callable(name_or_fn):
        return name_or_fn
    if name_or_fn not in table:
        raise ValueError(f"{flag} {name_or_fn!r}: not one of {', '.join(table)} (add yours to algos.{flag})")
    return table[name_or_fn]


def estimator_name(advantage, short: bool = False) -> str:
    """How the console names the algorithm that --advantage selects: --advantage gae is PPO."""
    name = getattr(advantage, "__name__", advantage)
    long = {"gae": "PPO (GAE critic)", "grpo": "GRPO", "rloo": "RLOO", "reinforce_pp": "REINFORCE++"}.get(
        name, f"--advantage {name}")
    return {"gae": "ppo"}.get(name, name) if short else long


def uses_critic(estimator) -> bool:
    """Whether `estimator` (a name, or a function) reads a critic's values: it is in CRITIC_ESTIMATORS."""
    return estimator in CRITIC_ESTIMATORS


def compute_advantages(estimator, rewards: torch.Tensor, response_mask: torch.Tensor, group_ids: torch.Tensor,
                       values: torch.Tensor | None = None, kl_penalty: torch.Tensor | None = None, *,
                       whiten: bool = False, reduce=None,
                       **hyperparameters) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(advantages (B, R), returns (B, R) or None) of a batch by `estimator`, a name in ADVANTAGE_ESTIMATORS
    or a function of the same form, which gets `hyperparameters` (gamma, lam, scale_by_std, ...) as keywords.
    With `whiten` the advantages are whitened over every response token of the batch, over all processes
    when `reduce` sums across them (ORZ)."""
    fn = lookup(ADVANTAGE_ESTIMATORS, estimator, "--advantage")
    kl_penalty = torch.zeros_like(response_mask) if kl_penalty is None else kl_penalty
    advantages, returns = fn(rewards=rewards, response_mask=response_mask, group_ids=group_ids, values=values,
                             kl_penalty=kl_penalty, reduce=reduce, **hyperparameters)
    if whiten:
        advantages = masked_whiten(advantages, response_mask, reduce=reduce)
    return advantages, returns


def gspo_note(ratio_level: str, clip_low: float, clip_high: float, loss_agg) -> str | None:
    """One line for a run whose sequence-level ratio (GSPO) keeps settings GSPO's paper does not use
    (arXiv:2507.18071v2, sec. 5: clip ranges 3e-4 / 4e-4 and a mean over sequences), or None."""
    if ratio_level != "sequence" or (clip_low, clip_high, loss_agg) == (3e-4, 4e-4, "seq-mean-token-mean"):
        return None
    return (f"note: --ratio-level sequence (GSPO) with --clip-low {clip_low} --clip-high {clip_high} --loss-agg "
            f"{loss_agg}; GSPO's paper uses --clip-low 3e-4 --clip-high 4e-4 --loss-agg seq-mean-token-mean")
