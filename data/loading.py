"""Load math question/answer data from any common source, and turn questions into prompts.

Every source becomes a list of plain records, one per problem:

    {"id": 0,                 # index in the source, stable across runs and limits
     "question": "What is 2 + 3?",
     "answer": "5",           # the final answer the reward compares against, always a string
     "source": "math500",     # the file path, directory or dataset name passed in
     "extras": {}}            # other fields of the source, e.g. ORZ's pass_at_n or an eval set's choices

Sources `load_records` understands:
  - `.json`: ORZ training pairs `[{"from": "human", "value": q}, {"from": "assistant", "ground_truth":
    {"value": a}}]`, ORZ eval records `{"prompt": [{"from": "user", "value": q}], "final_answer": a}`,
    a list of flat objects, or JSON Lines saved under a .json name;
  - `.jsonl` and `.parquet` with flat records;
  - a local dataset directory (data files, or the output of `save_to_disk`) or a Hugging Face dataset name;
  - the shipped eval sets by name: "math500", "aime2024" (see `list_eval_sets`).

Every problem with the input raises `DataError` with a one-line message that names the file and the
record, so a script can print it and exit 2:

    try:
        records = load_records(args.dataset, question_field=args.question_field)
    except DataError as err:
        sys.exit(f"error: {err}")
    prompts = [format_prompt(r["question"], template="orz") for r in records]
"""

import json
import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

# Default field names, tried in order. `solution` is deliberately absent from the answers: in MATH-style
# sets it holds a worked solution, and comparing a model's boxed answer against it always scores 0.
QUESTION_FIELDS = ("question", "problem", "prompt", "query")
ANSWER_FIELDS = ("answer", "final_answer", "ground_truth")
FILE_SUFFIXES = (".json", ".jsonl", ".parquet")

EVAL_DIR = Path(__file__).resolve().parent / "eval"
EVAL_FILES = {"math500": "math500.json", "aime2024": "aime2024.json"}

# The prompt of Open-Reasoner-Zero (commit 3fdd9a0, MIT; arXiv:2503.24290), reproduced exactly: plain
# text for a base model, no chat template. It ends right after "<think>" with no newline, so the model's
# first token continues the reasoning. `{question}` is filled with str.replace, not str.format, because
# the text itself contains the braces of `\boxed{}`.
ORZ_INSTRUCTION = (
    "You must put your answer inside <answer> </answer> tags, i.e., <answer> answer here </answer>. "
    "And your final answer will be extracted automatically by the \\boxed{} tag."
)
ORZ_TEMPLATE = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. "
    "The Assistant first thinks about the reasoning process in the mind and then provides the User with "
    "the answer. The reasoning process is enclosed within <think> </think> and answer is enclosed within "
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
    "<answer> answer here </answer>. User: "
    + ORZ_INSTRUCTION
    + "\nThis is the problem:\n{question}\nAssistant: <think>"
)
# ORZ's stop strings: generation ends at the first of them, which stays in the response (the template
# asks for the answer inside <answer> tags; the others stop a base model that starts a new turn).
ORZ_STOP_STRINGS = ["User:", "Human:", "Assistant:", "</answer>"]
PROMPT_TEMPLATES = ("orz", "chat", "raw")


@dataclass
class DataArgs:
    """How records are read from a dataset (training, evaluation and curation share these arguments)."""

    question_field: str | None = field(default=None, metadata={
        "group": "model and data", "help": "field holding the question (default: auto)"})
    answer_field: str | None = field(default=None, metadata={"help": "field holding the final answer (default: auto)"})
    synthetic_difficulty: int = field(default=1, metadata={"help": "difficulty of the built-in task (1: a+b under 20)"})


class DataError(ValueError):
    """A problem with the input data or prompt settings that the user must fix.

    The message is one line and names the file (or dataset) and, where there is one, the record.
    """

    def __init__(self, message: str):
        # One line whatever went into it, so a script can print it as a single error line.
        super().__init__(" ".join(str(message).splitlines()))


def list_eval_sets() -> dict[str, Path]:
    """Map each shipped eval set's name ("math500", "aime2024") to its file under data/eval/."""
    return {name: EVAL_DIR / filename for name, filename in EVAL_FILES.items()}


SYNTHETIC_SIZES = {"train": 4096, "test": 512}  # problems of the built-in task's splits


