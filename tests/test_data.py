"""Unit tests of data/loading.py and data/synthetic.py: every source format, the shipped eval sets, error
messages, hundreds of malformed data files (each one ends in well-formed records or in one `DataError` line that
names the file, never a traceback from deep inside a library), prompt templates, the one loader of the built-in
task or a file, records whose answer cannot be checked, and the tiny base model's cache (processes building it at
once, leftovers of a killed build, the progress bar; a very small base in its own cache directory, never the
shared one).

Run: python -m pytest tests/test_data.py -q
"""

import hashlib
import json
import random
import re
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT, start_script

from data.loading import (
    ORZ_TEMPLATE,
    DataError,
    format_prompt,
    list_eval_sets,
    load_records,
)
from data.synthetic import build_tiny_base, tiny_base_path
from train_ppo import Args

REPO = ROOT

SAMPLES = REPO / "tests" / "data"

# Open-Reasoner-Zero's prompt (commit 3fdd9a0), typed by hand a second time and independently of
# data/loading.py, so that an accidental edit of the template there fails here.
ORZ_TEMPLATE_TYPED = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. The "
    "Assistant first thinks about the reasoning process in the mind and then provides the User with the "
    "answer. The reasoning process is enclosed within <think> </think> and answer is enclosed within "
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer "
    "here </answer>. User: You must put your answer inside <answer> </answer> tags, i.e., <answer> answer "
    "here </answer>. And your final answer will be extracted automatically by the \\boxed{} tag.\n"
    "This is the problem:\n"
    "{question}\n"
    "Assistant: <think>"
)


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """Keep `datasets`' arrow cache inside the test's tmp dir instead of ~/.cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def load_error(spec, **kwargs) -> str:
    """Load `spec`, expect a DataError, return its message after checking it is one line."""
    with pytest.raises(DataError) as info:
        load_records(str(spec), **kwargs)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message, message
    assert "Traceback" not in message
    return message


# ---------------------------------------------------------------- formats


def test_orz_training_pairs():
    path = SAMPLES / "orz_train_sample.json"
    records = load_records(str(path))
    assert [r["id"] for r in records] == [0, 1, 2, 3, 4]
    assert records[0] == {
        "id": 0,
        "question": "A box holds 12 pencils. How many pencils are in 7 boxes?",
        "answer": "84",
        "source": str(path),
        "extras": {},
    }
    assert records[1]["extras"] == {"pass_at_n": 0.375}
    assert records[2]["answer"] == "\\frac{3}{4}"
    assert records[4]["question"] == "Let $x$ satisfy $3x - 5 = 16$.\nWhat is $x$?"


def test_flat_jsonl_default_fields_numbers_and_extras():
    path = SAMPLES / "flat_sample.jsonl"
    records = load_records(str(path))
    assert [r["id"] for r in records] == [0, 1, 2, 3]  # the blank line is not a record
    assert [r["question"] for r in records] == [
        "What is 9 times 6?",
        "Solve for $y$: $4y + 2 = 18$.",
        "Half of a number is 1.25. What is the number?",
        "How many edges does a cube have?",
    ]
    # int 4 -> "4", float 2.5 -> "2.5", ground_truth {"value": ...} unwrapped.
    assert [r["answer"] for r in records] == ["54", "4", "2.5", "12"]
    assert records[0]["extras"] == {"level": 1}
    # `solution` is kept as an extra, never taken as the answer.
    assert records[1]["extras"] == {"solution": "Subtract 2 and divide by 4, so $y = \\boxed{4}$."}
    assert records[3]["extras"] == {"pass_at_n": 0.5}
    assert all(r["source"] == str(path) for r in records)


def test_json_list_of_flat_objects(tmp_path):
    path = tmp_path / "flat.json"
    path.write_text(json.dumps([{"problem": "1 + 1?", "answer": "2"}, {"problem": "2 + 2?", "answer": "4"}]))
    records = load_records(str(path))
    assert [(r["id"], r["question"], r["answer"]) for r in records] == [
        (0, "1 + 1?", "2"),
        (1, "2 + 2?", "4"),
    ]


def test_json_lines_saved_as_json(tmp_path):
    path = write_jsonl(
        tmp_path / "lines.json", [{"question": "3 * 3?", "answer": 9}, {"question": "5 - 2?", "answer": 3}]
    )
    records = load_records(str(path))
    assert [(r["id"], r["question"], r["answer"]) for r in records] == [
        (0, "3 * 3?", "9"),
        (1, "5 - 2?", "3"),
    ]
    # A single object is what a one-line JSON Lines file holds.
    single = tmp_path / "single.json"
    single.write_text(json.dumps({"question": "7 + 1?", "answer": "8"}))
    assert [r["answer"] for r in load_records(str(single))] == ["8"]


def test_orz_eval_format_keeps_choices(tmp_path):
    path = tmp_path / "eval.json"
    rows = [
        {
            "prompt": [{"from": "user", "value": "Which is prime?"}],
            "final_answer": "B",
            "choices": {"A": "4", "B": "5"},
        },
        {
            "prompt": [{"from": "user", "value": "Which is even?"}],
            "final_answer": "A",
            "choices": {"A": "6", "B": "7"},
        },
    ]
    path.write_text(json.dumps(rows, indent=2))
    records = load_records(str(path))
    assert [(r["question"], r["answer"]) for r in records] == [
        ("Which is prime?", "B"),
        ("Which is even?", "A"),
    ]
    assert records[1]["extras"] == {"choices": {"A": "6", "B": "7"}}


def test_chat_message_prompt_takes_last_user_turn(tmp_path):
    rows = [
        {
            "prompt": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is 10 / 4?"},
            ],
            "answer": "2.5",
        }
    ]
    records = load_records(str(write_jsonl(tmp_path / "chat.jsonl", rows)))
    assert records[0]["question"] == "What is 10 / 4?"


def test_parquet_with_field_overrides(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "set.parquet"
    table = pa.table({"text": ["Double 21.", "Halve 9."], "target": [42.0, 4.5], "solution": ["2*21", "9/2"]})
    pq.write_table(table, path)
    records = load_records(str(path), question_field="text", answer_field="target")
    # An integral float (an int column that met a null in pandas) reads as "42", not "42.0".
    assert [(r["id"], r["question"], r["answer"]) for r in records] == [
        (0, "Double 21.", "42"),
        (1, "Halve 9.", "4.5"),
    ]
    assert records[0]["extras"] == {"solution": "2*21"}


def test_answer_field_override_to_solution(tmp_path):
    path = write_jsonl(tmp_path / "sol.jsonl", [{"problem": "Name the smallest prime.", "solution": "2"}])
    assert load_records(str(path), answer_field="solution")[0]["answer"] == "2"


def test_limit_keeps_source_ids(tmp_path):
    rows = [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(10)]
    path = write_jsonl(tmp_path / "ten.jsonl", rows)
    records = load_records(str(path), limit=3)
    assert [r["id"] for r in records] == [0, 1, 2]
    assert records[2]["answer"] == "3"
    assert len(load_records("math500", limit=7)) == 7


def test_local_dataset_directory_with_data_files(tmp_path):
    directory = tmp_path / "mydata"
    directory.mkdir()
    write_jsonl(
        directory / "train.jsonl", [{"problem": "2 ** 5?", "answer": 32}, {"problem": "3 ** 2?", "answer": 9}]
    )
    write_jsonl(directory / "test.jsonl", [{"problem": "4 ** 2?", "answer": 16}])
    train = load_records(str(directory))
    assert [(r["id"], r["question"], r["answer"]) for r in train] == [
        (0, "2 ** 5?", "32"),
        (1, "3 ** 2?", "9"),
    ]
    assert train[0]["source"] == str(directory)
    test = load_records(str(directory), split="test")
    assert [(r["question"], r["answer"]) for r in test] == [("4 ** 2?", "16")]


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    import datasets

    train = datasets.Dataset.from_list([{"question": "6 / 3?", "answer": "2", "topic": "arithmetic"}])
    test = datasets.Dataset.from_list([{"question": "8 / 2?", "answer": "4", "topic": "arithmetic"}])
    train.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "dict"))

    single = load_records(str(tmp_path / "single"))
    assert single == [
        {
            "id": 0,
            "question": "6 / 3?",
            "answer": "2",
            "source": str(tmp_path / "single"),
            "extras": {"topic": "arithmetic"},
        }
    ]
    assert load_records(str(tmp_path / "dict"), split="test")[0]["question"] == "8 / 2?"
    message = load_error(tmp_path / "dict", split="validation")
    assert str(tmp_path / "dict") in message and "'validation'" in message and "train, test" in message


# ---------------------------------------------------------------- shipped eval sets


def test_shipped_eval_sets_are_the_orz_files():
    files = list_eval_sets()
    assert sorted(files) == ["aime2024", "math500"]
    # sha256 of the ORZ files at commit 3fdd9a0 (data/SOURCES.md): the copies are byte-for-byte.
    expected = {
        "math500": "236bd0cc329ee3efaf045a150e6473e4f420e7e7e17051a4e77a1f2688599e63",
        "aime2024": "ef02255e61539115f6274a0765ff10076df416db5f90d41500d472cb5184e560",
    }
    for name, path in files.items():
        assert path.parent == REPO / "data" / "eval"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == expected[name]


def test_shipped_eval_sets_load():
    math500 = load_records("math500")
    assert len(math500) == 500
    assert math500[0]["question"].startswith("Convert the point $(0,3)$ in rectangular coordinates to polar")
    assert math500[0]["answer"] == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert math500[1]["answer"] == "p - q"
    assert math500[0]["source"] == "math500"

    aime = load_records("aime2024")
    assert len(aime) == 30
    assert aime[0]["question"].startswith("Among the $900$ residents of Aimeville")
    assert aime[0]["answer"] == "73"
    assert [r["id"] for r in aime] == list(range(30))
    # The shorthand and the file path give the same records.
    by_path = load_records(str(list_eval_sets()["aime2024"]))
    assert [(r["question"], r["answer"]) for r in by_path] == [(r["question"], r["answer"]) for r in aime]


# ---------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    for name in ("nope.json", "nope.jsonl", "nope.parquet"):
        message = load_error(tmp_path / name)
        assert str(tmp_path / name) in message and "no such file" in message
    assert "no such file or directory" in load_error(tmp_path / "no_such_dir")


def test_invalid_json_reports_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text(
        '[\n  {"question": "1 + 1?", "answer": "2"},\n  {"question": "2 + 2?" "answer": "4"}\n]\n'
    )
    message = load_error(path)
    assert message.startswith(f"{path}: invalid JSON at line 3")


def test_invalid_json_lines_reports_line_and_record(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(
        '{"question": "a?", "answer": "1"}\n\n{"question": "b?", "answer": "2"}\n{"question": "c?",\n'
    )
    message = load_error(path)
    assert message.startswith(f"{path}: line 4 (record 2): invalid JSON")
    # The same content under a .json name is read as JSON Lines and fails the same way.
    renamed = tmp_path / "broken_lines.json"
    renamed.write_text(path.read_text())
    assert load_error(renamed).startswith(f"{renamed}: line 4 (record 2): invalid JSON")


def test_record_not_of_detected_format(tmp_path):
    pairs = json.loads((SAMPLES / "orz_train_sample.json").read_text())
    pairs[2] = {"question": "Flat in the middle?", "answer": "1"}
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(pairs))
    message = load_error(path)
    assert message.startswith(f"{path}: record 2: is a dict, expected an ORZ training pair")

    flat_then_pair = write_jsonl(tmp_path / "mixed.jsonl", [{"question": "q?", "answer": "1"}, pairs[0]])
    assert load_error(flat_then_pair).startswith(f"{flat_then_pair}: record 1: is a list of 2 items")

    broken_pair = [[{"from": "human", "value": "q?"}, {"from": "assistant", "value": "1"}]]
    path = tmp_path / "no_ground_truth.json"
    path.write_text(json.dumps(broken_pair))
    assert "record 0: the assistant turn has no 'ground_truth'" in load_error(path)

    scalars = tmp_path / "scalars.json"
    scalars.write_text('["a", "b"]')
    assert load_error(scalars).startswith(f"{scalars}: record 0: is a str")


def test_missing_question_field_names_fields_tried_and_flag(tmp_path):
    path = write_jsonl(
        tmp_path / "q.jsonl", [{"question": "ok?", "answer": "1"}, {"text": "x?", "answer": "2"}]
    )
    message = load_error(path)
    assert message.startswith(f"{path}: record 1: no question field (tried question, problem, prompt, query)")
    assert "--question-field" in message and "fields: text, answer" in message


def test_missing_answer_field_with_solution_hint(tmp_path):
    path = write_jsonl(
        tmp_path / "a.jsonl", [{"problem": "Smallest prime?", "solution": "It is $\\boxed{2}$."}]
    )
    message = load_error(path)
    assert message.startswith(f"{path}: record 0: no answer field (tried answer, final_answer, ground_truth)")
    assert "--answer-field" in message and "'solution' is a worked solution" in message


def test_named_field_missing(tmp_path):
    path = write_jsonl(tmp_path / "n.jsonl", [{"question": "q?", "answer": "1"}, {"question": "r?"}])
    message = load_error(path, answer_field="answer")
    assert message.startswith(f"{path}: record 1: field 'answer' (chosen with --answer-field) is missing")


def test_field_override_rejected_for_orz_pairs():
    path = SAMPLES / "orz_train_sample.json"
    assert "do not apply to ORZ training pairs" in load_error(path, question_field="question")


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"question": 17, "answer": "1"}, "record 1: question 'question' is a int, expected a string"),
        ({"question": "q?", "answer": ["1", "2"]}, "record 1: answer 'answer' is a list of 2 items"),
        ({"question": "q?", "answer": True}, "record 1: answer 'answer' is a bool"),
        ({"question": "q?", "answer": {"text": "1"}}, "record 1: answer 'answer' is a dict"),
        ({"question": "   \n", "answer": "1"}, "record 1: question 'question' is empty"),
        ({"question": "q?", "answer": ""}, "record 1: answer 'answer' is empty"),
        ({"question": "q?", "ground_truth": {"value": ""}}, "record 1: answer 'ground_truth' is empty"),
        (
            {"prompt": [{"role": "system", "content": "hi"}], "answer": "1"},
            "record 1: 'prompt' is a message list",
        ),
    ],
)
def test_bad_field_values(tmp_path, row, expected):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"question": "fine?", "answer": "1"}, row])
    message = load_error(path)
    assert message.startswith(f"{path}: {expected}")


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"question": "What is 1\ud800?", "answer": "1"}, "record 1: question 'question' has an invalid "
         "character '\\ud800' at position 9"),
        ({"question": "q?", "answer": "1\udfff"}, "record 1: answer 'answer' has an invalid character '\\udfff'"),
        ({"question": "q?", "ground_truth": {"value": "\ud83d"}}, "record 1: answer 'ground_truth' has an invalid"),
        ({"prompt": [{"role": "user", "content": "x\ud800"}], "answer": "1"}, "record 1: question 'prompt' has an"),
    ],
)
def test_lone_surrogates_in_question_or_answer_are_refused_at_load_time(tmp_path, row, expected):
    """A broken \\u escape (half of a surrogate pair) is no text a tokenizer or a UTF-8 file takes: it is
    refused when loading, with the record, not when training reaches it."""
    path = write_jsonl(tmp_path / "bad.jsonl", [{"question": "fine?", "answer": "1"}, row])
    message = load_error(path)
    assert message.startswith(f"{path}: {expected}"), message
    message.encode("utf-8")  # the message itself prints anywhere


def test_lone_surrogates_in_orz_pairs_and_extras(tmp_path):
    pair = [{"from": "human", "value": "q\ud800"}, {"from": "assistant", "ground_truth": {"value": "1"}}]
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([pair]))
    assert load_error(path).startswith(f"{path}: record 0: question 'value' has an invalid character")
    # other fields only reach a custom reward function, which may want them as they are
    path = write_jsonl(tmp_path / "extras.jsonl", [{"question": "q?", "answer": "1", "note": "\ud800"}])
    assert load_records(str(path))[0]["extras"] == {"note": "\ud800"}


def test_json_number_answers_keep_their_literal_form(tmp_path):
    """A number answer is the text the file wrote: 1e30 stays 1e30 (not the float's 31 digits, which never
    match 10^{30}), digits beyond a float's precision are kept, none are invented. Other fields stay
    numbers."""
    from reward import math_reward

    lines = ['{"question": "q?", "answer": 1e30, "weight": 0.5}', '{"question": "q?", "answer": 1.50}',
             '{"question": "q?", "answer": 0.1000000000000000000001}', '{"question": "q?", "answer": 1e400}',
             '{"question": "q?", "ground_truth": {"value": -2.5E-7, "pass_at_n": 0.25}}',
             '{"question": "q?", "answer": 12345678901234567890}']
    answers = ["1e30", "1.50", "0.1000000000000000000001", "1e400", "-2.5E-7", "12345678901234567890"]
    for name, text in (("n.jsonl", "\n".join(lines)), ("n.json", "[" + ",".join(lines) + "]")):
        path = tmp_path / name
        path.write_text(text)
        records = load_records(str(path))
        assert [r["answer"] for r in records] == answers
        assert records[0]["extras"] == {"weight": 0.5} and type(records[0]["extras"]["weight"]) is float
        assert type(records[4]["extras"]["pass_at_n"]) is float
    assert math_reward("\\boxed{10^{30}}", records[0]["answer"]) == 1.0
    assert math_reward("\\boxed{1.5}", records[1]["answer"]) == 1.0
    pair = tmp_path / "pair.json"
    pair.write_text('[[{"from": "human", "value": "q?"}, '
                    '{"from": "assistant", "ground_truth": {"value": 1e30}}]]')
    assert load_records(str(pair))[0]["answer"] == "1e30"


def test_binary_float_answers_are_written_without_invented_digits(tmp_path):
    """Parquet floats have no literal: the shortest text that reads back as the same float."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from reward import math_reward

    path = tmp_path / "floats.parquet"
    pq.write_table(pa.table({"question": ["a?", "b?", "c?"], "answer": [1e30, 42.0, 0.1]}), path)
    answers = [r["answer"] for r in load_records(str(path))]
    assert answers == ["1e+30", "42", "0.1"]
    assert math_reward("\\boxed{10^{30}}", answers[0]) == 1.0


