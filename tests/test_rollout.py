"""Numerical tests of rollout.py and the padding/whitening helpers of utils.py: the training forward pass
replays the sampling distribution, micro-batched log-probs, stop handling (ids, pad == EOS, stop strings),
left padding, position ids, and masked whitening across simulated processes.

Run: python -m pytest tests/test_rollout.py -q
"""

import math
import threading

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
    logprobs_from_logits,
    output_head,
    plan_micro_batches,
    response_mask_from_lengths,
    stop_positions,
)
from utils import left_pad, masked_whiten, position_ids_from_mask

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
# Padding and position ids
# ---------------------------------------------------------------------------------------------

def test_left_pad():
    ids, mask = left_pad([[1, 2, 3], [4], [], [5, 6]], pad_id=9)
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4], [9, 9, 9], [9, 5, 6]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0], [0, 1, 1]]


def test_position_ids_from_mask():
    # left-padded prompt then a right-padded response: cumsum - 1, clamped at 0
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0],   # cumsum [0,0,1,2,3,4,4,4] - 1 -> [-1,-1,0,1,2,3,3,3]
                         [1, 1, 1, 1, 1, 1, 1, 1],
                         [0, 0, 0, 0, 0, 0, 0, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2, 3, 3, 3],
                                                     [0, 1, 2, 3, 4, 5, 6, 7],
                                                     [0, 0, 0, 0, 0, 0, 0, 0]]


# ---------------------------------------------------------------------------------------------
# masked_whiten
# ---------------------------------------------------------------------------------------------

def test_masked_whiten_hand_computed():
    x = torch.tensor([[1.0, 3.0, 100.0], [5.0, -7.0, -7.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # valid values 1, 3, 5: mean 3, population var (4 + 0 + 4) / 3 = 8/3
    s = (8 / 3) ** 0.5
    expected = torch.tensor([[-2 / s, 0.0, 0.0], [2 / s, 0.0, 0.0]])
    torch.testing.assert_close(masked_whiten(x, mask), expected, atol=1e-6, rtol=0)
    # shift_mean=False keeps the mean: (x - 3) / s + 3
    torch.testing.assert_close(masked_whiten(x, mask, shift_mean=False),
                               torch.tensor([[3 - 2 / s, 3.0, 0.0], [3 + 2 / s, 0.0, 0.0]]), atol=1e-6, rtol=0)


def test_masked_whiten_statistics():
    gen = torch.Generator().manual_seed(0)
    x = 3 + 5 * torch.randn(6, 9, generator=gen)
    mask = (torch.arange(9)[None] < torch.tensor([9, 1, 4, 0, 7, 2])[:, None]).float()
    out = masked_whiten(x, mask)
    valid = out[mask.bool()]
    assert valid.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert valid.var(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    assert torch.all(out[mask == 0] == 0)


def test_masked_whiten_single_token():
    out = masked_whiten(torch.tensor([[4.0, 2.0]]), torch.tensor([[1.0, 0.0]]))
    assert torch.isfinite(out).all()
    assert out.tolist() == [[0.0, 0.0]]


def test_masked_whiten_across_processes():
    """Two threads play two processes; `reduce` is a real all-reduce (sum) between them."""
    gen = torch.Generator().manual_seed(1)
    x = 2 + 3 * torch.randn(6, 5, generator=gen)
    # the halves hold different numbers of tokens (12 vs 6), so per-half statistics differ
    mask = (torch.arange(5)[None] < torch.tensor([5, 4, 3, 1, 2, 3])[:, None]).float()
    halves = [(x[:3], mask[:3]), (x[3:], mask[3:])]
    slots, barrier, outputs = [None, None], threading.Barrier(2), [None, None]

    def all_reduce_for(rank):
        def reduce(t):
            slots[rank] = t
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()  # nobody overwrites a slot before both have read it
            return total
        return reduce

    def worker(rank):
        outputs[rank] = masked_whiten(*halves[rank], reduce=all_reduce_for(rank))

    threads = [threading.Thread(target=worker, args=(rank,)) for rank in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    combined = torch.cat(outputs)
    torch.testing.assert_close(combined, masked_whiten(x, mask), atol=1e-6, rtol=0)
    # independent reference over all valid tokens of both processes
    valid = x[mask.bool()]
    reference = (x - valid.mean()) / valid.std(unbiased=False) * mask
    torch.testing.assert_close(combined, reference, atol=1e-5, rtol=0)
    # the check can fail: whitening each half on its own gives something else
    local = torch.cat([masked_whiten(*h) for h in halves])
    assert (local - combined).abs().max() > 1e-2


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
