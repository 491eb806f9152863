"""Tests of `python -m data.curate`: difficulty filtering with recorded pass rates and resume, dedup of
hand-made duplicates, contamination against a planted MATH500 question, the memorization probe against
text the tiny model provably recites, and one-line errors.

Run: python -m pytest tests/test_curate.py -q
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from data.curate import dedup_records, find_overlaps, main, question_key, words
from data.loading import load_records

ROOT = Path(__file__).resolve().parent.parent


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def progress_rows(path: Path) -> list[dict]:
    lines = path.read_text().splitlines()
    assert "settings" in json.loads(lines[0])
    return [json.loads(line) for line in lines[1:]]


# ---------------------------------------------------------------- difficulty


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


# ---------------------------------------------------------------- dedup


def test_dedup_hand_made_duplicates(tmp_path, capsys):
    rows = [{"question": "What is $2 + 3$?", "answer": "5"},
            {"question": "what is 2+3 ?", "answer": "5"},                    # case, spaces, $ and punctuation
            {"question": "What  is\n2 + 3", "answer": "6"},                  # same question, other answer
            {"question": "What is 2 - 3?", "answer": "-1"},                  # another operator: kept
            {"question": "Find $\\dfrac{1}{2} + \\tfrac{1}{3}$.", "answer": "5/6"},
            {"question": "find \\frac{1}{2}+\\frac{1}{3}", "answer": "5/6"},  # \dfrac, \tfrac = \frac
            {"question": "Find \\left( 1 + 2 \\right)\\,.", "answer": "3"},
            {"question": "Find (1+2)", "answer": "3"}]                       # \left, \right, \, spacing
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "dedup.jsonl"
    kept = main(["dedup", "--dataset", data, "--output", str(out)])
    assert [k["source_id"] for k in kept] == [0, 3, 4, 6]
    assert "8 records, 4 distinct questions: dropped 4 duplicates (1 with an answer other" in capsys.readouterr().out
    assert [r["question"] for r in load_records(str(out))] == [rows[i]["question"] for i in (0, 3, 4, 6)]
    assert question_key("What is 2+3 ?") == question_key("what is 2 + 3")


def test_dedup_keeps_first_and_pairs_with_it():
    records = [{"id": i, "question": q, "answer": "1"} for i, q in enumerate(["A b.", "a  B", "c", "A B?"])]
    kept, dropped = dedup_records(records)
    assert [r["id"] for r in kept] == [0, 2]
    assert [(d["id"], k["id"]) for d, k in dropped] == [(1, 0), (3, 0)]


# ---------------------------------------------------------------- contamination


def math500_question(index: int) -> str:
    return json.loads((ROOT / "data" / "eval" / "math500.json").read_text())[index]["prompt"][0]["value"]


def test_contamination_finds_a_planted_math500_question(tmp_path, capsys):
    original = math500_question(5)  # "A regular hexagon can be divided into six equilateral triangles. ..."
    planted = "Problem 12.  " + " ".join(original.replace("$", "").split()).upper() + " Give the answer in inches."
    rows = [{"question": "Tom has 3 apples and gets 4 more. How many apples does Tom have now?", "answer": "7"},
            {"question": planted, "answer": "42"},
            {"question": "A square has perimeter 20 inches. What is the area of the square, in square inches?",
             "answer": "25"}]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    report_path = tmp_path / "report.json"
    hits = main(["contamination", "--dataset", data, "--eval", "math500,aime2024", "--report", str(report_path)])
    assert [(h["id"], h["eval_set"], h["eval_id"]) for h in hits] == [(1, "math500", 5)]
    assert hits[0]["overlap"] == 1.0 and hits[0]["n"] == 13
    report = json.loads(report_path.read_text())
    assert report["flagged_records"] == 1 and report["records"] == 3
    assert report["eval_sets"] == {"math500": 500, "aime2024": 30}
    assert "record 1 ~ math500 #5: overlap 1.00" in capsys.readouterr().out

    out = tmp_path / "clean.jsonl"
    main(["contamination", "--dataset", data, "--eval", "math500", "--report", str(report_path), "--drop",
          "--output", str(out)])
    assert [r["question"] for r in load_records(str(out))] == [rows[0]["question"], rows[2]["question"]]


def test_contamination_short_questions_and_threshold(tmp_path):
    evals = {"mine": [{"id": 0, "question": "What is 2 + 3?"},
                      {"id": 1, "question": " ".join(f"w{i}" for i in range(30))}]}
    train = [{"id": 0, "question": "what is 2+3"},                                  # short: matched whole
             {"id": 1, "question": "What is 2 - 3?"},                               # the operator differs
             {"id": 2, "question": " ".join([f"w{i}" for i in range(20)] + [f"x{i}" for i in range(10)])},  # 8/18
             {"id": 3, "question": " ".join(f"w{i}" for i in range(25))}]           # 13 of 13: 1.0
    hits = find_overlaps(train, evals, n=13, threshold=0.5)
    assert [(h["id"], h["eval_id"], h["n"]) for h in hits] == [(0, 0, 5), (3, 1, 13)]
    assert [h["id"] for h in find_overlaps(train, evals, n=13, threshold=0.4)] == [0, 2, 3]
    assert words("What is $2+3$?") == ["what", "is", "2", "+", "3"]
    # An eval file works as well as a shipped name.
    eval_file = write_jsonl(tmp_path / "ev.jsonl", [{"question": "What is 2 + 3?", "answer": "5"}])
    data = write_jsonl(tmp_path / "t.jsonl", [{"question": q["question"], "answer": "1"} for q in train])
    hits = main(["contamination", "--dataset", data, "--eval", eval_file, "--report", str(tmp_path / "r.json")])
    assert [(h["id"], h["eval_set"]) for h in hits] == [(0, eval_file)]


def test_contamination_report_defaults_to_next_to_its_input(tmp_path, monkeypatch):
    """Without --report the report goes beside the dataset file, not into the current directory; a dataset
    that is not a local file (the built-in task, a hub name) needs --report."""
    data_dir, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    data_dir.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    data = write_jsonl(data_dir / "train.jsonl", [{"question": "What is 2 + 3?", "answer": "5"}])
    eval_file = write_jsonl(data_dir / "ev.jsonl", [{"question": "What is 2 + 3?", "answer": "5"}])
    main(["contamination", "--dataset", data, "--eval", eval_file])
    assert list(elsewhere.iterdir()) == []
    report = json.loads((data_dir / "train.contamination.json").read_text())
    assert report["dataset"] == data and report["flagged_records"] == 1
    with pytest.raises(SystemExit) as err:
        main(["contamination", "--dataset", "synthetic", "--eval", eval_file])
    assert str(err.value) == ("error: --dataset synthetic is not a local file, so there is no place beside "
                              "it for the report: give --report FILE.json")
    assert list(elsewhere.iterdir()) == []


# ---------------------------------------------------------------- memorization


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


def test_split_question_keeps_a_leading_bos_for_the_prefix_only():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from data.curate import split_question

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *"abcdefghij"])}
    for template, lead in [("<s> $A", [1]), ("<s> $A </s>", [1]), ("$A", [])]:
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("<s>", 1), ("</s>", 2)])
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
        assert split_question(tokenizer, "a b c d e f g h i j", 0.6) == (lead + [3, 4, 5, 6, 7, 8], [9, 10, 11, 12], 6)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("argv, message", [
    (["dedup", "--dataset", "{tmp}/missing.jsonl", "--output", "{tmp}/o.jsonl"], "missing.jsonl: no such file"),
    (["dedup", "--dataset", "{tmp}/empty.jsonl", "--output", "{tmp}/o.jsonl"], "empty.jsonl: file is empty"),
    (["contamination", "--dataset", "synthetic", "--eval", "math500,gsm8k", "--report", "{tmp}/r.json"],
     "unknown eval set 'gsm8k'"),
    (["contamination", "--dataset", "synthetic", "--drop"], "--drop and --output go together"),
    (["difficulty", "--dataset", "synthetic", "--output", "{tmp}/o.jsonl", "--max-pass", "2"], "--max-pass"),
    (["difficulty", "--dataset", "synthetic", "--output", "{tmp}/o.jsonl", "--model", "./nope"],
     "./nope: no such path"),
    (["difficulty", "--dataset", "synthetic", "--output", "{tmp}/o.jsonl", "--reward", "{tmp}/nope.py:score"],
     "--reward: reward spec"),
    (["memorization", "--dataset", "synthetic", "--fraction", "0"], "need 0 < --fraction < 1"),
    (["memorization", "--dataset", "synthetic", "--fraction", "1.5"], "got 1.5, 8 and 256"),
    (["memorization", "--dataset", "synthetic", "--batch-size", "0"], "--batch-size >= 1"),
    (["memorization", "--dataset", "synthetic", "--max-remainder-tokens", "0"], "got 0.6, 8 and 0"),
    (["memorization", "--dataset", "synthetic", "--limit", "-1"], "--limit must be >= 0"),
    (["memorization", "--dataset", "{tmp}/missing.jsonl"], "missing.jsonl: no such file"),
])
def test_bad_input_is_one_line(tmp_path, argv, message):
    (tmp_path / "empty.jsonl").write_text("")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit) as err:
        main(argv)
    text = str(err.value)
    assert text.startswith("error: ") and message in text and "\n" not in text


def test_command_line_error_exit(tmp_path):
    result = subprocess.run([sys.executable, "-m", "data.curate", "contamination", "--dataset", "synthetic",
                             "--eval", "nope", "--report", str(tmp_path / "r.json")],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: unknown eval set 'nope': use math500, aime2024, or a file that exists"


def test_write_jsonl_writes_any_text(tmp_path):
    import json

    from data.curate import write_jsonl

    rows = [{"question": "1 + 1", "note": "broken \ud800 escape", "answer": "2"}]
    write_jsonl(tmp_path / "out.jsonl", rows)
    assert [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()] == rows
