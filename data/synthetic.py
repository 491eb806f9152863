"""The built-in task and the tiny base model the default run and the tests train, all made offline.

The task: arithmetic problems with exact integer answers ("What is 12 + 7?", "Tom has 12 apples and gets
7 more..."), as records shaped like every other dataset (`{"id", "question", "answer", "source",
"extras"}`), so the real ORZ prompt template and the real `math_reward` score them. Problems are keyed by
their operands and operators; a fixed 20% of keys (by hash) form the held-out split, so no held-out
problem is ever seen in pre-training or RL.

The base model: a small Llama-shaped model with a byte-level BPE tokenizer trained on the templated task
text. It is pre-trained on worked examples `" 12 + 7 = 19 </think> <answer> \\boxed{19} </answer>"` in
which the result is right only `p_correct` of the time (otherwise off by a few, or left unboxed). So the
base knows the arithmetic (the right result is the most likely one) but samples it rarely: RL must do
the work of sharpening it, as RL on a real base model does. The result is cached on disk, keyed by every
setting that shapes it, so later runs and tests reuse it.

Why the tokenizer merges across spaces: the ORZ template is ~140 word-level tokens, which would make the
fixed instruction 80% of every sequence and the CPU default 4x slower. BPE trained on the templated
corpus without a word pre-split compresses that fixed text to a few tokens; digits stay single tokens
so that arithmetic stays learnable. It is byte-level, so any text round-trips.
"""

import hashlib
import json
import random
from pathlib import Path

SOURCE = "synthetic"
HELD_OUT_PERCENT = 20
WORD_PROBLEMS = (
    ("{a} + {b}", "{name} has {a} apples and gets {b} more. How many apples does {name} have now?"),
    ("{a} - {b}", "{name} has {a} coins and spends {b}. How many coins are left?"),
)
EXPRESSION_PHRASES = ("What is {expr}?", "Compute {expr}.", "Evaluate {expr}.", "Find the value of {expr}.")
NAMES = ("Tom", "Ana", "Li", "Sam", "Mia")


def problem_key(operands: tuple[int, ...], ops: tuple[str, ...]) -> str:
    return " ".join(str(x) for pair in zip(operands, ops + ("",), strict=True) for x in pair).strip()


def is_held_out(key: str) -> bool:
    """A fixed 20% of problem keys, chosen by hash so the split does not depend on the seed."""
    return int(hashlib.sha256(key.encode()).hexdigest(), 16) % 100 < HELD_OUT_PERCENT


def sample_problem(rng: random.Random, difficulty: int) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Difficulty 1: a + b with operands 0-19; 2: a +/- b with operands 0-99; d >= 3: d operands 0-99, +/-."""
    if difficulty < 1:
        raise ValueError(f"difficulty must be >= 1, got {difficulty}")
    high, n, ops = (19, 2, "+") if difficulty == 1 else (99, max(2, difficulty), "+-")
    operands = tuple(rng.randint(0, high) for _ in range(n))
    return operands, tuple(rng.choice(ops) for _ in range(n - 1))


def evaluate(operands: tuple[int, ...], ops: tuple[str, ...]) -> int:
    total = operands[0]
    for op, x in zip(ops, operands[1:], strict=True):
        total = total + x if op == "+" else total - x
    return total


def phrase(operands, ops, rng: random.Random) -> str:
    expr = problem_key(operands, ops)
    if len(ops) == 1 and rng.random() < 0.3:
        for pattern, text in WORD_PROBLEMS:
            if pattern == f"{{a}} {ops[0]} {{b}}" and (ops[0] == "+" or operands[0] >= operands[1]):
                return text.format(a=operands[0], b=operands[1], name=rng.choice(NAMES))
    return rng.choice(EXPRESSION_PHRASES).format(expr=expr)


def make_synthetic_records(split: str = "train", n: int = 1000, seed: int = 0, difficulty: int = 1) -> list[dict]:
    """`n` problems of one split ("train" or "test"), deterministic in (split, n, seed, difficulty).

    Problems may repeat within the train split when it has fewer distinct keys than `n` (difficulty 1
    has 320); the test split is deduplicated, so its size is min(n, distinct held-out keys).
    """
    if split not in ("train", "test"):
        raise ValueError(f"synthetic split must be 'train' or 'test', got {split!r}")
    rng = random.Random(f"{seed}-{split}-{difficulty}")
    records, seen = [], set()
    for _ in range(200 * n):
        if len(records) == n:
            break
        operands, ops = sample_problem(rng, difficulty)
        key = problem_key(operands, ops)
        if is_held_out(key) != (split == "test") or (split == "test" and key in seen):
            continue
        seen.add(key)
        records.append({"id": len(records), "question": phrase(operands, ops, rng),
                        "answer": str(evaluate(operands, ops)), "source": f"{SOURCE}:{split}",
                        "extras": {"expression": key}})
    if not records:
        raise ValueError(f"synthetic task: no {split} problems at difficulty {difficulty}")
    return records


def worked_response(record: dict, rng: random.Random, p_correct: float) -> str:
    """A response in ORZ's format whose final answer is right with probability `p_correct`.

    The working is always right; the answer habit is sloppy: a wrong answer is the result mis-copied
    by 1-5 (70% of them) or the right result without the box the reward needs (30%). So the base can
    compute but rarely answers well, and what RL must learn generalises to held-out problems. The text
    starts where the prompt's "<think>" ends.
    """
    value = int(record["answer"])
    answer = f"\\boxed{{{value}}}"
    if rng.random() >= p_correct:
        if rng.random() < 0.7:
            answer = f"\\boxed{{{value + rng.choice((-1, 1)) * rng.randint(1, 5)}}}"
        else:
            answer = str(value)
    return f" {record['extras']['expression']} = {value} </think> <answer> {answer} </answer>"


def build_tokenizer(texts: list[str], vocab_size: int = 768):
    """Byte-level BPE over `texts`, digits split one per token; pad and EOS are separate tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # No word split (use_regex=False): see the module docstring.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|pad|>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")


