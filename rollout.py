"""Rollouts: sample responses with Hugging Face `generate`, score them, and build the experience batch.

Also the per-token log-probs of the training forward pass and the critic-free baselines (GRPO's group
mean/std and RLOO's leave-one-out). Tensors are named as in veRL/TRL: `logprobs`, `old_logprobs`,
`response_mask`; shapes are (B, P) for prompts, (B, R) for responses.

Layout of a batch row:  [pad pad p0 p1 ... p_{P-1} | r0 r1 ... r_k pad pad]
  prompts are left-padded to P (generation needs the last prompt token at the same column everywhere),
  responses right-padded to R. The logit at column t predicts token t+1 (RECIPE pitfall 2), so response
  log-probs come from columns P-1 .. P+R-2.
"""

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from utils import position_ids_from_mask

LOGIT_CHUNK = 16  # rows per chunk of the full-vocabulary log-softmax (RECIPE pitfall 11)


@dataclass
class Experience:
    """One rollout: B = prompts x samples per prompt rows, on this process."""

    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P)
    response_ids: torch.Tensor  # (B, R) right-padded
    response_mask: torch.Tensor  # (B, R) float, 1 up to and including the first stop
    truncated: torch.Tensor  # (B,) bool: hit max_new_tokens without stopping
    group_ids: torch.Tensor  # (B,) the dataset id of each row's prompt: groups are keyed by it
    rewards: torch.Tensor | None = None  # (B,)
    old_logprobs: torch.Tensor | None = None  # (B, R)
    ref_logprobs: torch.Tensor | None = None  # (B, R)
    values: torch.Tensor | None = None  # (B, R)
    advantages: torch.Tensor | None = None  # (B, R)
    returns: torch.Tensor | None = None  # (B, R)

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask.long()], dim=1)

    def select(self, index: torch.Tensor) -> "Experience":
        """The rows `index` of every tensor field (a mini- or micro-batch)."""
        return Experience(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index]
                             for f in fields(self)})

    def trim(self) -> "Experience":
        """The same rows without columns that are padding in every row: prompt columns on the left,
        response columns on the right. A micro-batch of similar lengths then computes on few pads."""
        p = int(self.prompt_mask.any(dim=0).long().argmax()) if self.prompt_mask.any() else self.prompt_mask.shape[1]
        r = max(int(self.response_mask.sum(dim=1).max()), 1)
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None and f.name.startswith("prompt_"):
                v = v[:, p:]
            elif v is not None and v.dim() == 2:
                v = v[:, :r]
            out[f.name] = v
        return Experience(**out)


def plan_micro_batches(lengths: torch.Tensor, max_rows: int, max_tokens: int = 0,
                       num_batches: int | None = None) -> list[torch.Tensor]:
    """Split rows into micro-batches of similar length: sorted by length, then cut greedily so that each
    holds at most `max_rows` rows and, if `max_tokens` > 0, at most `max_tokens` padded tokens
    (rows x longest row). `num_batches` forces at least that many (every process must run the same
    number of forward passes under sharded training); empty ones come back as empty index tensors.
    lengths (B,) -> list of index tensors. Example: lengths [5, 1, 4, 2], max_rows 2 -> [[0, 2], [3, 1]].
    """
    order = torch.argsort(lengths, descending=True, stable=True)
    batches, current, longest = [], [], 0
    for i in order.tolist():
        longest_if = max(longest, int(lengths[i]))
        if current and (len(current) >= max_rows or (max_tokens > 0 and longest_if * (len(current) + 1) > max_tokens)):
            batches.append(current)
            current, longest_if = [], int(lengths[i])
        current.append(i)
        longest = longest_if
    if current:
        batches.append(current)
    while num_batches is not None and len(batches) < num_batches:
        big = max(range(len(batches)), key=lambda b: len(batches[b])) if batches else None
        if big is None or len(batches[big]) < 2:
            batches.append([])
        else:  # split the fullest micro-batch in two
            half = len(batches[big]) // 2
            batches[big:big + 1] = [batches[big][:half], batches[big][half:]]
    return [torch.tensor(b, dtype=torch.long, device=lengths.device) for b in batches]