def test_huge_integer_literal_is_one_line(tmp_path):
    path = tmp_path / "huge.jsonl"
    path.write_text('{"question": "q?", "answer": "1"}\n{"question": "q?", "answer": ' + "9" * 5000 + "}\n")
    assert load_error(path).startswith(f"{path}: line 2 (record 1): ")


@pytest.mark.parametrize("field", ["question", "answer"])
def test_null_field_is_named_as_null(tmp_path, field):
    row = {"question": "q?", "answer": "1"}
    row[field] = None
    path = write_jsonl(tmp_path / "null.jsonl", [row])
    message = load_error(path)
    assert message.startswith(f"{path}: record 0: {field} '{field}' is null"), message
    assert "no answer field" not in message and "no question field" not in message


def test_nan_answer_from_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "nan.parquet"
    pq.write_table(pa.table({"question": ["a?", "b?"], "answer": [1.0, float("nan")]}), path)
    assert load_error(path).startswith(f"{path}: record 1: answer 'answer' is nan")


def test_empty_sources(tmp_path):
    empty_list = tmp_path / "empty.json"
    empty_list.write_text("[]")
    assert load_error(empty_list) == f"{empty_list}: contains no records"
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n")
    assert load_error(blank) == f"{blank}: file is empty"
    empty_dir = tmp_path / "empty_dir"
    empty_dir.mkdir()
    message = load_error(empty_dir)
    assert message.startswith(f"{empty_dir}: cannot load dataset")


