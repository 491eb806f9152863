"""Curate a training set the ORZ way: keep prompts the model rarely solves, drop repeats, drop eval overlap.

    python -m data.curate difficulty --model tiny --dataset synthetic --num-samples 64 --output hard.jsonl
    python -m data.curate dedup --dataset train.jsonl --output deduped.jsonl
    python -m data.curate contamination --dataset train.jsonl --eval math500,aime2024 [--drop --output clean.jsonl]
    python -m data.curate memorization --model tiny --dataset math500 [--fraction 0.6 --limit 50 --report m.json]

Every output is JSON Lines, one record per problem: {"question", "answer", the source record's other
fields, "source", "source_id"} (+ "pass_rate", "num_samples" from `difficulty`). "question" and "answer"
are the fields data/loading.py reads first, so `python train_ppo.py --dataset hard.jsonl` trains on it, and
"source"/"source_id" keep the first origin through chained curation steps. `contamination` and
`memorization` (which problems the model recites from their first 60%, arXiv:2507.10532) write a JSON report.

Bad input (a missing or empty file, an unknown eval set, a bad option) stops with one line `error: ...`.
"""

import hashlib
import json
import os
import re
import sys
import unicodedata
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from data.loading import DataArgs, DataError, is_synthetic, list_eval_sets
from reward import RewardArgs, reward_problems
from rollout import EngineArgs, ModelArgs, SamplingArgs

# ---------------------------------------------------------------- loading and writing records


def load_dataset(spec: str, args) -> list[dict]:
    """Records of `spec` as training reads them (data.loading.load_dataset: "synthetic" is the built-in
    task's --split), the first --limit of them; a bad spec or file is one line."""
    from data.loading import load_dataset as load

    try:
        records = load(spec, args.split, seed=args.seed, difficulty=args.synthetic_difficulty,
                       question_field=args.question_field, answer_field=args.answer_field)
    except (DataError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    return records[:args.limit] if args.limit else records


def output_record(record: dict, **fields) -> dict:
    """A flat record data/loading.py reads back: question, answer, the source's other fields, its origin."""
    extras = {k: v for k, v in (record.get("extras") or {}).items() if k not in ("question", "answer")}
    row = {"question": record["question"], "answer": record["answer"], **extras}
    row.setdefault("source", record["source"])
    row.setdefault("source_id", record["id"])
    row.update(fields)
    return row


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    """Write `rows` as JSON Lines, atomically (a temporary file, then rename), so the output may be the input."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    # a lone surrogate (which UTF-8 cannot hold) goes out as its JSON escape, as utils.JsonlWriter does
    with open(tmp, "w", encoding="utf-8", errors="backslashreplace") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------- text normalisation

# LaTeX that changes spacing or sizing only: "\,", "\;", "\!", "\quad", "\left(", "\displaystyle" ...
_LATEX_NOISE = re.compile(r"\\[,;:! ]|\\q?quad\b|\\left\b|\\right\b|\\displaystyle\b|\\[dt]frac\b|[$~]")


def normalize_text(text: str) -> str:
    """Lowercase, NFKC, LaTeX spacing/sizing commands and `$` removed (`\\dfrac` -> `\\frac`), whitespace
    collapsed: "Find $x$ if $\\dfrac{x}{2} = 3$." and "find x if \\frac{x}{2}=3" differ only in spaces."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = _LATEX_NOISE.sub(lambda m: "\\frac" if m.group(0).endswith("frac") else " ", text)
    return " ".join(text.split())


def question_key(text: str) -> str:
    """The dedup key: `normalize_text`, no space next to punctuation, no trailing ".?!": so "What is 2+3 ?"
    and "what is 2 + 3" are the same question."""
    text = re.sub(r"\s*([^\w\s])\s*", r"\1", normalize_text(text))
    return text.rstrip(".?! ")


def words(text: str) -> list[str]:
    """The words of `normalize_text(text)`: runs of letters and digits, and the operators + - * / = < > ^ | !
    (so "43 + 70 - 19" and "43 - 70 + 19" differ). Case and other punctuation are ignored, as in GPT-3's
    decontamination (arXiv:2005.14165, appendix C)."""
    return re.findall(r"\w+|[-+*/=<>^|!]", normalize_text(text))


# ---------------------------------------------------------------- difficulty


def _record_key(record: dict) -> str:
    """A short hash of a record's question and answer: a progress file made from other data is detected."""
    return hashlib.sha1(f"{record['question']}\x00{record['answer']}".encode()).hexdigest()[:16]


def _read_progress(path: Path, settings: dict) -> dict[int, dict]:
    """Rows of a progress file by record id; the first line holds the settings they were sampled with.

    A line cut off by a killed run (no final newline) is dropped from the file. Settings that differ from
    this run's stop the run: pass rates from another model or sample count must not be mixed.
    """
    if not path.exists():
        return {}
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]
        path.write_text(text, encoding="utf-8")
    lines = text.splitlines()
    if not lines:
        return {}
    try:
        header, rows = json.loads(lines[0]), [json.loads(line) for line in lines[1:] if line.strip()]
    except json.JSONDecodeError:
        raise SystemExit(f"error: {path}: not a progress file of data.curate (invalid JSON); delete it") from None
    if not isinstance(header, dict) or header.get("settings") != settings:
        old = header.get("settings") if isinstance(header, dict) else None
        changed = sorted(k for k in settings if not isinstance(old, dict) or old.get(k) != settings[k])
        raise SystemExit(f"error: {path} was sampled with other settings ({', '.join(changed) or 'unknown'}); "
                         "delete it or choose another --output")
    return {row["id"]: row for row in rows}


