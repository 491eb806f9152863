"""Rule-based math reward: answer extraction, equivalence checking, and a hang-proof batch scorer.

Open-Reasoner-Zero's reward (arXiv:2503.24290v2, repo commit 3fdd9a0): 1.0 when the last `\\boxed{}` inside
`<answer> ... </answer>` equals the ground truth, else 0.0; no format reward, no length penalty. The caller
applies ORZ's other rule (a truncated response scores 0). What this file adds, numbered:

1. Equivalence is math-verify 0.9.0 (`parse`/`verify`) on the LaTeX path only, plus our own normalisation
   for what it misses or gets wrong: units inside `\\text{}`, thousands separators, E-notation, `x = 5`,
   `\\approx`, inequalities and set-builder sets vs intervals, column vectors (and arrays, and a scalar
   times a vector) vs tuples, repeating decimals, multiple-choice letters and multiple-select sets (`AC`),
   word answers, lead-ins such as `\\text{The answer is }`, and one answer written twice (`1/2 or 0.5`).
   Its bare-unit stripping is off: it turns `4t` into `4` (`latex2sympy2_extended` strips "t", "s", "m"...).
2. Plain numbers (integers, decimals, fractions, mixed numbers, scientific notation) are compared exactly
   with `fractions.Fraction`, never through math-verify's 6-decimal float rounding, which accepts
   0.0000671 for 0.0000672. A decimal stands for a non-terminating exact value only when written to at
   least 6 places (math-verify's own threshold), so 0.33 never matches 1/3 while 0.333333 does.
3. A percentage matches both its number and its fraction: `50\\%` equals `50` and `0.5`.
4. Adjacent boxes joined only by "and", "or", commas or spaces are read as one list (`\\boxed{2}, \\boxed{3}`
   answers "2, 3"), so a hedge such as `\\boxed{5} or \\boxed{6}` is a two-element list that fails against 5.
   `extract_answer` itself returns only the last box, as specified.
5. Security: model output is never given to `eval`. math-verify's `ExprExtractionConfig` path runs
   `sympy.parse_expr` (Python `eval`) on regex matches (digits and `+-*/^()` only); we do not use that path.
   The LaTeX path builds sympy objects from an ANTLR parse tree; `sympy.Number(text)` (which would
   sympify a string) only ever sees the lexer's number tokens.
6. Bounded time: a cheap pre-screen rejects answers that could make sympy or CPython's big integers run
   for minutes (length, bracket depth, power towers, huge exponents and factorials); a SIGALRM soft
   deadline interrupts Python-level work; and `RewardPool` scores in worker processes it kills and
   restarts when an item overruns, because a big-integer computation in C ignores Python signals.
   math-verify's own timeouts use `signal.alarm` and fail outside the main thread, so we turn them off
   (`parsing_timeout=None`, `timeout_seconds=None`) and enforce ours.

Run it on a JSON Lines file of {"response", "ground_truth"[, "expected"]} records:

    python reward.py tests/reward_cases.jsonl --baseline
    python reward.py runs/ppo/reward_audit.jsonl --compare
    python reward.py rollouts.jsonl --reward my_rewards.py:score --reward-workers 8 --reward-timeout 5

From a trainer:

    with RewardPool("math", num_workers=8, timeout=5.0) as pool:
        rewards, counters = pool.score(responses, ground_truths)
"""

import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import json
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import pickle
import re
import signal
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the repetition functions import it when they run (section 8)
    import torch

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------
# 1. Extraction
# ----------------------------------------------------------------------------------------------------
# Hand-written because the installed libraries' box extractors do not follow this file's rules. Measured with
# math-verify 0.9.0 and latex2sympy2_extended 1.11.0 by swapping each into extract_answer, final_answer and
# last_boxed_string (the `<answer>` region kept) and scoring tests/reward_cases.jsonl and tests/test_reward.py
# (neither package has a `last_boxed_only_string` or `remove_boxed`):
# - latex2sympy2_extended.math_normalization.extract_boxed_content(text, "last"): 252 of 252 judged cases keep
#   their verdict, but 11 test items of test_reward.py fail (6 still fail with a shim for its unclosed-box
#   and `\boxed 7` tails). It has no last-box-only mode: it joins boxes with "," when under 10 characters apart, or
#   up to 70 apart with any "and", "or", "," or ";" between, so `first \boxed{2}. Checking again, the answer is
#   \boxed{3}` reads "2,3", a correction scored as a hedge. It returns the whole text when there is no box, `{5`
#   for an unclosed `\boxed{5`, everything after `\boxed` for `\boxed 7$.`, and counts `\{` and `\}` as group
#   braces, so a piecewise `\boxed{\left\{ ... \right.}` never closes.
# - math_verify.parse with LatexExtractionConfig(boxed_match_priority=0): 5 of 252 verdicts go from right to
#   wrong and 17 test items fail. It ignores `\fbox`, falls back to an earlier box when the last one is unclosed, and
#   returns its normalised string (`4t` becomes `4`, `5 \text{ (or possibly 6)}` becomes `5`).

_BOX_START = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# A backslash escapes the next character, so `\{` and `\}` are not group braces but `\\{` opens one.
_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)
# `\boxed 5` runs to `$`, a newline, `\]`, `\)` or the next box
_UNBRACED_BOX_END = re.compile(r"\$|\n|\\\]|\\\)|\\boxed|\\fbox")
# Between two boxes that form one list answer: separators only, e.g. "$, $", " and ", "\text{ or }", "x =".
_BOX_JOINER = re.compile(
    r"(?:\s|\$|,|;|&|\\quad|\\qquad|\\[,;:! ]|\\\\|\\text\{\s*(?:and|or|,)?\s*\}|\band\b|\bor\b"
    r"|(?<![A-Za-z\\])[A-Za-z](?:_\{?\w+\}?)?\s*=)*"  # `$x = \boxed{2}$ and $x = \boxed{3}$`
)


def _closing_brace(text: str, open_pos: int) -> int:
    """Index of the `}` matching the `{` at `open_pos`, or -1 if the group never closes."""
    depth = 0
    for m in _BRACE_TOKEN.finditer(text, open_pos):
        token = m.group()
        if token == "{":
            depth += 1
        elif token == "}":
            depth -= 1
            if depth == 0:
                return m.start()
    return -1


def _boxes(text: str) -> list[tuple[int, int, str | None]]:
    """Top-level `\\boxed`/`\\fbox` answers in order, as (start, end, content); content None if unclosed.

    Handles nested braces, the `\\boxed 5` form (up to `$` or the end of the line), and boxes nested in
    boxes (only the outer one is listed). One pass over the text, so a 200k-character response is cheap.
    """
    found: list[tuple[int, int, str | None]] = []
    pos = 0
    while (m := _BOX_START.search(text, pos)) is not None:
        j = m.end()
        while j < len(text) and text[j].isspace():
            j += 1
        if j < len(text) and text[j] == "{":
            close = _closing_brace(text, j)
            if close < 0:  # an unclosed box swallows the rest of the text
                found.append((m.start(), len(text), None))
                break
            found.append((m.start(), close + 1, text[j + 1 : close]))
            pos = close + 1
        elif j > m.end() and j < len(text):  # `\boxed 5`, as in Hendrycks MATH solutions
            stop = _UNBRACED_BOX_END.search(text, j)
            end = stop.start() if stop else len(text)
            found.append((m.start(), end, text[j:end].strip().rstrip(".")))
            pos = max(end, j + 1)
        else:
            found.append((m.start(), j, None))
            pos = j
    return found


def _answer_region(text: str) -> str:
    """The inside of the last `<answer>` block (to `</answer>` or the end), or the whole text if none."""
    start = text.rfind("<answer>")
    if start < 0:
        return text
    start += len("<answer>")
    end = text.find("</answer>", start)
    return text[start : end if end >= 0 else len(text)]


def _unbox(content: str) -> str:
    """`\\boxed{\\boxed{5}}` -> `5`: strip boxes that wrap the whole content."""
    content = content.strip()
    while (inner := _boxes(content)) and len(inner) == 1 and inner[0][0] == 0 and inner[0][1] == len(content):
        if inner[0][2] is None:
            return ""
        content = inner[0][2].strip()
    return content


def extract_answer(text: str) -> str | None:
    """The final answer: content of the last `\\boxed{...}` (or `\\fbox{...}`, or `\\boxed x`).

    When the text has an `<answer>` tag, only the last answer block counts (ORZ's rule). Returns None
    when there is no complete final answer: no box, an empty box, an unclosed last box, non-string input.

    >>> extract_answer("<think>maybe \\\\boxed{3}</think> <answer>\\\\boxed{\\\\frac{1}{2}}</answer>")
    '\\\\frac{1}{2}'
    """
    if not isinstance(text, str):
        return None
    boxes = _boxes(_answer_region(text))
    if not boxes or boxes[-1][2] is None:
        return None
    return _unbox(boxes[-1][2]) or None


def final_answer(text: str) -> str | None:
    """Like `extract_answer`, but reads adjacent boxes joined by "and"/"or"/commas as one list answer."""
    if not isinstance(text, str):
        return None
    region = _answer_region(text)
    boxes = _boxes(region)
    if not boxes or boxes[-1][2] is None:
        return None
    parts = [_unbox(boxes[-1][2])]
    if not parts[0]:
        return None
    for k in range(len(boxes) - 2, -1, -1):
        gap = region[boxes[k][1] : boxes[k + 1][0]]
        if len(gap) > 40 or not _BOX_JOINER.fullmatch(gap) or boxes[k][2] is None:
            break
        if "\n" in gap and not re.search(r"[,;&]|\band\b|\bor\b|\\text", gap):
            break  # boxes on separate lines: a correction more likely than a list
        part = _unbox(boxes[k][2])
        if part and part != parts[0]:  # a repeated box is one answer, not a list
            parts.insert(0, part)
        if len(parts) > 16 or len(boxes) - k > 1000:  # no real answer lists this many boxes
            break
    return ", ".join(parts)


def last_boxed_string(text: str) -> str | None:
    """The last top-level `\\boxed{...}` of the whole text, box included (what the baseline parses)."""
    if not isinstance(text, str):
        return None
    boxes = _boxes(text)
    if not boxes or boxes[-1][2] is None:
        return None
    return text[boxes[-1][0] : boxes[-1][1]]


