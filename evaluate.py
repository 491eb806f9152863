"""Evaluate a model on held-out math problems: avg@k, pass@k and maj@k per dataset.

    python evaluate.py --model runs/ppo/policy --datasets math500,aime2024 --num-samples 4 --max-new-tokens 8000
    python evaluate.py --model tiny --datasets synthetic --num-samples 8 --temperature 0.6
    python evaluate.py compare runs/gae-seed0 runs/gae-seed1 --vs runs/grpo-seed0 runs/grpo-seed1

Each problem gets k samples with training's prompt template, ORZ's stop strings and the rule-based reward;
`evaluate_datasets` is also what training's held-out evaluation runs. Writes results.json (per dataset and
per problem, and the pass@k curve for k = 1, 2, 4, ..., N) and completions.jsonl to --output-dir. `compare`
gives the difference of two runs, or two groups of runs, on the same problems with a paired bootstrap
interval (`paired_bootstrap`).
"""

import math
from dataclasses import dataclass, field
from pathlib import Path

from data.loading import DataArgs  # these two do not load torch: rollout still comes first to set the
from reward import RewardArgs  # OpenMP spin count before torch loads (see there)
from rollout import (
    EngineArgs,
    ModelArgs,
    SamplingArgs,
    generate_responses,
    load_sampling_model,
    model_problems,
    prepare_for_sampling,
    resolve_model,
    stop_positions,
)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from `n` samples of which `c` are correct: 1 - C(n-c, k) / C(n, k).

    Chen et al. 2021, "Evaluating Large Language Models Trained on Code" (arXiv:2107.03374), eq. 1, in
    the numerically stable product form of their Figure 3: 1 - prod_{i=n-c+1}^{n} (1 - k / i).
    Examples: (5, 2, 1) -> 0.4; (5, 2, 2) -> 0.7; c = 0 -> 0.0; n - c < k -> 1.0.
    """
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)) or not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs integers 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def same_answer(answer: str, other: str) -> bool:
    """Whether two extracted answers are mathematically equivalent, judged by `reward.math_reward`
    (math-verify plus normalisation, with its cost pre-screen and soft deadline), so `\\frac12` and `0.5`
    agree exactly as the reward would have them agree."""
    from reward import math_reward

    return answer == other or math_reward(f"\\boxed{{{answer}}}", other) >= 1.0


def majority_answer(answers: list[str | None], same=same_answer) -> str | None:
    """The most common answer among samples, counting equivalent answers together (majority voting,
    "self-consistency": Wang et al. 2022, arXiv:2203.11171).

    Each answer joins the first group whose first member it is `same` as; None (no answer) is ignored.
    Ties go to the group that appeared first. Returns that group's first member, or None if no sample
    has an answer. Example: ["1/2", None, "3", "\\frac12", "3", "0.5"] -> "1/2" (3 votes against 2).
    """
    groups: list[list] = []  # [first member, votes]
    for answer in answers:
        if answer is None:
            continue
        group = next((g for g in groups if answer == g[0] or same(answer, g[0])), None)
        if group is None:
            groups.append([answer, 1])
        else:
            group[1] += 1
    if not groups:
        return None
    return max(groups, key=lambda g: g[1])[0]  # max keeps the first of equal counts


def aggregate_eval(per_problem: list[dict]) -> dict:
    """avg@k, pass@k and maj@k over problems, from per-problem counts as `evaluate_datasets` returns them:
    `{"n": samples, "correct": correct samples, "maj_correct": 0 or 1}`.

    avg@k is the mean over problems of correct / n (accuracy averaged over the k samples); pass@k is the
    mean of `pass_at_k(n, correct, k)`; maj@k the share of problems whose majority answer is right.
    k is the smallest n (every problem has the same n in an eval). Returns {"avg@k": .., "pass@k": ..,
    "maj@k": .., "problems": P, "k": k} with k written out, e.g. "avg@4".
    """
    if not per_problem:
        raise ValueError("aggregate_eval: no problems to aggregate")
    bad = next((p for p in per_problem if not (0 <= p.get("correct", -1) <= p.get("n", 0))), None)
    if bad is not None:
        raise ValueError(f"aggregate_eval: need n >= 1 and 0 <= correct <= n per problem, got {bad}")
    k, count = min(p["n"] for p in per_problem), len(per_problem)
    return {f"avg@{k}": sum(p["correct"] / p["n"] for p in per_problem) / count,
            f"pass@{k}": sum(pass_at_k(p["n"], p["correct"], k) for p in per_problem) / count,
            f"maj@{k}": sum(p["maj_correct"] for p in per_problem) / count,
            "problems": count, "k": k, "pass_at": pass_at_k_curve(per_problem)}


def pass_at_k_curve(per_problem: list[dict]) -> dict[str, float]:
    """pass@k for k = 1, 2, 4, ... up to the smallest n, and n itself: {"1": .., "2": .., ..., "n": ..}, the
    mean over problems of the unbiased `pass_at_k`. RL is reported to raise pass@1 while lowering pass@k at
    large k (Yue et al. 2025, arXiv:2504.13837): the curve of a base model and of its RL checkpoint shows
    whether that happened. pass@1 is avg@n. Example: counts (n=4, c=1) and (n=4, c=0) give
    {"1": 0.125, "2": 0.25, "4": 0.5}."""
    n = min(p["n"] for p in per_problem)
    ks = sorted({2 ** i for i in range(n.bit_length()) if 2 ** i <= n} | {n})
    return {str(k): sum(pass_at_k(p["n"], p["correct"], k) for p in per_problem) / len(per_problem) for k in ks}


def paired_bootstrap(a, b, *, resamples: int = 10_000, level: float = 0.95, seed: int = 0) -> dict:
    """The difference of mean per-problem score between two runs, or two groups of runs, with a bootstrap
    interval: resample the problems (the same ones for both sides: paired) and, within each group, its
    runs; the interval is the percentiles of the resampled differences.

    a, b: (runs, P) or (P,) per-problem scores (e.g. avg@k), the same P problems in the same order. The
    problem level is the paired bootstrap of evaluation studies (Efron & Tibshirani 1993, ch. 13); the run
    level adds seed variance, which Hochlehnert et al. 2025 (arXiv:2504.07086) find as large as many
    reported gains. scipy.stats.bootstrap resamples one level only, hence this. With one run per side it
    is the plain paired bootstrap: 100 problems, a - b = 1 on half of them and 0 on the rest, gives 0.5
    and about (0.40, 0.60), the binomial quantiles.
    Returns {"diff": mean(a) - mean(b), "mean_a", "mean_b", "low", "high", "excludes_zero", "level", "problems",
    "runs": (ra, rb)}.
    """
    import numpy as np

    a, b = np.atleast_2d(np.asarray(a, dtype=float)), np.atleast_2d(np.asarray(b, dtype=float))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or a.shape[1] == 0:
        raise ValueError(f"paired_bootstrap needs scores of the same problems on both sides, got shapes {a.shape} "
                         f"and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()) or resamples < 1 or not 0 < level < 1:
        raise ValueError("paired_bootstrap needs finite scores, resamples >= 1 and 0 < level < 1")
    rng = np.random.default_rng(seed)
    problems = a.shape[1]
    diffs = np.empty(resamples)
    for i in range(resamples):  # one row of (runs x problems) indices per side; a loop keeps memory flat
        cols = rng.integers(0, problems, problems)
        rows_a, rows_b = rng.integers(0, len(a), len(a)), rng.integers(0, len(b), len(b))
        diffs[i] = a[np.ix_(rows_a, cols)].mean() - b[np.ix_(rows_b, cols)].mean()
    low, high = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    return {"diff": float(a.mean() - b.mean()), "mean_a": float(a.mean()), "mean_b": float(b.mean()),
            "low": float(low), "high": float(high),
            "excludes_zero": bool(low > 0 or high < 0), "level": level, "problems": problems,
            "runs": (len(a), len(b))}


def problem_scores(path: str | Path, dataset: str | None = None, step: int | None = None) -> dict:
    """{problem key: correct / n} of one evaluation: a training run's directory (its eval_problems.jsonl,
    the last evaluation unless `step`), or `python evaluate.py`'s output directory or results.json. The key
    is "dataset/id"; `dataset` keeps one set. Raises ValueError with one line naming the path."""
    import json

    path = Path(path)
    if (path / "eval_problems.jsonl").is_file():
        rows = [json.loads(line) for line in (path / "eval_problems.jsonl").read_text().splitlines() if line.strip()]
        rows = [r for r in rows if step is None or r["step"] == step]
        if not rows:
            at = f" at step {step}" if step is not None else ""
            raise ValueError(f"{path}: no evaluation{at} in eval_problems.jsonl")
        per_problem = rows[-1]["per_problem"]
    elif (path / "results.json").is_file() or path.suffix == ".json" and path.is_file():
        per_problem = json.loads((path / "results.json" if path.is_dir() else path).read_text())["per_problem"]
    else:
        raise ValueError(f"{path}: neither a run directory with eval_problems.jsonl nor evaluate.py's results.json")
    scores = {f"{name}/{p['id']}": p["correct"] / p["n"] for name, rows in per_problem.items()
              if dataset is None or name == dataset for p in rows}
    if not scores:
        raise ValueError(f"{path}: no problems{f' of {dataset}' if dataset else ''}")
    return scores


def compare_runs(group_a: list, group_b: list, **kwargs) -> dict:
    """`paired_bootstrap` of two groups of evaluations (paths as `problem_scores` reads them) on the
    problems every one of them has; kwargs go to `problem_scores` (dataset, step) and the bootstrap."""
    boot = {k: kwargs.pop(k) for k in ("resamples", "level", "seed") if k in kwargs}
    a = [problem_scores(p, **kwargs) for p in group_a]
    b = [problem_scores(p, **kwargs) for p in group_b]
    keys = sorted(set.intersection(*(set(s) for s in a + b)))
    if not keys:
        raise ValueError("the evaluations share no problem: compare runs evaluated on the same set")
    return paired_bootstrap([[s[k] for k in keys] for s in a], [[s[k] for k in keys] for s in b], **boot)


def format_comparison(result: dict, name_a: str = "a", name_b: str = "b") -> str:
    """One line: `a 0.912 vs b 0.871: +0.041 (95% CI +0.012 to +0.070, excludes 0; 512 problems, 3 vs 3 runs)`."""
    verdict = "excludes 0" if result["excludes_zero"] else "includes 0"
    return (f"{name_a} {result['mean_a']:.3f} vs {name_b} {result['mean_b']:.3f}: {result['diff']:+.3f} "
            f"({result['level']:.0%} CI {result['low']:+.3f} to {result['high']:+.3f}, {verdict}; "
            f"{result['problems']} problems, {result['runs'][0]} vs {result['runs'][1]} runs)")


def evaluate_datasets(model, tokenizer, datasets: dict[str, list[dict]], *, pool, generate_kwargs: dict,
                      num_samples: int = 1, batch_size: int = 8, seed: int = 0, score_truncated: bool = False,
                      prompt_template: str = "orz", progress: bool = True, rank: int = 0, world: int = 1,
                      generate=generate_responses, gather=None) -> dict:
    """Sample `num_samples` responses per problem, score them with `pool`, and report avg@k/pass@k/maj@k.

    datasets: name -> records as data/loading.py makes them ({"id", "question", "answer", ...}); a record
        with "prompt_ids" (as train_ppo.load_data adds) is used as is, otherwise its question is formatted
        with `prompt_template` (data.loading.format_prompt) and tokenized.
    pool: a reward.RewardPool (ORZ's rule applies: a truncated response scores 0 unless `score_truncated`).
    generate_kwargs: the keyword arguments of `generate_responses` other than the prompts,
        `num_generations`, `batch_size` and `seeds` (max_new_tokens, temperature, top_p, top_k,
        stop_token_ids, pad_token_id, stop_strings, tokenizer, synced_gpus); `stop_token_ids` and
        `stop_strings` also cut the responses (`stop_positions`), as in training.
    batch_size: prompts per generate call; each call is seeded from (seed, dataset, first prompt's index).
    rank, world: under accelerate, this process samples every `world`-th batch of each dataset, starting at
        batch `rank`. Batches and their seeds are those of one process, so the samples, and the metrics of
        the gathered `per_problem` rows, do not depend on the number of processes. With `synced_gpus`, a
        process short of a batch repeats one and discards it, so that all make the same generate calls.

    generate: the sampler, `rollout.generate_responses` or one with its arguments and result
        (`vllm_engine.generate_responses`, whose `model` is the engine).

    Majority voting uses the final answers of responses that stopped on their own; maj@k is right when
    the first sample carrying the majority answer scored 1. Returns
        {"metrics": {name: aggregate_eval(...), ..., "overall": over all problems pooled},
         "per_problem": {name: [{"id", "n", "correct", "maj_correct", "majority"}, ...]},
         "completions": [{"dataset", "id", "question", "ground_truth", "sample", "response", "answer",
                          "reward", "truncated"}, ...]}.
    Under accelerate, give every process all records with its `rank` and `world`, and `gather`
    (accelerate's gather_object): `per_problem` and the metrics are then every process's.
    """
    from tqdm.auto import tqdm

    from data.loading import format_prompt
    from reward import final_answer  # what math_reward compares: the last box, or a list of joined boxes
    from utils import left_pad

    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be >= 1, got {num_samples} and {batch_size}")
    temperature = generate_kwargs.get("temperature", 1.0)  # None: the checkpoint's own settings
    if temperature is not None and temperature <= 0 and num_samples > 1:
        raise ValueError("temperature 0 (greedy) gives identical samples: use num_samples 1")
    stop_ids, stop_strings = generate_kwargs["stop_token_ids"], generate_kwargs.get("stop_strings")
    per_problem, completions = {}, []
    bar = tqdm(total=sum(len(r) for r in datasets.values()), desc="eval", unit="problem", disable=not progress)
    for d, (name, records) in enumerate(datasets.items()):
        per_problem[name] = []
        starts = list(range(0, len(records), batch_size))
        mine = starts[rank::world]
        calls = -(-len(starts) // world) if generate_kwargs.get("synced_gpus") else len(mine)
        for call in range(calls):
            start = mine[call] if call < len(mine) else (mine or starts)[0]  # a repeat, discarded below
            chunk = records[start:start + batch_size]
            prompts = [r["prompt_ids"] if "prompt_ids" in r else
                       tokenizer(format_prompt(r["question"], prompt_template, tokenizer))["input_ids"] for r in chunk]
            ids, mask = left_pad(prompts, tokenizer.pad_token_id)
            out = generate(model, ids, mask, num_generations=num_samples, batch_size=batch_size,
                                     seeds=[seed * 1_000_003 + d * 100_003 + start], **generate_kwargs)
            if call >= len(mine):
                continue
            lengths, truncated = stop_positions(out, stop_ids, stop_strings, tokenizer)
            texts = tokenizer.batch_decode([row[:n] for row, n in zip(out.tolist(), lengths.tolist(), strict=True)],
                                           skip_special_tokens=True)
            truths = [r["answer"] for r in chunk for _ in range(num_samples)]
            extras = [r.get("extras") or {} for r in chunk for _ in range(num_samples)]
            rewards, _ = pool.score(texts, truths, extras)
            if not score_truncated:
                rewards = [0.0 if cut else x for x, cut in zip(rewards, truncated.tolist(), strict=True)]
            for j, r in enumerate(chunk):
                rows = range(j * num_samples, (j + 1) * num_samples)
                answers = [final_answer(texts[i]) for i in rows]
                votes = [None if truncated[i] else a for i, a in zip(rows, answers, strict=True)]
                majority = majority_answer(votes)
                maj_correct = majority is not None and rewards[rows[votes.index(majority)]] >= 1.0
                per_problem[name].append({"id": r["id"], "n": num_samples,
                                          "correct": sum(rewards[i] >= 1.0 for i in rows),
                                          "maj_correct": int(maj_correct), "majority": majority})
                completions += [{"dataset": name, "id": r["id"], "question": r["question"], "ground_truth": r["answer"],
                                 "sample": s, "response": texts[i], "answer": answers[s], "reward": rewards[i],
                                 "truncated": bool(truncated[i])} for s, i in enumerate(rows)]
            bar.update(len(chunk))
    bar.close()
    per_problem = {name: gather(rows) for name, rows in per_problem.items()} if gather else per_problem
    metrics = {name: aggregate_eval(rows) for name, rows in per_problem.items() if rows}
    pooled = [p for rows in per_problem.values() for p in rows]
    if pooled:
        metrics["overall"] = aggregate_eval(pooled)
    return {"metrics": metrics, "per_problem": per_problem, "completions": completions}


@dataclass
class EvalArgs(RewardArgs, EngineArgs, SamplingArgs, DataArgs, ModelArgs):
    """Arguments of `python evaluate.py`: the model, data, sampling and reward arguments every command
    shares (parsed by cli.parse_args, like train_ppo.Args), then evaluation's own."""

    datasets: str = field(default="math500", metadata={
        "group": "model and data",
        "help": "comma-separated: math500, aime2024, synthetic, or any file/dir/hub dataset data/loading.py reads"})
    split: str = field(default="test", metadata={"help": "split of a dataset directory or hub dataset"})
    limit: int = field(default=0, metadata={"help": "first N problems of each dataset (0: all)"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    num_samples: int = field(default=4, metadata={
        "group": "evaluation", "help": "samples per problem (k of avg@k, pass@k, maj@k)"})
    batch_size: int = field(default=8, metadata={"help": "prompts per generate call"})
    checkpoint_sampling: bool = field(default=False, metadata={
        "help": "sample as the checkpoint's generation_config says (its temperature, top-k/top-p, repetition "
                "penalty...: the settings a model card reports with), ignoring --temperature/--top-p/--top-k; "
                "off: softmax(logits / T) only, as training samples"})
    output_dir: str = field(default="runs/eval", metadata={"help": "where results.json and completions.jsonl go"})
    overwrite: bool = field(default=False, metadata={
        "help": "replace an evaluation already in --output-dir (without it, one there stops the command)"})


def load_eval_datasets(args: EvalArgs) -> dict[str, list[dict]]:
    """name -> records for each of `args.datasets`, read by data.loading.load_dataset as training reads
    them ("synthetic" is the built-in task's --split, by default the 512 held-out problems)."""
    from data.loading import DataError, load_dataset

    names = [s.strip() for s in args.datasets.split(",") if s.strip()]
    if not names:
        raise SystemExit("error: --datasets is empty")
    out = {}
    for spec in names:
        try:
            records = load_dataset(spec, args.split, seed=args.seed, difficulty=args.synthetic_difficulty,
                                   question_field=args.question_field, answer_field=args.answer_field)
        except (DataError, ValueError) as err:
            raise SystemExit(f"error: {err}") from None
        out[spec] = records[:args.limit] if args.limit else records
    return out


def format_eval_table(metrics: dict) -> str:
    """A plain-text table: one row per dataset (and "overall"), columns problems, avg@k, pass@k, maj@k."""
    k = next(iter(metrics.values()))["k"]
    cols = [f"avg@{k}", f"pass@{k}", f"maj@{k}"]
    width = max(12, *(len(name) for name in metrics))
    lines = [f"{'dataset':<{width}} {'problems':>8} " + " ".join(f"{c:>8}" for c in cols)]
    lines += [f"{name:<{width}} {m['problems']:>8} " + " ".join(f"{m[c]:>8.3f}" for c in cols)
              for name, m in metrics.items()]
    curves = {name: m["pass_at"] for name, m in metrics.items() if len(m.get("pass_at", {})) > 1}
    if curves:
        ks = list(next(iter(curves.values())))
        lines += ["", f"{'pass@k':<{width}} " + " ".join(f"{'k=' + k:>7}" for k in ks)]
        lines += [f"{name:<{width}} " + " ".join(f"{curve[k]:>7.3f}" for k in ks) for name, curve in curves.items()]
    return "\n".join(lines)


def main(args: EvalArgs) -> dict:
    """`python evaluate.py`: load the model and datasets, run `evaluate_datasets` with training's
    prompt template, --stop-strings (ORZ's by default) and --reward, print the table, write results.json and
    completions.jsonl to --output-dir. Returns the metrics."""
    import json
    from dataclasses import asdict

    from accelerate.utils import set_seed
    from transformers import AutoConfig, AutoTokenizer

    from data.loading import context_problems
    from reward import RewardPool, reward_problems
    from utils import JsonlWriter, number_problems
    from vllm_engine import engine_problems, sampler

    problems = number_problems(args)
    if problems:
        raise SystemExit("error: " + "; ".join(problems))
    if args.num_samples < 1 or args.max_new_tokens < 1 or args.batch_size < 1 or args.limit < 0:
        raise SystemExit("error: --num-samples, --max-new-tokens and --batch-size must be >= 1, --limit >= 0")
    if args.temperature < 0 or (args.temperature == 0 and args.num_samples > 1):
        raise SystemExit("error: --temperature must be >= 0, and 0 (greedy) needs --num-samples 1")
    problems = model_problems(args.model) + reward_problems(args.reward) + engine_problems(args)  # before it loads
    if (Path(args.output_dir) / "results.json").exists() and not args.overwrite:
        problems.append(f"--output-dir {args.output_dir} holds an evaluation (results.json): name another, or "
                        "--overwrite to replace it")
    if problems:
        raise SystemExit("error: " + problems[0])
    datasets = load_eval_datasets(args)
    set_seed(args.seed)  # Python's, NumPy's and torch's generators
    model_path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=args.trust_remote_code)
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=args.trust_remote_code)
    problems = context_problems(config, args.max_new_tokens)
    if problems:
        raise SystemExit("error: " + problems[0])
    model = load_sampling_model(model_path, args.rollout_engine, args.trust_remote_code)
    stop_ids = prepare_for_sampling(tokenizer, model, checkpoint_settings=args.checkpoint_sampling)
    sampling = (dict(temperature=None, top_p=None, top_k=None) if args.checkpoint_sampling else
                dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k))
    generate_kwargs = dict(max_new_tokens=args.max_new_tokens, **sampling, stop_token_ids=stop_ids,
                           pad_token_id=tokenizer.pad_token_id,
                           stop_strings=args.stop_strings, tokenizer=tokenizer)
    model_or_engine, generate = sampler(args, model, model_path, getattr(config, "max_position_embeddings", 4096))
    with RewardPool(args.reward, num_workers=args.reward_workers, timeout=args.reward_timeout) as pool:
        try:
            result = evaluate_datasets(model_or_engine, tokenizer, datasets, pool=pool, generate=generate,
                                       generate_kwargs=generate_kwargs,
                                       num_samples=args.num_samples, batch_size=args.batch_size, seed=args.seed,
                                       score_truncated=args.score_truncated, prompt_template=args.prompt_template)
        except ValueError as err:  # e.g. DataError from a prompt template
            raise SystemExit(f"error: {err}") from None
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "completions.jsonl").unlink(missing_ok=True)
    writer = JsonlWriter(out / "completions.jsonl")
    for row in result["completions"]:
        writer.write(row)
    writer.close()
    results = {"model": args.model, "args": asdict(args), "metrics": result["metrics"],
               "generation_config": model.generation_config.to_diff_dict(),  # what sampling left to the model
               "per_problem": result["per_problem"]}
    # a lone surrogate in model text (which UTF-8 cannot hold) is written as its JSON escape
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False),
                                        encoding="utf-8", errors="backslashreplace")
    print(format_eval_table(result["metrics"]))
    print(f"wrote {out / 'results.json'} and {out / 'completions.jsonl'}")
    return result["metrics"]