def test_unreadable_and_unsupported_files(tmp_path):
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"question": "caf\u00e9?", "answer": "1"}\n'.encode("latin-1"))
    assert load_error(latin1).startswith(f"{latin1}: not UTF-8 text")
    not_parquet = tmp_path / "fake.parquet"
    not_parquet.write_text("not parquet at all")
    assert load_error(not_parquet).startswith(f"{not_parquet}: cannot read parquet")
    csv = tmp_path / "set.csv"
    csv.write_text("question,answer\n1+1?,2\n")
    assert load_error(csv).startswith(f"{csv}: unsupported file type")
    scalar = tmp_path / "scalar.json"
    scalar.write_text('"just a string"')
    assert load_error(scalar) == f"{scalar}: top level is a str, expected a list of records"


def test_limit_must_be_positive():
    with pytest.raises(ValueError, match="limit"):
        load_records("math500", limit=0)


# ---------------------------------------------------------------- fuzzing: malformed data files


VALID_ORZ = json.dumps([
    [{"from": "human", "value": f"What is {i} + {i}?"}, {"from": "assistant", "ground_truth": {"value": str(2 * i)}}]
    for i in range(4)])
VALID_JSONL = "\n".join(json.dumps({"question": f"What is {i} + 1?", "answer": i + 1}) for i in range(4))
ODD_VALUES = [None, 0, -1.5, True, [], {}, [1, 2], {"value": None}, "", "\x00", "é" * 3, {"nested": {"x": 1}}]