def ground_truth_answer(ground_truth) -> str | None:
    """The answer inside a dataset's ground truth: a plain string, `$...$`-wrapped, or already boxed."""
    if isinstance(ground_truth, bool) or not isinstance(ground_truth, (str, int, float)):
        return None
    truth = str(ground_truth).strip()
    if _BOX_START.search(truth):
        boxed = extract_answer(truth)
        truth = boxed if boxed is not None else truth
    truth = re.sub(r"^(?:\$\$?|\\\(|\\\[)(.*?)(?:\$\$?|\\\)|\\\])$", r"\1", truth, flags=re.DOTALL).strip()
    return truth or None


def format_reward(response: str) -> float:
    """1.0 if the response is `[<think>] reasoning </think> <answer> ... \\boxed{...} ... </answer>`, else 0.0.

    The ORZ prompt ends with `<think>`, so the opening tag is optional. Off by default: ORZ trains without
    a format reward (arXiv:2503.24290v2, Sec. 2.2); the trainer decides whether and how much to weight it.
    """
    if not isinstance(response, str):
        return 0.0
    # String methods rather than one regex: a flood of tags must not make this quadratic in the trainer.
    head, sep, tail = response.partition("</think>")
    head, tail = head.strip().removeprefix("<think>"), tail.strip()
    if not sep or not head.strip() or not tail.startswith("<answer>") or not tail.endswith("</answer>"):
        return 0.0
    body = tail[len("<answer>") : -len("</answer>")]
    if any(tag in head or tag in body for tag in ("<think>", "</think>", "<answer>", "</answer>")):
        return 0.0
    return 1.0 if extract_answer(response) is not None else 0.0


# ----------------------------------------------------------------------------------------------------
# 2. Pre-screen: refuse answers whose parsing or evaluation could take unbounded time
# ----------------------------------------------------------------------------------------------------

_MAX_ANSWER_CHARS = 400  # the ANTLR parse of a 600-character list takes ~1 s; real answers are far shorter
_MAX_BRACKET_DEPTH = 6  # ANTLR's parse time grows fast with nested parentheses (50 levels took 15 s)
_MAX_GROUP_DEPTH = 14  # all of ( [ { together: \frac and \sqrt nest braces cheaply
_MAX_EXPONENT = 10_000  # 10^10000 is a 10k-digit integer: fine; 2^(10^6) is not
_MAX_FACTORIAL = 5_000


def _exponent_groups(s: str) -> list[tuple[str, bool]]:
    """Every superscript of `s` as (exponent text, immediately followed by another `^`)."""
    groups = []
    i = s.find("^")
    while i >= 0:
        j = i + 1
        while j < len(s) and s[j] == " ":
            j += 1
        if j < len(s) and s[j] == "{":
            close = _closing_brace(s, j)
            end = close + 1 if close >= 0 else len(s)
            exponent = s[j + 1 : end - 1] if close >= 0 else s[j + 1 :]
        else:
            m = re.match(r"\d+|\\[A-Za-z]+|.", s[j:])
            exponent = m.group() if m else ""
            end = j + len(exponent)
        groups.append((exponent, s[end:].lstrip().startswith("^")))
        i = s.find("^", max(end, i + 1))
    return groups


def _power_too_big(s: str, level: int = 0) -> bool:
    """True for power towers (3 levels, or `a^b^c`), integer exponents above `_MAX_EXPONENT`, and
    two-level numeric towers whose inner power exceeds it (10^{10^{10}}: the inner 10^10 is too big)."""
    for exponent, chained in _exponent_groups(s):
        if chained:
            return True
        literal = exponent.strip().lstrip("+-")
        if literal.isdigit() and (len(literal) > 6 or int(literal) > _MAX_EXPONENT):
            return True
        if "^" in exponent:
            if level >= 1:
                return True
            for base, power in re.findall(r"(\d+(?:\.\d+)?)\s*\^\s*\{?\s*(\d+)", exponent):
                if float(base) > 1 and int(power) * math.log10(float(base)) > math.log10(_MAX_EXPONENT):
                    return True
            if _power_too_big(exponent, level + 1):
                return True
    return False


def too_costly(answer: str) -> bool:
    """Cheap screen, run before any parsing, for answers that could stall sympy, ANTLR or CPython."""
    if len(answer) > _MAX_ANSWER_CHARS or answer.count(",") > 64:
        return True
    depth = brackets = max_depth = max_brackets = 0
    for ch in answer:
        if ch in "([{":
            depth += 1
            brackets += ch != "{"
            max_depth, max_brackets = max(max_depth, depth), max(max_brackets, brackets)
        elif ch in ")]}":
            depth -= 1
            brackets -= ch != "}"
    if max_depth > _MAX_GROUP_DEPTH or max_brackets > _MAX_BRACKET_DEPTH:
        return True
    if re.search(r"\d{300}", answer):  # CPython refuses int() of over 4300 digits anyway
        return True
    if any(int(n) > _MAX_FACTORIAL for n in re.findall(r"(\d{1,9})\s*!", answer)):
        return True
    if re.search(r"\d{10}\s*!", answer):
        return True
    return _power_too_big(answer)


# ----------------------------------------------------------------------------------------------------
# 3. Normalisation
# ----------------------------------------------------------------------------------------------------

# fmt: off
_UNICODE = str.maketrans({
    "\u2212": "-", "\u2013": "-", "\u00d7": r"\times ", "\u22c5": r"\cdot ", "\u00b7": r"\cdot ",
    "\u00f7": r"\div ", "\u03c0": r"\pi ", "\u221e": r"\infty ", "\u221a": r"\sqrt ", "\u2264": r"\le ",
    "\u2265": r"\ge ", "\u2260": r"\ne ", "\u00b0": r"^\circ ", "\u222a": r"\cup ", "\u2229": r"\cap ",
    "\u2208": r"\in ", "\u2248": r"\approx ", "\u2205": r"\emptyset ", "\u00a0": " ", "\u2009": " ",
    "\u202f": " ", "\n": " ", "\t": " ", "\u00a2": r"\text{ cents}",
})
# fmt: on
_DELIMITERS = re.compile(r"\\\$|\$|\\\(|\\\)|\\\[|\\\]|\\displaystyle|\\textstyle")
_SIZING = re.compile(r"\\(?:left|right|middle)(?:\.|(?![A-Za-z]))|\\[Bb]igg?[lr]?(?![A-Za-z])")
_SPACING = re.compile(r"(?<!\\)\\[,;: ]|\\q?quad(?![A-Za-z])|~|\\hspace\{[^{}]*\}")
_TEXT_COMMAND = re.compile(
    r"\\(?:textbf|textit|textrm|textup|textnormal|textsf|texttt|mathrm|mathbf|mathit|mathsf|mathtt|"
    r"mbox|hbox|text)\s*(?=\{)"
)
_DEGREES = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ(?=\s*$)|\\degree(?![A-Za-z])")
_TEXT_JOINER = re.compile(r"\\text\{\s*(?:and|or|,)\s*\}")
# `3, 5, and 7` (after `\text{}` is unwrapped): the Oxford comma's "and" is only a separator
_LIST_AND = re.compile(r",\s*(?:,\s*)*(?:and|or)\s+|(?:,\s*){2,}")
# `\{x \mid x > 2\}`, `\{x | 1 \le x < 2\}`: set-builder notation for an interval, read as its condition
_SET_BUILDER = re.compile(r"^\\\{\s*([A-Za-z])\s*(?:\\mid|\||:)\s*(.*)\\\}$")
_INEQUALITY = re.compile(r"[<>]|\\[lg]eq?(?![A-Za-z])|\\[lg]t(?![A-Za-z])")
# `0.\overline{3}`, `0.1\overline{6}`, `1.\overline{09}`: a repeating decimal
_REPEATING = re.compile(r"(?<![\d.])(\d*)\.(\d*)\\overline\{?(\d{1,12})\}?(?![\d])")
_ANSWER_PREFIX = re.compile(
    r"^(?:(?:the\s+)?(?:final\s+)?answer\s*(?:is\b|:)|(?:option|choice)\b)\s*:?\s*", re.IGNORECASE
)
# `\left[\begin{array}{cc} 1 & 2 \\ 3 & 4 \end{array}\right]`: an array used as a matrix
_ARRAY = re.compile(r"[(\[]?\s*\\begin\{array\}\{[^{}]*\}(.*?)\\end\{array\}\s*[)\]]?")
_ALL_REALS = re.compile(r"(?:[a-z]\s*\\in\s*)?all\s+real(?:\s+numbers?|s)?", re.IGNORECASE)
_PERCENT = re.compile(r"\s*(?:\\%|%|\\text\{\s*(?:\\%|%|percent)\s*\}|\bpercent\b)\s*$")
# A unit in text after a value: letters, spaces, dots, slashes and hyphens, maybe squared or cubed.
_TEXT_UNIT = re.compile(
    r"\s*\\text\{\s*([A-Za-z(][A-Za-z .\-/()]*)\}\s*(?:\^\s*\{?\s*[23]\s*\}?)?(?:\s*/\s*\\text\{[A-Za-z ]+\})?\s*$"
)
_WORD_UNIT = re.compile(r"(?<=[\d}\s])\s*([A-Za-z]{2,}(?:\s+[A-Za-z]{2,})*)\s*(?:\^\s*\{?\s*[23]\s*\}?)?\s*$")
# fmt: off
_UNIT_WORDS = frozenset({
    "cm", "mm", "km", "m2", "cm2", "ft", "in", "inch", "inches", "feet", "foot", "yd", "yard", "yards", "mi",
    "mile", "miles", "mph", "kph", "kmh", "hr", "hrs", "min", "mins", "sec", "secs", "ms", "kg", "mg", "lb",
    "lbs", "oz", "ml", "gal", "sq", "units", "unit", "dollars", "dollar", "cents", "cent", "degrees",
    "degree", "deg", "rad", "radians", "meters", "meter", "metres", "metre", "square", "cubic", "hours",
    "hour", "minutes", "minute", "seconds", "second", "days", "day", "weeks", "week", "months", "month",
    "years", "year", "grams", "gram", "pounds", "ounces", "liters", "liter", "litres", "litre", "gallons",
    "quarts", "pints", "cups", "people", "persons", "students", "ways", "times", "points",
})
# Longer words that are mathematics rather than units: never stripped from the end of an answer.
_MATH_WORDS = frozenset({
    "sin", "cos", "tan", "sec", "csc", "cot", "sinh", "cosh", "tanh", "arcsin", "arccos", "arctan", "log",
    "ln", "exp", "sqrt", "frac", "pi", "infty", "infinity", "mod", "gcd", "lcm", "and", "or", "undefined",
    "none",
})
# fmt: on
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?|[+-]?\d{1,3}(?: \d{3})+(?:\.\d+)?")
_E_NOTATION = re.compile(r"(?<![\w\\.])(\d+(?:\.\d*)?|\.\d+)[eE]([+-]?\d{1,2})(?![\w.])")
_BASE_SUBSCRIPT = re.compile(r"^(\d[0-9A-F]*)_\{?\(?(\d{1,2})\)?\}?$")  # `52_8`: digits in base 8
_VECTOR = re.compile(r"\\begin\{[pbvB]?matrix\}(.*?)\\end\{[pbvB]?matrix\}")
_APPROX = re.compile(r"\\approx|\\simeq|\\sim(?![A-Za-z])")
_ASSIGNMENT = re.compile(r"^\s*(?:[A-Za-z](?:_\{?\w+\}?)?|\\[A-Za-z]+)\s*=\s*([^=<>]+)$")
_CHOICE = re.compile(r"^\(([A-J])\)\s*(.*)$|^([A-J])$")  # `B`, `(B)`, or AMC's `(B) 12`
_LEADING_CHOICE = re.compile(r"^\(([A-J])\).*$|^([A-J])(?:[.:)].*)?$")
_WORDS = re.compile(r"[A-Za-z]{3,}(?:[ '-][A-Za-z]+)*")