def compare_main(argv: list[str]) -> dict:
    """`python evaluate.py compare RUN [RUN ...] --vs RUN [RUN ...]`: the paired bootstrap of two groups."""
    import argparse

    parser = argparse.ArgumentParser(prog="evaluate.py compare", description=compare_runs.__doc__)
    parser.add_argument("a", nargs="+", help="run directories (eval_problems.jsonl) or evaluate.py outputs")
    parser.add_argument("--vs", nargs="+", required=True, help="the group to compare with")
    parser.add_argument("--dataset", help="one eval set only (default: every problem of every set)")
    parser.add_argument("--step", type=int, help="the evaluation at this step (default: each run's last)")
    parser.add_argument("--resamples", type=int, default=10_000)
    parser.add_argument("--level", type=float, default=0.95)
    args = parser.parse_args(argv)
    try:
        result = compare_runs(args.a, args.vs, dataset=args.dataset, step=args.step, resamples=args.resamples,
                              level=args.level)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    name = lambda paths: Path(paths[0]).name + (f" (+{len(paths) - 1})" if len(paths) > 1 else "")  # noqa: E731
    print(format_comparison(result, name(args.a), name(args.vs)))
    return result


if __name__ == "__main__":
    import sys

    from cli import parse_args

    if sys.argv[1:2] == ["compare"]:
        compare_main(sys.argv[2:])
    else:
        main(parse_args(EvalArgs, prog="evaluate.py", description=__doc__))