def mutate(text: str, rng: random.Random) -> str:
    """One random corruption of a file's text."""
    kind = rng.randrange(7)
    if kind == 0:  # truncated at a random byte
        return text[:rng.randrange(len(text))]
    if kind == 1:  # a character deleted or duplicated
        i = rng.randrange(len(text))
        return text[:i] + text[i + 1:] if rng.random() < 0.5 else text[:i] + text[i] * 2 + text[i:]
    if kind == 2:  # garbage inserted
        i = rng.randrange(len(text))
        return text[:i] + rng.choice(["}", "]", "{", "\"", ",", "\\", "\n", "nul", "\ufeff"]) + text[i:]
    if kind == 3:  # empty or blank
        return rng.choice(["", " ", "\n\n", "[]", "{}", "null", "42", "\"text\""])
    if kind == 4:  # a value replaced by one of the wrong type
        data = [json.loads(line) for line in text.splitlines()] if text.lstrip()[0] == "{" else json.loads(text)
        return json.dumps(replace_random_value(data, rng)) if text.lstrip()[0] == "[" else "\n".join(
            json.dumps(d) for d in replace_random_value(data, rng))
    if kind == 5:  # a key removed or renamed
        return text.replace(rng.choice(["\"question\"", "\"answer\"", "\"value\"", "\"ground_truth\"", "\"from\""]),
                            rng.choice(["\"q\"", "\"\"", "\"Question \""]), 1)
    return text.replace("\n", rng.choice(["\n\n", "\n{\n", "\n[1]\n"]), 1)  # a bad JSONL line