def _strip_percent(s: str) -> tuple[str, bool]:
    m = _PERCENT.search(s)
    if m is None or not s[: m.start()].strip():
        return s, False
    return s[: m.start()].rstrip(), True


def _strip_units(s: str) -> str:
    """Remove a trailing unit: `5 \\text{ cm}^2`, `12 \\text{ ways}`, `18 dollars`, but never `4t` or `2 pi`."""
    for _ in range(3):
        m = _TEXT_UNIT.search(s)
        if m and s[: m.start()].strip() and not re.search(r"[=,(\[]\s*$", s[: m.start()]):
            s = s[: m.start()].rstrip().rstrip("/").rstrip()
            continue
        m = _WORD_UNIT.search(s)
        if m and _as_number(s[: m.start()]) is not None:
            words = [w.lower() for w in m.group(1).split()]
            if all(w in _UNIT_WORDS or (len(w) >= 4 and w not in _MATH_WORDS) for w in words):
                s = s[: m.start()].rstrip()
                continue
        break
    return s


def _exact_decimal(mantissa: str, exponent: str) -> str:
    """`1.5`, `-3` -> `\\frac{3}{2000}`: E-notation as an exact LaTeX number (no float rounding)."""
    value = Fraction(mantissa) * Fraction(10) ** int(exponent)
    if value.denominator == 1:
        return str(value.numerator)
    return f"\\frac{{{value.numerator}}}{{{value.denominator}}}"


def _vector_as_tuple(m: re.Match) -> str:
    """A one-row or one-column matrix as a tuple, so `(1, 2)` and a column vector compare equal."""
    rows = [r.strip() for r in re.split(r"\\\\", m.group(1)) if r.strip()]
    if len(rows) == 1:
        cells = [c.strip() for c in rows[0].split("&")]
    elif all("&" not in r for r in rows):
        cells = rows
    else:
        return m.group(0)
    return "(" + ", ".join(cells) + ")" if len(cells) >= 2 else m.group(0)


_SCALED_VECTOR = re.compile(
    r"([-+]?(?:\\frac\{[^{}]*\}\{[^{}]*\}|[\d.]+(?:/\d+)?))\s*(?:\\cdot|\\times)?\s*"
    r"(\\begin\{[pbvB]?matrix\}.*?\\end\{[pbvB]?matrix\})"
)


def _scaled_vector(factor: str, matrix: str) -> str:
    """`\\frac{1}{3}\\begin{pmatrix} -1 \\\\ 2 \\end{pmatrix}` -> the matrix with the factor in every cell."""
    begin, body, end = re.match(r"(\\begin\{\w+\})(.*)(\\end\{\w+\})", matrix).groups()
    rows = [
        [f"{factor} \\cdot ({c.strip()})" for c in row.split("&")]
        for row in re.split(r"\\\\", body)
        if row.strip()
    ]
    return begin + " \\\\ ".join(" & ".join(row) for row in rows) + end


def _repeating_decimal(m: re.Match) -> str:
    """`0.1\\overline{6}` -> `\\frac{1}{6}`: a repeating decimal as the exact fraction it denotes."""
    whole, fixed, period = m.group(1) or "0", m.group(2), m.group(3)
    value = Fraction(int(whole)) + Fraction(int(fixed or "0"), 10 ** len(fixed))
    value += Fraction(int(period), (10 ** len(period) - 1) * 10 ** len(fixed))
    return (
        str(value.numerator)
        if value.denominator == 1
        else f"\\frac{{{value.numerator}}}{{{value.denominator}}}"
    )


def normalize_answer(answer: str) -> tuple[str, bool]:
    """Canonical LaTeX for an answer string, and whether it was a percentage (the `%` is removed).

    Removes what does not change the value: `$`, `\\left`/`\\right`, spacing commands, degree signs,
    trailing units, `\\text{}` wrappers, thousands separators, "and" in lists, "The answer is"; rewrites
    E-notation and repeating decimals exactly, set-builder sets as their condition, and column vectors
    (arrays, scaled vectors) as tuples. Keeps everything that does (variables, exponents, list structure).

    >>> normalize_answer("\\\\$1{,}000 \\\\text{ dollars}")
    ('1000', False)
    """
    s = answer.translate(_UNICODE)
    s = re.sub(r"\\\\\[[-+\d.\s]*(?:pt|em|ex|mm|cm|mu)\]", r"\\\\ ", s)  # matrix row spacing `\\[2pt]`
    s = _DELIMITERS.sub("", s)
    s = _SIZING.sub("", s)
    s = re.sub(r",\s*\\!\s*", ",", s).replace("\\!", "")  # `10,\!080` is MATH's thousands separator
    s = _SPACING.sub(" ", s)
    s = re.sub(r"\\[dtc]frac(?![A-Za-z])", r"\\frac", s)
    s = _TEXT_COMMAND.sub(r"\\text", s)
    s = re.sub(r"\{\s*,\s*\}", ",", s)
    s = _DEGREES.sub("", s)
    s = _TEXT_JOINER.sub(", ", s)
    s = s.replace("\\langle", "(").replace("\\rangle", ")")
    s, percent = _strip_percent(s.strip().rstrip(".").rstrip())
    s = _strip_units(s)
    s, percent_after_unit = _strip_percent(s)
    while (unwrapped := re.sub(r"\\text\{([^{}]*)\}", r"\1", s)) != s:
        s = unwrapped
    s = re.sub(r"\s+", " ", s).strip().rstrip(".,;").rstrip()
    s = _strip_units(s)  # a unit that was inside the text: `\text{5 hours}`
    s = _LIST_AND.sub(", ", s).strip(" ,")
    s = _ANSWER_PREFIX.sub("", s)  # `\text{The answer is } 5`, `\text{Option B}`
    if _ALL_REALS.fullmatch(s):
        s = "(-\\infty, \\infty)"
    if (m := _SET_BUILDER.fullmatch(s)) and _INEQUALITY.search(m.group(2)):
        s = m.group(2).strip()  # `\{x \mid x > 2\}` -> `x > 2`, which then matches `(2, \infty)`
    s = _REPEATING.sub(_repeating_decimal, s)
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "").replace(" ", "")
    s = _E_NOTATION.sub(lambda m: _exact_decimal(m.group(1), m.group(2)), s)
    s = _ARRAY.sub(r"\\begin{pmatrix}\1\\end{pmatrix}", s)
    scaled = _SCALED_VECTOR.fullmatch(s)
    if scaled and _as_number(scaled.group(1)) is not None and len(re.findall(r"&|\\\\", s)) < 16:
        s = _scaled_vector(scaled.group(1), scaled.group(2))
    s = _VECTOR.sub(_vector_as_tuple, s)
    s = re.sub(r"\\varnothing|\\\{\s*\\\}|\\O(?![A-Za-z])", r"\\emptyset", s)
    return s.strip(), percent or percent_after_unit


_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_NUMBER_FORMS = [
    ("int", re.compile(rf"({_NUMBER})")),
    ("frac", re.compile(rf"\\frac\{{([+-]?{_NUMBER})\}}\{{([+-]?{_NUMBER})\}}")),
    ("frac", re.compile(r"\\frac(\d)(\d)")),
    ("frac", re.compile(rf"({_NUMBER})/({_NUMBER})")),
    ("mixed", re.compile(r"(\d+)\\frac\{(\d+)\}\{(\d+)\}")),
    ("sci", re.compile(rf"({_NUMBER})(?:\\times|\\cdot|\*)10\^\{{?([+-]?\d{{1,3}})\}}?")),
    ("sci", re.compile(r"()10\^\{?([+-]?\d{1,3})\}?")),
]


def _as_number(s: str) -> tuple[Fraction, int | None] | None:
    """Exact value of a plain number, with its count of decimal places (None if written exactly).

    Plain numbers: `-12`, `0.35625`, `\\frac{-3}{8}`, `3/8`, `2\\frac{1}{2}` (mixed), `1.5\\times10^{3}`.
    """
    t = s.replace(" ", "")
    while t.startswith("(") and t.endswith(")") and "," not in t:
        t = t[1:-1]
    sign = 1
    if t[:1] in ("+", "-"):
        sign, t = (-1 if t[0] == "-" else 1), t[1:]
    for kind, pattern in _NUMBER_FORMS:
        m = pattern.fullmatch(t)
        if m is None:
            continue
        if kind == "int":
            decimals = len(t.split(".")[1]) if "." in t else None
            return sign * Fraction(t), decimals
        if kind == "frac":
            den = Fraction(m.group(2))
            return (sign * Fraction(m.group(1)) / den, None) if den else None
        if kind == "mixed":
            den = Fraction(m.group(3))
            return (sign * (int(m.group(1)) + Fraction(m.group(2)) / den), None) if den else None
        mantissa = Fraction(m.group(1) or 1)
        return sign * mantissa * Fraction(10) ** int(m.group(2)), None
    return None