def _load_sampler(model_name: str, trust_remote_code: bool, engine: str = "hf"):
    """Model (a stand-in without weights when the vLLM `engine` samples: `rollout.load_sampling_model`),
    tokenizer and stop ids, exactly as evaluate.py and train_ppo.py build them."""
    from transformers import AutoTokenizer

    from rollout import load_sampling_model, prepare_for_sampling, resolve_model

    path = resolve_model(model_name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = load_sampling_model(path, engine, trust_remote_code)
    except (OSError, ValueError) as err:
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise SystemExit(f"error: --model {model_name}: cannot load: {first}") from None
    return model, tokenizer, prepare_for_sampling(tokenizer, model)


def _sample_pending(pending: list[dict], args, progress_path: Path, initial: int, total: int) -> None:
    """Sample `args.num_samples` responses per pending record with --prompt-template, score them with --reward
    in RewardPool workers (ORZ's rule: a truncated response scores 0 unless --score-truncated), and append one
    progress line per record after each batch. Each batch is seeded from (--seed, its first record's id)."""
    from tqdm.auto import tqdm

    from evaluate import evaluate_datasets
    from reward import RewardPool
    from rollout import resolve_model
    from utils import JsonlWriter
    from vllm_engine import sampler

    model, tokenizer, stop_ids = _load_sampler(args.model, args.trust_remote_code, args.rollout_engine)
    model_or_engine, generate = sampler(args, model, resolve_model(args.model),
                                        getattr(model.config, "max_position_embeddings", 4096))
    generate_kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                           top_k=args.top_k,
                           stop_token_ids=stop_ids, pad_token_id=tokenizer.pad_token_id,
                           stop_strings=args.stop_strings, tokenizer=tokenizer)
    writer = JsonlWriter(progress_path)
    bar = tqdm(total=total, initial=initial, desc="difficulty", unit="prompt")
    with RewardPool(args.reward, num_workers=args.reward_workers, timeout=args.reward_timeout) as pool:
        for start in range(0, len(pending), args.batch_size):
            chunk = pending[start:start + args.batch_size]
            try:
                result = evaluate_datasets(model_or_engine, tokenizer, {"curate": chunk}, pool=pool, generate=generate,
                                           generate_kwargs=generate_kwargs, num_samples=args.num_samples,
                                           batch_size=len(chunk), seed=args.seed * 100_003 + chunk[0]["id"],
                                           score_truncated=args.score_truncated,
                                           prompt_template=args.prompt_template, progress=False)
            except ValueError as err:  # e.g. DataError from a prompt template
                raise SystemExit(f"error: {err}") from None
            cut = Counter(c["id"] for c in result["completions"] if c["truncated"])
            for record, row in zip(chunk, result["per_problem"]["curate"], strict=True):
                writer.write({"id": record["id"], "key": _record_key(record), "correct": int(row["correct"]),
                              "num_samples": row["n"], "pass_rate": row["correct"] / row["n"],
                              "truncated": cut[record["id"]]})
            bar.update(len(chunk))
    bar.close()
    writer.close()