def replace_random_value(data, rng: random.Random):
    """A copy of `data` with one scalar or container somewhere inside replaced by an odd value."""
    data = json.loads(json.dumps(data))
    node, path = data, []
    while isinstance(node, (list, dict)) and node and rng.random() < 0.8:
        key = rng.randrange(len(node)) if isinstance(node, list) else rng.choice(list(node))
        path.append((node, key))
        node = node[key]
    if path:
        parent, key = path[-1]
        parent[key] = rng.choice(ODD_VALUES)
    return data


@pytest.mark.parametrize("base,suffix", [(VALID_ORZ, ".json"), (VALID_JSONL, ".jsonl")])
def test_malformed_data_files_give_records_or_one_line_errors(base, suffix, tmp_path):
    rng = random.Random(0)
    outcomes = {"records": 0, "errors": 0}
    for case in range(150):
        text = mutate(base, rng)
        path = tmp_path / f"case{case}{suffix}"
        path.write_text(text, encoding="utf-8")
        try:
            records = load_records(str(path))
        except DataError as err:
            message = str(err)
            assert "\n" not in message and str(path) in message, (text, message)
            outcomes["errors"] += 1
            continue
        except Exception as err:  # noqa: BLE001 - exactly what must not happen
            pytest.fail(f"case {case}: {type(err).__name__}: {err}\n--- input ---\n{text}")
        for r in records:
            assert isinstance(r["question"], str) and r["question"].strip(), (text, r)
            assert isinstance(r["answer"], str) and r["answer"].strip(), (text, r)
        outcomes["records"] += 1
    assert outcomes["errors"] > 50 and outcomes["records"] > 10, outcomes  # both kinds of outcome were exercised