@torch.no_grad()
def generate_responses(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, num_generations: int,
                       max_new_tokens: int, temperature: float, top_p: float, top_k: int,
                       stop_token_ids: list[int], pad_token_id: int, stop_strings: list[str] | None = None,
                       tokenizer=None, batch_size: int | None = None,
                       seeds: list[int] | None = None, synced_gpus: bool = False) -> torch.Tensor:
    """Sample `num_generations` responses per prompt; returns (B * G, R) ids, rows grouped by prompt.

    Generates in eval mode with the KV cache on: with gradient checkpointing in train mode HF drops the
    cache and re-runs the prefix at every token (RECIPE pitfall 12). `batch_size` caps prompts per call.
    `seeds`, one per call, reseeds torch before it: a call's samples then depend only on its seed and its
    prompts (left padding shared by all of its prompts is cut first), not on what else this process or
    other processes generate, so that runs on 1 or N processes and resumed runs sample the same tokens.
    `synced_gpus` keeps every process stepping until all are done, which sharded models (FSDP) need:
    each decoding step gathers parameters from all processes.
    """
    was_training = model.training
    model.eval()
    do_sample = temperature > 0
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, num_return_sequences=num_generations,
                  eos_token_id=stop_token_ids, pad_token_id=pad_token_id, use_cache=True,
                  synced_gpus=synced_gpus)
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k)
    if stop_strings:
        kwargs.update(stop_strings=stop_strings, tokenizer=tokenizer)
    chunks = []
    step = batch_size or len(prompt_ids)
    for n, start in enumerate(range(0, len(prompt_ids), step)):
        ids, mask = prompt_ids[start:start + step], prompt_mask[start:start + step]
        first = int(mask.any(dim=0).long().argmax())
        ids, mask = ids[:, first:], mask[:, first:]
        if seeds is not None:
            torch.manual_seed(seeds[n])
        out = model.generate(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                             **kwargs)
        chunks.append(out[:, ids.shape[1]:])
    model.train(was_training)
    width = max(c.shape[1] for c in chunks)
    return torch.cat([F.pad(c, (0, width - c.shape[1]), value=pad_token_id) for c in chunks])


def stop_positions(response_ids: torch.Tensor, stop_token_ids: list[int],
                   stop_strings: list[str] | None = None, tokenizer=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Length of each response up to and including its first stop, and whether it was truncated.

    A stop is a stop token id or the token that completes a stop string (kept in the output, as ORZ
    does). The mask is never derived from `== pad_id`, because pad may equal EOS (RECIPE pitfall 4).
    Returns lengths (B,) long and truncated (B,) bool.
    """
    B, R = response_ids.shape
    is_stop = torch.isin(response_ids, torch.tensor(stop_token_ids, device=response_ids.device))
    has_stop = is_stop.any(dim=1)
    lengths = torch.where(has_stop, is_stop.float().argmax(dim=1) + 1, torch.full_like(has_stop, R, dtype=torch.long))
    if stop_strings:
        for i in range(B):
            ids = response_ids[i, :lengths[i]].tolist()
            if any(s in tokenizer.decode(ids) for s in stop_strings):
                lo, hi = 1, len(ids)  # smallest prefix whose text holds a stop string: containment is monotone
                while lo < hi:
                    mid = (lo + hi) // 2
                    if any(s in tokenizer.decode(ids[:mid]) for s in stop_strings):
                        hi = mid
                    else:
                        lo = mid + 1
                lengths[i] = lo
                has_stop[i] = True
    # No stop anywhere means generation ran out of max_new_tokens: the response was cut off.
    return lengths, ~has_stop


def response_mask_from_lengths(lengths: torch.Tensor, width: int) -> torch.Tensor:
    return (torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]).float()


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float,
                         with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-prob of `tokens` under softmax(logits / T), in fp32 and in row chunks.

    Dividing by the sampling temperature makes these the log-probs of the distribution that was
    sampled (RECIPE pitfall 1). logits (B, R, V), tokens (B, R) -> (B, R), and entropy (B, R) if asked.
    """
    out, ent = [], []
    for rows in torch.split(torch.arange(logits.shape[0], device=logits.device), LOGIT_CHUNK):
        chunk = logits[rows].float() / (temperature if temperature > 0 else 1.0)
        logp = chunk.log_softmax(dim=-1)
        out.append(logp.gather(-1, tokens[rows].unsqueeze(-1)).squeeze(-1))
        if with_entropy:
            ent.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(out), (torch.cat(ent) if with_entropy else None)


def forward_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int,
                     temperature: float, with_entropy: bool = False):
    """Log-probs (and entropy) of the last `response_len` tokens of each row under `model`.

    Positions are computed from the mask exactly as `generate` computes them (RECIPE pitfall 3), and only
    the logits of response positions are materialised (`logits_to_keep`). (B, P+R) -> (B, R).
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids_from_mask(attention_mask),
                   logits_to_keep=response_len + 1, use_cache=False).logits[:, :-1]
    return logprobs_from_logits(logits, input_ids[:, -response_len:], temperature, with_entropy)


@torch.no_grad()
def batched_logprobs(model, exp: Experience, temperature: float, micro_batches: list[torch.Tensor]) -> torch.Tensor:
    """`forward_logprobs` over the whole batch, one trimmed micro-batch at a time, without grad (old and
    reference log-probs). `micro_batches` are row-index tensors, as `plan_micro_batches` makes them.
    Returns (B, R), 0 outside the response mask."""
    out = torch.zeros_like(exp.response_mask, dtype=torch.float32)
    for rows in micro_batches:
        mb = exp.select(rows if len(rows) else torch.zeros(1, dtype=torch.long, device=rows.device)).trim()
        logprobs = forward_logprobs(model, mb.input_ids, mb.attention_mask, mb.response_ids.shape[1], temperature)[0]
        if len(rows):
            out[rows, :logprobs.shape[1]] = logprobs
    return out * exp.response_mask


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
