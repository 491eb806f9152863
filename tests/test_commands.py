"""End to end: the commands other than the trainers, run on the built-in tiny model: `python evaluate.py` (the
files it writes, a checkpoint's own sampling settings) and `python -m data.curate` (difficulty filtering with
recorded pass rates and resume, the memorization probe against text the tiny model provably recites). Their unit
tests are in test_evaluate.py and test_curate.py.
"""

import json
from pathlib import Path

import pytest
from conftest import ROOT, run_script

from data.curate import main
from data.loading import load_records
from evaluate import EvalArgs, aggregate_eval
from evaluate import main as eval_main

# --------------------------------------------------------------------------------------------------
# python evaluate.py
# --------------------------------------------------------------------------------------------------

def test_eval_command_writes_results(tiny_base, tmp_path):
    out = tmp_path / "eval"
    cmd = ["evaluate.py", "--model", "tiny", "--datasets", "synthetic,math500",
           "--limit", "4", "--num-samples", "2", "--max-new-tokens", "24", "--reward-workers", "0",
           "--output-dir", str(out)]
    # In-process scoring (--reward-workers 0): a spawned worker re-imports torch, ~10 s on a busy CPU; the
    # worker pool itself is tested in test_reward.py.
    proc = run_script(*cmd, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "pass@2" in proc.stdout and "overall" in proc.stdout

    results = json.loads((out / "results.json").read_text())
    metrics = results["metrics"]
    assert set(metrics) == {"synthetic", "math500", "overall"}
    for name in ("synthetic", "math500"):
        m = metrics[name]
        assert m["problems"] == 4 and m["k"] == 2
        assert 0 <= m["avg@2"] <= m["pass@2"] <= 1 and 0 <= m["maj@2"] <= m["pass@2"]
        assert aggregate_eval(results["per_problem"][name]) == m  # the raw counts reproduce the metrics
    assert metrics["overall"]["problems"] == 8

    rows = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 4 * 2
    assert set(rows[0]) >= {"dataset", "id", "question", "ground_truth", "sample", "response", "answer", "reward"}
    assert [r["sample"] for r in rows[:4]] == [0, 1, 0, 1]
    for name in ("synthetic", "math500"):
        mine = [r for r in rows if r["dataset"] == name]
        correct = sum(r["reward"] >= 1 for r in mine)
        assert correct == sum(p["correct"] for p in results["per_problem"][name])
        assert all(r["reward"] == 0 for r in mine if r["truncated"])  # ORZ: truncated scores 0
    # The built-in model answers some synthetic problems right in 24 tokens; the rewards must show it.
    assert any(r["reward"] == 1 and r["answer"] == r["ground_truth"] for r in rows if r["dataset"] == "synthetic")

    again = run_script(*cmd, timeout=300)  # an evaluation is never replaced silently
    assert again.returncode == 1 and again.stderr.strip() == (
        f"error: --output-dir {out} holds an evaluation (results.json): name another, or --overwrite to replace it")
    assert json.loads((out / "results.json").read_text()) == results
    one = [a if a != "synthetic,math500" else "synthetic" for a in cmd[:-2]]  # a small one replaces it
    assert run_script(*one, "--limit", "1", "--num-samples", "1", "--output-dir", str(out), "--overwrite",
                      timeout=300).returncode == 0
    assert json.loads((out / "results.json").read_text())["metrics"]["overall"]["problems"] == 1
    # beyond the tiny model's context of 1024 positions: refused at once, not decoded for minutes
    long = run_script(*cmd[:-2], "--max-new-tokens", "8000", "--output-dir", str(tmp_path / "long"), timeout=300)
    assert long.returncode == 1 and long.stderr.strip().startswith(
        "error: --max-new-tokens 8000 exceed(s) the model's context of 1024 positions"), long.stderr[-2000:]
    assert not (tmp_path / "long").exists()


def test_eval_uses_the_checkpoints_sampling_settings_only_when_asked(tiny_base, tmp_path):
    """A checkpoint whose generation_config says top-k 1: by default evaluation samples (the 4 samples of
    a problem differ somewhere), with --checkpoint-sampling it decodes greedily (4 equal samples, the same
    as --temperature 0), and results.json records the config."""
    for f in Path(tiny_base).iterdir():
        (tmp_path / f.name).symlink_to(f)
    config = json.loads((tmp_path / "generation_config.json").read_text())
    (tmp_path / "generation_config.json").unlink()
    (tmp_path / "generation_config.json").write_text(json.dumps({**config, "do_sample": True, "top_k": 1}))
    common = dict(model=str(tmp_path), datasets="synthetic", limit=6, max_new_tokens=16, reward_workers=0)

    def responses(out: str, **changes) -> dict:
        eval_main(EvalArgs(**common, output_dir=str(tmp_path / out), **changes))
        rows = [json.loads(line) for line in (tmp_path / out / "completions.jsonl").read_text().splitlines()]
        return {i: [r["response"] for r in rows if r["id"] == i] for i in {r["id"] for r in rows}}

    sampled = responses("plain", num_samples=4)
    assert any(len(set(r)) > 1 for r in sampled.values())
    own = responses("own", num_samples=4, checkpoint_sampling=True)
    greedy = responses("greedy", num_samples=1, temperature=0.0)
    assert own == {i: r * 4 for i, r in greedy.items()}
    assert json.loads((tmp_path / "own" / "results.json").read_text())["generation_config"]["top_k"] == 1
    # A checkpoint that says greedy cannot give 4 different samples: one line, not a traceback.
    (tmp_path / "generation_config.json").write_text(json.dumps({**config, "do_sample": False}))
    with pytest.raises(SystemExit, match="^error: Greedy methods"):
        responses("refused", num_samples=4, checkpoint_sampling=True)


def test_eval_ends_responses_at_the_given_stop_strings(tiny_base, tmp_path):
    """--stop-strings, as a training run was given them (a recipe's own), not ORZ's: each response ends at the
    first of them, which it keeps; the same responses without it run on past that point."""
    common = dict(model="tiny", datasets="synthetic", limit=6, num_samples=2, max_new_tokens=24, reward_workers=0)

    def responses(out: str, **changes) -> list[dict]:
        eval_main(EvalArgs(**common, output_dir=str(tmp_path / out), **changes))
        return [json.loads(line) for line in (tmp_path / out / "completions.jsonl").read_text().splitlines()]

    stop = " = "  # a whole token of the tiny model's vocabulary: a response is cut at a token's end
    plain, cut = responses("plain"), responses("cut", stop_strings=[stop])
    assert any(stop in r["response"][:-len(stop)] for r in plain)
    for p, c in zip(plain, cut, strict=True):
        if stop in p["response"]:
            assert c["response"] == p["response"][:p["response"].index(stop) + len(stop)] and not c["truncated"]
        else:
            assert c["response"] == p["response"]


# --------------------------------------------------------------------------------------------------
# python -m data.curate: difficulty
# --------------------------------------------------------------------------------------------------

def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def progress_rows(path: Path) -> list[dict]:
    lines = path.read_text().splitlines()
    assert "settings" in json.loads(lines[0])
    return [json.loads(line) for line in lines[1:]]


def test_difficulty_records_pass_rates_filters_and_resumes(tiny_base, tmp_path, capsys):
    out = tmp_path / "hard.jsonl"
    progress = Path(str(out) + ".progress")
    base = ["difficulty", "--model", "tiny", "--dataset", "synthetic", "--num-samples", "4", "--max-new-tokens", "24",
            "--output", str(out), "--reward-workers", "0", "--batch-size", "3"]

    # First run: 3 prompts, everything kept (range [0, 1]).
    kept = main(base + ["--limit", "3", "--max-pass", "1"])
    rows = progress_rows(progress)
    assert [r["id"] for r in rows] == [0, 1, 2]
    assert all(r["num_samples"] == 4 and r["pass_rate"] == r["correct"] / 4 for r in rows)
    assert [k["pass_rate"] for k in kept] == [r["pass_rate"] for r in rows]
    first_lines = progress.read_text()

    # Interrupted mid-write: a cut-off line is dropped and its prompt sampled again.
    with open(progress, "a") as f:
        f.write('{"id": 3, "key": "ab')
    main(base + ["--limit", "6", "--max-pass", "1"])
    assert progress.read_text().startswith(first_lines)  # the first 3 prompts were not sampled again
    rows = progress_rows(progress)
    assert [r["id"] for r in rows] == [0, 1, 2, 3, 4, 5]

    # A range that needs no new samples: the filter is applied to the recorded pass rates.
    before = progress.read_text()
    kept = main(base + ["--limit", "6", "--min-pass", "0", "--max-pass", "0.25"])
    assert progress.read_text() == before
    expected = [r["id"] for r in rows if r["pass_rate"] <= 0.25]
    assert [k["source_id"] for k in kept] == expected
    assert "sampled in" in capsys.readouterr().out

    # The output trains as it is: question/answer read back, pass_rate and num_samples kept per record.
    records = load_records(str(out))
    assert [r["question"] for r in records] == [k["question"] for k in kept]
    assert all(r["extras"]["num_samples"] == 4 and r["extras"]["pass_rate"] <= 0.25 for r in records)

    # Other sampling settings cannot reuse the progress file.
    with pytest.raises(SystemExit, match=r"^error: .*other settings \(num_samples\)"):
        main([a if a != "4" else "2" for a in base] + ["--limit", "6"])


def test_difficulty_on_a_jsonl_file_with_an_empty_range(tiny_base, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", [{"problem": f"What is {a} + {b}?", "answer": a + b}
                                                   for a, b in [(3, 4), (10, 5), (7, 7)]])
    out = tmp_path / "none.jsonl"
    kept = main(["difficulty", "--model", "tiny", "--dataset", data, "--num-samples", "2", "--max-new-tokens", "24",
                 "--output", str(out), "--reward-workers", "0", "--min-pass", "1.0", "--max-pass", "1.0"])
    rows = progress_rows(Path(str(out) + ".progress"))
    assert len(rows) == 3 and [k["source_id"] for k in kept] == [r["id"] for r in rows if r["correct"] == 2]
    # The data changed under the same output: the progress file is refused, not mixed in.
    write_jsonl(tmp_path / "train.jsonl", [{"problem": "What is 1 + 1?", "answer": 2}])
    with pytest.raises(SystemExit, match="made from other data"):
        main(["difficulty", "--dataset", data, "--num-samples", "2", "--max-new-tokens", "24", "--output", str(out)])


