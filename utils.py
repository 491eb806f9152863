"""Small shared helpers: seeding, masked statistics, padding, argument parsing, output files.

No algorithm logic and no configuration lives here; everything is a plain function a notebook can paste.
"""

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import shlex
import sys
import time
import types
import typing
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


@contextlib.contextmanager
def timer(metrics: dict, name: str):
    """Add the seconds the block takes to metrics["time/NAME"]."""
    start = time.time()
    try:
        yield
    finally:
        metrics[f"time/{name}"] = metrics.get(f"time/{name}", 0.0) + time.time() - start


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, reduce: Callable | None = None) -> torch.Tensor:
    """Sum of `x` where `mask` is set; `reduce` sums the result across processes when given."""
    total = (x * mask).sum()
    return reduce(total) if reduce else total


def masked_mean(x: torch.Tensor, mask: torch.Tensor, reduce: Callable | None = None) -> torch.Tensor:
    """Mean of `x` over the positions where `mask` is set (0 when none is), optionally across processes."""
    total, count = masked_sum(x, mask), mask.sum().to(x.dtype)
    if reduce:
        total, count = reduce(total), reduce(count)
    return total / count.clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  reduce: Callable | None = None, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked positions of the whole batch (across processes with `reduce`).

    The variance is the population one (no Bessel correction), so one valid token gives 0, not NaN.
    Positions outside the mask come back as 0.
    """
    mean = masked_mean(x, mask, reduce)
    var = masked_mean((x - mean) ** 2, mask, reduce)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids, mask), both (B, max_len), padded on the left as generation needs."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
    return ids, mask


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift them (as `generate` does)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def disable_dropout(model: torch.nn.Module) -> int:
    """Set every dropout probability in `model` to 0 (nn.Dropout modules and float `*dropout*`/`*pdrop`
    attributes that attention implementations read in train mode); returns how many were non-zero.

    Sampling and old log-probs run in eval mode; an update in train mode with dropout would score other
    log-probs, so the PPO ratio would not be 1 before the first step. Gradient checkpointing needs train
    mode, so dropout is switched off rather than the update run in eval mode. The config is left as is.
    """
    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            module.p, changed = 0.0, changed + 1
        for name, value in list(vars(module).items()):
            if ("dropout" in name or name.endswith("pdrop")) and isinstance(value, float) and value > 0:
                setattr(module, name, 0.0)
                changed += 1
    return changed


def add_lora(model: torch.nn.Module, r: int, alpha: float, dropout: float = 0.0,
             target_modules: str = "all-linear", causal_lm: bool = True) -> torch.nn.Module:
    """`model` wrapped by peft with LoRA adapters (Hu et al., arXiv:2106.09685) of rank `r` on
    `target_modules`, everything else frozen. "all-linear" is every linear layer of the attention and MLP
    blocks but not the LM head; else comma-separated module names (q_proj,v_proj). The adapters start as
    B = 0, so the wrapped model computes exactly what `model` did."""
    from peft import LoraConfig, get_peft_model

    targets = target_modules if target_modules == "all-linear" else [
        t.strip() for t in target_modules.split(",") if t.strip()]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                        task_type="CAUSAL_LM" if causal_lm else None)
    return get_peft_model(model, config)


def merge_lora_state_dict(state: dict, scaling: float, adapter: str = "default") -> dict:
    """A peft LoRA model's full state dict as its base model's: each adapted weight becomes
    W + scaling * B @ A (scaling = alpha / r), the adapter tensors go, and the keys lose peft's prefixes.
    It works on a gathered state dict, so it needs no unsharded model (FSDP)."""
    merged = {}
    for key, value in state.items():
        if f".lora_A.{adapter}." in key or f".lora_B.{adapter}." in key:
            continue
        name = key.removeprefix("base_model.model.")
        if ".base_layer." in key:
            module, param = key.rsplit(".base_layer.", 1)
            name = name.replace(".base_layer.", ".")
            if param == "weight":
                a, b = state[f"{module}.lora_A.{adapter}.weight"], state[f"{module}.lora_B.{adapter}.weight"]
                value = (value.float() + scaling * (b.float() @ a.float())).to(value.dtype)
        merged[name] = value
    return merged


@contextlib.contextmanager
def lora_disabled(model: torch.nn.Module):
    """Run `model` (with peft's LoRA layers anywhere inside, under any wrapper) without its adapters: the
    base model it started from, with no copy of its weights."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)


@contextlib.contextmanager
def trainable_state_only(models: list):
    """Within: each of `models` (unwrapped; a wrapper's state dict, as DDP's, calls theirs) gives a state
    dict of only its parameters that train, and loads one in strict mode, its frozen weights left as they are. LoRA
    checkpoints then hold the adapters and the value head, not the frozen base the run starts from."""
    handles = []
    for model in models:
        trains = {name for name, p in model.named_parameters() if p.requires_grad}

        def drop_frozen(module, state, prefix, metadata, trains=trains):
            for key in [k for k in state if k.startswith(prefix) and k[len(prefix):] not in trains]:
                del state[key]  # frozen weights, tied copies (lm_head) and buffers alike

        def frozen_are_not_missing(module, incompatible, trains=trains):
            # the keys carry the prefix of whatever called load_state_dict (DDP's "module.")
            incompatible.missing_keys[:] = [k for k in incompatible.missing_keys
                                            if any(k == n or k.endswith("." + n) for n in trains)]

        handles += [model.register_state_dict_post_hook(drop_frozen),
                    model.register_load_state_dict_post_hook(frozen_are_not_missing)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def lora_merged(model: torch.nn.Module, enabled: bool = True):
    """Run `model` with each LoRA adapter merged into its weight (W + scaling * B A): one matmul per adapted
    layer instead of three, for generation. On leaving, the product is subtracted again; in float32 that
    gives back W to within a rounding of W + B A (one unit in the last place), in bf16 it would not, so the
    caller keeps such weights unmerged. `enabled` False: `model` as it is."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)] if enabled else []
    for layer in layers:
        layer.merge()
    try:
        yield model
    finally:
        for layer in layers:
            layer.unmerge()


def lora_scaling(peft_model, adapter: str = "default") -> float:
    """The factor of B @ A in `peft_model`'s adapted weights: alpha / r (alpha / sqrt(r) with rsLoRA)."""
    config = peft_model.peft_config[adapter]
    return config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)


def cache_root() -> Path:
    """Where built models are cached: $REASONER_ZERO_CACHE, else $XDG_CACHE_HOME/reasoner-zero (~/.cache)."""
    return Path(os.environ.get("REASONER_ZERO_CACHE")
                or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "reasoner-zero")


def build_once(path: Path, build: Callable[[Path], None], log=print, what: str = "it") -> Path:
    """Return `path`, first building it with `build(tmp_dir)` if it is not there yet.

    Processes that need it at once (tests, the processes of one run) build it once: the first takes a lock
    on the entry and builds into a temporary directory that is renamed to `path` when complete, so a
    half-written entry is never taken for a finished one; the others wait on the lock. Temporary directories
    of killed builds are removed before building.
    """
    import shutil

    from filelock import FileLock, Timeout

    if path.is_dir():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path.with_name(path.name + ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log(f"waiting for another process that is building {what} ({path}) ...")
        lock.acquire()
    try:
        if not path.is_dir():  # else built by the process we waited for
            for stale in path.parent.glob(path.name + ".tmp*"):  # only the lock holder writes: killed builds
                shutil.rmtree(stale, ignore_errors=True)
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")
            build(tmp)
            os.replace(tmp, path)  # atomic
    finally:
        lock.release()
    return path


def number_problems(args, num_processes: int = 1) -> list[str]:
    """One message for each float field of the dataclass `args` that is NaN or infinite (NaN passes every
    range check, and inf most of them), and for a `seed` outside numpy's [0, 2**32 - 1] once each process
    adds its index; [] if there is none."""
    problems = [f"--{f.name.replace('_', '-')} {getattr(args, f.name)} must be a finite number"
                for f in dataclasses.fields(args)
                if isinstance(getattr(args, f.name), float) and not math.isfinite(getattr(args, f.name))]
    highest = 2**32 - max(num_processes, 1)
    if hasattr(args, "seed") and not 0 <= args.seed <= highest:
        problems.append(f"--seed {args.seed} must be in [0, {highest}]"
                        + (f" with {num_processes} processes" if num_processes > 1 else ""))
    return problems


def main_process_decides(accelerator, fn, *args, what: str = "error"):
    """`fn(*args)` run on the main process only, its result sent to every process; its one-line error
    (SystemExit) or an OSError (prefixed with `what`) stops every process together, printed once. For checks
    that may not agree between processes (the hub, a reward module's import) and for file operations done
    once, which the others must not wait on forever."""
    from accelerate.utils import broadcast_object_list

    outcome = [None]  # (result, error)
    if accelerator.is_main_process:
        try:
            outcome[0] = (fn(*args), None)
        except SystemExit as err:
            outcome[0] = (None, str(err.code))
        except OSError as err:
            outcome[0] = (None, f"{what}: {err}")
    broadcast_object_list(outcome)
    result, error = outcome[0]
    if error is not None:
        raise SystemExit(error if accelerator.is_main_process else 1)
    return result



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
            got = f"the string {value!r}"
        elif isinstance(value, (bool, int, float, list, dict)):
            got = json.dumps(value, default=str)  # as the file spells it: true, [1, 2]
        else:
            got = repr(value)  # e.g. a date, which YAML reads from 2024-01-01
        hint = f" (write [{value!r}])" if isinstance(value, str) and typing.get_origin(tp) is list else ""
        raise ValueError(f"expected {_type_name(tp)}, got {got}{hint}")
    return value


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

    argv = list(sys.argv[1:] if argv is None else argv)
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


class JsonlWriter:
    """Append-only JSON Lines file, flushed per line so a killed run keeps everything written so far.

    Any str can be written: a lone surrogate (which UTF-8 cannot hold) goes out as its JSON escape `\\udXXX`,
    so a line never fails to write and reads back to the same string (a high and a low surrogate side by
    side read back as the one character they encode).
    """

    def __init__(self, path: str | os.PathLike):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        # json.dumps puts non-ASCII characters only inside JSON strings, where backslashreplace's `\udXXX`
        # is exactly the JSON escape of that code point.
        self.file = open(path, "a", encoding="utf-8", errors="backslashreplace")  # noqa: SIM115 - run-long

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


# --------------------------------------------------------------------------------------------------
# Plots of runs: `python utils.py plot RUN_DIR [RUN_DIR ...] --out FILE.png`
# --------------------------------------------------------------------------------------------------

# (title, keys or a test on the key): one panel each, in this order. Eval accuracies are every eval/
# key that is an accuracy: eval/accuracy and eval/<dataset>/avg@k, pass@k, maj@k.
PLOT_PANELS = [
    ("train reward", ["train/reward"]),
    ("eval accuracy",
     lambda key: key.startswith("eval/") and any(s in key for s in ("accuracy", "avg@", "pass@", "maj@"))),
    ("response length", ["train/response_length"]),
    ("entropy", ["policy/entropy"]),
    ("clip fraction", ["policy/clipfrac"]),
    ("value loss", ["critic/value_loss"]),
    ("explained variance", ["critic/explained_var"]),
]
OPTIONAL_PANELS = ("value loss", "explained variance")  # drawn only when some run has them (PPO's critic)


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl (one JSON object per line; blank and malformed lines, such as
    a last line cut off by a kill, are skipped). Raises SystemExit with one line if the file is missing."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: {run_dir}: no metrics.jsonl (is it a run directory?)")
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _series(records: list[dict], key: str) -> tuple[list, list]:
    """(steps, values) of the records that have a number under `key`; the step is the record's `step`,
    or its line number when it has none."""
    points = [(r.get("step", i), r[key]) for i, r in enumerate(records)
              if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    return [p[0] for p in points], [p[1] for p in points]


def _same_series(a: tuple[list, list], b: tuple[list, list]) -> bool:
    """Equal steps and values (to rounding): two such lines would be drawn exactly on top of each other."""
    return a[0] == b[0] and len(a[1]) == len(b[1]) and all(
        math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12) for x, y in zip(a[1], b[1], strict=True))


def _merge_duplicate_keys(keys: list[str], runs: dict[str, list[dict]]) -> list[list[str]]:
    """`keys` grouped so that each group is one series in every run: [[eval/accuracy, eval/x/avg@4], ...].

    With one eval set, eval/accuracy (avg@k pooled over all sets) is the same series as that set's avg@k;
    drawn twice, one line would hide the other. A key joins an earlier group only when it equals that
    group's first key in every run that logged either of them.
    """
    groups: list[list[str]] = []
    for key in keys:
        for group in groups:
            pairs = [(_series(records, group[0]), _series(records, key)) for records in runs.values()]
            pairs = [(a, b) for a, b in pairs if a[0] or b[0]]
            if pairs and all(_same_series(a, b) for a, b in pairs):
                group.append(key)
                break
        else:
            groups.append([key])
    return groups


def figure_of_runs(run_dirs: list[str]):
    """The matplotlib figure `plot_runs` saves, and its panel titles; the caller closes the figure.

    Each run has one colour in every panel; the keys of a panel with several differ in line style (the
    first, e.g. eval/accuracy, solid and thicker). Keys whose series are identical are drawn once, with a
    legend entry naming all of them. Every panel spans the same steps. A panel whose values are all one
    number says so, and a run whose lines coincide with an earlier run's is labelled "(same as ...)",
    so a line on top of another is not read as a missing run.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    if not run_dirs:
        raise SystemExit("error: plot needs at least one run directory")
    names = [Path(d).resolve().name or str(d) for d in run_dirs]
    # Labelled by directory name; two runs with the same name (a/ppo, b/ppo) keep the path given.
    runs = {(name if names.count(name) == 1 else str(d)): read_metrics(d)
            for name, d in zip(names, run_dirs, strict=True)}
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if len(runs) > len(cycle):  # more runs than the default cycle: spread them over a colour map
        cycle = [matplotlib.colormaps["turbo"](i / (len(runs) - 1)) for i in range(len(runs))]
    colours = dict(zip(runs, cycle, strict=False))
    # Line styles and markers cycle at coprime lengths: 20 keys in one panel before a pair repeats.
    line_styles, markers = ("-", "--", ":", "-."), (".", "x", "^", "s", "d")
    present = {key for records in runs.values() for r in records for key in r}
    panels = []
    for title, keys in PLOT_PANELS:
        # The headline eval/accuracy first: it keeps the solid line and names any key merged into it.
        if callable(keys):
            keys = sorted((k for k in present if keys(k)), key=lambda k: (k != "eval/accuracy", k))
        if title in OPTIONAL_PANELS and not any(k in present for k in keys):
            continue
        panels.append((title, keys))
    steps = [s for records in runs.values() for _, keys in panels for k in keys
             for s in _series(records, k)[0]]
    low, high = (min(steps), max(steps)) if steps else (0, 1)
    pad = 0.04 * (high - low) or 0.5
    cols = 2
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.remove()
    for ax, (title, keys) in zip(axes.flat, panels, strict=False):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_xlim(low - pad, high + pad)
        groups = _merge_duplicate_keys(keys, runs)
        drawn, values, run_handles, key_handles = {}, [], [], []
        for run, records in runs.items():
            series = {group[0]: _series(records, group[0]) for group in groups}
            series = {k: v for k, v in series.items() if v[0]}
            if not series:
                continue
            for key, (x, y) in series.items():
                i = [g[0] for g in groups].index(key)
                # Markers tell keys apart when line styles repeat; alone, they only mark the points of a
                # short run.
                marker = markers[i % 5] if len(groups) > 1 or len(x) < 30 else None
                ax.plot(x, y, color=colours[run], linestyle=line_styles[i % 4], marker=marker,
                        markevery=max(1, len(x) // 15), linewidth=2.0 if i == 0 and len(groups) > 1 else 1.5,
                        label=run if len(keys) == 1 else f"{run}: {key}")
                values += y
            twin = next((other for other, s in drawn.items() if s.keys() == series.keys()
                         and all(_same_series(s[k], series[k]) for k in s)), None)
            drawn[run] = series
            label = run + (f" (same as {twin})" if twin else "")
            run_handles.append(Line2D([], [], color=colours[run], label=label))
        if len(groups) > 1 or any(len(g) > 1 for g in groups):
            for i, group in enumerate(groups):
                key_handles.append(Line2D([], [], color="gray", linestyle=line_styles[i % 4],
                                          marker=markers[i % 5], label=" = ".join(group)))
        if drawn:
            # A legend of several keys would cover the lines: it goes under the panel.
            below = dict(loc="upper center", bbox_to_anchor=(0.5, -0.24), ncol=2) if key_handles else {}
            ax.legend(handles=run_handles + key_handles, fontsize="small", **below)
            if max(values) == min(values):
                ax.text(0.5, 0.9, f"constant {values[0]:g}" + (" in every run" if len(drawn) > 1 else ""),
                        ha="center", va="top", transform=ax.transAxes, color="gray")
        else:
            ax.text(0.5, 0.5, f"no {' / '.join(keys) or title} in these runs", ha="center", va="center",
                    transform=ax.transAxes, color="gray")
    fig.tight_layout()
    return fig, [title for title, _ in panels]


def plot_runs(run_dirs: list[str], out_path: str | os.PathLike) -> list[str]:
    """Draw the metrics of one or more runs, overlaid, against step into one PNG; returns the panel titles.

    Panels: train reward, eval accuracy (every eval/ accuracy key), response length, entropy, clip
    fraction, and value loss / explained variance when any run logged them. A panel no run has data for
    is drawn empty with a note. Runs are labelled by the run directory's name; how they are told apart is
    in `figure_of_runs`. Uses matplotlib's Agg backend, so it needs no display.
    """
    fig, titles = figure_of_runs(run_dirs)
    import matplotlib.pyplot as plt  # after figure_of_runs chose the Agg backend

    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return titles


def is_evaluation(path: str | os.PathLike) -> bool:
    """Whether `path` is `python evaluate.py`'s output (a directory with results.json, or the file itself)."""
    path = Path(path)
    return (path / "results.json").is_file() or (path.is_file() and path.name.endswith(".json"))


def plot_pass_at_k(eval_paths: list[str], out_path: str | os.PathLike) -> list[str]:
    """pass@k against k (log2 axis) of several evaluations (`python evaluate.py` outputs, e.g. the base model
    and its RL checkpoint), one panel per dataset, one line per evaluation, into one PNG; returns the panel
    titles. RL that only sharpens the base model's distribution shows as a higher pass@1 and a curve that
    meets or falls under the base's at large k (arXiv:2504.13837)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {}  # label -> {dataset: {k: pass@k}}
    for path in eval_paths:
        path = Path(path)
        try:
            metrics = json.loads((path / "results.json" if path.is_dir() else path).read_text())["metrics"]
            curves[path.name if path.is_dir() else path.parent.name] = {
                name: {int(k): v for k, v in m["pass_at"].items()} for name, m in metrics.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise SystemExit(f"error: {path}: not an evaluation with pass@k curves (results.json of evaluate.py)"
                             ) from None
    # "overall" pools the sets: a panel of its own only when there are several
    datasets = [d for d in dict.fromkeys(name for c in curves.values() for name in c) if d != "overall"]
    datasets = datasets + ["overall"] if len(datasets) != 1 else datasets
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 3.6), squeeze=False)
    for ax, name in zip(axes.flat, datasets, strict=True):
        for label, per_set in curves.items():
            if name in per_set:
                ks = sorted(per_set[name])
                ax.plot(ks, [per_set[name][k] for k in ks], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ks = sorted({k for c in curves.values() for k in c.get(name, {})})
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_title(f"pass@k: {name}")
        ax.set_xlabel("k (samples per problem)")
        ax.set_ylabel("pass@k")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return [f"pass@k: {name}" for name in datasets]


def main(argv: list[str] | None = None) -> None:
    """`python utils.py plot RUN_DIR [RUN_DIR ...] --out FILE.png`; given evaluations (`python evaluate.py`
    outputs) instead of runs, their pass@k curves."""
    parser = argparse.ArgumentParser(prog="utils.py", description="Helpers with a command line.")
    sub = parser.add_subparsers(dest="command", required=True)
    plot = sub.add_parser("plot", help="plot the metrics.jsonl of one or more runs into one PNG, or the pass@k "
                                       "curves of evaluate.py's outputs")
    plot.add_argument("run_dirs", nargs="+", help="run directories holding metrics.jsonl, or evaluate.py output "
                                                  "directories (results.json) for pass@k against k")
    plot.add_argument("--out", default="runs.png", help="PNG file to write (default runs.png)")
    args = parser.parse_args(argv)
    if not str(args.out).lower().endswith(".png"):
        raise SystemExit(f"error: --out {args.out}: must be a .png file")
    evaluations = [is_evaluation(d) for d in args.run_dirs]
    if any(evaluations) and not all(evaluations):
        which = ", ".join(d for d, e in zip(args.run_dirs, evaluations, strict=True) if e)
        raise SystemExit("error: plot draws either runs (metrics.jsonl) or evaluations (results.json), not both: "
                         f"{which} are evaluations")
    titles = (plot_pass_at_k if all(evaluations) else plot_runs)(args.run_dirs, args.out)
    print(f"wrote {args.out} ({len(titles)} panels: {', '.join(titles)})")


if __name__ == "__main__":
    main()