def _numbers_match(a: tuple[Fraction, int | None], b: tuple[Fraction, int | None]) -> bool:
    """Exact equality, or a decimal of at least 6 places that rounds or truncates an exact value."""
    if a[0] == b[0]:
        return True
    for x, y in ((a, b), (b, a)):
        if x[1] is not None and x[1] >= 6 and y[1] is None and y[0] != 0:
            diff = abs(x[0] - y[0])
            if diff <= Fraction(1, 10 ** x[1]) and diff <= abs(y[0]) / 100_000:
                return True
    return False


def _candidates(answer: str) -> tuple[list[str], str | None]:
    """Strings that each stand for the answer, and the base of a `52_8`-style number (None if none)."""
    s, percent = normalize_answer(answer)
    base = None
    if m := _BASE_SUBSCRIPT.fullmatch(s):  # the digits are the answer; the base must not contradict
        s, base = m.group(1), m.group(2)
    parts = [p.strip() for p in _APPROX.split(s)] if _APPROX.search(s) else [s]
    if len(parts) > 1:  # `x \approx 3.14`: the lone variable is not an answer
        parts = [p for p in parts if p and not re.fullmatch(r"[A-Za-z]|\\[A-Za-z]+", p)]
    out = []
    for part in parts:
        if (m := _ASSIGNMENT.match(part)) and "," not in part:
            part = m.group(1).strip()  # `x = 5` -> `5`; math-verify's Eq path would round floats
        if part:
            out.append(part)
            if percent:
                out.append(f"\\frac{{{part}}}{{100}}")
    return list(dict.fromkeys(out))[:6], base


def _choice(s: str) -> tuple[str, str] | None:
    """(letter, value or "") of a multiple-choice ground truth such as `B`, `(B)` or `(B) 12`."""
    m = _CHOICE.fullmatch(s.strip())
    if m is None or len(re.findall(r"\([A-J]\)", s)) > 1:  # "(A), (C)" is a set of options, not one
        return None
    return m.group(1) or m.group(3), (m.group(2) or "").strip()


# ----------------------------------------------------------------------------------------------------
# 4. Equivalence with math-verify
# ----------------------------------------------------------------------------------------------------


@functools.cache
def _math_verify():
    """Import math-verify once, on first use (nothing runs at import time), with our extraction config."""
    import math_verify
    from latex2sympy2_extended.latex2sympy2 import NormalizationConfig

    # Our timeouts replace math-verify's signal.alarm ones, so its "timeout is disabled" warning is noise.
    for module_name in ("math_verify.parser", "math_verify.grader"):
        sys.modules[module_name].TIMEOUT_WARNING_SHOWN = True
    config = math_verify.LatexExtractionConfig(
        # units=False: its unit list strips "t", "s", "m", "c"... so `4t` would equal `4`.
        normalization_config=NormalizationConfig(
            basic_latex=True, units=False, malformed_operators=True, nits=False, boxed="none", equations=False
        ),
        boxed_match_priority=-1,  # we already took the answer out of its box
    )
    return math_verify, [config]


@functools.lru_cache(maxsize=4096)
def _parse(latex: str):
    """Sympy object for a normalised LaTeX answer, or None. Cached: a prompt's truth is parsed once."""
    math_verify, config = _math_verify()
    parsed = math_verify.parse(
        f"${latex}$", extraction_config=config, fallback_mode="no_fallback", parsing_timeout=None
    )
    return parsed[0] if parsed else None


def _as_union(expr):
    """`{x < 2, x > 3}` (from "x < 2 or x > 3") as the set it describes, or None."""
    from sympy import FiniteSet, Union
    from sympy.core.relational import Relational

    if not isinstance(expr, FiniteSet) or not all(isinstance(a, Relational) for a in expr.args):
        return None
    symbols = set().union(*(a.free_symbols for a in expr.args))
    if len(symbols) != 1:
        return None
    return Union(*(a.as_set() for a in expr.args))


def _math_verify_equal(truth: str, pred: str) -> bool:
    """math-verify's verdict on two normalised answers; inequalities may match intervals either way."""
    math_verify, _ = _math_verify()
    gold, guess = _parse(truth), _parse(pred)
    if gold is None or guess is None:
        return False
    if math_verify.verify(gold, guess, timeout_seconds=None, allow_set_relation_comp=True):
        return True
    union = _as_union(guess)
    return union is not None and math_verify.verify(gold, union, timeout_seconds=None)


def _top_level_parts(s: str) -> list[str]:
    """`s` split at commas outside brackets: `1, (2, 3)` -> [`1`, `(2, 3)`]."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(s):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(s[start:i].strip())
            start = i + 1
    parts.append(s[start:].strip())
    return [p for p in parts if p]


def _choice_set(s: str) -> frozenset[str] | None:
    """The letters of a multiple-select answer such as `AC`, `A, C` or `(A), (C)`; None for anything else."""
    letters = re.sub(r"[\s,()]|\\text|and", "", s)
    if not re.fullmatch(r"[A-J]{2,10}", letters) or len(set(letters)) != len(letters):
        return None
    if re.search(r"[A-J]{2}", s) and not re.fullmatch(r"[A-J]+", s.strip()):
        return None  # `AB, C`: a segment and a point, not options
    return frozenset(letters)


def answers_match(pred: str, truth: str) -> bool:
    """True if the extracted answer `pred` is mathematically equivalent to the ground truth `truth`."""
    truth_norm = normalize_answer(truth)[0]
    choice = _choice(truth_norm)
    if choice is not None:  # multiple choice: `B` matches `B`, `(B)`, `\text{B}`, `\textbf{(B) } 5`
        guess = normalize_answer(pred)[0]
        if len(re.findall(r"\([A-J]\)", guess)) > 1:  # "(B) or (C)" hedges
            return False
        if m := _LEADING_CHOICE.fullmatch(guess):
            return (m.group(1) or m.group(2)) == choice[0]
        return bool(choice[1]) and answers_match(pred, choice[1])  # the option's value, if the truth has it
    pred_norm = normalize_answer(pred)[0]
    letters = _choice_set(truth_norm)
    if letters is not None and (guessed := _choice_set(pred_norm)) is not None:
        return letters == guessed  # multiple select: `AC` = `A, C` = `(C), (A)`
    if _equivalent(pred, truth):
        return True
    if m := re.fullmatch(r"\(([A-J])\)\s*(\S.*)", pred_norm):  # `(B) 12` when the truth is the value 12
        return _equivalent(m.group(2), truth)
    parts = _top_level_parts(pred_norm)
    if 2 <= len(parts) <= 6 and len(_top_level_parts(truth_norm)) == 1:
        # One answer written twice, `\boxed{\frac{1}{2}}` or `\boxed{0.5}`: every part must be right.
        return all(_equivalent(part, truth) for part in parts)
    # Two equations (`y^2 = 4x`, `x = y^2/4`) compare whole, unless both just assign a plain number, which
    # `_equivalent` already settled exactly (math-verify would round it).
    equations = pred_norm.count("=") == 1 and truth_norm.count("=") == 1 and "," not in pred_norm + truth_norm
    if equations and None in (_as_number(pred_norm.split("=")[1]), _as_number(truth_norm.split("=")[1])):
        return _math_verify_equal(truth_norm, pred_norm)
    return False


def _equivalent(pred: str, truth: str) -> bool:
    """`answers_match` for a truth that is not a multiple-choice letter."""
    truths, truth_base = _candidates(truth)
    preds, pred_base = _candidates(pred)
    if truth_base and pred_base and truth_base != pred_base:
        return False
    if any(p == t for t in truths for p in preds):
        return True
    if all(_WORDS.fullmatch(t) and t.lower() not in _MATH_WORDS for t in truths):
        # A word answer ("Evelyn", "even"): letters compare as words, not as products of symbols.
        squash = lambda x: re.sub(r"[\s'-]", "", x).lower()  # noqa: E731
        return any(squash(p) == squash(t) for t in truths for p in preds)
    for t in truths:
        t_number = _as_number(t)
        for p in preds:
            p_number = _as_number(p)
            if t_number is not None and p_number is not None:
                if _numbers_match(p_number, t_number):
                    return True
                continue  # two plain numbers are settled exactly, never by float rounding
            if _math_verify_equal(t, p):
                return True
    return False


# ----------------------------------------------------------------------------------------------------
# 5. Reward functions
# ----------------------------------------------------------------------------------------------------


class _DeadlineExceeded(BaseException):
    """Raised by our SIGALRM handler. A BaseException so `except Exception` in sympy cannot swallow it."""


@contextlib.contextmanager
def _deadline(seconds: float | None):
    """Interrupt the body after `seconds` with `_DeadlineExceeded` (Python-level work only).

    Only in the main thread (signals are delivered there) and only if no timer is already running: an
    outer deadline (the worker's) wins, and we never cancel a timer the caller set for itself.
    """
    if (
        not seconds
        or not hasattr(signal, "setitimer")
        or threading.current_thread() is not threading.main_thread()
        or signal.getitimer(signal.ITIMER_REAL)[0] > 0
    ):
        yield
        return

    def _raise(signum, frame):
        raise _DeadlineExceeded

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        try:
            signal.setitimer(signal.ITIMER_REAL, 0)
        finally:  # restore the handler even if the alarm fires inside this block
            signal.signal(signal.SIGALRM, previous)


_MATH_BUDGET_S = 3.0  # soft limit for one comparison when math_reward runs outside a worker


def math_reward(response: str, ground_truth: str, **extras) -> float:
    """1.0 if the response's final boxed answer is mathematically equivalent to the ground truth, else 0.0.

    The final answer is the last box inside the last `<answer>` block (or the whole response without
    one); see `answers_match` for what counts as equivalent. Never raises: unparseable, too costly or
    malformed input scores 0.0. `extras` (dataset fields) are accepted and ignored.
    """
    del extras  # the trainer passes dataset fields to every reward function; this one needs none
    pred, truth = final_answer(response), ground_truth_answer(ground_truth)
    if pred is None or truth is None:
        return 0.0
    if pred == truth:
        return 1.0
    if too_costly(pred) or too_costly(truth):
        return 0.0
    try:
        with _deadline(_MATH_BUDGET_S):
            return 1.0 if answers_match(pred, truth) else 0.0
    except _DeadlineExceeded:
        return 0.0
    except Exception:  # a sympy failure on model output is a wrong answer, not a crash
        logger.debug("math_reward: comparison failed", exc_info=True)
        return 0.0


def math_verify_baseline(response: str, ground_truth: str, **extras) -> float:
    """Plain math-verify on the last box, as most projects use it: the reference `--baseline` compares to.

    `verify(parse("$" + truth + "$"), parse(last_boxed_string))` with math-verify's defaults (including
    its signal.alarm timeouts, so call it in a main thread; `RewardPool` workers are).
    """
    from math_verify import parse, verify

    box = last_boxed_string(response)
    if box is None or not isinstance(ground_truth, str):
        return 0.0
    return 1.0 if verify(parse(f"${ground_truth}$"), parse(box)) else 0.0


# Control rewards: what a spurious reward gives on the same model and data. Shao et al. 2025 ("Spurious
# Rewards", arXiv:2506.10947) raise Qwen2.5-Math's MATH500 accuracy with a random reward and with a
# format-only one; a gain that a control also gives is not evidence that the real reward taught anything.


def random_reward(response: str, ground_truth: str, *, p: float = 0.5, rng=None, **extras) -> float:
    """1.0 with probability `p`, whatever the response: the random control. `rng` is a random.Random
    (the trainer seeds one per step and process); None draws from the `random` module."""
    import random

    del response, ground_truth, extras
    return 1.0 if (rng or random).random() < p else 0.0


def boxed_format_reward(response: str, ground_truth: str, **extras) -> float:
    """1.0 when the response has a final answer the rule could compare (`final_answer`: a complete last
    box, inside `<answer>` when there is one), whatever its value: the format control."""
    del ground_truth, extras
    return 1.0 if final_answer(response) is not None else 0.0


def control_reward(spec) -> tuple[str, float] | None:
    """("random", p) for "random" (p = 0.5) or "random:P"; ("format", 1.0) for "format"; None for any
    other spec. Raises ValueError for "random:P" with P not in [0, 1]."""
    if spec == "format":
        return "format", 1.0
    if not isinstance(spec, str) or spec.partition(":")[0] != "random":
        return None
    text = spec.partition(":")[2] or "0.5"
    try:
        p = float(text)
    except ValueError:
        p = math.nan
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"reward spec {spec!r}: 'random:P' needs a probability P in [0, 1], got {text!r}")
    return "random", p


# ----------------------------------------------------------------------------------------------------
# 6. Loading reward functions by name
# ----------------------------------------------------------------------------------------------------


def load_reward_fn(spec: str) -> Callable[..., float]:
    """`"math"` -> `math_reward`; `"module:function"` or `"path/to/file.py:function"` -> that function;
    the controls `"random"`/`"random:P"` -> `random_reward` with p = P (0.5), `"format"` -> `boxed_format_reward`.

    Raises ValueError with one line naming the spec if it cannot be resolved to a callable.
    """
    control = control_reward(spec)
    if control is not None:
        return functools.partial(random_reward, p=control[1]) if control[0] == "random" else boxed_format_reward
    if spec == "math":
        try:  # math_reward needs them for every answer that is not a plain number: fail now, not per answer
            import latex2sympy2_extended  # noqa: F401
            import math_verify  # noqa: F401
        except ImportError as e:
            raise ValueError(f"reward 'math' needs math-verify ({e}): "
                             "pip install math-verify antlr4-python3-runtime==4.13.2") from e
        return math_reward
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(
            f"reward spec {spec!r}: expected 'math', 'module:function' or 'path/file.py:function'"
        )
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise ValueError(f"reward spec {spec!r}: expected 'module:function' or 'path/file.py:function'")
    if target.endswith(".py") or "/" in target or os.sep in target:
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"reward spec {spec!r}: file {path} not found")
        module_spec = importlib.util.spec_from_file_location(f"_reward_fn_{path.stem}", path)
        if module_spec is None or module_spec.loader is None:
            raise ValueError(f"reward spec {spec!r}: cannot import {path}")
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            raise ValueError(f"reward spec {spec!r}: importing {path} failed: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ValueError(f"reward spec {spec!r}: cannot import module {target!r}: {e}") from e
    fn = getattr(module, name, None)
    if fn is None:
        raise ValueError(f"reward spec {spec!r}: {target} has no attribute {name!r}")
    if not callable(fn):
        raise ValueError(f"reward spec {spec!r}: {target}.{name} is a {type(fn).__name__}, not a function")
    return fn


# Run in a child process by `reward_problems`: resolves the spec as this process would (same sys.path)
# and prints the outcome as the last line of its output.
_REWARD_CHECK = """
import json, sys
sys.path[:] = json.loads(sys.argv[1])
from reward import load_reward_fn
try:
    load_reward_fn(sys.argv[2])
    result = {}