def is_synthetic(spec: str) -> bool:
    """Whether a dataset spec names the built-in task ("synthetic" or "synthetic:SPLIT"), not a file."""
    return spec == "synthetic" or spec.startswith("synthetic:")


def load_dataset(spec: str, split: str, *, seed: int = 0, difficulty: int = 1, question_field: str | None = None,
                 answer_field: str | None = None) -> list[dict]:
    """Records of a dataset spec, as training, evaluation and curation read it: "synthetic" is the built-in
    task's `split` and "synthetic:SPLIT" names the split (train: 4096 problems, test: the 512 held out),
    seeded by `seed`; anything else (a file, a dataset directory, a hub name, math500, ...) goes to
    `load_records` with `split`. Raises DataError (one line) for a bad spec or file."""
    if is_synthetic(spec):
        from data.synthetic import make_synthetic_records

        which = spec.partition(":")[2] or split
        if which not in SYNTHETIC_SIZES:
            raise DataError(f"{spec}: the built-in task has the splits {', '.join(SYNTHETIC_SIZES)}, not {which!r}")
        return make_synthetic_records(which, n=SYNTHETIC_SIZES[which], seed=seed, difficulty=difficulty)
    return load_records(spec, split=split, question_field=question_field, answer_field=answer_field)


def load_records(
    spec: str,
    split: str = "train",
    question_field: str | None = None,
    answer_field: str | None = None,
    limit: int | None = None,
) -> list[dict]:
    """Load question/answer records from a file, a dataset directory, a dataset name or an eval set name.

    spec: a .json/.jsonl/.parquet path, a local dataset directory, a Hugging Face dataset name, or
        "math500"/"aime2024" (the shipped eval sets; these names win over a directory of the same name).
    split: the split of a dataset directory or name (slices such as "train[:100]" work for
        `load_dataset`, plain names for a saved DatasetDict); ignored for single files and a saved Dataset.
    question_field, answer_field: the field to read from flat records; by default the first present of
        QUESTION_FIELDS / ANSWER_FIELDS. An answer may be a string, a number, or {"value": ...}; a JSON
        number answer keeps the text the file wrote ("1e30", "1.50").
    limit: keep only the first `limit` records (ids stay their index in the source).

    Returns a list of {"id", "question", "answer", "source", "extras"} dicts; "source" is `spec` as given.
    Raises DataError for anything wrong with the data.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of records, got {limit}")
    spec = str(spec)  # a pathlib.Path works too
    eval_sets = list_eval_sets()
    path = eval_sets[spec] if spec in eval_sets else Path(spec).expanduser()
    source = spec  # what the caller asked for, so logs read "math500" rather than a checkout's path

    if path.is_dir():
        items = _read_dataset(str(path), source, split, limit)
    elif path.suffix.lower() in FILE_SUFFIXES:
        items = _read_file(path, source, limit)
    elif path.exists():
        expected = ", ".join(FILE_SUFFIXES)
        raise DataError(f"{source}: unsupported file type (expected {expected} or a dataset directory)")
    elif spec.startswith(("/", "./", "../", "~")):
        # Looks like a path, so asking the Hub for it would only give a confusing error.
        raise DataError(f"{source}: no such file or directory")
    else:
        items = _read_dataset(spec, source, split, limit)

    if not items:
        raise DataError(f"{source}: contains no records")
    return _to_records(items[:limit], source, question_field, answer_field)


def format_prompt(
    question: str,
    template: str = "orz",
    tokenizer=None,
    system_prompt: str | None = None,
) -> str:
    """Turn a question into the text the policy continues.

    template:
      "orz"  - ORZ_TEMPLATE, plain text for base models (what ORZ trains with);
      "chat" - the tokenizer's chat template, with ORZ's instruction about <answer> tags and \\boxed{}
               in the user turn and an optional system prompt, ending with the generation prompt;
      "raw"  - the question unchanged;
      any other string containing "{question}" - a custom template, filled by plain replacement (so
               braces elsewhere, as in \\boxed{}, need no escaping).

    >>> format_prompt("What is 2 + 3?", "Q: {question}\\nA:")
    'Q: What is 2 + 3?\\nA:'
    """
    if system_prompt is not None and template != "chat":
        raise DataError(f"a system prompt needs template 'chat', not {_short(template)}")
    if template == "orz":
        return ORZ_TEMPLATE.replace("{question}", question)
    if template == "raw":
        return question
    if template == "chat":
        return _chat_prompt(question, tokenizer, system_prompt)
    if "{question}" in template:
        return template.replace("{question}", question)
    raise DataError(
        f"unknown prompt template {_short(template)}: use one of {', '.join(PROMPT_TEMPLATES)} "
        "or a template string containing {question}"
    )


def _chat_prompt(question: str, tokenizer, system_prompt: str | None) -> str:
    """Render one user turn (ORZ's instruction, then the problem) with the tokenizer's chat template."""
    if tokenizer is None:
        raise DataError("template 'chat' needs a tokenizer")
    if getattr(tokenizer, "chat_template", None) is None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(f"tokenizer {name} has no chat template: use template 'orz' or 'raw' instead")
    messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    messages.append({"role": "user", "content": f"{ORZ_INSTRUCTION}\nThis is the problem:\n{question}"})
    # Imported here: jinja2 comes with transformers, which only the chat path needs.
    from jinja2.exceptions import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TemplateError as err:
        # Some templates refuse a system turn via raise_exception(); say so without a jinja traceback.
        raise DataError(f"the tokenizer's chat template failed: {_first_line(err)}") from None


# ---------------------------------------------------------------- reading sources into raw items


def _read_file(path: Path, source: str, limit: int | None) -> list:
    """Read a .json, .jsonl or .parquet file into a list of raw items (dicts or ORZ pairs)."""
    if path.suffix.lower() == ".parquet":
        return _read_parquet(path, source, limit)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{source}: no such file") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{source}: not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise DataError(f"{source}: cannot read: {err.strerror or err}") from None
    if not text.strip():
        raise DataError(f"{source}: file is empty")
    if path.suffix.lower() == ".jsonl":
        return _parse_json_lines(text, source, limit)
    return _parse_json(text, source, limit)


class _JsonNumber(float):
    """A JSON number with a fraction or an exponent, which also keeps the text the file wrote: as a float,
    1e30 would become the integer 1000000000000000019884624838656 and 0.1000000000000000000001 lose digits."""

    def __new__(cls, text: str):
        number = super().__new__(cls, text)
        number.text = text
        return number


def _plain(value):
    """`value` with every _JsonNumber inside made a plain float (record fields other than the answer)."""
    if isinstance(value, _JsonNumber):
        return float(value)
    if isinstance(value, dict):
        return {key: _plain(v) for key, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _too_long_number(err: ValueError) -> str:
    """The message for the one ValueError json raises besides a syntax error: an integer of more digits
    than Python converts (sys.get_int_max_str_digits)."""
    return f"{_first_line(err).split(':')[0]}: write this number as a string"


def _parse_json(text: str, source: str, limit: int | None) -> list:
    """Parse a .json file: a list of records, one object, or (saved under the wrong name) JSON Lines."""
    try:
        data = json.loads(text, parse_float=_JsonNumber)
    except json.JSONDecodeError as err:
        # A file whose first line is a complete JSON value but whose whole text is not is JSON Lines;
        # a broken JSON list fails on its first line ("[") and keeps the whole-file error position.
        first_line = next(line for line in text.splitlines() if line.strip())
        try:
            json.loads(first_line)
        except json.JSONDecodeError:
            position = f"line {err.lineno} column {err.colno}"
            raise DataError(f"{source}: invalid JSON at {position}: {err.msg}") from None
        return _parse_json_lines(text, source, limit)
    except ValueError as err:
        raise DataError(f"{source}: {_too_long_number(err)}") from None
    if isinstance(data, dict):
        return [data]  # what a one-line JSON Lines file holds
    if not isinstance(data, list):
        raise DataError(f"{source}: top level is {_describe(data)}, expected a list of records")
    return data


def _parse_json_lines(text: str, source: str, limit: int | None) -> list:
    """Parse JSON Lines, one record per non-blank line; stops after `limit` records."""
    items = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if limit is not None and len(items) >= limit:
            break
        if not line.strip():
            continue
        try:
            items.append(json.loads(line, parse_float=_JsonNumber))
        except json.JSONDecodeError as err:
            raise DataError(
                f"{source}: line {line_number} (record {len(items)}): invalid JSON at column {err.colno}: "
                f"{err.msg}"
            ) from None
        except ValueError as err:
            where = f"{source}: line {line_number} (record {len(items)})"
            raise DataError(f"{where}: {_too_long_number(err)}") from None
    return items


def _read_parquet(path: Path, source: str, limit: int | None) -> list[dict]:
    """Read a parquet file's rows as dicts with pyarrow (what `datasets` uses underneath)."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise DataError(f"{source}: no such file") from None
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"{source}: cannot read parquet: {_first_line(err)}") from None
    if limit is not None:
        table = table.slice(0, limit)
    return table.to_pylist()