def test_binary_and_wrong_format_files(tmp_path):
    cases = {"garbage.parquet": b"PAR1 not really", "binary.json": bytes(range(256)),
             "latin1.jsonl": "é".encode("latin-1"), "notes.txt": b"hello"}
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(DataError) as err:
            load_records(str(path))
        assert "\n" not in str(err.value) and name in str(err.value)


# ---------------------------------------------------------------- prompt templates


def make_tokenizer(chat_template: str | None):
    """A word-level tokenizer built offline; only its chat template matters here."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "[PAD]": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")
    tokenizer.chat_template = chat_template
    return tokenizer


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def test_orz_template_is_exact():
    assert ORZ_TEMPLATE == ORZ_TEMPLATE_TYPED
    question = "What is $1 + 2$?"
    prompt = format_prompt(question)
    assert prompt == format_prompt(question, template="orz")
    assert prompt.endswith("Assistant: <think>")
    assert "This is the problem:\n" + question + "\nAssistant: <think>" in prompt
    assert prompt.startswith("A conversation between User and Assistant.")
    assert "\\boxed{} tag." in prompt and "{question}" not in prompt


def test_question_with_braces_is_inserted_verbatim():
    question = "Evaluate $\\frac{1}{2} + {x}$ where {question} is literal."
    assert format_prompt(question).count(question) == 1
    assert format_prompt(question, template="raw") == question


def test_chat_template():
    tokenizer = make_tokenizer(CHAT_TEMPLATE)
    prompt = format_prompt("What is 2 + 2?", template="chat", tokenizer=tokenizer)
    assert prompt == (
        "<|user|>\nYou must put your answer inside <answer> </answer> tags, i.e., <answer> answer here </answer>. "
        "And your final answer will be extracted automatically by the \\boxed{} tag.\n"
        "This is the problem:\nWhat is 2 + 2?<|end|>\n<|assistant|>\n"
    )
    with_system = format_prompt(
        "What is 2 + 2?", template="chat", tokenizer=tokenizer, system_prompt="Think step by step."
    )
    assert with_system.startswith("<|system|>\nThink step by step.<|end|>\n<|user|>\nYou must put")
    assert with_system.endswith(prompt)


def test_chat_template_errors():
    with pytest.raises(DataError, match="has no chat template"):
        format_prompt("q?", template="chat", tokenizer=make_tokenizer(None))
    with pytest.raises(DataError, match="needs a tokenizer"):
        format_prompt("q?", template="chat")
    refusing = make_tokenizer("{{ raise_exception('System role not supported\\nat all') }}")
    with pytest.raises(DataError, match="chat template failed: System role not supported") as info:
        format_prompt("q?", template="chat", tokenizer=refusing, system_prompt="S")
    assert "\n" not in str(info.value)


def test_raw_and_custom_templates():
    assert format_prompt("What is 3 + 4?", template="raw") == "What is 3 + 4?"
    custom = "Problem: {question}\nPut the result in \\boxed{}.\nSolution:"
    assert format_prompt("What is 3 + 4?", template=custom) == (
        "Problem: What is 3 + 4?\nPut the result in \\boxed{}.\nSolution:"
    )


def test_template_errors():
    with pytest.raises(DataError, match="unknown prompt template 'qwen'"):
        format_prompt("q?", template="qwen")
    with pytest.raises(DataError, match="system prompt needs template 'chat'"):
        format_prompt("q?", template="orz", system_prompt="S")


def test_a_file_whose_name_starts_with_synthetic_is_read_as_a_file(tmp_path, monkeypatch):
    """'synthetic' and 'synthetic:SPLIT' name the built-in task; `synthetic_extra.jsonl` is a file, in
    training, evaluation and curation alike (they share one loader)."""
    import argparse

    from data.curate import load_dataset
    from data.loading import read_data
    from data.synthetic import make_synthetic_records
    from evaluate import EvalArgs, load_eval_datasets
    from train_ppo import Args

    monkeypatch.chdir(tmp_path)
    (tmp_path / "synthetic_extra.jsonl").write_text('{"question": "1 + 1", "answer": "2"}\n')
    train, _ = read_data(Args(dataset="synthetic_extra.jsonl", eval_datasets="synthetic_extra.jsonl"))
    assert [r["answer"] for r in train] == ["2"]
    evals = load_eval_datasets(EvalArgs(datasets="synthetic_extra.jsonl,synthetic"))
    assert [r["answer"] for r in evals["synthetic_extra.jsonl"]] == ["2"]
    assert evals["synthetic"] == make_synthetic_records("test", 512)  # the held-out split
    curate_args = argparse.Namespace(split="train", seed=0, synthetic_difficulty=1, question_field=None,
                                     answer_field=None, limit=0)
    assert [r["answer"] for r in load_dataset("synthetic_extra.jsonl", curate_args)] == ["2"]


def test_one_loader_for_the_built_in_task_or_a_file():
    from data.loading import DataError, load_dataset
    from data.synthetic import make_synthetic_records

    assert load_dataset("synthetic", "train", seed=3) == make_synthetic_records("train", 4096, seed=3)
    assert load_dataset("synthetic:test", "train", seed=3) == make_synthetic_records("test", 512, seed=3)
    assert load_dataset("synthetic", "test") == make_synthetic_records("test", 512)
    with pytest.raises(DataError, match="synthetic:dev"):
        load_dataset("synthetic:dev", "train")


def test_records_whose_answer_cannot_be_checked_are_skipped_and_counted(tmp_path, tiny_base, capsys):
    from transformers import AutoTokenizer

    from data.loading import load_data

    path = tmp_path / "mixed.jsonl"
    answers = ["4", "\\frac{1}{2", "\\{1, 2\\}", "x}", "7"]
    path.write_text("\n".join(json.dumps({"question": f"q{i}?", "answer": a}) for i, a in enumerate(answers)))
    args = Args(dataset=str(path), output_dir=str(tmp_path / "out"))
    train, _ = load_data(args, AutoTokenizer.from_pretrained(tiny_base))
    assert [r["answer"] for r in train] == ["4", "\\{1, 2\\}", "7"]
    assert "skipped 2 of 5 training records whose answer cannot be checked" in capsys.readouterr().out


# ---------------------------------------------------------------- the tiny base model's cache (data/synthetic.py)


SMALL = dict(steps=30, hidden_size=32, num_layers=1, batch_size=8)  # seconds to build, not minutes

# Each process imports everything first, then waits for the other at a file barrier, so that both look for
# the cache at the same moment (as tests and a training run started together on a fresh machine do).
BUILD_AFTER_BARRIER = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from data.synthetic import build_tiny_base
cache, barrier, me, overrides = sys.argv[2], Path(sys.argv[3]), sys.argv[4], json.loads(sys.argv[5])
(barrier / me).touch()
while len(list(barrier.iterdir())) < 2:
    time.sleep(0.005)
print("PATH", build_tiny_base(cache_dir=cache, **overrides))
"""


