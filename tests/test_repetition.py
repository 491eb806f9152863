"""Tests of the repetition metric in rollout.py: the tail-loop test, the compression test, the share, and
the guard that zeroes the reward of degenerate responses. Hand-made responses, both outcomes.

Run: python -m pytest tests/test_repetition.py -q
"""

import time

import pytest
import torch

from reward import compression_ratio, repetition_flags, repetition_rate, tail_loop_flags, zero_degenerate

NORMAL = " 12 + 7 = 19 </think> <answer> \\boxed{19} </answer>"
COUNTING = " 1, 2, 3, 4, 5, 6"
PARAGRAPH = ("Let me reconsider the problem. We have x + y = 10 and x - y = 2, so adding gives 2x = 12 and x = 6. "
             "Then y = 4, and x y = 24. Checking: 6 + 4 = 10 and 6 - 4 = 2. ")
SOLUTION = (
    "We need the number of positive integers n below 100 such that n^2 + 3n + 2 is divisible by 6. Note that "
    "n^2 + 3n + 2 = (n+1)(n+2), a product of two consecutive integers, so it is always even. So we need "
    "(n+1)(n+2) to be divisible by 3, which happens when n is not a multiple of 3. Check: n = 1 gives 2 * 3 = 6, "
    "divisible; n = 3 gives 4 * 5 = 20, not divisible. Among 1, ..., 99 there are 33 multiples of 3, so the "
    "count is 99 - 33 = 66. </think> <answer> \\boxed{66} </answer>")


def word_ids(texts: list[str]) -> list[list[int]]:
    """A word-level 'tokenizer' shared by the texts: each distinct whitespace-separated word is one id."""
    vocab: dict[str, int] = {}
    return [[vocab.setdefault(w, len(vocab)) for w in t.split()] for t in texts]


def flags_of(texts: list[str], with_texts: bool = True) -> list[bool]:
    return repetition_flags(word_ids(texts), texts=texts if with_texts else None).tolist()


def test_normal_answers_pass():
    texts = [NORMAL, COUNTING, " " + ", ".join(str(i) for i in range(1, 150)), SOLUTION,
             " 1000000 + 2000000 = 3000000 </think> <answer> \\boxed{3000000} </answer>", ""]
    assert flags_of(texts) == [False] * len(texts)
    assert all(compression_ratio(t) > 0.4 for t in texts[2:4])  # ordinary text compresses to ~0.4-0.6


def test_loops_are_flagged():
    texts = [" the" * 30,                 # one-token span, 30 copies
             " = 5" * 10,                 # two-token span
             SOLUTION[:200] + " = 5" * 8,  # a loop at the end of a normal start
             PARAGRAPH * 6]               # cycling paragraphs: longer than max_span words, caught by compression
    assert flags_of(texts) == [True, True, True, True]
    # Without the texts only the tail test runs: the paragraph (40 words) loops 6 times, within max_span.
    assert flags_of(texts, with_texts=False) == [True, True, True, True]
    assert flags_of([PARAGRAPH * 6], with_texts=False) == [True]
    assert repetition_flags(word_ids([PARAGRAPH * 6]), max_span=16).tolist() == [False]  # span too long
    assert repetition_flags(word_ids([PARAGRAPH * 6]), texts=[PARAGRAPH * 6], max_span=16).tolist() == [True]


def test_thresholds_both_ways():
    # A one-token span needs min_loop_tokens (16) copies; a 2-token span needs 4 copies covering 16 tokens.
    assert flags_of([" the" * 15, " the" * 16]) == [False, True]
    assert flags_of([" = 5" * 7, " = 5" * 8]) == [False, True]
    # A longer span needs min_repeats (4) copies.
    unit = " a b c d e f g h i j"
    assert flags_of([unit * 3, unit * 4]) == [False, True]
    # Compression: a 160-character paragraph 4 times is 0.20 (kept), 5 times 0.17 (flagged); too short: kept.
    loose = repetition_flags(word_ids([PARAGRAPH * 4, PARAGRAPH * 5]), texts=[PARAGRAPH * 4, PARAGRAPH * 5],
                             max_span=16)
    assert loose.tolist() == [False, True]
    assert repetition_flags([[1]], texts=["ab" * 100]).tolist() == [False]  # 200 chars < min_chars
    assert repetition_flags([[1]], texts=["ab" * 150]).tolist() == [True]


def test_cut_off_copy_and_stop_after_loop():
    loop = word_ids([" x = 5 ;" * 6])[0]
    assert tail_loop_flags([loop[:-2]]).tolist() == [True]  # truncated inside the last copy
    # A loop that then stopped: the tail ends with the stop, so only the compression test can see it.
    text = " = 5" * 100 + " </answer>"
    ids = word_ids([text])
    assert tail_loop_flags(ids).tolist() == [False]
    assert repetition_flags(ids, texts=[text]).tolist() == [True]


def test_tensor_with_lengths_matches_lists():
    texts = [NORMAL, " the" * 30, " = 5" * 10, COUNTING]
    rows = word_ids(texts)
    width = max(len(r) for r in rows) + 5
    # Padding after each length is a run of one token: it must not count as a loop.
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    lengths = torch.tensor([len(r) for r in rows])
    from_tensor = repetition_flags(ids, lengths, texts=texts)
    assert from_tensor.tolist() == repetition_flags(rows, texts=texts).tolist() == [False, True, True, False]
    assert from_tensor.dtype == torch.bool and from_tensor.shape == (4,)
    # A list with lengths cuts each row; an empty batch is fine.
    assert repetition_flags([r + [0] * 20 for r in rows], lengths.tolist()).tolist() == [False, True, True, False]
    assert repetition_flags([]).tolist() == []
    assert repetition_rate([]) == 0.0
    with pytest.raises(ValueError, match="texts"):
        repetition_flags(rows, texts=texts[:2])


def test_rate_and_guard():
    texts = [NORMAL, " the" * 30, " = 5" * 10, COUNTING]
    assert repetition_rate(word_ids(texts), texts=texts) == 0.5
    flags = repetition_flags(word_ids(texts), texts=texts)
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0])
    assert zero_degenerate(rewards, flags).tolist() == [1.0, 0.0, 0.0, 1.0]
    assert rewards.tolist() == [1.0, 1.0, 0.0, 1.0]  # not modified in place
    assert zero_degenerate([1.0, 1.0, 0.5, 1.0], flags.tolist()) == [1.0, 0.0, 0.0, 1.0]


def test_with_the_tiny_tokenizer(tiny_base):
    """Token ids as a model samples them: a loop repeats the same ids (retokenised text may not)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    texts = [NORMAL, COUNTING, " = 5" * 10, " the" * 30]
    ids = [tok(NORMAL)["input_ids"], tok(COUNTING)["input_ids"], tok(" = 5")["input_ids"] * 10,
           tok(" the")["input_ids"] * 30]
    assert repetition_flags(ids, texts=texts).tolist() == [False, False, True, True]


def test_cheap_for_a_large_batch():
    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (512, 4096))
    ids[:8, -200:] = torch.tensor([7, 8, 9, 10]).repeat(50)  # 8 looping rows
    start = time.perf_counter()
    flags = repetition_flags(ids, torch.full((512,), 4096))
    assert flags.sum().item() == 8 and flags[:8].all()
    assert time.perf_counter() - start < 60  # ~0.2 s here; a hang, not slowness (benchmark.py times speed)