def difficulty(args) -> list[dict]:
    """`difficulty`: each prompt's pass rate over `--num-samples` samples, and the records whose pass rate is in
    [--min-pass, --max-pass], with "pass_rate" and "num_samples", written to --output.

    ORZ (arXiv:2503.24290v2, data curation) keeps the problems its model rarely solves, e.g. at most 4 right
    in 64 samples: --num-samples 64 --max-pass 0.0625 (4/64; the range is inclusive). --min-pass 0 keeps
    never-solved problems too; raise it above 0 to drop those (no learning signal, or a wrong answer key).

    Resumable: per-prompt results are appended to OUTPUT.progress, and a rerun (also with a larger --limit,
    or another pass range) samples only the prompts not in it. Returns the written records.
    """
    if args.num_samples < 1 or args.batch_size < 1 or args.max_new_tokens < 1:
        raise SystemExit("error: --num-samples, --batch-size and --max-new-tokens must be >= 1")
    if not 0.0 <= args.min_pass <= args.max_pass <= 1.0:
        raise SystemExit(f"error: need 0 <= --min-pass <= --max-pass <= 1, got {args.min_pass} and {args.max_pass}")
    if args.temperature <= 0 and args.num_samples > 1:
        raise SystemExit("error: --temperature must be > 0 to draw several different samples")
    if args.model != "tiny" and args.model.startswith((".", "/", "~")) and not Path(args.model).expanduser().exists():
        raise SystemExit(f"error: --model {args.model}: no such path")
    from vllm_engine import engine_problems

    problems = reward_problems(args.reward) + engine_problems(args)  # before any sampling, not at scoring
    if problems:
        raise SystemExit("error: " + problems[0])
    records = load_dataset(args.dataset, args)
    progress_path = Path(args.output + ".progress")
    # What the samples depend on; which data they came from is checked per record (`_record_key`).
    settings = {key: getattr(args, key) for key in ("model", "num_samples", "max_new_tokens", "temperature",
                                                    "prompt_template", "seed", "top_p", "top_k", "reward",
                                                    "score_truncated")}
    done = _read_progress(progress_path, settings)
    for r in records:
        if r["id"] in done and done[r["id"]]["key"] != _record_key(r):
            raise SystemExit(f"error: {progress_path}: record {r['id']} differs from {args.dataset} record {r['id']}; "
                             "the progress file was made from other data: delete it or choose another --output")
    if not progress_path.exists() or progress_path.stat().st_size == 0:
        progress_path.parent.mkdir(parents=True, exist_ok=True)
        progress_path.write_text(json.dumps({"settings": settings}) + "\n", encoding="utf-8")
    pending = [r for r in records if r["id"] not in done]
    print(f"difficulty: {len(records)} prompts, {len(records) - len(pending)} already sampled in {progress_path}, "
          f"{len(pending)} to sample x {args.num_samples}")
    if pending:
        _sample_pending(pending, args, progress_path, len(records) - len(pending), len(records))
        done = _read_progress(progress_path, settings)
    rates = [done[r["id"]]["pass_rate"] for r in records]
    eps = 1e-9  # pass rates are k/n fractions: 4/64 must count as <= 0.0625
    kept = [output_record(r, pass_rate=p, num_samples=done[r["id"]]["num_samples"])
            for r, p in zip(records, rates, strict=True) if args.min_pass - eps <= p <= args.max_pass + eps]
    write_jsonl(args.output, kept)
    never, always = sum(p == 0 for p in rates), sum(p == 1 for p in rates)
    print(f"pass rate: mean {sum(rates) / len(rates):.3f}; never solved {never}, "
          f"sometimes {len(rates) - never - always}, always {always}")
    print(f"kept {len(kept)} of {len(records)} prompts with pass rate in [{args.min_pass:g}, {args.max_pass:g}]: "
          f"wrote {args.output}")
    return kept


# ---------------------------------------------------------------- dedup


def dedup_records(records: list[dict]) -> tuple[list[dict], list[tuple[dict, dict]]]:
    """Keep the first record of each `question_key`; returns (kept, [(dropped, the kept copy), ...])."""
    first: dict[str, dict] = {}
    kept, dropped = [], []
    for r in records:
        key = question_key(r["question"])
        if key in first:
            dropped.append((r, first[key]))
        else:
            first[key] = r
            kept.append(r)
    return kept, dropped


