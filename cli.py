"""Command-line and config-file arguments from a dataclass: `parse_args(Args)` turns the fields of a
dataclass into `--kebab-case` options (with groups, defaults and help from the fields' metadata) and reads
`--config FILE` (YAML or JSON) as defaults that the command line overrides. Every problem is one line.
"""

import argparse
import dataclasses
import json
import shlex
import sys
import types
import typing
from pathlib import Path


class _ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors as one line, `error: ...`, and exit status 2 (no usage block)."""

    def error(self, message: str):
        self.exit(2, f"error: {message}\n")


def _field_group(args_class, name: str) -> str | None:
    """The `group` in the metadata of field `name`, looked up through the base classes too, so that a
    subclass that redeclares a field (to change its default) keeps the field in its group."""
    for cls in args_class.__mro__:
        f = getattr(cls, "__dataclass_fields__", {}).get(name)
        if f is not None and "group" in f.metadata:
            return f.metadata["group"]
    return None


def _base_type(tp) -> tuple[object, bool]:
    """(`tp` without `| None`, whether None is allowed)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp):
        rest = [t for t in typing.get_args(tp) if t is not type(None)]
        if len(rest) == 1:
            return rest[0], True
    return tp, False


def _type_name(tp) -> str:
    """How an error message names a field's type: "a list of strings", "one of gae, grpo", ..."""
    tp, optional = _base_type(tp)
    if typing.get_origin(tp) is typing.Literal:
        name = "one of " + ", ".join(map(str, typing.get_args(tp)))
    elif typing.get_origin(tp) is list:
        name = f"a list of {_type_name(typing.get_args(tp)[0]).partition(' ')[2]}s"
    else:
        name = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[tp]
    return name + (" or null" if optional else "")


def _config_value(value, tp):
    """`value` read from a config file as a value of the field type `tp`; ValueError if it is not one.

    Ints are accepted as floats, and so are strings that are float literals: YAML 1.1 (PyYAML) reads
    `1e-6` as a string. Nothing else is converted: a string is never split into a list, a number never
    becomes a string."""
    tp, optional = _base_type(tp)
    if value is None and optional:
        return None
    if typing.get_origin(tp) is typing.Literal:
        ok = any(type(value) is type(c) and value == c for c in typing.get_args(tp))
    elif typing.get_origin(tp) is list:
        ok = isinstance(value, list)
        if ok:
            return [_config_value(v, typing.get_args(tp)[0]) for v in value]
    elif tp is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            ok = False
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, tp)
    if not ok:
        if isinstance(value, str):
            got = f"the string {_spelled(value, json_like=False)}"
        elif isinstance(value, (bool, int, float, list, dict)):
            got = _spelled(value)  # as the file spells it: true, [1, 2]
        else:
            got = _spelled(value, json_like=False)  # e.g. a date, which YAML reads from 2024-01-01
        hint = (f" (write [{_spelled(value, json_like=False)}])" if isinstance(value, str)
                and typing.get_origin(tp) is list else "")
        raise ValueError(f"expected {_type_name(tp)}, got {got}{hint}")
    return value


def _spelled(value, width: int = 60, json_like: bool = True) -> str:
    """`value` as a config file spells it (JSON: true, [1, 2]; else repr), cut to about `width`
    characters. Walked only as far as it is shown: a few hundred bytes of YAML aliases (a "billion laughs"
    nest) stand for more nested items than memory holds."""
    parts, left = [], width

    def emit(text: str) -> None:
        nonlocal left
        parts.append(text[:max(left, 0)])
        left -= len(text)
        if left < 0:
            raise StopIteration

    def walk(v) -> None:
        if isinstance(v, (list, tuple)):
            emit("[")
            for i, item in enumerate(v):
                emit(", " if i else "")
                walk(item)
            emit("]")
        elif isinstance(v, dict):
            emit("{")
            for i, (k, item) in enumerate(v.items()):
                emit((", " if i else "") + f"{_spelled(str(k), 20)}: ")
                walk(item)
            emit("}")
        else:
            emit(json.dumps(v, default=str) if json_like else repr(v))

    try:
        walk(value)
    except StopIteration:
        parts.append("...")
    return "".join(parts)


