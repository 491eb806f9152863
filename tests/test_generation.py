"""`generate_responses_refill`: same rows, grouping, stop and mask rules as `generate_responses`, and the same
tokens as it in its first call when seeded per call."""

import pytest
import torch

from rollout import generate_responses, generate_responses_refill, stop_positions
from utils import left_pad

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