# --------------------------------------------------------------------------------------------------
# python -m data.curate: memorization
# --------------------------------------------------------------------------------------------------

def math500_question(index: int) -> str:
    return json.loads((ROOT / "data" / "eval" / "math500.json").read_text())[index]["prompt"][0]["value"]


def recited_text(model, tokenizer, stop_ids) -> list[int]:
    """Token ids of seed text + the model's own 40-token greedy continuation, for the first seed whose
    continuation has no stop token, decodes to text that tokenizes back to the same ids, and starts before
    the 60% cut: greedy decoding from the first 60% of that text must then give the rest."""
    import torch

    for seed in ["The quick brown fox jumps over", "Convert the point (0,3) in rectangular coordinates.", "Let x ="]:
        seed_ids = tokenizer(seed, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            ids = model.generate(torch.tensor([seed_ids]), do_sample=False, max_new_tokens=40,
                                 pad_token_id=tokenizer.pad_token_id)[0].tolist()
        if (len(ids) == len(seed_ids) + 40 and not set(ids) & set(stop_ids) and len(seed_ids) <= 0.6 * len(ids)
                and tokenizer(tokenizer.decode(ids), add_special_tokens=False)["input_ids"] == ids):
            return ids
    pytest.fail("no seed text gives a greedy continuation usable as recited text")


def test_memorization_finds_recited_text_and_not_an_edited_copy(tiny_base, tmp_path, capsys):
    from data.curate import _load_sampler

    model, tokenizer, stop_ids = _load_sampler(str(tiny_base), False)
    ids = recited_text(model, tokenizer, stop_ids)
    cut, k = round(0.6 * len(ids)), 5
    rest = len(ids) - cut
    # The same text with its rest's token k replaced: the model still continues as before, so it matches
    # the first k tokens of the rest and no more.
    other = next(t for t in tokenizer(" Zebra!", add_special_tokens=False)["input_ids"] if t != ids[cut + k])
    edited = ids[:cut + k] + [other] + ids[cut + k + 1:]
    assert tokenizer(tokenizer.decode(edited), add_special_tokens=False)["input_ids"] == edited
    rows = [{"question": tokenizer.decode(ids), "answer": "1"},
            {"question": "What is 1?", "answer": "1"},                       # fewer than 8 tokens: skipped
            {"question": tokenizer.decode(edited), "answer": "1"},
            {"question": math500_question(5), "answer": "1"}]                # a longer prefix, padded beside it
    data = write_jsonl(tmp_path / "planted.jsonl", rows)
    report = main(["memorization", "--model", str(tiny_base), "--dataset", data, "--batch-size", "3"])

    by_id = {row["id"]: row for row in report["per_problem"]}
    assert sorted(by_id) == [0, 2, 3] and report["skipped_problems"][0]["id"] == 1
    assert by_id[0] == {"id": 0, "exact": True, "exact_tokens": True, "exact_text": True, "prefix_match": 1.0,
                        "prefix_tokens": cut, "remainder_tokens": rest, "continuation": tokenizer.decode(ids[cut:])}
    assert not by_id[2]["exact"] and not by_id[2]["exact_text"] and by_id[2]["prefix_match"] == round(k / rest, 4)
    assert by_id[2]["continuation"] == tokenizer.decode(ids[cut:])
    assert not by_id[3]["exact"] and by_id[3]["prefix_match"] < 1

    path = tmp_path / "planted.memorization.json"  # beside the dataset without --report
    assert json.loads(path.read_text()) == report
    assert {k: report[k] for k in ("model", "dataset", "fraction", "problems", "probed", "skipped", "exact")} == {
        "model": str(tiny_base), "dataset": data, "fraction": 0.6, "problems": 4, "probed": 3, "skipped": 1,
        "exact": 1}
    assert report["exact_rate"] == 1 / 3
    mean = sum(row["prefix_match"] for row in report["per_problem"]) / 3
    assert report["mean_prefix_match"] == round(mean, 4)
    out = capsys.readouterr().out
    assert out.endswith(f"memorization: 1 of 3 problems of {data} reproduced exactly from their first 60% "
                        f"(greedy; mean prefix match {mean:.3f}; 1 skipped); report: {path}\n")
    assert f"  problem 0: reproduced {rest} tokens  {' '.join(tokenizer.decode(ids).split())[:70]!r}" in out


def test_memorization_skips_and_caps(tiny_base, tmp_path, monkeypatch):
    """Skips are counted with their reason; --max-remainder-tokens caps the compared rest; a dataset that is
    not a local file reports to runs/memorization/MODEL-DATASET.json."""
    from data.curate import memorization_report_path

    # Digits are one token each in the tiny tokenizer: "12345" is 5 tokens, "1234567890" 10.
    data = write_jsonl(tmp_path / "digits.jsonl", [{"question": "12345", "answer": "1"},
                                                   {"question": "1234567890", "answer": "1"}])
    base = ["memorization", "--model", "tiny", "--dataset", data, "--report", str(tmp_path / "r.json")]
    for fraction, reason in [("0.96", "empty remainder"), ("0.04", "empty prefix")]:
        report = main(base + ["--fraction", fraction])
        assert report["skipped_problems"] == [{"id": 0, "reason": "5 tokens, fewer than 8"},
                                              {"id": 1, "reason": reason}]
        assert report["probed"] == 0 and report["exact_rate"] == 0.0
    report = main(base + ["--fraction", "0.5", "--max-remainder-tokens", "3"])
    assert report["skipped"] == 1 and report["max_remainder_tokens"] == 3
    row = report["per_problem"][0]
    assert (row["id"], row["prefix_tokens"], row["remainder_tokens"]) == (1, 5, 3)

    monkeypatch.chdir(tmp_path)
    main(["memorization", "--dataset", "synthetic", "--limit", "2"])
    assert json.loads((tmp_path / "runs" / "memorization" / "tiny-synthetic.json").read_text())["problems"] == 2
    assert memorization_report_path("tiny", "math500") == Path("runs/memorization/tiny-math500.json")
    assert memorization_report_path("/ckpt/run1/", "org/set") == Path("runs/memorization/run1-org-set.json")
