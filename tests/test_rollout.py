"""Unit tests of rollout.py: the training forward pass replays the sampling distribution, micro-batched
log-probs and their plans, stop handling (ids, pad == EOS, stop strings), the Experience batch; and generation:
`generate_responses_refill` (same rows, grouping, stop and mask rules as `generate_responses`, and the same
tokens as it in its first call when seeded per call), the growing KV cache, and sampling that ignores a
checkpoint's generation settings.

Run: python -m pytest tests/test_rollout.py -q
"""

import math
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from rollout import (
    LOGIT_CHUNK_ELEMENTS,
    ChunkedLogprobs,
    Experience,
    batched_logprobs,
    forward_logprobs,
    generate_responses,
    generate_responses_refill,
    logprobs_from_logits,
    output_head,
    plan_micro_batches,
    response_mask_from_lengths,
    stop_positions,
)
from utils import left_pad

VOCAB, PAD, EOS = 24, 0, 3  # a small vocabulary, so the random model emits EOS now and then
TEMPERATURE = 0.7


def tiny_lm(arch: str):
    torch.manual_seed(0)
    # initializer_range 0.3: logits far from uniform, so a wrong log-prob shows up clearly
    if arch == "llama":
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                             initializer_range=0.3, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=1)
        return LlamaForCausalLM(config).eval()
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=0.3,
                        pad_token_id=PAD, eos_token_id=EOS, bos_token_id=1)
    return GPT2LMHeadModel(config).eval()


def sample(model, num_generations=2, max_new_tokens=12):
    """Run `generate_responses` on left-padded prompts of different lengths, capturing generate's raw logits."""
    prompt_ids, prompt_mask = left_pad([[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]], PAD)
    captured = {}
    original = model.generate

    def generate_with_logits(**kwargs):
        out = original(**kwargs, output_logits=True, return_dict_in_generate=True)
        captured["logits"] = torch.stack(out.logits, dim=1)  # (B, R, V), before temperature
        return out.sequences

    model.generate = generate_with_logits
    model.train()  # generate_responses must switch to eval and back
    torch.manual_seed(1)
    response = generate_responses(model, prompt_ids, prompt_mask, num_generations=num_generations,
                                  max_new_tokens=max_new_tokens, temperature=TEMPERATURE, top_p=1.0, top_k=0,
                                  stop_token_ids=[EOS], pad_token_id=PAD)
    assert model.training
    del model.generate
    model.eval()
    prompt_ids = prompt_ids.repeat_interleave(num_generations, 0)
    prompt_mask = prompt_mask.repeat_interleave(num_generations, 0)
    return prompt_ids, prompt_mask, response, captured["logits"]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def rollout(request):
    model = tiny_lm(request.param)
    prompt_ids, prompt_mask, response, logits = sample(model)
    lengths, truncated = stop_positions(response, [EOS])
    response_mask = response_mask_from_lengths(lengths, response.shape[1])
    return dict(arch=request.param, model=model, prompt_ids=prompt_ids, prompt_mask=prompt_mask,
                response=response, logits=logits, lengths=lengths, truncated=truncated,
                response_mask=response_mask)


# ---------------------------------------------------------------------------------------------
# The training forward pass replays sampling
# ---------------------------------------------------------------------------------------------

def test_forward_logprobs_match_sampling_distribution(rollout):
    r = rollout
    response, mask = r["response"], r["response_mask"]
    assert r["truncated"].any() and (~r["truncated"]).any()  # some rows stop early, some run to the end
    assert r["logits"].shape[1] == response.shape[1]
    sampled = torch.log_softmax(r["logits"].float() / TEMPERATURE, dim=-1)
    sampled = sampled.gather(-1, response.unsqueeze(-1)).squeeze(-1)
    input_ids = torch.cat([r["prompt_ids"], response], 1)
    attention_mask = torch.cat([r["prompt_mask"], mask.long()], 1)
    with torch.no_grad():
        logprobs, entropy = forward_logprobs(r["model"], input_ids, attention_mask, response.shape[1], TEMPERATURE,
                                             with_entropy=True)
    valid = mask.bool()
    torch.testing.assert_close(logprobs[valid], sampled[valid], atol=1e-4, rtol=0)
    # entropy of softmax(logits / T) at the same positions
    p = torch.softmax(r["logits"].float() / TEMPERATURE, -1)
    torch.testing.assert_close(entropy[valid], -(p * p.log()).sum(-1)[valid], atol=1e-4, rtol=0)
    # the check can fail: without the temperature the log-probs are different
    with torch.no_grad():
        at_t1, _ = forward_logprobs(r["model"], input_ids, attention_mask, response.shape[1], 1.0)
    assert (at_t1 - sampled)[valid].abs().max() > 1e-2


def test_entropy_gradient_only_when_asked():
    """Two-token vocabulary with p = (1/4, 3/4): H = -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.5623 and dH/dlogit_i =
    -p_i (ln p_i + H) = (0.2059, -0.2059). Without entropy_grad the same value carries no graph."""
    logits = torch.tensor([[[0.0, math.log(3.0)]]], requires_grad=True)
    tokens = torch.tensor([[1]])
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    logprobs, entropy = logprobs_from_logits(logits, tokens, 1.0, with_entropy=True, entropy_grad=True)
    entropy.sum().backward()
    assert entropy.item() == pytest.approx(h, abs=1e-6)
    expected = [-0.25 * (math.log(0.25) + h), -0.75 * (math.log(0.75) + h)]
    torch.testing.assert_close(logits.grad[0, 0], torch.tensor(expected), atol=1e-6, rtol=0)
    logprobs, entropy = logprobs_from_logits(logits, tokens, 1.0, with_entropy=True)
    assert entropy.item() == pytest.approx(h, abs=1e-6) and entropy.grad_fn is None
    assert logprobs.requires_grad and logprobs.item() == pytest.approx(math.log(0.75), abs=1e-6)