def _read_dataset(spec: str, source: str, split: str, limit: int | None) -> list[dict]:
    """Read one split of a local dataset directory or a Hugging Face dataset name as a list of dicts."""
    import datasets

    directory = Path(spec)
    saved = directory.is_dir() and (
        (directory / datasets.config.DATASET_STATE_JSON_FILENAME).exists()
        or (directory / datasets.config.DATASETDICT_JSON_FILENAME).exists()
    )
    try:
        # load_dataset refuses a save_to_disk directory, so those go through load_from_disk.
        dataset = datasets.load_from_disk(spec) if saved else datasets.load_dataset(spec, split=split)
    # Not found, no data files, unknown split, no network (OSError, ValueError); unparsable data files
    # (DatasetsError, raised while building the split).
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as err:
        raise DataError(f"{source}: cannot load dataset (split {split!r}): {_first_line(err)}") from None
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise DataError(f"{source}: no split {split!r} (splits: {', '.join(dataset)})")
        dataset = dataset[split]
    if limit is not None and limit < len(dataset):
        dataset = dataset.select(range(limit))
    return dataset.to_list()


# ---------------------------------------------------------------- raw items to records


def _to_records(items: list, source: str, question_field: str | None, answer_field: str | None) -> list[dict]:
    """Normalise raw items into records; the first item decides the format the others must follow."""
    if isinstance(items[0], list):
        if question_field is not None or answer_field is not None:
            raise DataError(
                f"{source}: --question-field/--answer-field do not apply to ORZ training pairs "
                "[human, assistant], whose fields are fixed"
            )
        return [_orz_pair_record(item, source, i) for i, item in enumerate(items)]
    if isinstance(items[0], dict):
        return [_flat_record(item, source, i, question_field, answer_field) for i, item in enumerate(items)]
    raise DataError(
        f"{source}: record 0: is {_describe(items[0])}, expected an object with question and answer fields "
        "or an ORZ training pair [human, assistant]"
    )