except ValueError as err:
    result = {"error": str(err)}
except BaseException as err:
    result = {"error": f"reward spec {sys.argv[2]!r}: importing it raised {type(err).__name__}: {err}"}
print()  # the result on a line of its own, whatever the module printed
print(json.dumps(result))
"""


def reward_problems(spec: str, timeout: float = 120.0) -> list[str]:
    """[] if the reward `spec` resolves to a function; else one message. A custom reward is imported in a
    child process, so that a module that ends the process at import (os._exit, a crash) is reported with
    its exit code instead of ending this one silently. (It is imported again where it is used.)"""
    import subprocess

    try:
        if spec == "math" or control_reward(spec) is not None:  # ours: imported here, quickly
            load_reward_fn(spec)
            return []
    except ValueError as err:
        return [f"--reward: {err}"]
    try:
        result = subprocess.run([sys.executable, "-c", _REWARD_CHECK, json.dumps(sys.path), spec],
                                capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [f"--reward: reward spec {spec!r}: importing it took more than {timeout:.0f} s"]
    try:
        error = json.loads(result.stdout.strip().splitlines()[-1]).get("error")
        if result.returncode != 0:  # it printed its verdict, then died (an exit hook, a crash at shutdown)
            raise ValueError
    except (IndexError, ValueError, AttributeError):
        how = f"signal {-result.returncode}" if result.returncode < 0 else f"exit code {result.returncode}"
        last = result.stderr.strip().splitlines()[-1:] or [""]
        error = (f"reward spec {spec!r}: importing it ended the process with {how}"
                 + (f" ({last[0][:200]})" if last[0] else ""))
    return [f"--reward: {error}"] if error else []


def _absolute_spec(spec: str) -> str:
    """The same spec with a file path made absolute, so workers find it whatever their directory."""
    target, _, name = spec.rpartition(":")
    if target.endswith(".py") or "/" in target or os.sep in target:
        return f"{Path(target).expanduser().resolve()}:{name}"
    return spec


# ----------------------------------------------------------------------------------------------------
# 7. Batch scoring in worker processes
# ----------------------------------------------------------------------------------------------------


# Every rule this trainer is meant for gives rewards of order 1 (ORZ: 0 or 1), so a larger value is a bug
# in the reward function, not a score, and it breaks training: the critic's squared error of a 1e30 reward
# is inf in float32, and one such row swamps the whitened advantages of the whole batch. 1e6 leaves room
# for any deliberate scale while keeping the value loss (1e12 at most) far inside float32's range.
MAX_ABS_REWARD = 1e6


def _check_reward(value) -> tuple[str, float, str]:
    """("ok", value, "") for a real number within +-MAX_ABS_REWARD (a bool is 0 or 1: a reward written as
    `answer == truth` is a fair one), else ("invalid", 0.0, what it was).

    Never raises: `float()` of a user's value may overflow (10**400) or fail in the value's own code.
    """
    kind = type(value).__name__
    if isinstance(value, (str, bytes)) or not hasattr(value, "__float__"):
        return "invalid", 0.0, f"returned {kind}, not a number (return a float)"
    try:
        number = float(value)
    except Exception as e:  # OverflowError for 10**400; anything from a user class's __float__
        return "invalid", 0.0, f"returned {kind} that float() refused ({type(e).__name__})"
    if not math.isfinite(number) or abs(number) > MAX_ABS_REWARD:
        return "invalid", 0.0, f"returned {number:g}, outside [-{MAX_ABS_REWARD:g}, {MAX_ABS_REWARD:g}]"
    return "ok", number, ""


def _score_one(
    fn, response, ground_truth, extras: dict, soft_timeout: float | None
) -> tuple[str, float, str]:
    """Call a reward function and classify the outcome: ok, invalid, error or timeout."""
    pid = os.getpid()
    try:
        with _deadline(soft_timeout):
            value = fn(response, ground_truth, **extras)
            return _check_reward(value)  # inside the deadline: a user's __float__ may be slow too
    except _DeadlineExceeded:
        return "timeout", 0.0, "soft deadline"
    # A user's reward function may raise anything, sys.exit too; it costs the sample, not the run (nor the
    # worker: SystemExit would end it, and every item after it).
    except (Exception, SystemExit) as e:
        return "error", 0.0, type(e).__name__
    finally:
        if os.getpid() != pid:  # a child the function forked, returning here: it must not answer for us
            os._exit(0)


def _worker_main(conn, reward_fn, soft_timeout: float) -> None:
    """Worker process: load the reward function once, then score (call, index, item) messages forever."""
    # Ctrl-C, and SIGTERM sent to the whole process group (`timeout`, `kill -TERM -PGID`, Slurm), are for the
    # trainer, which finishes its step, with these rewards, before it stops and shuts us down.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    try:
        fn = load_reward_fn(reward_fn) if isinstance(reward_fn, str) else reward_fn
        if fn is math_reward:  # warm sympy's lazy imports and the ANTLR parser before the first deadline
            for truth, guess in (("\\frac{x}{2}", "x/2"), ("(3,\\infty)", "x > 3"), ("2^{10}", "1024")):
                math_reward(f"\\boxed{{{guess}}}", truth)
    except BaseException as e:
        conn.send(("fatal", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if message is None:
            return
        call_id, index, response, ground_truth, extras = message
        start = time.perf_counter()
        status, value, detail = _score_one(fn, response, ground_truth, extras, soft_timeout)
        try:
            conn.send((call_id, index, status, value, detail, time.perf_counter() - start))
        except (OSError, ValueError):
            return


@dataclasses.dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: multiprocessing.connection.Connection
    started: float
    ready: bool = False  # sent its "ready" message: the reward function is loaded
    job: tuple[int, int, float, float] | None = None  # (call id, item index, hard deadline, dispatch time)


def _stop_workers(workers: list[_Worker], grace_s: float = 1.0) -> None:
    """Ask workers to exit, then kill whatever is still running after `grace_s`. Never blocks longer."""
    for w in workers:
        with contextlib.suppress(OSError, ValueError):
            w.conn.send(None)
    end = time.monotonic() + grace_s
    for w in workers:
        w.process.join(max(0.0, end - time.monotonic()))
        if w.process.is_alive():
            w.process.kill()
            w.process.join(1.0)
        w.conn.close()
    workers.clear()


class _RateLimitedWarnings:
    """At most `limit` warnings per `window_s` seconds; the count of suppressed ones is logged later."""

    def __init__(self, limit: int = 5, window_s: float = 60.0):
        self.limit, self.window_s = limit, window_s
        self.window_start, self.count, self.suppressed = -math.inf, 0, 0

    def warn(self, msg: str, *args) -> None:
        now = time.monotonic()
        if now - self.window_start > self.window_s:
            if self.suppressed:
                logger.warning(
                    "reward: %d more warnings suppressed in the last %.0f s", self.suppressed, self.window_s
                )
            self.window_start, self.count, self.suppressed = now, 0, 0
        if self.count < self.limit:
            self.count += 1
            logger.warning(msg, *args)
        else:
            self.suppressed += 1


_CALL_ARGUMENTS = ("response", "ground_truth")  # what `fn(response, ground_truth, **extras)` names


class RewardPool:
    """Score (response, ground truth) pairs with a reward function in worker processes, with per-item timeouts.

    `reward_fn` is "math", "module:function", "path/to/file.py:function", or a picklable top-level
    callable `fn(response, ground_truth, **extras) -> float`. Workers are 'spawn'ed (the trainer is a
    multi-threaded torch process, which must not fork), started once and reused across calls; a worker
    is killed and replaced only when an item overruns `timeout` seconds or the worker dies. An item that
    raises, overruns, or returns a non-number, a bool, NaN, inf or a value beyond +-MAX_ABS_REWARD scores 0.0
    and is counted and logged.

    `num_workers=0` scores in the calling process: no processes, but then hard timeouts are NOT enforced
    (a soft SIGALRM deadline applies in the main thread, and math_reward's pre-screen always applies).
    """

    _STARTUP_TIMEOUT_S = 300.0  # importing sympy in a fresh worker on a loaded machine can be slow

    def __init__(
        self, reward_fn: str | Callable[..., float] = "math", num_workers: int = 2, timeout: float = 5.0
    ):
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}")
        if not timeout or timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        if isinstance(reward_fn, str):
            self._fn = load_reward_fn(reward_fn)  # fail fast, in the caller, with the clear message
            self._spec: str | Callable[..., float] = (
                _absolute_spec(reward_fn) if reward_fn != "math" else "math"
            )
        elif callable(reward_fn):
            if num_workers > 0:
                try:
                    pickle.dumps(reward_fn)
                except Exception as e:
                    raise ValueError(
                        f"reward_fn {reward_fn!r} cannot be sent to worker processes ({type(e).__name__}); "
                        "use a top-level function or a 'module:function' spec"
                    ) from e
            self._fn, self._spec = reward_fn, reward_fn
        else:
            raise ValueError(f"reward_fn must be a spec string or a callable, got {type(reward_fn).__name__}")
        self.num_workers, self.timeout = num_workers, float(timeout)
        # The worker interrupts Python code a little before the parent's hard kill, which then only
        # catches C-level hangs (big integers), so most overruns do not cost a restart.
        self._soft_timeout = max(0.05, min(self.timeout * 0.8, self.timeout - 0.2))
        self._warnings = _RateLimitedWarnings()
        self._call_id = 0
        self._start_failures = 0
        self._closed = False
        self.last_seconds: list[float] = []  # per-item scoring time of the last `score` call
        self.first_failure: str | None = None  # the last `score` call's failed item of lowest index, for messages
        self._first_failed_index = -1
        self._ctx = multiprocessing.get_context("spawn")
        self._workers: list[_Worker] = []
        # Runs at close() or at interpreter exit, whichever comes first; holds no reference to self.
        self._finalizer = weakref.finalize(self, _stop_workers, self._workers)
        for _ in range(num_workers):
            self._workers.append(self._start_worker())

    def _start_worker(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe()
        process = self._ctx.Process(
            target=_worker_main,
            args=(child_conn, self._spec, self._soft_timeout),
            daemon=True,
            name="reward-worker",
        )
        process.start()
        child_conn.close()
        return _Worker(process, parent_conn, started=time.monotonic())

    def _replace_worker(self, w: _Worker) -> None:
        if w.process.is_alive():
            w.process.kill()
        w.process.join(2.0)
        w.conn.close()
        self._workers[self._workers.index(w)] = self._start_worker()

    def worker_pids(self) -> list[int | None]:
        """Process ids of the current workers (they change only when a worker is replaced)."""
        return [w.process.pid for w in self._workers]

    def score(
        self, responses: list[str], ground_truths: list[str], extras: list[dict] | None = None
    ) -> tuple[list[float], dict[str, int]]:
        """Rewards for each (response, ground truth[, extras]) and counters of failed items.

        `extras[i]` (e.g. a dataset record's other fields) are passed to the reward function as keyword
        arguments, except keys named "response" or "ground_truth", which the call already fills.

        Returns (rewards, {"reward/errors": n, "reward/timeouts": n, "reward/invalid": n}).
        """
        if self._closed:
            raise RuntimeError("RewardPool is closed")
        n = len(responses)
        if len(ground_truths) != n or (extras is not None and len(extras) != n):
            raise ValueError(
                f"score: {n} responses, {len(ground_truths)} ground truths, "
                f"{'no' if extras is None else len(extras)} extras; lengths must match"
            )
        # A record field named like an argument the call already passes would make every call a TypeError.
        extras = [{k: v for k, v in (e or {}).items() if k not in _CALL_ARGUMENTS} for e in (extras or [{}] * n)]
        rewards, seconds = [0.0] * n, [0.0] * n
        counters = {"reward/errors": 0, "reward/timeouts": 0, "reward/invalid": 0}
        self.first_failure, self._first_failed_index = None, -1
        if self.num_workers == 0:
            for i in range(n):
                start = time.perf_counter()
                result = _score_one(self._fn, responses[i], ground_truths[i], extras[i], self.timeout)
                self._record(i, *result, rewards, counters)
                seconds[i] = time.perf_counter() - start
        else:
            self._score_in_workers(responses, ground_truths, extras, rewards, seconds, counters)
        self.last_seconds = seconds
        return rewards, counters

    def _record(self, index: int, status: str, value: float, detail: str, rewards, counters) -> None:
        rewards[index] = value if status == "ok" else 0.0
        key = {"error": "reward/errors", "timeout": "reward/timeouts", "invalid": "reward/invalid"}.get(
            status
        )
        if key is not None:
            counters[key] += 1
            self._warnings.warn("reward item %d scored 0: %s (%s)", index, status, detail)
            # Workers finish in any order: the lowest index keeps the message the same from run to run.
            if self.first_failure is None or index < self._first_failed_index:
                self.first_failure, self._first_failed_index = f"item {index}: {status}, {detail}", index

    def _score_in_workers(self, responses, ground_truths, extras, rewards, seconds, counters) -> None:
        self._call_id += 1
        call = self._call_id
        todo = deque(range(len(responses)))
        remaining = len(responses)
        while remaining:
            now = time.monotonic()
            for w in list(self._workers):  # give each idle, ready worker one item
                while todo and w.ready and w.job is None:
                    i = todo.popleft()
                    try:
                        payload = pickle.dumps((call, i, responses[i], ground_truths[i], extras[i]))
                    except Exception as e:  # e.g. an unpicklable extras value: only this item fails
                        self._record(i, "error", 0.0, f"unsendable ({type(e).__name__})", rewards, counters)
                        remaining -= 1
                        continue
                    try:
                        w.conn.send_bytes(payload)
                    except (OSError, ValueError):  # died while idle: retry the item on its replacement
                        todo.appendleft(i)
                        self._replace_worker(w)
                        break
                    w.job = (call, i, now + self.timeout, now)
            if not remaining:
                break
            deadlines = [w.job[2] for w in self._workers if w.job is not None]
            wait_s = max(0.0, min(deadlines) - now) if deadlines else 1.0
            ready = multiprocessing.connection.wait([w.conn for w in self._workers], timeout=wait_s)
            for conn in ready:
                w = next((w for w in self._workers if w.conn is conn), None)
                if w is None:  # replaced earlier in this loop
                    continue
                try:
                    message = w.conn.recv()
                except (EOFError, OSError):  # the worker died (crash, OOM killer, os._exit in user code)
                    if w.job is not None and w.job[0] == call:
                        self._record(w.job[1], "error", 0.0, "worker died", rewards, counters)
                        remaining -= 1
                    if not w.ready:
                        self._start_failures += 1
                        if self._start_failures > 3:
                            raise RuntimeError(
                                f"reward workers for {self._spec!r} keep dying while starting"
                            ) from None
                    self._replace_worker(w)
                    continue
                if message[0] == "ready":
                    w.ready, self._start_failures = True, 0
                    continue
                if message[0] == "fatal":
                    raise RuntimeError(f"reward worker could not load {self._spec!r}: {message[1]}")
                call_id, index, status, value, detail, elapsed = message
                w.job = None
                if call_id != call:  # a late answer from an interrupted earlier call
                    continue
                self._record(index, status, value, detail, rewards, counters)
                seconds[index] = elapsed
                remaining -= 1
            now = time.monotonic()
            for w in list(self._workers):
                if w.job is not None and now >= w.job[2]:  # overran: kill it, C code ignores signals
                    if w.job[0] == call:
                        self._record(
                            w.job[1], "timeout", 0.0, f"killed after {self.timeout:g} s", rewards, counters
                        )
                        seconds[w.job[1]] = now - w.job[3]
                        remaining -= 1
                    self._replace_worker(w)
                elif not w.ready and now - w.started > self._STARTUP_TIMEOUT_S:
                    raise RuntimeError(
                        f"reward worker for {self._spec!r} did not start in {self._STARTUP_TIMEOUT_S:g} s"
                    )

    def close(self) -> None:
        """Stop the workers (idempotent; also runs at interpreter exit)."""
        self._closed = True
        self._finalizer()

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------------
# 8. A response's reward: the judge's verdict, then the rules, in one function (`decide_reward`)
# ----------------------------------------------------------------------------------------------------

# Repetition: responses caught in a loop. ORZ (arXiv:2503.24290v2, sec. on the critic) finds that such
# responses appear during RL and that its critic learns to give them low values; its training code logs a
# suffix-array "repeatness" score per step. Ours is cheaper and yes/no, so that its share can be logged at
# every step and, optionally, a degenerate response can be denied its reward. torch is imported inside these
# functions only: the reward workers import this module and need no torch.

def _padded_ids(response_ids, lengths) -> "tuple[torch.Tensor, torch.Tensor]":
    """(B, R) long ids and (B,) lengths from a right-padded tensor (+ lengths) or a list of id lists."""
    import torch

    if torch.is_tensor(response_ids):
        if response_ids.dim() != 2:
            raise ValueError(f"repetition: response_ids must be (B, R), got shape {tuple(response_ids.shape)}")
        full = torch.full((len(response_ids),), response_ids.shape[1], dtype=torch.long, device=response_ids.device)
        lengths = full if lengths is None else torch.as_tensor(lengths, device=response_ids.device).long()
        return response_ids.long(), lengths.clamp(min=0, max=response_ids.shape[1])
    rows = [list(r) for r in response_ids]
    if lengths is not None:
        rows = [r[:int(n)] for r, n in zip(rows, lengths, strict=True)]
    ids = torch.full((len(rows), max([len(r) for r in rows] + [1])), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return ids, torch.tensor([len(r) for r in rows], dtype=torch.long)


def tail_loop_flags(response_ids, lengths=None, *, max_span: int = 64, min_repeats: int = 4,
                    min_loop_tokens: int = 16) -> "torch.Tensor":
    """Whether each response ends in a loop: its last L tokens repeat a span of p tokens (1 <= p <= max_span)
    back to back, with L >= min_repeats * p and L >= min_loop_tokens (so a 1-token span needs 16 copies).

    A cut-off last copy counts: the test is x[t] == x[t - p] over the tail, i.e. the tail has period p.
    Vectorised over the batch; per response it reads only the last max(min_repeats * p, min_loop_tokens)
    tokens for each p, so the cost does not grow with the response length. A response that stopped
    normally ends with its stop (e.g. "</answer>"), so this flags mostly truncated, looping responses.
    response_ids: (B, R) right-padded with `lengths` (B,), or a list of id lists. Returns (B,) bool.
    """
    import torch

    ids, lengths = _padded_ids(response_ids, lengths)
    B, R = ids.shape
    flags = torch.zeros(B, dtype=torch.bool, device=ids.device)
    for p in range(1, max_span + 1):
        need = max(min_repeats * p, min_loop_tokens)  # tail length that must have period p
        if need > R:
            break  # `need` grows with p: no row is long enough from here on
        t = lengths[:, None] - need + p + torch.arange(need - p, device=ids.device)[None, :]
        same = ids.gather(1, t.clamp(0, R - 1)) == ids.gather(1, (t - p).clamp(0, R - 1))
        flags |= (lengths >= need) & same.all(dim=1)
    return flags


def compression_ratio(text: str) -> float:
    """zlib-compressed size / UTF-8 size of `text` (1.0 for empty text). Normal math prose is ~0.4-0.6,
    text that cycles through the same paragraphs far lower. Whisper uses the same signal (as raw/compressed,
    threshold 2.4) to reject looping transcriptions (openai/whisper, transcribe.py)."""
    import zlib

    raw = text.encode("utf-8")
    return len(zlib.compress(raw)) / len(raw) if raw else 1.0


def repetition_flags(response_ids, lengths=None, texts: list[str] | None = None, *, max_span: int = 64,
                     min_repeats: int = 4, min_loop_tokens: int = 16, max_compression_ratio: float = 0.2,
                     min_chars: int = 300) -> "torch.Tensor":
    """Whether each response is degenerate (caught in a loop): `tail_loop_flags`, or, when `texts` is
    given, a text of at least `min_chars` characters whose `compression_ratio` is below
    `max_compression_ratio` (repeated paragraphs, loops that later stopped, spans longer than max_span).

    Defaults: "12 + 7 = 19 </think> <answer> \\boxed{19} </answer>" and "1, 2, 3, 4, 5, 6" pass; "the the the
    ..." (16+ copies), "= 5 = 5 = 5 ..." (4+ copies over 16+ tokens) and text cycling through the same
    paragraphs are flagged. Normal math text compresses to ~0.4-0.6; a 160-character paragraph written 5 times
    comes to 0.17 (4 times: 0.20, not flagged), a 700-character solution written 3 times to 0.19; a paragraph
    up to max_span tokens long that loops to the end is caught by the tail test from 4 copies. Cheap enough
    for every step: O(max_span^2) tensor work per response, plus one zlib call per long text.

    response_ids: (B, R) right-padded ids with `lengths` (B,) (e.g. exp.response_ids and
    exp.response_mask.sum(1)), or a list of token id lists. texts: the decoded responses, same order.
    Returns (B,) bool on the ids' device.
    """
    import torch

    flags = tail_loop_flags(response_ids, lengths, max_span=max_span, min_repeats=min_repeats,
                            min_loop_tokens=min_loop_tokens)
    if texts is not None:
        if len(texts) != len(flags):
            raise ValueError(f"repetition_flags: {len(flags)} responses but {len(texts)} texts")
        squashed = [len(t) >= min_chars and compression_ratio(t) < max_compression_ratio for t in texts]
        flags |= torch.tensor(squashed, dtype=torch.bool, device=flags.device)
    return flags


def repetition_rate(response_ids, lengths=None, texts: list[str] | None = None, **kwargs) -> float:
    """Share of responses `repetition_flags` flags (0.0 for no responses); log it as train/repetition."""
    flags = repetition_flags(response_ids, lengths, texts, **kwargs)
    return flags.float().mean().item() if len(flags) else 0.0


def zero_degenerate(rewards, flags):
    """The guard: a degenerate response gets reward 0, whatever its answer, so that a loop that happens to
    end in a right box is never reinforced. rewards (B,) tensor or list; flags (B,) bool. Same type back."""
    import torch

    if torch.is_tensor(rewards):
        flags = torch.as_tensor(flags, dtype=torch.bool, device=rewards.device)
        return torch.where(flags, torch.zeros_like(rewards), rewards)
    return [0.0 if bool(f) else r for r, f in zip(rewards, flags, strict=True)]


def overlong_penalty(length: int, max_new_tokens: int, buffer: int, factor: float = 1.0) -> float:
    """DAPO's soft overlong punishment (arXiv:2503.14476v1, eq. 13): 0 up to `max_new_tokens - buffer`
    tokens, then falling linearly to -`factor` at `max_new_tokens` (a truncated response).
    Example: budget 100, buffer 20 -> lengths 80, 90, 100 get 0, -0.5, -1."""
    over = max(float(length) - (max_new_tokens - buffer), 0.0)
    return -factor * min(over / max(buffer, 1), 1.0)


@dataclasses.dataclass(frozen=True)
class RewardRules:
    """What turns a judge's verdict into a response's reward: the training flags of the same names."""

    reward: str = "math"  # a control ('random[:P]', 'format') gives the reward in the judge's place
    score_truncated: bool = False
    format_reward_weight: float = 0.0
    zero_repetitive: bool = False
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0
    max_new_tokens: int = 0

    @classmethod
    def of(cls, args) -> "RewardRules":
        """The rules a run's arguments set (fields of the same names)."""
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
                      if not callable(getattr(args, f.name))})