def test_chunked_logprobs_hand_computed():
    """One token, hidden h = 1, two-word vocabulary with weights (0, ln 3): logits (0, ln 3), p = (1/4, 3/4).
    Token 1: log-prob ln 3/4, entropy H = 0.5623. For the loss log-prob + entropy, dloss/dlogits =
    (onehot - p) - p (ln p + H) = (-1/4 + 0.2059, 1/4 - 0.2059); dloss/dW = that times h, dloss/dh = that . W."""
    hidden = torch.tensor([[1.0]], requires_grad=True)
    weight = torch.tensor([[0.0], [math.log(3.0)]], requires_grad=True)
    out = ChunkedLogprobs.apply(hidden, weight, torch.tensor([1]), 1.0, 1)
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert out[0, 0].item() == pytest.approx(math.log(0.75), abs=1e-6) and out[0, 1].item() == pytest.approx(h)
    out.sum().backward()
    g = [-0.25 - 0.25 * (math.log(0.25) + h), 0.25 - 0.75 * (math.log(0.75) + h)]
    torch.testing.assert_close(weight.grad, torch.tensor([[g[0]], [g[1]]]), atol=1e-6, rtol=0)
    assert hidden.grad.item() == pytest.approx(g[1] * math.log(3.0), abs=1e-6)