def _orz_pair_record(item, source: str, index: int) -> dict:
    """One ORZ training pair `[{"from": "human", "value": q}, {"from": "assistant", "ground_truth": ...}]`."""
    where = f"{source}: record {index}"
    if not (isinstance(item, list) and len(item) == 2 and all(isinstance(turn, dict) for turn in item)):
        raise DataError(
            f"{where}: is {_describe(item)}, expected an ORZ training pair like record 0: "
            '[{"from": "human", "value": ...}, {"from": "assistant", "ground_truth": {"value": ...}}]'
        )
    human, assistant = item
    if human.get("value") is None:
        raise DataError(f"{where}: the human turn has no 'value' (the question)")
    ground_truth = assistant.get("ground_truth")
    if not isinstance(ground_truth, dict) or ground_truth.get("value") is None:
        raise DataError(f"{where}: the assistant turn has no 'ground_truth': {{'value': ...}} (the answer)")
    question = _question_text(human["value"], where, "value")
    answer, extras = _answer_text(ground_truth, where, "ground_truth")
    return {"id": index, "question": question, "answer": answer, "source": source, "extras": extras}


def _flat_record(item, source: str, index: int, question_field: str | None, answer_field: str | None) -> dict:
    """One flat object; ORZ eval records are flat too, with the question inside a `prompt` message list."""
    where = f"{source}: record {index}"
    if not isinstance(item, dict):
        raise DataError(f"{where}: is {_describe(item)}, expected an object like record 0")
    q_name = _pick_field(item, question_field, QUESTION_FIELDS, "question", where)
    a_name = _pick_field(item, answer_field, ANSWER_FIELDS, "answer", where)
    question = _question_text(item[q_name], where, q_name)
    answer, answer_extras = _answer_text(item[a_name], where, a_name)
    extras = {key: _plain(value) for key, value in item.items() if key not in (q_name, a_name)}
    extras.update(answer_extras)
    return {"id": index, "question": question, "answer": answer, "source": source, "extras": extras}