def dedup(args) -> list[dict]:
    """`dedup`: drop records whose normalised question repeats an earlier one; print counts, write --output.
    Returns the written records."""
    records = load_dataset(args.dataset, args)
    kept, dropped = dedup_records(records)
    conflicts = sum(d["answer"].strip() != k["answer"].strip() for d, k in dropped)
    kept = [output_record(r) for r in kept]
    write_jsonl(args.output, kept)
    print(f"dedup: {len(records)} records, {len(kept)} distinct questions: dropped {len(dropped)} duplicates "
          f"({conflicts} with an answer other than the kept copy's); wrote {args.output}")
    return kept


# ---------------------------------------------------------------- contamination


def load_eval_sets(spec: str, args) -> dict[str, list[dict]]:
    """name -> records for a comma-separated list of shipped eval set names or existing files."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise SystemExit("error: --eval is empty")
    shipped = list_eval_sets()
    out = {}
    for name in names:
        if name not in shipped and not is_synthetic(name) and not Path(name).expanduser().exists():
            raise SystemExit(f"error: unknown eval set {name!r}: use {', '.join(shipped)}, or a file that exists")
        spec = "synthetic:test" if name == "synthetic" else name  # the built-in task's held-out split
        out[name] = load_dataset(spec, replace(args, question_field=None, answer_field=None, limit=0, split="test"))
    return out


def _ngrams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def find_overlaps(train: list[dict], evals: dict[str, list[dict]], n: int = 13, threshold: float = 0.5) -> list[dict]:
    """Pairs (training record, eval question) that share word n-grams, GPT-3's decontamination test
    (arXiv:2005.14165, appendix C: 13-grams of lowercased words, punctuation ignored).

    An eval question shorter than n words is matched whole (n = its length), so a short question copied
    into a training question is still found. overlap = shared n-grams / n-grams of the shorter of the two
    texts, i.e. how much of one is contained in the other; pairs with overlap >= threshold are returned as
    {"id", "question", "eval_set", "eval_id", "eval_question", "overlap", "n"}, by training id then overlap.
    """
    entries, index = [], {}  # index: n-gram size -> n-gram -> eval entries holding it
    for name, records in evals.items():
        for r in records:
            tokens = words(r["question"])
            if not tokens:
                continue
            size = min(n, len(tokens))
            grams = _ngrams(tokens, size)
            entries.append((name, r, size, len(grams)))
            for g in grams:
                index.setdefault(size, {}).setdefault(g, []).append(len(entries) - 1)
    hits = []
    for r in train:
        tokens = words(r["question"])
        found = []
        for size, by_gram in index.items():
            grams = _ngrams(tokens, size)
            shared = Counter(e for g in grams for e in by_gram.get(g, ()))
            for e, count in shared.items():
                name, er, _, total = entries[e]
                overlap = count / min(len(grams), total)
                if overlap >= threshold:
                    found.append({"id": r["id"], "question": r["question"], "eval_set": name, "eval_id": er["id"],
                                  "eval_question": er["question"], "overlap": round(overlap, 4), "n": size})
        hits += sorted(found, key=lambda h: -h["overlap"])
    return hits


def default_report_path(dataset: str, kind: str = "contamination") -> Path:
    """Where a command (`kind`) writes its report without --report: beside the dataset, named after it
    (data/train.jsonl -> data/train.contamination.json; a dataset directory d -> d.contamination.json).
    A dataset that is not a local path has no such place: SystemExit with one line."""
    path = Path(dataset).expanduser()
    if dataset.lower().endswith((".json", ".jsonl", ".parquet")) and not path.exists():
        raise SystemExit(f"error: --dataset {dataset}: no such file")
    if is_synthetic(dataset) or not path.exists():
        raise SystemExit(f"error: --dataset {dataset} is not a local file, so there is no place beside it "
                         "for the report: give --report FILE.json")
    return path.with_name((path.stem if path.is_file() else path.name) + f".{kind}.json")


def contamination(args) -> list[dict]:
    """`contamination`: report training records that overlap an eval question (printed and as JSON in
    --report, by default beside the dataset); with --drop, write the other records to --output. Returns the
    overlaps."""
    if args.n < 1 or not 0 < args.threshold <= 1:
        raise SystemExit(f"error: need --n >= 1 and 0 < --threshold <= 1, got {args.n} and {args.threshold}")
    if args.drop != bool(args.output):
        raise SystemExit("error: --drop and --output go together: --drop --output clean.jsonl writes the cleaned set")
    # Not the current directory: a report there is easily lost or overwritten by the next dataset's.
    args.report = args.report or str(default_report_path(args.dataset))
    train = load_dataset(args.dataset, args)
    evals = load_eval_sets(args.eval, args)
    hits = find_overlaps(train, evals, n=args.n, threshold=args.threshold)
    flagged = {h["id"] for h in hits}
    report = {"dataset": args.dataset, "eval_sets": {k: len(v) for k, v in evals.items()}, "n": args.n,
              "threshold": args.threshold, "records": len(train), "flagged_records": len(flagged), "overlaps": hits}
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(json.dumps(report, indent=2, ensure_ascii=False))
    for h in hits[:20]:
        question = " ".join(h["question"].split())
        print(f"  record {h['id']} ~ {h['eval_set']} #{h['eval_id']}: overlap {h['overlap']:.2f} "
              f"({h['n']}-grams)  {question[:70]!r}")
    if len(hits) > 20:
        print(f"  ... {len(hits) - 20} more in {args.report}")
    sizes = ", ".join(f"{k} {v}" for k, v in report["eval_sets"].items())
    print(f"contamination: {len(flagged)} of {len(train)} training records overlap an eval question ({sizes}; "
          f"{args.n}-grams, overlap >= {args.threshold:g}); report: {args.report}")
    if args.drop:
        write_jsonl(args.output, [output_record(r) for r in train if r["id"] not in flagged])
        print(f"dropped {len(flagged)}, wrote {len(train) - len(flagged)} records to {args.output}")
    return hits


# ---------------------------------------------------------------- memorization

MIN_QUESTION_TOKENS = 8  # shorter questions are skipped: a few tokens are reproduced by chance, not memory


def split_question(tokenizer, question: str, fraction: float) -> tuple[list[int], list[int], int]:
    """(prefix ids, remainder ids, cut): the question's n tokens split after the first cut = round(fraction * n).

    The prefix starts with what the tokenizer puts in front by default (Llama's BOS; nothing for the tiny or
    Qwen tokenizers): the model always saw text after it. A suffix it adds (an EOS) belongs to neither part.
    """
    ids = tokenizer(question, add_special_tokens=False)["input_ids"]
    full = tokenizer(question)["input_ids"]
    lead = next((full[:i] for i in range(len(full) - len(ids) + 1) if full[i:i + len(ids)] == ids), [])
    cut = round(fraction * len(ids))
    return lead + ids[:cut], ids[cut:], cut


def greedy_continuations(model, tokenizer, prompts: list[list[int]], lengths: list[int],
                         stop_ids: list[int]) -> list[list[int]]:
    """The greedy continuation of each prompt (token ids, left-padded into one batch with an attention mask),
    lengths[i] tokens, or fewer when the model stops first (a stop token is never text of the question)."""
    import torch

    pad, width = tokenizer.pad_token_id, max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max(lengths),
                             pad_token_id=pad, eos_token_id=stop_ids)
    rows = [row[:n] for row, n in zip(out[:, width:].tolist(), lengths, strict=True)]
    return [row[:next((i for i, t in enumerate(row) if t in stop_ids), len(row))] for row in rows]


def memorization_report_path(model: str, dataset: str) -> Path:
    """Beside a local dataset (`default_report_path`: DATASET.memorization.json); a named eval set (math500),
    the built-in task or a hub dataset has no such place: runs/memorization/MODEL-DATASET.json."""
    if not is_synthetic(dataset) and Path(dataset).expanduser().exists():
        return default_report_path(dataset, "memorization")
    names = [re.sub(r"[^\w.+-]+", "-", s).strip("-") for s in (Path(model.rstrip("/")).name, dataset)]
    return Path("runs", "memorization", f"{names[0].removesuffix('.gguf')}-{names[1]}.json")


def memorization(args) -> dict:
    """`memorization`: which problems the model reproduces from their beginning, the contamination probe of
    arXiv:2507.10532 (Wu et al. 2025): the raw question text (no prompt or chat template) cut after the first
    --fraction of its tokens, greedy-decoded for as many tokens as the rest has (at most
    --max-remainder-tokens: then the first that many are compared).

    A problem counts as memorized ("exact") when the continuation's token ids equal the rest's, or when the
    two decoded texts are equal with whitespace collapsed (other spacing, or the same text in other tokens).
    "prefix_match", the share of the rest's tokens reproduced before the first wrong one, is a graded
    signal next to it. Questions of fewer than 8 tokens, or whose cut leaves an empty prefix or rest, are
    skipped and counted. Rates are over the problems probed. Writes and returns the report.
    """
    from tqdm.auto import tqdm

    if not 0 < args.fraction < 1 or args.batch_size < 1 or args.max_remainder_tokens < 1:
        raise SystemExit(f"error: need 0 < --fraction < 1, --batch-size >= 1 and --max-remainder-tokens >= 1, "
                         f"got {args.fraction}, {args.batch_size} and {args.max_remainder_tokens}")
    args.report = args.report or str(memorization_report_path(args.model, args.dataset))
    records = load_dataset(args.dataset, args)
    model, tokenizer, stop_ids = _load_sampler(args.model, args.trust_remote_code)
    model.eval()
    probes, skipped = [], []
    for r in records:
        prefix, rest, cut = split_question(tokenizer, r["question"], args.fraction)
        n = cut + len(rest)
        reason = (f"{n} tokens, fewer than {MIN_QUESTION_TOKENS}" if n < MIN_QUESTION_TOKENS else
                  "empty prefix" if cut == 0 else "empty remainder" if not rest else None)
        if reason:
            skipped.append({"id": r["id"], "reason": reason})
        else:
            probes.append((r, prefix, rest[:args.max_remainder_tokens], cut))
    probes.sort(key=lambda p: len(p[1]))  # batches of similar length: less padding
    rows = []
    for start in tqdm(range(0, len(probes), args.batch_size), desc="memorization", unit="batch"):
        chunk = probes[start:start + args.batch_size]
        outs = greedy_continuations(model, tokenizer, [p[1] for p in chunk], [len(p[2]) for p in chunk], stop_ids)
        for (r, _, rest, cut), out in zip(chunk, outs, strict=True):
            same = next((i for i, (a, b) in enumerate(zip(out, rest, strict=False)) if a != b), len(out))
            text = tokenizer.decode(out)
            exact_text = " ".join(text.split()) == " ".join(tokenizer.decode(rest).split())
            rows.append({"id": r["id"], "exact": out == rest or exact_text, "exact_tokens": out == rest,
                         "exact_text": exact_text, "prefix_match": round(same / len(rest), 4), "prefix_tokens": cut,
                         "remainder_tokens": len(rest), "continuation": text, "question": r["question"]})
    rows.sort(key=lambda row: row["id"])
    exact = [row for row in rows if row["exact"]]
    mean = sum(row["prefix_match"] for row in rows) / len(rows) if rows else 0.0
    report = {"model": args.model, "dataset": args.dataset, "fraction": args.fraction,
              "max_remainder_tokens": args.max_remainder_tokens,
              "compared": f"the greedy continuation with the rest of the question, at most its first "
                          f"{args.max_remainder_tokens} tokens: token ids, or text with whitespace collapsed",
              "problems": len(records), "probed": len(rows), "skipped": len(skipped), "exact": len(exact),
              "exact_rate": len(exact) / len(rows) if rows else 0.0, "mean_prefix_match": round(mean, 4),
              "skipped_problems": skipped, "per_problem": [{k: v for k, v in row.items() if k != "question"}
                                                           for row in rows]}
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(json.dumps(report, indent=2, ensure_ascii=False))
    for row in exact[:5]:
        print(f"  problem {row['id']}: reproduced {row['remainder_tokens']} tokens  "
              f"{' '.join(row['question'].split())[:70]!r}")
    print(f"memorization: {len(exact)} of {len(rows)} problems of {args.dataset} reproduced exactly from their first "
          f"{args.fraction * 100:g}% (greedy; mean prefix match {mean:.3f}; {len(skipped)} skipped); "
          f"report: {args.report}")
    return report


# ---------------------------------------------------------------- command line


@dataclass
class CurateArgs(DataArgs):
    """The dataset arguments of every command (and DataArgs' field names, as training reads records)."""

    dataset: str = field(kw_only=True, metadata={
        "group": "model and data",
        "help": "file (.json/.jsonl/.parquet), dataset dir or hub name, math500/aime2024, or 'synthetic'"})
    split: str = field(default="train", metadata={"help": "split of a dataset directory or hub dataset"})
    limit: int = field(default=0, metadata={"help": "first N records only (0: all)"})
    seed: int = field(default=0, metadata={"help": "seed of the synthetic task and of sampling"})


@dataclass
class DifficultyArgs(RewardArgs, EngineArgs, SamplingArgs, ModelArgs, CurateArgs):
    """`difficulty`: the model, sampling and reward arguments of training and evaluation, then its own."""

    output: str = field(kw_only=True, metadata={
        "group": "difficulty", "help": "JSON Lines output; progress goes to OUTPUT.progress"})
    num_samples: int = field(default=64, metadata={"help": "samples per prompt (ORZ: 64)"})
    min_pass: float = field(default=0.0, metadata={"help": "keep pass rates >= this"})
    max_pass: float = field(default=0.0625, metadata={"help": "keep pass rates <= this (4/64)"})
    batch_size: int = field(default=8, metadata={"help": "prompts per generate call"})


@dataclass
class DedupArgs(CurateArgs):
    output: str = field(kw_only=True, metadata={"group": "dedup", "help": "JSON Lines output"})


@dataclass
class ContaminationArgs(CurateArgs):
    eval: str = field(default="math500,aime2024", metadata={
        "group": "contamination", "help": "comma-separated: math500, aime2024, or files"})
    n: int = field(default=13, metadata={"help": "n-gram size in words (GPT-3: 13)"})
    threshold: float = field(default=0.5, metadata={"help": "flag when this share of n-grams is shared"})
    report: str | None = field(default=None, metadata={
        "help": "JSON report of the overlaps (default: beside the dataset, DATASET.contamination.json)"})
    drop: bool = field(default=False, metadata={"help": "write the records without overlap to --output"})
    output: str | None = field(default=None, metadata={"help": "JSON Lines output of --drop"})


@dataclass
class MemorizationArgs(ModelArgs, CurateArgs):
    fraction: float = field(default=0.6, metadata={
        "group": "memorization", "help": "share of each question's tokens given to the model (Wu et al.: 0.6)"})
    max_remainder_tokens: int = field(default=256, metadata={
        "help": "decode and compare at most this many tokens of the rest"})
    batch_size: int = field(default=8, metadata={"help": "questions per generate call"})
    report: str | None = field(default=None, metadata={
        "help": "JSON report (default: beside a local dataset, DATASET.memorization.json; for math500, "
                "synthetic or a hub name runs/memorization/MODEL-DATASET.json under the current directory)"})


# command -> (its arguments, what it does, its line in the usage)
COMMANDS = {"difficulty": (DifficultyArgs, difficulty, "keep prompts by the model's pass rate"),
            "dedup": (DedupArgs, dedup, "drop repeated questions"),
            "contamination": (ContaminationArgs, contamination, "find (and drop) overlap with eval sets"),
            "memorization": (MemorizationArgs, memorization, "which problems the model recites from their start")}


def main(argv: list[str] | None = None):
    from cli import parse_args

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        usage = "\n".join(f"  {name:14s} {text}" for name, (_, _, text) in COMMANDS.items())
        if argv and argv[0] in ("-h", "--help"):
            print(f"usage: python -m data.curate COMMAND [--OPTION VALUE ...]\n\n{__doc__.splitlines()[0]}\n\n"
                  f"commands (python -m data.curate COMMAND --help for its options):\n{usage}")
            raise SystemExit(0)
        got = f"unknown command {argv[0]!r}" if argv else "a command is needed"
        raise SystemExit(f"error: {got}: use one of {', '.join(COMMANDS)} (python -m data.curate --help)")
    args_class, run, _ = COMMANDS[argv[0]]
    args = parse_args(args_class, argv[1:], prog=f"python -m data.curate {argv[0]}", description=__doc__)
    if args.limit < 0:
        raise SystemExit("error: --limit must be >= 0")
    return run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