def outcome_reward(verdict: float, response: str, ground_truth: str, *, truncated: bool, rules: RewardRules,
                   rng=None) -> float:
    """Steps 1 and 2 of `decide_reward`: the verdict (or the control reward) and the truncation rule, before
    any shaping. DAPO's dynamic sampling reads it as a response's accuracy (a group has signal when its
    responses' outcomes differ)."""
    control = control_reward(rules.reward)
    score = verdict
    if control is not None:  # what a spurious reward gives on the same run
        score = (random_reward(response, ground_truth, p=control[1], rng=rng) if control[0] == "random"
                 else boxed_format_reward(response, ground_truth))
    return 0.0 if truncated and not rules.score_truncated else score


def decide_reward(verdict: float, response: str, ground_truth: str, *, truncated: bool, length: int,
                  repetitive: bool, rules: RewardRules, rng=None) -> float:
    """The reward of one response, from the judge's `verdict` (the rule, math_reward, or the user's function,
    as RewardPool scored it), decided in this order:

    1. the verdict, or a control reward in its place (`--reward random[:P]` draws from `rng`, a
       random.Random; `--reward format` gives 1 for any final boxed answer);
    2. truncation: a response that did not stop on its own scores 0 (ORZ), unless `score_truncated`;
    3. format: `format_reward_weight` x `format_reward`, for a response that was not zeroed in 2;
    4. repetition: with `zero_repetitive`, a response caught in a loop (`repetition_flags`) loses what 1-3
       gave it, so that a loop that happens to end in a right box is never reinforced (ORZ only logs it);
    5. overlong shaping: DAPO's length penalty (`overlong_penalty`) is added last, to every response, looping
       or not: it is about the length alone.
    """
    score = outcome_reward(verdict, response, ground_truth, truncated=truncated, rules=rules, rng=rng)  # 1, 2
    return shaped_reward(score, response, truncated=truncated, length=length, repetitive=repetitive, rules=rules)


