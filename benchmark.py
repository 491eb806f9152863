"""Speed figures that do not belong in tests: run a benchmark, print a table.

    python benchmark.py critic            # what the PPO critic adds to a step, vs GRPO (ORZ: about 20%)
    python benchmark.py critic --quick    # fewer steps, for a smoke run

`critic` runs the real training loop (`train_ppo.main`) for `gae` and `grpo` in one process, on the same
model, prompts, group size and lengths, alternating the two, and reports the median step time of each,
their ratio, and each phase's share of the step. Three settings:
  short      the built-in tiny base on its task: responses of ~12 tokens, about as long as the prompts;
  long       a 2x wider model with random weights, stopping only at EOS, so responses run to ~210-256
             tokens, about 25x longer than the prompts, as in ORZ's runs; all 64 rows decode together;
  gen-bound  the same, decoding 8 rows per generate call: each decoding step is then bound by overheads
             and memory traffic rather than arithmetic, as decoding is on GPUs, and generation dominates
             the step as it did in ORZ's runs.
The critic roughly doubles the non-generation work (a value pass plus its own update), so the ratio is
about 1 + (1 - generation share of the GRPO step) x 4/3: it depends on how much generation dominates.
"""

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

PHASES = ("time/generate", "time/reward", "time/logprobs", "time/critic", "time/update")


def random_model(base_dir: Path, out_dir: Path, hidden_size: int, num_layers: int) -> Path:
    """A randomly initialised model with the tiny base's tokenizer: it rarely stops, so lengths are long."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(base_dir)
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = hidden_size, 3 * hidden_size, num_layers
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out_dir)
    return out_dir


def run(model: str, advantage: str, steps: int, out: Path, **overrides) -> list[dict]:
    from train_ppo import Args, main

    args = Args(model=model, advantage=advantage, max_steps=steps, output_dir=str(out), eval_every=0,
                samples_per_step=0, whiten_advantages=True, **overrides)
    main(args)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows[1:]  # the first step pays one-off costs (allocator warm-up, reward workers starting)


def critic_benchmark(quick: bool) -> None:
    from data.synthetic import build_tiny_base

    base = build_tiny_base()
    tmp = Path(tempfile.mkdtemp(prefix="bench-critic-"))
    random_dir = str(random_model(base, tmp / "random", hidden_size=256, num_layers=4))
    long = dict(max_new_tokens=256, prompts_per_step=8, num_generations=8, prompt_template="raw", stop_strings=[])
    settings = {
        "short": (str(base), dict(max_new_tokens=32, prompts_per_step=16, num_generations=8)),
        "long": (random_dir, long),
        "gen-bound": (random_dir, dict(long, generation_batch_size=1)),
    }
    steps, reps = (2, 1) if quick else (3, 2)
    results = {}
    for name, (model, kw) in settings.items():
        rows = {"gae": [], "grpo": []}
        for rep in range(reps):  # alternate the two so drift in machine load hits both alike
            for adv in ("grpo", "gae"):
                rows[adv] += run(model, adv, steps, tmp / f"{name}-{adv}-{rep}", **kw)
        results[name] = rows
    print(f"\n{'setting':<10} {'estimator':<9} {'step s':>7} {'resp len':>8} " + " ".join(f"{p[5:]:>9}" for p in PHASES))
    for name, rows in results.items():
        med = {adv: statistics.median(r["time/step"] for r in rs) for adv, rs in rows.items()}
        for adv, rs in rows.items():
            total = sum(r["time/step"] for r in rs)
            shares = " ".join(f"{sum(r.get(p, 0.0) for r in rs) / total:>9.0%}" for p in PHASES)
            length = statistics.mean(r["train/response_length"] for r in rs)
            print(f"{name:<10} {adv:<9} {med[adv]:>7.2f} {length:>8.1f} {shares}")
        print(f"{name:<10} PPO/GRPO step-time ratio: {med['gae'] / med['grpo']:.2f} (ORZ: about 1.2)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=["critic"], help="which benchmark")
    parser.add_argument("--quick", action="store_true", help="fewer steps and repetitions")
    args = parser.parse_args(argv)
    if args.which == "critic":
        critic_benchmark(args.quick)


if __name__ == "__main__":
    sys.exit(main())