def _pick_field(item: dict, chosen: str | None, candidates: tuple, kind: str, where: str) -> str:
    """The name of the field holding the question or answer: the user's choice, else the first present."""
    flag = f"--{kind}-field"
    fields = _field_list(item)
    if chosen is not None:
        if item.get(chosen) is None:
            raise DataError(
                f"{where}: field '{chosen}' (chosen with {flag}) is missing or null; the record has {fields}"
            )
        return chosen
    for name in candidates:
        value = item.get(name)
        # A `prompt` that is neither text nor a message list (e.g. token ids) is not a question.
        if value is not None and (name != "prompt" or isinstance(value, str) or _is_message_list(value)):
            return name
    null = next((name for name in candidates if name in item and item[name] is None), None)
    if null is not None:
        raise DataError(
            f"{where}: {kind} '{null}' is null (empty): fill it in or drop the record; {flag} NAME reads "
            f"another field; the record has {fields}"
        )
    hint = ""
    if kind == "answer" and "solution" in item:
        hint = " ('solution' is a worked solution, not a final answer: use it only on purpose)"
    raise DataError(
        f"{where}: no {kind} field (tried {', '.join(candidates)}); choose one with {flag} NAME{hint}; "
        f"the record has {fields}"
    )


def _question_text(value, where: str, name: str) -> str:
    """The question as a non-empty string; a message list gives its last user turn."""
    if _is_message_list(value):
        turns = [m for m in value if m.get("from", m.get("role")) in ("user", "human")]
        if not turns:
            raise DataError(f"{where}: '{name}' is a message list without a user turn")
        value = turns[-1].get("value", turns[-1].get("content"))
    if not isinstance(value, str):
        raise DataError(f"{where}: question '{name}' is {_describe(value)}, expected a string")
    if not value.strip():
        raise DataError(f"{where}: question '{name}' is empty")
    return _valid_text(value, f"{where}: question '{name}'")


def _answer_text(value, where: str, name: str) -> tuple[str, dict]:
    """The answer as a non-empty string, plus the other keys of a {"value": ...} answer (e.g. pass_at_n)."""
    extras = {}
    if isinstance(value, dict) and "value" in value:
        extras = {key: _plain(v) for key, v in value.items() if key != "value"}
        value = value["value"]
    # bool is an int subclass, but True is never a math answer: it means a column was misread.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = _number_text(value, where, name)
    if not isinstance(value, str):
        raise DataError(f"{where}: answer '{name}' is {_describe(value)}, expected a string or a number")
    if not value.strip():
        raise DataError(f"{where}: answer '{name}' is empty")
    return _valid_text(value, f"{where}: answer '{name}'"), extras


def _number_text(value: int | float, where: str, name: str) -> str:
    """A number answer as text, never with digits the source did not hold: a JSON number as the file wrote
    it; a binary float (parquet, datasets) as the shortest text that reads back as the same float, or
    without ".0" when integral and below 2**53, where every integer is exact (such floats come from int
    columns that met a null in pandas)."""
    if isinstance(value, _JsonNumber):
        return value.text  # JSON 1e400 is a number too, though a float cannot hold it
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        raise DataError(f"{where}: answer '{name}' is {value} (a missing value?)")
    return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)


def _valid_text(text: str, what: str) -> str:
    """`text` if it is valid Unicode; DataError for a lone surrogate (half of a broken \\u escape pair, which
    JSON readers let through): no tokenizer takes it and no UTF-8 file can hold it, so it would stop
    training later, when the prompt is tokenized or a sample holding it is written."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise DataError(
            f"{what} has an invalid character {text[err.start]!r} at position {err.start} (a lone UTF-16 "
            "surrogate, e.g. half of a broken \\u escape pair): fix or remove it"
        ) from None
    return text


# ---------------------------------------------------------------- message helpers


def _is_message_list(value) -> bool:
    """True for chat-style turns: ORZ's [{"from", "value"}] or Hugging Face's [{"role", "content"}]."""
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(m, dict) and ("from" in m or "role" in m) for m in value)
    )


def _describe(value) -> str:
    """A short type description for error messages, never the value itself (it may span lines)."""
    if isinstance(value, list):
        return f"a list of {len(value)} items"
    if value is None:
        return "null"
    return "a float" if isinstance(value, float) else f"a {type(value).__name__}"


def _field_list(item: dict, at_most: int = 12) -> str:
    """The record's field names for an error message, shortened for wide tables."""
    names = [str(key) for key in item]
    if not names:
        return "no fields"
    more = f", ... ({len(names) - at_most} more)" if len(names) > at_most else ""
    return "fields: " + ", ".join(names[:at_most]) + more