@pytest.mark.parametrize("entropy_weight", [0.0, 0.3])
def test_chunked_logprobs_equal_the_full_logits_values_and_gradients(entropy_weight):
    """37 tokens in chunks of 5 (the last one short), temperature 0.7: the same log-probs, entropies and
    gradients (hidden states and weight) as the log-softmax of all logits at once."""
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = (torch.randn(50, 16) * 0.5).requires_grad_()
    tokens = torch.randint(0, 50, (37,))
    a, b = torch.randn(37), torch.randn(37) * entropy_weight
    out = ChunkedLogprobs.apply(hidden, weight, tokens, 0.7, 5)
    ((out[:, 0] * a).sum() + (out[:, 1] * b).sum()).backward()
    chunked = out.detach(), hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    logp, ent = logprobs_from_logits((hidden @ weight.T)[None], tokens[None], 0.7, with_entropy=True,
                                     entropy_grad=True)
    ((logp[0] * a).sum() + (ent[0] * b).sum()).backward()
    torch.testing.assert_close(chunked[0], torch.stack([logp[0], ent[0]], -1).detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked[1], hidden.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked[2], weight.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("autocast", [False, True])
def test_forward_logprobs_chunked_equals_the_full_logits_pass(autocast):
    """The training pass on a model: the LM head in chunks of 3 tokens gives the log-probs, entropies and
    parameter gradients (tied embedding included) of the full-logits pass; under bf16 autocast too, to
    bf16's precision. The model's head is itself again afterwards."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4, initializer_range=0.3,
                                         tie_word_embeddings=True, pad_token_id=PAD, eos_token_id=EOS))
    assert output_head(model) is model.lm_head and model.lm_head.weight is model.model.embed_tokens.weight
    ids, mask = left_pad([[5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15, 16, 17]], PAD)
    weights = torch.randn(2, 4)

    def run(chunk):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logp, ent = forward_logprobs(model, ids, mask, 4, TEMPERATURE, with_entropy=True, entropy_grad=True,
                                         logit_chunk=chunk)
        ((logp * weights).sum() - 0.1 * ent.sum()).backward()
        return logp.detach(), ent.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    chunked, full = run(3 * VOCAB), run(0)
    tol = dict(atol=2e-2, rtol=2e-2) if autocast else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked[0], full[0], **tol)
    torch.testing.assert_close(chunked[1], full[1], **tol)
    for name in full[2]:
        torch.testing.assert_close(chunked[2][name], full[2][name], **tol, msg=name)
    assert "forward" not in vars(model.lm_head)
    assert LOGIT_CHUNK_ELEMENTS // 49152 == 682  # the chunk of SmolLM2's vocabulary that the README quotes


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_shared_prompts_give_the_log_probs_entropies_and_gradients_of_the_plain_pass(arch):
    """share_prompts: 3 prompts (two left-padded) x 2 samples, rows shuffled so a group's rows are apart: each
    distinct prompt runs once and its rows' responses on its keys and values. The log-probs, entropies and
    every parameter's gradient equal the plain pass's (the prompt's share of a gradient flows back through
    the rows' picked cache); GPT-2's absolute positions would show wrong ones. Rows of one prompt alone
    take the plain pass."""
    model = tiny_lm(arch)  # eval mode: GPT-2's dropout would make two passes differ
    prompts, prompt_mask = left_pad([[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]], PAD)
    order = torch.tensor([3, 0, 5, 1, 4, 2])  # samples of prompts 1, 0, 2, 0, 2, 1
    prompts, prompt_mask = prompts.repeat_interleave(2, 0)[order], prompt_mask.repeat_interleave(2, 0)[order]
    responses = torch.randint(4, VOCAB, (6, 5), generator=torch.Generator().manual_seed(2))
    response_mask = torch.ones_like(responses)
    response_mask[2, 3:] = 0
    ids, mask = torch.cat([prompts, responses], 1), torch.cat([prompt_mask, response_mask], 1)
    weights = torch.randn(6, 5, generator=torch.Generator().manual_seed(3)) * response_mask

    def run(share, rows=slice(None)):
        model.zero_grad()
        logp, ent = forward_logprobs(model, ids[rows], mask[rows], 5, TEMPERATURE, with_entropy=True,
                                     entropy_grad=True, logit_chunk=3 * VOCAB, share_prompts=share)
        ((logp * weights[rows]).sum() - 0.1 * (ent * weights[rows]).sum()).backward()
        return logp.detach(), ent.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    shared, plain = run(True), run(False)
    torch.testing.assert_close(shared[0], plain[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared[1], plain[1], atol=1e-5, rtol=1e-5)
    for name in plain[2]:
        torch.testing.assert_close(shared[2][name], plain[2][name], atol=1e-5, rtol=1e-5, msg=name)
    assert plain[2][next(iter(plain[2]))].abs().sum() > 0
    with torch.no_grad():  # as the old and reference log-probs are taken
        torch.testing.assert_close(forward_logprobs(model, ids, mask, 5, TEMPERATURE, share_prompts=True)[0],
                                   plain[0], atol=1e-5, rtol=1e-5)
    one = run(True, slice(0, 1))  # nothing to share: the plain pass, exactly
    assert torch.equal(one[0], run(False, slice(0, 1))[0])


def test_forward_without_position_ids_would_not_match():
    # RoPE (Llama) depends only on relative positions, so a constant left-padding offset cancels there;
    # GPT-2's absolute position embeddings make wrong positions under left padding visible.
    model = tiny_lm("gpt2")
    prompt_ids, prompt_mask, response, logits = sample(model)
    lengths, _ = stop_positions(response, [EOS])
    mask = response_mask_from_lengths(lengths, response.shape[1])
    P, R = prompt_ids.shape[1], response.shape[1]
    sampled = torch.log_softmax(logits / TEMPERATURE, -1).gather(-1, response.unsqueeze(-1)).squeeze(-1)
    input_ids = torch.cat([prompt_ids, response], 1)
    attention_mask = torch.cat([prompt_mask, mask.long()], 1)
    with torch.no_grad():
        plain = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, P - 1:-1]
        with_pos, _ = forward_logprobs(model, input_ids, attention_mask, R, TEMPERATURE)
    plain = torch.log_softmax(plain / TEMPERATURE, -1).gather(-1, response.unsqueeze(-1)).squeeze(-1)
    err_plain = ((plain - sampled).abs() * mask).amax(1)
    err_pos = ((with_pos - sampled).abs() * mask).amax(1)
    padded = prompt_mask[:, 0] == 0  # rows whose prompt is shorter than P
    assert padded.any() and (~padded).any()
    assert torch.all(err_pos < 1e-4)
    assert torch.all(err_plain[~padded] < 1e-4)  # no padding: both agree
    assert torch.all(err_plain[padded] > 1e-2)  # left padding without position ids: wrong log-probs


def test_batched_logprobs_micro_batch_sizes(rollout):
    r = rollout
    exp = Experience(prompt_ids=r["prompt_ids"], prompt_mask=r["prompt_mask"], response_ids=r["response"],
                     response_mask=r["response_mask"], truncated=r["truncated"],
                     group_ids=torch.arange(len(r["response"])) // 2)
    B = len(r["response"])
    lengths = exp.attention_mask.sum(dim=1)
    plans = [plan_micro_batches(lengths, rows) for rows in (1, 2, B)] + [plan_micro_batches(lengths, B, max_tokens=40)]
    results = [batched_logprobs(r["model"], exp, TEMPERATURE, plan) for plan in plans]
    valid = r["response_mask"].bool()
    for out in results:
        assert out.shape == r["response"].shape
        torch.testing.assert_close(out[valid], results[-1][valid], atol=1e-5, rtol=0)
    with torch.no_grad():
        full, _ = forward_logprobs(r["model"], exp.input_ids, exp.attention_mask, r["response"].shape[1], TEMPERATURE)
    torch.testing.assert_close(results[-1][valid], full[valid], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# Stops and masks
# ---------------------------------------------------------------------------------------------

def test_stop_positions_token_ids():
    ids = torch.tensor([[5, 7, EOS, PAD, PAD],   # stops at column 2: length 3 (EOS inside the mask)
                        [5, 7, 8, 9, 10],         # no stop: length 5, truncated
                        [EOS, PAD, PAD, PAD, PAD],  # immediate stop: length 1
                        [6, 6, 6, 6, EOS],        # stops on the last column: length 5, not truncated
                        [6, EOS, 9, EOS, PAD]])   # the first stop counts: length 2
    lengths, truncated = stop_positions(ids, [EOS])
    assert lengths.tolist() == [3, 5, 1, 5, 2]
    assert truncated.tolist() == [False, True, False, False, False]
    mask = response_mask_from_lengths(lengths, 5)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]


def test_stop_positions_pad_equals_eos():
    # pad == EOS: the padding after the stop is EOS too; the first EOS ends the response
    ids = torch.tensor([[5, 7, EOS, EOS, EOS], [5, 7, 8, 9, 10], [EOS, EOS, EOS, EOS, EOS]])
    lengths, truncated = stop_positions(ids, [EOS])
    assert lengths.tolist() == [3, 5, 1]
    assert truncated.tolist() == [False, True, False]
    # deriving the mask from `!= pad` would have dropped the EOS itself (length 2, not 3)
    assert (ids[0] != EOS).sum().item() == 2


def test_stop_positions_several_stop_ids():
    im_end, endoftext = 20, 21  # Qwen's two stops
    ids = torch.tensor([[5, im_end, 0, 0], [5, 6, endoftext, 0], [5, 6, 7, 8], [endoftext, im_end, 0, 0]])
    lengths, truncated = stop_positions(ids, [im_end, endoftext])
    assert lengths.tolist() == [2, 3, 4, 1]
    assert truncated.tolist() == [False, False, True, False]


@pytest.fixture(scope="module")
def tokenizer():
    from data.synthetic import build_tokenizer

    texts = ["<think> 1 + 2 = 3 </think> <answer> \\boxed{3} </answer> User: hi Assistant: ok"] * 4
    return build_tokenizer(texts, vocab_size=300)


def char_ids(tokenizer, text: str) -> list[int]:
    """One token per character (byte-level BPE has every single byte in its vocabulary)."""
    ids = [tokenizer.convert_tokens_to_ids(tokenizer.tokenize(c)) for c in text]
    assert all(len(i) == 1 for i in ids)
    return [i[0] for i in ids]


def test_stop_strings_char_level(tokenizer):
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    texts = ["x=5</answer>abc",   # "</answer>" completes at its ">", the 12th token: length 12
             "ab User: q</answer>",  # "User:" completes first, at the 8th token
             "no stop here at all"]  # nothing: truncated, full length
    rows = [char_ids(tokenizer, t) for t in texts]
    R = max(len(r) for r in rows) + 2
    rows[1] = rows[1] + [eos]
    ids = torch.tensor([r + [pad] * (R - len(r)) for r in rows])
    ids[2, len(texts[2]):] = torch.tensor(char_ids(tokenizer, "zz"))  # no padding in a truncated row
    assert tokenizer.decode(ids[0, :12].tolist()) == "x=5</answer>"
    lengths, truncated = stop_positions(ids, [eos], stop_strings=["</answer>", "User:"], tokenizer=tokenizer)
    assert lengths.tolist() == [len("x=5</answer>"), len("ab User:"), R]
    assert truncated.tolist() == [False, False, True]
    # a stop token before the stop string wins
    early = torch.tensor([char_ids(tokenizer, "ab") + [eos] + char_ids(tokenizer, "</answer>")])
    lengths, truncated = stop_positions(early, [eos], stop_strings=["</answer>"], tokenizer=tokenizer)
    assert lengths.tolist() == [3] and truncated.tolist() == [False]


def test_stop_strings_natural_tokenization(tokenizer):
    text = " 7 + 1 = 8 </think> <answer> \\boxed{8} </answer> User: next"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) < len(text)  # merged tokens, not characters
    # reference: the shortest prefix (in tokens) whose text holds the stop string, by a linear scan
    expected = next(k for k in range(1, len(ids) + 1) if "</answer>" in tokenizer.decode(ids[:k]))
    assert expected < len(ids)  # completes mid-sequence
    lengths, truncated = stop_positions(torch.tensor([ids]), [tokenizer.eos_token_id],
                                        stop_strings=["</answer>"], tokenizer=tokenizer)
    assert lengths.tolist() == [expected] and truncated.tolist() == [False]
    assert (tokenizer.decode(ids[:expected]).endswith("</answer>")
            or "</answer>" not in tokenizer.decode(ids[:expected - 1]))


# ---------------------------------------------------------------------------------------------
# Micro-batch plans and the Experience batch
# ---------------------------------------------------------------------------------------------

def test_plan_micro_batches_sorts_packs_and_pads_the_count():
    lengths = torch.tensor([5, 1, 4, 2])
    assert [b.tolist() for b in plan_micro_batches(lengths, max_rows=2)] == [[0, 2], [3, 1]]
    # a token budget of 8 padded tokens: 5+4 would cost 2 x 5 = 10, so 5 goes alone; then 4, 2 (2 x 4 = 8); then 1
    assert [b.tolist() for b in plan_micro_batches(lengths, max_rows=4, max_tokens=8)] == [[0], [2, 3], [1]]
    # forcing a count splits the fullest batch, then adds empty ones
    assert [b.tolist() for b in plan_micro_batches(lengths, max_rows=4, num_batches=2)] == [[0, 2], [3, 1]]
    assert [b.tolist() for b in plan_micro_batches(torch.tensor([3]), max_rows=4, num_batches=3)] == [[0], [], []]
    # a padding cap of 10%: 5+4 pads 1 of 10 (kept), 2+1 would pad 1 of 4 (cut)
    assert [b.tolist() for b in plan_micro_batches(lengths, max_rows=2, max_padding=0.1)] == [[0, 2], [3], [1]]
    assert [b.tolist() for b in plan_micro_batches(lengths, max_rows=4, max_padding=0.1)] == [[0, 2], [3], [1]]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("max_padding", [0.05, 0.1, 0.3])
def test_plan_micro_batches_padding_cap(seed, max_padding):
    """Widely spread lengths: every row once, and no micro-batch pads more than the cap."""
    lengths = torch.randint(1, 300, (64,), generator=torch.Generator().manual_seed(seed))
    plan = plan_micro_batches(lengths, max_rows=64, max_padding=max_padding)
    assert sorted(torch.cat(plan).tolist()) == list(range(64))
    for rows in plan:
        padded = int(lengths[rows].max()) * len(rows)
        assert padded - int(lengths[rows].sum()) <= max_padding * padded
    uncapped = plan_micro_batches(lengths, max_rows=64)
    assert len(uncapped) == 1 and len(plan) > 1


def test_plan_micro_batches_counts_prompt_and_response_padding_separately():
    """Prompts are left-padded and responses right-padded, so a micro-batch is as wide as its longest
    prompt plus its longest response: (10 + 2) and (2 + 10) tokens together are 24 columns, 40% padding."""
    lengths, prompts = torch.tensor([12, 12]), torch.tensor([10, 2])
    assert len(plan_micro_batches(lengths, max_rows=2, max_padding=0.1)) == 1  # by total length: no padding
    assert len(plan_micro_batches(lengths, max_rows=2, max_padding=0.1, prompt_lengths=prompts)) == 2
    # the token budget counts the same width: 2 x (10 + 10) = 40 > 30
    assert len(plan_micro_batches(lengths, max_rows=2, max_tokens=30, prompt_lengths=prompts)) == 2


@pytest.mark.parametrize("seed", range(5))
def test_plan_micro_batches_padding_cap_holds_after_trim(seed):
    """On a real rollout layout, the share of padding in every trimmed micro-batch is within the cap."""
    g = torch.Generator().manual_seed(seed)
    rows, width = 48, 40
    prompt_len = torch.randint(1, width, (rows,), generator=g)
    response_len = torch.randint(1, width, (rows,), generator=g)
    cols = torch.arange(width)
    prompt_mask = (cols[None, :] >= width - prompt_len[:, None]).long()
    response_mask = (cols[None, :] < response_len[:, None]).float()
    exp = Experience(prompt_ids=prompt_mask * 5, prompt_mask=prompt_mask, response_ids=response_mask.long() * 6,
                     response_mask=response_mask, truncated=torch.zeros(rows, dtype=torch.bool),
                     group_ids=torch.arange(rows))
    plan = plan_micro_batches(exp.attention_mask.sum(dim=1), max_rows=rows, max_padding=0.1,
                              prompt_lengths=exp.prompt_mask.sum(dim=1))
    assert sorted(torch.cat(plan).tolist()) == list(range(rows))
    for idx in plan:
        mb = exp.select(idx).trim()
        computed = mb.input_ids.numel()
        assert computed - mb.attention_mask.sum().item() <= 0.1 * computed


def test_trim_drops_columns_that_are_padding_everywhere():
    exp = Experience(prompt_ids=torch.tensor([[0, 0, 7, 8], [0, 0, 0, 9]]),
                     prompt_mask=torch.tensor([[0, 0, 1, 1], [0, 0, 0, 1]]),
                     response_ids=torch.tensor([[1, 2, 0, 0], [3, 0, 0, 0]]),
                     response_mask=torch.tensor([[1.0, 1.0, 0, 0], [1.0, 0, 0, 0]]),
                     truncated=torch.tensor([False, False]), group_ids=torch.tensor([0, 1]),
                     advantages=torch.ones(2, 4))
    t = exp.trim()
    assert t.prompt_ids.tolist() == [[7, 8], [0, 9]] and t.prompt_mask.tolist() == [[1, 1], [0, 1]]
    assert t.response_ids.tolist() == [[1, 2], [3, 0]] and t.advantages.shape == (2, 2)
    assert t.input_ids.tolist() == [[7, 8, 1, 2], [0, 9, 3, 0]]


# ---------------------------------------------------------------------------------------------
# Generation: refill, the growing KV cache, the checkpoint's generation settings
# ---------------------------------------------------------------------------------------------

STOP_STRINGS = ["</answer>", "User:"]


@pytest.fixture(scope="module")
def setup(tiny_base, tmp_path_factory):
    """A small random model with the tiny base's tokenizer, its EOS row scaled so lengths spread widely."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmark import random_model

    path = random_model(tiny_base, tmp_path_factory.mktemp("gen") / "m", 64, 2, eos_scale=20.0, head_width=32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    from data.loading import format_prompt

    questions = ("What is 1 + 2?", "Tom has 12 apples and gets 7 more. How many apples does Tom have now?",
                 "Compute 3 - 1.")
    prompts = [tokenizer(format_prompt(q, "orz", tokenizer))["input_ids"] for q in questions]
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    eos = model.generation_config.eos_token_id
    kw = dict(num_generations=6, max_new_tokens=48, temperature=1.0, top_p=1.0, top_k=0,
              stop_token_ids=[eos] if isinstance(eos, int) else eos, pad_token_id=tokenizer.pad_token_id,
              tokenizer=tokenizer)
    return model, tokenizer, ids, mask, kw


@pytest.mark.parametrize("stop_strings", [None, STOP_STRINGS])
def test_refill_rows_are_valid_and_grouped(setup, stop_strings):
    model, tokenizer, ids, mask, kw = setup
    stats = {}
    out = generate_responses_refill(model, ids, mask, **kw, stop_strings=stop_strings, seeds=[3], stats=stats)
    assert out.shape[0] == len(ids) * kw["num_generations"] and out.dtype == torch.long
    lengths, truncated = stop_positions(out, kw["stop_token_ids"], stop_strings, tokenizer)
    assert stats["calls"] > 1, "the lengths should spread enough for at least one refill"
    assert int(lengths.max()) <= kw["max_new_tokens"]
    stop = torch.tensor(kw["stop_token_ids"])
    for row, n, cut in zip(out, lengths.tolist(), truncated.tolist(), strict=True):
        body = row[:n]
        assert not torch.isin(body[:-1], stop).any(), "no stop token before the end of a response"
        if cut:  # no stop at all: it used the whole budget
            assert n == kw["max_new_tokens"] and not torch.isin(body, stop).any()
            if stop_strings:
                assert not any(s in tokenizer.decode(body.tolist()) for s in stop_strings)
        elif stop_strings and not bool(torch.isin(body[-1:], stop).any()):  # ended by a stop string
            text = tokenizer.decode(body.tolist())
            assert any(s in text for s in stop_strings)
            assert not any(s in tokenizer.decode(body[:-1].tolist()) for s in stop_strings)
    # Rows are grouped by prompt: row r continues prompt r // G, checked by re-scoring a whole row's
    # continuation being conditioned on its own prompt (the same seed with one prompt gives its rows).
    one = generate_responses_refill(model, ids[1:2], mask[1:2], **kw, stop_strings=stop_strings, seeds=[3])
    assert one.shape[0] == kw["num_generations"]


def test_refill_first_call_matches_generate(setup):
    """Seeded alike, the first refill call draws exactly generate_responses' tokens until it ends: every
    row agrees with plain generate on its first `steps` tokens (and stopped rows agree entirely)."""
    model, tokenizer, ids, mask, kw = setup
    plain = generate_responses(model, ids, mask, **kw, seeds=[11])
    refill = generate_responses_refill(model, ids, mask, **kw, seeds=[11], refill_fraction=0.5)
    p_len, _ = stop_positions(plain, kw["stop_token_ids"])
    r_len, _ = stop_positions(refill, kw["stop_token_ids"])
    steps = int(torch.sort(p_len).values[len(p_len) - len(p_len) // 2 - 1])  # the first call ends here
    assert torch.equal(plain[:, :steps], refill[:, :steps])
    done = p_len <= steps
    assert done.sum() >= len(p_len) // 2
    assert torch.equal(p_len[done], r_len[done])


@pytest.mark.parametrize("stop_strings", [None, STOP_STRINGS])
def test_refill_greedy_matches_generate(setup, stop_strings):
    """Greedy decoding leaves nothing to chance: every row of every refill call, continued from the kept KV
    cache after the finished rows are dropped, is exactly plain generate's row (positions, masks and cache
    rows all line up), and the stop rules end rows at the same tokens."""
    model, tokenizer, ids, mask, kw = setup
    kw = {**kw, "temperature": 0.0, "stop_strings": stop_strings, "num_generations": 1}  # HF: greedy is G = 1
    ids, mask = ids.repeat(6, 1), mask.repeat(6, 1)  # so more prompts instead: 3 of ours and 15 random ones
    torch.manual_seed(0)
    ids[3:] = torch.where(mask[3:].bool(), torch.randint(2, 600, ids[3:].shape), ids[3:])
    plain = generate_responses(model, ids, mask, **kw)
    stats = {}
    refill = generate_responses_refill(model, ids, mask, **kw, refill_fraction=0.8, stats=stats)
    assert stats["calls"] >= 3, stats
    lengths, _ = stop_positions(plain, kw["stop_token_ids"], stop_strings, tokenizer)
    assert len(set(lengths.tolist())) > 3, "lengths should spread for the test to mean something"
    assert torch.equal(stop_positions(refill, kw["stop_token_ids"], stop_strings, tokenizer)[0], lengths)
    for a, b, n in zip(plain, refill, lengths.tolist(), strict=True):
        assert torch.equal(a[:n], b[:n])


def test_refill_same_distribution(setup):
    """Over many seeds, the mean length and the first-token distribution match plain generate's."""
    model, tokenizer, ids, mask, kw = setup
    kw = {**kw, "max_new_tokens": 24}
    plain_len, refill_len, plain_tok, refill_tok = [], [], [], []
    for seed in range(12):
        a = generate_responses(model, ids, mask, **kw, seeds=[seed])
        b = generate_responses_refill(model, ids, mask, **kw, seeds=[1000 + seed])
        plain_len.append(stop_positions(a, kw["stop_token_ids"])[0].float())
        refill_len.append(stop_positions(b, kw["stop_token_ids"])[0].float())
        plain_tok.append(a[:, 3])
        refill_tok.append(b[:, 3])
    a, b = torch.cat(plain_len), torch.cat(refill_len)
    se = ((a.var() + b.var()) / len(a)).sqrt()
    assert abs(a.mean() - b.mean()) < 4 * se, (a.mean(), b.mean(), se)


def test_refill_rejects_synced_gpus(setup):
    model, tokenizer, ids, mask, kw = setup
    with pytest.raises(ValueError, match="synced_gpus"):
        generate_responses_refill(model, ids, mask, **kw, synced_gpus=True)


@pytest.mark.parametrize("refill", [False, True])
def test_growing_kv_cache_samples_the_same_tokens(setup, monkeypatch, refill):
    """The in-place KV cache changes no sampled token: the same seeds give the same rows as HF's own
    DynamicCache, also when the buffer has to grow every few steps (KV_CHUNK 3)."""
    from transformers.cache_utils import DynamicLayer

    import rollout

    model, tokenizer, ids, mask, kw = setup
    generate = generate_responses_refill if refill else generate_responses
    assert isinstance(rollout.growing_kv_cache(model).layers[0], rollout.GrowingLayer)
    monkeypatch.setattr(rollout, "KV_CHUNK", 3)
    ours = generate(model, ids, mask, **kw, stop_strings=STOP_STRINGS, seeds=[5])
    monkeypatch.setattr(rollout, "GrowingLayer", DynamicLayer)  # growing_kv_cache now builds HF's own layers
    assert type(rollout.growing_kv_cache(model).layers[0]) is DynamicLayer
    hf = generate(model, ids, mask, **kw, stop_strings=STOP_STRINGS, seeds=[5])
    assert ours.shape[1] > 20 and torch.equal(ours, hf)


def test_growing_layer_matches_dynamic_layer(monkeypatch):
    """Keys and values after every update equal DynamicLayer's, across regrowth and after the operations that
    replace them (crop, batch select, repeat, reset); values may have their own head width."""
    from transformers.cache_utils import DynamicLayer

    import rollout

    monkeypatch.setattr(rollout, "KV_CHUNK", 2)
    g = torch.Generator().manual_seed(0)
    ours, ref = rollout.GrowingLayer(), DynamicLayer()

    def step(n: int, batch: int = 3):
        k, v = torch.randn(batch, 2, n, 4, generator=g), torch.randn(batch, 2, n, 5, generator=g)
        (k1, v1), (k2, v2) = ours.update(k, v), ref.update(k, v)
        assert torch.equal(k1, k2) and torch.equal(v1, v2)

    for n in (5, 1, 1, 3, 1):
        step(n)
    for op in (lambda layer: layer.crop(-2), lambda layer: layer.batch_select_indices(torch.tensor([2, 0]))):
        op(ours), op(ref)
        step(1, batch=2 if ours.keys.shape[0] == 2 else 3)
    step(4, batch=2)
    ours.batch_repeat_interleave(2), ref.batch_repeat_interleave(2)
    step(1, batch=4)
    ours.reset(), ref.reset()
    step(2, batch=1)
    assert ours.get_seq_length() == ref.get_seq_length() == 2


def test_growing_layer_releases_its_buffer_when_rows_are_dropped():
    """After a row selection (what refill does between calls) the old full-batch buffer is freed, not kept
    alive next to the selected copy; the next update makes a buffer for the kept rows only."""
    import gc
    import weakref

    from rollout import GrowingLayer

    layer = GrowingLayer()
    for n in (7, 1, 1):
        layer.update(torch.randn(4, 2, n, 8), torch.randn(4, 2, n, 8))
    old = weakref.ref(layer.key_buffer)
    assert layer.key_buffer.shape[-2] > layer.get_seq_length()  # it has spare positions
    layer.batch_select_indices(torch.tensor([1, 3]))
    gc.collect()
    assert old() is None and layer.keys.shape == (2, 2, 9, 8)
    keys, _ = layer.update(torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8))
    assert keys.shape == (2, 2, 10, 8) and layer.key_buffer.shape[0] == 2


def test_refill_stop_ignores_a_late_check_after_ending_the_call():
    """Where HF checks the stop a step late (MPS), the criterion is asked once more after it ended the
    call, with pad (= EOS here) in every row: rows that were still running must stay unfinished."""
    from rollout import RefillStop

    stop = RefillStop(keep=2, stop_token_ids=[1])
    prefix = torch.zeros(4, 2, dtype=torch.long)
    assert stop(torch.cat([prefix, torch.tensor([[1], [5], [6], [7]])], 1), None).tolist() == [
        True, False, False, False]
    assert stop(torch.cat([prefix, torch.tensor([[1, 1], [5, 1], [6, 6], [7, 7]])], 1), None).all()  # 2 left: end
    assert stop(torch.cat([prefix, torch.tensor([[1, 1, 1], [5, 1, 1], [6, 6, 1], [7, 7, 1]])], 1), None).all()
    assert stop.finished.tolist() == [True, True, False, False]


def test_growing_kv_cache_leaves_other_caches_to_hf():
    """Sliding-window layers stay HF's; a cache implementation in the generation config, or layers with
    state other than keys and values (convolutions), get no cache from us at all."""
    from types import SimpleNamespace

    from transformers import GenerationConfig, Lfm2Config, LlamaConfig, MistralConfig
    from transformers.cache_utils import DynamicSlidingWindowLayer

    from rollout import GrowingLayer, growing_kv_cache

    kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
              intermediate_size=64, vocab_size=50)
    model = lambda config, **gen: SimpleNamespace(config=config, generation_config=GenerationConfig(**gen))  # noqa: E731
    cache = growing_kv_cache(model(LlamaConfig(**kw)))
    assert [type(layer) for layer in cache.layers] == [GrowingLayer, GrowingLayer]
    cache = growing_kv_cache(model(MistralConfig(sliding_window=8, **kw)))
    assert [type(layer) for layer in cache.layers] == [DynamicSlidingWindowLayer, DynamicSlidingWindowLayer]
    assert growing_kv_cache(model(LlamaConfig(**kw), cache_implementation="static")) is None
    assert growing_kv_cache(model(Lfm2Config(layer_types=["conv", "full_attention"], **kw))) is None


@pytest.mark.parametrize("which", ["conv layers", "static cache"])
def test_refill_falls_back_to_plain_generate(which):
    """Models refill cannot drop rows from, or whose generation config asks for a cache implementation,
    sample exactly as plain generate (same seeds, same rows) instead of failing."""
    from transformers import Lfm2Config, Lfm2ForCausalLM, LlamaConfig, LlamaForCausalLM

    kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
              intermediate_size=64, vocab_size=64, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    if which == "conv layers":
        model = Lfm2ForCausalLM(Lfm2Config(layer_types=["conv", "full_attention"], bos_token_id=2, **kw)).eval()
    else:
        model = LlamaForCausalLM(LlamaConfig(**kw)).eval()
        model.generation_config.cache_implementation = "static"

    def eos_about_a_quarter(module, inputs, logits):  # near-uniform logits over 64 tokens: P(EOS) ~ 0.24
        logits = logits.clone()
        logits[..., 1] = 3.0
        return logits

    model.get_output_embeddings().register_forward_hook(eos_about_a_quarter)
    ids, mask = left_pad([[5, 6, 7], [8, 9, 10, 11, 12]], 0)
    gen = dict(num_generations=4, max_new_tokens=16, temperature=1.0, top_p=1.0, top_k=0, stop_token_ids=[1],
               pad_token_id=0, seeds=[4])
    plain = generate_responses(model, ids, mask, **gen)
    assert len(set(stop_positions(plain, [1])[0].tolist())) > 3  # spread lengths: a refill would have happened
    assert torch.equal(generate_responses_refill(model, ids, mask, **gen), plain)


@pytest.mark.parametrize("refill", [False, True])
def test_sampling_ignores_the_checkpoints_generation_settings(tiny_base, tmp_path, refill):
    """A checkpoint whose generation_config bans the likeliest token, penalises repeats, forbids repeated
    n-grams and an early EOS, and narrows top-k/top-p: training still samples from softmax(logits / T)
    (first-token frequencies over 3000 samples), and the settings it set aside are reported."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data.loading import format_prompt
    from rollout import prepare_for_sampling

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    ids = torch.tensor([tokenizer(format_prompt("What is 7 + 8?"))["input_ids"]])
    with torch.no_grad():
        probs = torch.softmax(model(ids).logits[0, -1] / 0.7, dim=-1)
    top = int(probs.argmax())
    assert probs[top] > 0.2  # banning it would change the distribution a lot
    model.generation_config.update(repetition_penalty=3.0, no_repeat_ngram_size=1, min_new_tokens=4, top_k=2,
                                   top_p=0.3, temperature=0.1, bad_words_ids=[[top]], do_sample=False)
    logged = []
    stop_ids = prepare_for_sampling(tokenizer, model, log=logged.append)
    assert "bad_words_ids" in logged[0] and "repetition_penalty" in logged[0]
    generate = generate_responses_refill if refill else generate_responses
    torch.manual_seed(0)
    out = generate(model, ids, torch.ones_like(ids), num_generations=3000, max_new_tokens=1, temperature=0.7,
                   top_p=1.0, top_k=0, stop_token_ids=stop_ids, pad_token_id=tokenizer.pad_token_id)
    freq = torch.bincount(out[:, 0], minlength=len(probs)).float() / len(out)
    assert 0.5 * (freq - probs).abs().sum() < 0.05  # total variation; a banned top token would give > 0.2


def test_a_plain_checkpoint_has_no_generation_settings_to_report(tiny_base):
    from transformers import AutoModelForCausalLM

    from rollout import neutral_generation_config

    assert neutral_generation_config(AutoModelForCausalLM.from_pretrained(tiny_base)) == []


@pytest.mark.parametrize("generation", [None, dict(eos_token_id=[2, 7], top_k=5, repetition_penalty=1.3)],
                         ids=["from-config-json", "own-file"])
def test_what_the_engine_reads_of_the_model_is_what_the_hf_model_holds(tiny_base, tmp_path, generation):
    """With the vLLM engine, evaluation and curation load a stand-in without weights (`load_sampling_model`);
    its stop ids and the settings set aside are those of the HF model, for a checkpoint's own
    generation_config.json and for one without that file (taken from config.json, as from_pretrained does)."""
    import json

    from transformers import AutoTokenizer

    from rollout import load_sampling_model, prepare_for_sampling

    for f in Path(tiny_base).iterdir():
        if f.name != "generation_config.json":
            (tmp_path / f.name).symlink_to(f)
    if generation:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    got = {}
    for engine in ("hf", "vllm"):
        model, logged = load_sampling_model(str(tmp_path), engine), []
        ids = prepare_for_sampling(AutoTokenizer.from_pretrained(tmp_path), model, log=logged.append)
        got[engine] = (ids, logged, model.generation_config.to_diff_dict(), model.config.max_position_embeddings)
    assert isinstance(load_sampling_model(str(tmp_path)), torch.nn.Module)
    assert not hasattr(load_sampling_model(str(tmp_path), "vllm"), "parameters")
    assert got["vllm"] == got["hf"]
    if generation:
        assert got["hf"][0] == sorted({2, 7, got["hf"][0][0]}) and "repetition_penalty" in got["hf"][1][0]


@pytest.mark.parametrize("config_name,model_name,scaling", [
    ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 8.0}),  # divides the head's output
    ("GraniteMoeConfig", "GraniteMoeForCausalLM", {"logits_scaling": 8.0}),
    ("HyperCLOVAXConfig", "HyperCLOVAXForCausalLM", {"logits_scaling": 0.25}),  # multiplies it
    ("FalconH1Config", "FalconH1ForCausalLM", {"lm_head_multiplier": 3.0}),
    ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.25}),
])
def test_chunked_logprobs_of_models_that_scale_their_logits_are_those_of_their_logits(config_name, model_name,
                                                                                      scaling):
    """A model that transforms its head's output gets the log-probs of its own logits: the chunked head
    sees the transform (its output comes back changed) and the call is made again with the full logits."""
    import warnings

    import transformers

    from utils import position_ids_from_mask

    config = getattr(transformers, config_name)(vocab_size=50, hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                                                max_position_embeddings=64, **scaling)
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).eval()
    ids = torch.randint(1, 50, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    expected, _ = logprobs_from_logits(logits[:, -5:-1], ids[:, -4:], 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got, _ = forward_logprobs(model, ids, mask, 4, 1.0)
    torch.testing.assert_close(got, expected)
    assert output_head(model) is None  # remembered: no chunks for this model from now on


@pytest.mark.parametrize("refill", [False, True])
def test_sampler_logprobs_match_the_trainers(setup, refill):
    """The log-prob `generate` sampled each token with (SamplerLogprobs) equals the trainer's recomputed
    one, softmax(logits / T), on every response token up to its stop (fp32, same model: only batch-shape
    rounding apart), and recording it changes no sampled token."""
    model, tokenizer, ids, mask, kw = setup
    kw = {**kw, "temperature": 0.7}
    fn = generate_responses_refill if refill else generate_responses
    out = {}
    plain = fn(model, ids, mask, **kw, stop_strings=STOP_STRINGS, seeds=[5])
    recorded = fn(model, ids, mask, **kw, stop_strings=STOP_STRINGS, seeds=[5], logprobs_out=out)
    assert torch.equal(plain, recorded)
    assert out["logprobs"].shape == recorded.shape
    lengths, _ = stop_positions(recorded, kw["stop_token_ids"], STOP_STRINGS, tokenizer)
    response_mask = response_mask_from_lengths(lengths, recorded.shape[1])
    prompt_ids, prompt_mask = ids.repeat_interleave(6, 0), mask.repeat_interleave(6, 0)
    trainer, _ = forward_logprobs(model, torch.cat([prompt_ids, recorded], 1),
                                  torch.cat([prompt_mask, response_mask.long()], 1), recorded.shape[1], 0.7)
    diff = (out["logprobs"] - trainer).abs() * response_mask
    assert response_mask.sum() > 50 and diff.max() < 1e-4, diff.max()
    assert (out["logprobs"] * response_mask <= 0).all() and (out["logprobs"][response_mask.bool()] < -1e-3).any()


def test_a_model_directory_must_hold_a_causal_lm_safetensors_and_a_tokenizer(tmp_path, tiny_base):
    """Checked before the output directory is touched: an encoder trained as a policy without a word (it
    attends both ways), a directory with only config.json used to fail in a traceback after the lock."""
    import shutil

    from transformers import BertConfig, BertForMaskedLM

    from rollout import model_problems

    assert model_problems(str(tiny_base)) == []
    tokenizer_files = [p for p in tiny_base.iterdir() if p.name.startswith(("tokenizer", "special_tokens"))]
    bert = tmp_path / "bert"
    BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32)).save_pretrained(bert)
    for f in tokenizer_files:
        shutil.copy(f, bert)
    assert model_problems(str(bert)) == [f"--model {bert}: a BertForMaskedLM (config.json), not a causal language "
                                         "model: the policy must be one that AutoModelForCausalLM loads (such as "
                                         "LlamaForCausalLM)"]
    only_config = tmp_path / "only-config"
    only_config.mkdir()
    shutil.copy(tiny_base / "config.json", only_config)
    assert model_problems(str(only_config)) == [
        f"--model {only_config}: no .safetensors weights in this directory",
        f"--model {only_config}: no tokenizer in this directory (tokenizer.json or tokenizer_config.json)"]
    (only_config / "pytorch_model.bin").write_bytes(b"pickled")
    for f in tokenizer_files:
        shutil.copy(f, only_config)
    assert model_problems(str(only_config)) == [
        f"--model {only_config}: no .safetensors weights in this directory (pytorch_model.bin is pickled, which is "
        "not loaded: save the model with safe_serialization)"]
    t5 = tmp_path / "t5"
    t5.mkdir()
    (t5 / "config.json").write_text('{"model_type": "t5", "is_encoder_decoder": true}')
    assert "a model_type t5 (config.json), not a causal language model" in model_problems(str(t5))[0]


def test_an_encoder_is_refused_before_the_output_directory_is_claimed(tmp_path, tiny_base):
    from conftest import run_script
    from transformers import BertConfig, BertForMaskedLM

    bert = tmp_path / "bert"
    BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32)).save_pretrained(bert)
    out = tmp_path / "run"
    result = run_script("train_grpo.py", "--model", str(bert), "--output-dir", str(out), timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: --model {bert}: a BertForMaskedLM")
    assert not (out / ".lock").exists()