def test_two_processes_building_at_once_share_one_build(tmp_path):
    cache, barrier = tmp_path / "cache", tmp_path / "barrier"
    cache.mkdir()
    barrier.mkdir()
    # A build killed earlier left its temporary directory: it is removed, not kept forever.
    entry = tiny_base_path(str(cache), **SMALL)
    stale = entry.with_name(entry.name + ".tmp4194305")
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    argv = ["-c", BUILD_AFTER_BARRIER, str(ROOT), str(cache), str(barrier)]
    procs = [start_script(*argv, name, json.dumps(SMALL), cwd=tmp_path, env={"OMP_NUM_THREADS": "1"},
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    results = [p.communicate(timeout=600) for p in procs]
    for proc, (_, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err[-2000:]
    paths = {line.removeprefix("PATH ") for out, _ in results for line in out.splitlines()
             if line.startswith("PATH ")}
    assert paths == {str(entry)}
    assert (Path(paths.pop()) / "model.safetensors").is_file()
    # One process built it (with a progress bar: steps done of the total, and the time left); the other
    # waited for it and used the finished cache.
    built = [out + err for out, err in results if "building the tiny base model once" in out]
    assert len(built) == 1, results
    assert re.search(r"30/30 \[\d+:\d+<\d+:\d+", built[0]), built[0][-2000:]
    assert not [p.name for p in cache.iterdir() if ".tmp" in p.name]


def test_a_finished_cache_is_reused_without_building(tmp_path):
    logged = []
    first = build_tiny_base(cache_dir=str(tmp_path), log=logged.append, **SMALL)
    assert any("building" in line for line in logged)
    logged.clear()
    assert build_tiny_base(cache_dir=str(tmp_path), log=logged.append, **SMALL) == first
    assert logged == []


def test_context_problems_count_the_longest_prompt_and_the_new_tokens():
    from types import SimpleNamespace

    from data.loading import context_problems

    config = SimpleNamespace(max_position_embeddings=1024)
    assert context_problems(config, 1000, 24) == [] and context_problems(SimpleNamespace(), 10**6, 10) == []
    assert context_problems(config, 1020, 14) == [
        "--max-new-tokens 1020 plus the longest prompt's 14 tokens exceed(s) the model's context of 1024 positions "
        "(max_position_embeddings): lower --max-new-tokens, or use a model with a longer context"]


def test_the_tiny_base_is_the_one_the_readmes_figures_were_measured_with(tiny_base):
    """The default base built in this session has the bytes recorded in data.synthetic.BASE_SHA256: a change
    to the builder, the versions or the machine that changes it makes the README's tables stale."""
    from data.synthetic import BASE_SHA256

    assert hashlib.sha256((Path(tiny_base) / "model.safetensors").read_bytes()).hexdigest() == BASE_SHA256