def script_argv() -> list[str]:
    """The command line's arguments, or none inside a Jupyter kernel, whose sys.argv holds the kernel's own
    (`-f .../kernel-N.json`): a script pasted whole into a notebook cell runs as `python script.py` would."""
    if "ipykernel" in sys.modules:
        return []
    return sys.argv[1:]


def field_choices(args_class, name: str) -> list | None:
    """The values a string field allows, from its metadata "choices": a list, or a function returning a table
    whose keys are the names (e.g. `lambda: algos.ADVANTAGE_ESTIMATORS`), read when the arguments are parsed, so
    that an entry a notebook adds is a valid choice. None: any string."""
    choices = None
    for cls in args_class.__mro__:  # a subclass that redeclares a field (to change its default) keeps them
        f = getattr(cls, "__dataclass_fields__", {}).get(name)
        if f is not None and "choices" in f.metadata:
            choices = f.metadata["choices"]
            break
    return list(choices() if callable(choices) else choices) if choices is not None else None


def read_config(path: str, args_class) -> dict:
    """The values of a YAML (.yaml/.yml) or JSON config file as {field name: value}, checked against the
    fields of `args_class`: keys may be snake_case or kebab-case. Raises ValueError with one line naming
    the file (and the key) if the file cannot be read, is not a mapping, or has an unknown key or a value
    of the wrong type."""
    import difflib

    hints = typing.get_type_hints(args_class)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        why = getattr(err, "strerror", None) or err
        raise ValueError(f"--config {path}: cannot read it ({why})") from None
    if Path(path).suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or "syntax error"
            raise ValueError(f"{path}: not valid YAML ({problem}{where})") from None
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if values is None:  # an empty YAML file
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of argument names to values (name: value), "
                         f"got {type(values).__name__}")
    out = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in hints or name.startswith("_"):
            close = difflib.get_close_matches(name, list(hints), n=1)
            raise ValueError(f"{path}: unknown key {key}" + (f" (did you mean {close[0]}?)" if close else ""))
        if name in out:
            raise ValueError(f"{path}: {name} is given twice")
        try:
            out[name] = _config_value(value, hints[name])
            choices = field_choices(args_class, name)
            if choices is not None and out[name] not in choices:
                raise ValueError(f"expected one of {', '.join(choices)}, got the string {value!r}")
        except ValueError as err:
            raise ValueError(f"{path}: {key}: {err}") from None
    return out


def _help_text(f, tp, default, required: bool = False) -> str:
    """A field's help with its default appended once ("on"/"off" for flags; none for None), or "(required)"."""
    text = f.metadata.get("help", "").replace("%", "%%")
    if required:
        return f"{text} (required)"
    if tp is bool and default is not None:
        return f"{text} (default: {'on' if default else 'off'})"
    if default is None:  # decided at run time: the help says how
        return text
    shown = " ".join(shlex.quote(v) for v in default) if isinstance(default, list) else default
    return f"{text} (default: {str(shown).replace('%', '%%')})"