TINY_DEFAULTS = dict(difficulty=1, p_correct=0.3, hidden_size=128, num_layers=4, steps=600,
                     batch_size=64, lr=3e-3, seed=0)
# The hash of model.safetensors of the default base the README's figures were measured with (x86-64 with
# AVX-512, torch 2.13, the versions of constraints.txt). Built with 1 and with 2 threads here it is the same
# (checked on 2026-12-07: the same bytes); a CPU whose kernels round otherwise, or other versions, build
# other weights, with which RL goes elsewhere: a build that differs says so.
BASE_SHA256 = "16762ee803335b2745f5f2e31afb56dd76a05750ec5a082e9142696ca97f7764"
BUILD_THREADS = 2  # the base is built with this many threads whatever the machine (see `_build_tiny_base`)


def tiny_base_path(cache_dir: str | None = None, **overrides) -> Path:
    settings = {**TINY_DEFAULTS, **overrides}
    # The builder's own source is part of the key: editing it can never reuse a stale base.
    code = Path(__file__).read_bytes()
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode() + code).hexdigest()[:12]
    from utils import cache_root

    return (Path(cache_dir) if cache_dir else cache_root()) / f"tiny-base-{digest}"


def build_tiny_base(cache_dir: str | None = None, log=print, progress: bool = True, **overrides) -> Path:
    """Build (or reuse from cache) the tiny base model and tokenizer; returns its directory.

    Processes that need it at once build it once (`utils.build_once`). `log` gets the start and end of a
    build (accelerate's main-process print in the trainer); `progress` shows a progress bar.
    """
    from utils import build_once, saved_model_problem

    path = tiny_base_path(cache_dir, **overrides)
    return build_once(path, lambda tmp: _build_tiny_base(tmp, path, {**TINY_DEFAULTS, **overrides}, log, progress),
                      log, "the tiny base model", check=saved_model_problem)


def _build_tiny_base(tmp: Path, path: Path, settings: dict, log, progress: bool) -> None:
    """Pre-train the tiny base with `settings` and save it to `tmp` (which build_once moves to `path`).

    Pre-training is teacher-forced next-token prediction on the response tokens only, with prompts and
    responses tokenized separately exactly as generation will see them.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from data.loading import format_prompt
    from utils import save_on_this_process

    log(f"building the tiny base model once (cached at {path}) ...")
    rng = random.Random(settings["seed"])
    records = make_synthetic_records("train", 4000, seed=settings["seed"], difficulty=settings["difficulty"])
    examples = [(format_prompt(r["question"]), worked_response(r, rng, settings["p_correct"])) for r in records]
    tokenizer = build_tokenizer([p + r for p, r in examples])
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=settings["hidden_size"], intermediate_size=3 * settings["hidden_size"],
        num_hidden_layers=settings["num_layers"], num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=None,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(settings["seed"])
    model = LlamaForCausalLM(config)
    # Built with as many threads everywhere: float sums depend on the thread count, and machines whose bases
    # differ (by up to 0.22 in a weight) would train from different models under one launch.
    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    try:
        loss = _pretrain(model, tokenizer, examples, settings, rng, progress)
    finally:
        torch.set_num_threads(threads)
    save_on_this_process(model, tmp)  # each machine builds its own cache, on whichever process
    tokenizer.save_pretrained(tmp)
    (tmp / "reasoner_zero_base.json").write_text(json.dumps(settings, indent=2))
    log(f"built the tiny base model: final pre-training loss {loss:.3f}")
    digest = hashlib.sha256((tmp / "model.safetensors").read_bytes()).hexdigest()
    if settings == TINY_DEFAULTS and digest != BASE_SHA256:
        log(f"note: this machine built other weights than the base the README's figures were measured with "
            f"(model.safetensors sha256 {digest[:12]}, there {BASE_SHA256[:12]}): another CPU or other versions "
            "than constraints.txt's; the default runs learn as well, but their accuracies differ from the README's")


def _pretrain(model, tokenizer, examples: list, settings: dict, rng: random.Random, progress: bool) -> float:
    """Teacher-forced pre-training of `model` on `examples` (prompt, response); returns the last loss."""
    import torch
    from tqdm.auto import tqdm

    sequences = [(tokenizer(p)["input_ids"], tokenizer(r)["input_ids"] + [tokenizer.eos_token_id]) for p, r in examples]
    opt = torch.optim.AdamW(model.parameters(), lr=settings["lr"], betas=(0.9, 0.98), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, settings["lr"], total_steps=settings["steps"], pct_start=0.1)
    model.train()
    bar = tqdm(total=settings["steps"], desc="pre-training the tiny base", unit="step", disable=not progress)
    for step in range(settings["steps"]):
        batch = [sequences[rng.randrange(len(sequences))] for _ in range(settings["batch_size"])]
        width = max(len(p) + len(r) for p, r in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (p, r) in enumerate(batch):  # right padding is fine here: no generation in this loop
            ids[i, :len(p) + len(r)] = torch.tensor(p + r)
            labels[i, len(p):len(p) + len(r)] = torch.tensor(r)
            mask[i, :len(p) + len(r)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.update()
        if step % 10 == 0 or step == settings["steps"] - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return loss.item()