def shaped_reward(outcome: float, response: str, *, truncated: bool, length: int, repetitive: bool,
                  rules: RewardRules) -> float:
    """Steps 3 to 5 of `decide_reward` on a response's `outcome_reward`: format, repetition, overlong shaping."""
    score = outcome
    if rules.format_reward_weight and not (truncated and not rules.score_truncated):
        score += rules.format_reward_weight * format_reward(response)
    if rules.zero_repetitive and repetitive:
        score = 0.0
    if rules.overlong_buffer:
        score += overlong_penalty(length, rules.max_new_tokens, rules.overlong_buffer, rules.overlong_penalty)
    return score


def decide_rewards(verdicts: list[float], responses: list[str], ground_truths: list[str], *, truncated: list[bool],
                   lengths: list[int], repetitive: list[bool], rules: RewardRules,
                   rng=None) -> tuple[list[float], list[float], dict]:
    """`decide_reward` for each response of a batch, its `outcome_reward` (from the same draw of a random
    control), and the sums a step logs: train/correct (the judge's verdicts > 0, under a control reward) and
    train/overlong_penalty (with the shaping on)."""
    outcomes = [outcome_reward(v, r, g, truncated=t, rules=rules, rng=rng)
                for v, r, g, t in zip(verdicts, responses, ground_truths, truncated, strict=True)]
    rewards = [shaped_reward(o, r, truncated=t, length=n, repetitive=x, rules=rules)
               for o, r, t, n, x in zip(outcomes, responses, truncated, lengths, repetitive, strict=True)]
    stats = {}
    if control_reward(rules.reward) is not None:
        stats["train/correct"] = float(sum(v > 0 for v in verdicts))
    if rules.overlong_buffer:
        stats["train/overlong_penalty"] = sum(overlong_penalty(n, rules.max_new_tokens, rules.overlong_buffer,
                                                               rules.overlong_penalty) for n in lengths)
    return rewards, outcomes, stats