def build_parser(args_class, defaults: dict | None = None, prog: str | None = None,
                 description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser for the fields of a dataclass: `--kebab-case` options, grouped as the fields'
    metadata names groups (a `group` holds until the next field that names one; fields of one title share
    a group wherever they are declared), bools as `--x` and `--no-x`, lists as several values, Literals as
    choices, a field without a default as a required option (or a positional value when its metadata says
    "positional"); each help line shows the default (from `defaults`, e.g. a config file, else the
    field's). No prefix matching."""
    hints = typing.get_type_hints(args_class)
    positional = [f.name.upper() for f in dataclasses.fields(args_class) if f.metadata.get("positional")]
    parser = _ArgumentParser(
        prog=prog, allow_abbrev=False, usage=" ".join(["%(prog)s [-h] [--config FILE]", *positional,
                                                       "[--OPTION VALUE ...]"]),
        description=(description or "").strip().split("\n")[0] or None,
        epilog="Options can also come from a YAML or JSON file given with --config (keys as in --help, in\n"
               "snake_case or kebab-case, e.g. max_steps: 100); the command line overrides the file.",
        formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, max_help_position=32))
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file of argument values")
    groups, group = {}, parser
    for f in dataclasses.fields(args_class):
        title = _field_group(args_class, f.name)
        if title is not None:
            group = groups.setdefault(title, parser.add_argument_group(title))
        tp, _ = _base_type(hints[f.name])
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if defaults and f.name in defaults:
            default, required = defaults[f.name], False
        elif required:
            default = None
        else:
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        flag = "--" + f.name.replace("_", "-")
        kwargs = dict(dest=f.name, default=default, help=_help_text(f, tp, default, required))
        if f.metadata.get("positional"):  # a required value without a flag, e.g. the file to read
            kwargs.pop("dest")
            group.add_argument(f.name, metavar=f.name.upper(), type=tp, nargs=None if required else "?", **kwargs)
            continue
        if required:
            kwargs["required"] = True
        if tp is bool:
            group.add_argument(flag, action="store_true", **kwargs)
            group.add_argument("--no-" + flag[2:], dest=f.name, action="store_false", default=default,
                               help=f"turn off {flag}")
        elif typing.get_origin(tp) is typing.Literal:
            group.add_argument(flag, choices=typing.get_args(tp), **kwargs)
        elif typing.get_origin(tp) is list:
            group.add_argument(flag, nargs="*", type=typing.get_args(tp)[0], metavar="TEXT", **kwargs)
        elif tp is str and field_choices(args_class, f.name) is not None:
            group.add_argument(flag, choices=field_choices(args_class, f.name), **kwargs)
        elif tp in (int, float, str):
            metavar = {int: "N", float: "X", str: f.name.rpartition("_")[2].upper()}[tp]
            group.add_argument(flag, type=tp, metavar=metavar, **kwargs)
        else:
            raise TypeError(f"{args_class.__name__}.{f.name}: type {tp} has no command-line form")
    return parser


def _kebab(flag: str) -> str:
    """`--max_steps=3` -> `--max-steps=3` (the value is left alone)."""
    name, eq, value = flag.partition("=")
    return name.replace("_", "-") + eq + value


def parse_args(args_class, argv: list[str] | None = None, prog: str | None = None,
               description: str | None = None):
    """Parse a dataclass of arguments from the command line, with `--config FILE` (YAML or JSON) as defaults.

    Flags are the fields in kebab-case (`--max-steps`; `--max_steps` is accepted too); see `build_parser`.
    Values on the command line override the file. Any problem, such as an unknown flag (named with the
    closest valid one), a bad value, or a config file that is not a mapping or has an unknown key or a value
    of the wrong type, prints one line `error: ...` and exits with status 2. `description`: its first line
    heads --help (pass the script's docstring).
    """
    import difflib

    argv = list(script_argv() if argv is None else argv)
    parser = build_parser(args_class, prog=prog, description=description)
    options = {s for action in parser._actions for s in action.option_strings if s.startswith("--")}
    # The underscore spelling (`--max_steps`) that earlier versions accepted still works, unlisted.
    argv = [_kebab(a) if a.startswith("--") and _kebab(a).partition("=")[0] in options else a for a in argv]
    configs = [(i, a) for i, a in enumerate(argv) if a == "--config" or a.startswith("--config=")]
    defaults = {}
    if len(configs) > 1:
        parser.error("--config is given more than once")
    if configs:
        i, flag = configs[0]
        path = flag.partition("=")[2] if "=" in flag else (argv[i + 1] if i + 1 < len(argv) else "")
        if not path or path.startswith("--"):
            parser.error("argument --config: expected a file")
        try:
            defaults = read_config(path, args_class)
        except ValueError as err:
            parser.error(str(err))
        parser = build_parser(args_class, defaults, prog=prog, description=description)
    namespace, extra = parser.parse_known_args(argv)
    if extra:
        first = extra[0]
        if first.startswith("-"):
            name = first.partition("=")[0]
            close = difflib.get_close_matches(name, sorted(options), n=1)
            parser.error(f"unknown argument {name}" + (f" (did you mean {close[0]}?)" if close else ""))
        before = argv[argv.index(first) - 1] if argv.index(first) > 0 else ""
        flags = {"--" + name.replace("_", "-") for name, tp in typing.get_type_hints(args_class).items()
                 if _base_type(tp)[0] is bool}
        hint = (f" ({before} takes no value: {before} turns it on, --no-{before[2:]} off)"
                if before in flags else "")
        parser.error(f"unexpected value {first!r}{hint}")
    values = vars(namespace)
    values.pop("config")
    return args_class(**values)