def _short(text: str, at_most: int = 60) -> str:
    """repr() of a possibly long user string, cut so the message stays one readable line."""
    return repr(text if len(text) <= at_most else text[:at_most] + "...")


def _first_line(err: Exception) -> str:
    """The first non-empty line of an exception's message, so our messages stay one line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


# ---------------------------------------------------------------- a training run's data


def context_problems(config, max_new_tokens: int, longest_prompt: int = 0) -> list[str]:
    """[] if the longest prompt and --max-new-tokens fit in the model's context (`max_position_embeddings` of
    its config, when it has one); else one message. Decoding past it goes on for minutes and gives noise."""
    context = getattr(config, "max_position_embeddings", None)
    if not context or longest_prompt + max_new_tokens <= context:
        return []
    prompt = f" plus the longest prompt's {longest_prompt} tokens" if longest_prompt else ""
    return [f"--max-new-tokens {max_new_tokens}{prompt} exceed(s) the model's context of {context} positions "
            f"(max_position_embeddings): lower --max-new-tokens, or use a model with a longer context"]


def read_data(args) -> tuple[list, dict]:
    """(train records, {eval set name: records}) as read from their files, before any tokenizer or model
    is needed; a bad file stops the run with one line. `args`: a training run's arguments (train_ppo.Args)."""
    from utils import RunError

    load = partial(load_dataset, seed=args.seed, difficulty=args.synthetic_difficulty,
                   question_field=args.question_field, answer_field=args.answer_field)
    specs = [s.strip() for s in (args.eval_datasets or ("synthetic" if args.dataset == "synthetic" else "")).split(",")
             if s.strip()]
    try:
        train = load(args.dataset, "train")
        evals = {spec.partition(":")[0]: load(spec, "test") for spec in specs}
    except DataError as err:
        raise RunError(f"error: {err}") from None
    return train, evals


def load_data(args, tokenizer, data: tuple[list, dict] | None = None, config=None):
    """Train and eval records (`data` from `read_data`, read now if not given), each with `prompt_ids`;
    prompts over the limit are skipped and counted. With the model's `config`, a longest prompt and
    --max-new-tokens beyond its context stop the run (`context_problems`)."""
    from reward import answer_is_usable
    from utils import RunError

    train, evals = read_data(args) if data is None else data
    try:
        for records in (train, *evals.values()):
            for r in records:
                r["prompt_ids"] = tokenizer(format_prompt(r["question"], args.prompt_template, tokenizer))["input_ids"]
    except DataError as err:
        raise RunError(f"error: {err}") from None
    unusable = [r for r in train if not answer_is_usable(r["answer"])]
    if unusable:
        print(f"warning: skipped {len(unusable)} of {len(train)} training records whose answer cannot be checked "
              f"(empty or unbalanced braces; first: record {unusable[0]['id']}, answer {unusable[0]['answer'][:40]!r})")
        train = [r for r in train if answer_is_usable(r["answer"])]
    kept = [r for r in train if len(r["prompt_ids"]) <= args.max_prompt_tokens]
    if len(kept) < len(train):
        print(f"warning: skipped {len(train) - len(kept)} of {len(train)} training prompts longer than "
              f"--max-prompt-tokens {args.max_prompt_tokens} "
              f"(first: record {next(r['id'] for r in train if r not in kept)})")
    if not kept:
        raise RunError(f"error: {args.dataset}: no training prompt fits in "
                       f"--max-prompt-tokens {args.max_prompt_tokens}")
    for name, records in evals.items():
        records = [r for r in records if len(r["prompt_ids"]) <= args.max_prompt_tokens]
        evals[name] = records[:args.eval_limit] if args.eval_limit else records
    longest = max(len(r["prompt_ids"]) for records in (kept, *evals.values()) for r in records)
    problems = context_problems(config, args.max_new_tokens, longest) if config is not None else []
    if problems:
        raise RunError("error: " + problems[0])
    return kept, {name: records for name, records in evals.items() if records}