def answer_is_usable(answer: str) -> bool:
    """False for a ground truth no response could match: empty, or with unbalanced braces."""
    text = answer.replace("\\{", "").replace("\\}", "")
    depth = 0
    for ch in text:
        depth += (ch == "{") - (ch == "}")
        if depth < 0:
            return False
    return depth == 0 and ground_truth_answer(answer) is not None


def audit_verdicts(responses: list[str], ground_truths: list[str], verdicts: list[float], picked: list[int],
                   step: int, truncated: list[bool]) -> tuple[int, int, list[dict]]:
    """Judge the `picked` responses again with plain math-verify (`math_verify_baseline`): (how many were
    audited, how many were skipped, a row for each whose verdict differs from `verdicts`, for reward_audit.jsonl, which
    `python reward.py FILE --compare` reads). Compared are the judges' verdicts before ORZ's truncation rule.
    Answers the pre-screen refuses as too costly are not audited (nor responses to such a ground truth: a
    100 KB one took 30 s a step): math-verify runs in the caller's process (the trainer's), where a parse
    that never ends would stop training. `skipped` counts them."""
    # both what our judge reads (the answer region) and what math-verify reads (the last box of the text)
    affordable = [i for i in picked if not any(
        a is not None and too_costly(a) for a in (final_answer(responses[i]), last_boxed_string(responses[i]),
                                                 str(ground_truths[i])))]
    skipped, picked = len(picked) - len(affordable), affordable
    audited, differ = 0, []
    for i in picked:
        try:
            plain = math_verify_baseline(responses[i], ground_truths[i])
        except Exception:  # a failure of the audit's judge on model text is no verdict, not a crash of the run
            continue
        audited += 1
        if (verdicts[i] > 0) != (plain > 0):
            differ.append({"step": step, "response": responses[i], "ground_truth": ground_truths[i],
                           "reward": verdicts[i], "math_verify": plain, "truncated_response": bool(truncated[i])})
    return audited, skipped, differ


# ----------------------------------------------------------------------------------------------------
# 9. Command line: score a JSON Lines file
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RewardArgs:
    """How responses are scored (training, evaluation and curation share these arguments)."""

    reward: str = dataclasses.field(default="math", metadata={
        "group": "reward", "help": "'math', module:function or path/file.py:function; controls: 'random' (1 with "
                                   "probability 0.5; 'random:P' for P) or 'format' (1 for any final boxed answer)"})
    score_truncated: bool = dataclasses.field(default=False, metadata={
        "help": "score truncated responses too (ORZ: they get 0)"})
    reward_workers: int = dataclasses.field(default=2, metadata={
        "help": "reward worker processes (0: in-process, no hard timeout)"})
    reward_timeout: float = dataclasses.field(default=5.0, metadata={
        "help": "seconds per item before its worker is killed and it scores 0"})


@dataclasses.dataclass
class ScoreFileArgs(RewardArgs):
    """Arguments of `python reward.py FILE.jsonl` (parsed by cli.parse_args)."""

    file: str = dataclasses.field(kw_only=True, metadata={
        "positional": True, "help": "JSONL file of {response, ground_truth[, expected]} records"})
    baseline: bool = dataclasses.field(default=False, metadata={
        "help": "also score with plain math-verify on the last box and compare"})
    compare: bool = dataclasses.field(default=False, metadata={
        "help": "--baseline, and print every record where --reward and plain math-verify disagree (the table "
                "of a run's reward_audit.jsonl)"})


class _InputError(Exception):
    pass


def _read_records(path: str) -> list[dict]:
    """Records of a JSONL file; raises _InputError with `file:line: problem` on the first bad line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise _InputError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise _InputError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    records = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise _InputError(f"{path}:{lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(record, dict) or "response" not in record or "ground_truth" not in record:
            raise _InputError(f"{path}:{lineno}: expected an object with 'response' and 'ground_truth'")
        if "expected" in record and record["expected"] not in (0, 1):
            raise _InputError(f"{path}:{lineno}: 'expected' must be 0 or 1, got {record['expected']!r}")
        records.append(record)
    return records


def _one_line(value, width: int = 60) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _score_file(
    records: list[dict], reward_fn, workers: int, timeout: float, score_truncated: bool = False
) -> tuple[list[float], dict, list[float]]:
    """Rewards of the records (a record marked "truncated": true scores 0, as in training, unless
    `score_truncated`), the pool's counters and each item's seconds."""
    responses = [r["response"] for r in records]
    truths = [
        r["ground_truth"] if isinstance(r["ground_truth"], str) else str(r["ground_truth"]) for r in records
    ]
    extras = [
        {k: v for k, v in r.items() if k not in ("response", "ground_truth", "expected", "truncated")}
        for r in records
    ]
    with RewardPool(reward_fn, num_workers=workers, timeout=timeout) as pool:
        rewards, counters = pool.score(responses, truths, extras)
        seconds = pool.last_seconds
    if not score_truncated:
        rewards = [0.0 if r.get("truncated") is True else x for r, x in zip(records, rewards, strict=True)]
    return rewards, counters, seconds


def disagreement_table(records: list[dict], judge: list[float], baseline: list[float]) -> str:
    """Counts of the four verdict pairs (judge vs plain math-verify, a reward > 0 counting as correct), the
    disagreement rate, and one line per record where the two differ."""
    pairs = [(a > 0, b > 0) for a, b in zip(judge, baseline, strict=True)]
    count = {(a, b): pairs.count((a, b)) for a in (True, False) for b in (True, False)}
    differ = [i for i, (a, b) in enumerate(pairs) if a != b]
    lines = [f"judge vs math-verify on {len(pairs)} records: both 1: {count[True, True]}, both 0: "
             f"{count[False, False]}, judge only: {count[True, False]}, math-verify only: {count[False, True]}; "
             f"disagreement {len(differ) / len(pairs):.3f}",
             "disagreements (index | judge | math-verify | answer | ground truth):"]
    lines += [f"  {i:5d} | {judge[i]:.0f} | {baseline[i]:.0f} | {_one_line(final_answer(records[i]['response']), 40)}"
              f" | {_one_line(records[i]['ground_truth'], 40)}" for i in differ]
    return "\n".join(lines)


def main(args: ScoreFileArgs) -> int:
    """Score a JSONL file and print accuracy, agreement with `expected`, and the items that scored 0."""
    try:
        records = _read_records(args.file)
        if args.reward != "math":
            load_reward_fn(args.reward)
    except (_InputError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not records:
        print(f"error: {args.file}: no records", file=sys.stderr)
        return 2
    start = time.perf_counter()
    rewards, counters, seconds = _score_file(records, args.reward, args.reward_workers, args.reward_timeout,
                                             args.score_truncated)
    n = len(records)
    print(f"scored {n} records from {args.file} with {args.reward!r} in {time.perf_counter() - start:.1f} s")
    print(f"accuracy: {sum(r > 0 for r in rewards) / n:.3f} ({sum(r > 0 for r in rewards)}/{n})")
    print("counters: " + ", ".join(f"{k} {v}" for k, v in counters.items()))
    labelled = [i for i, r in enumerate(records) if "expected" in r]
    runs = [("judge", rewards, seconds)]
    if args.baseline or args.compare:
        base_rewards, base_counters, base_seconds = _score_file(
            records, math_verify_baseline, args.reward_workers, args.reward_timeout, args.score_truncated
        )
        runs.append(("math-verify baseline", base_rewards, base_seconds))
        print("baseline counters: " + ", ".join(f"{k} {v}" for k, v in base_counters.items()))
    print(f"{'':22s}" + "".join(f"{name:>22s}" for name, _, _ in runs))
    if labelled:
        agreements = [sum((rs[i] > 0) == bool(records[i]["expected"]) for i in labelled) for _, rs, _ in runs]
        print(
            f"{'agreement':22s}"
            + "".join(f"{a / len(labelled):>14.3f} ({a}/{len(labelled)})" for a in agreements)
        )
    print(f"{'accuracy':22s}" + "".join(f"{sum(r > 0 for r in rs) / n:>22.3f}" for _, rs, _ in runs))
    print(f"{'slowest item (s)':22s}" + "".join(f"{max(s):>22.3f}" for _, _, s in runs))
    slowest = max(range(n), key=lambda i: seconds[i])
    print(f"slowest judge item: #{slowest} ({seconds[slowest]:.3f} s)")
    print("items scoring 0 (index | extracted answer | ground truth):")
    for i, r in enumerate(rewards):
        if r <= 0:
            answer = final_answer(records[i]["response"])
            print(f"  {i:5d} | {_one_line(answer)} | {_one_line(records[i]['ground_truth'])}")
    if args.compare:
        print(disagreement_table(records, rewards, runs[1][1]))
    if labelled and len(runs) > 1:
        print("disagreements with expected (index | expected | judge | baseline | answer | truth):")
        for i in labelled:
            if any((rs[i] > 0) != bool(records[i]["expected"]) for _, rs, _ in runs):
                answer = final_answer(records[i]["response"])
                print(
                    f"  {i:5d} | {records[i]['expected']} | {rewards[i]:.0f} | {runs[1][1][i]:.0f} | "
                    f"{_one_line(answer, 40)} | {_one_line(records[i]['ground_truth'], 40)}"
                )
    return 0


if __name__ == "__main__":
    from cli import parse_args

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main(parse_args(ScoreFileArgs, prog="reward.py", description=__doc__)))
