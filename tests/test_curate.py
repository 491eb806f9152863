"""Unit tests of data/curate.py (`python -m data.curate`) without a model: dedup of hand-made duplicates,
contamination against a planted MATH500 question, the prefix split of the memorization probe, and one-line
errors. The subcommands that sample a model (difficulty, memorization) run in test_commands.py.

Run: python -m pytest tests/test_curate.py -q
"""

import json
from pathlib import Path

import pytest
from conftest import ROOT, run_script

from data.curate import dedup_records, find_overlaps, main, question_key, words
from data.loading import load_records


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


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
    result = run_script("-m", "data.curate", "contamination", "--dataset", "synthetic", "--eval", "nope",
                        "--report", str(tmp_path / "r.json"), timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: unknown eval set 'nope': use math500, aime2024, or a file that exists"


def test_write_jsonl_writes_any_text(tmp_path):
    import json

    from data.curate import write_jsonl

    rows = [{"question": "1 + 1", "note": "broken \ud800 escape", "answer": "2"}]
    write_jsonl(tmp_path / "out.jsonl", rows)
    assert [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()] == rows
