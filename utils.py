"""Small shared helpers: the run's one-line error, masked statistics, padding, LoRA adapters (peft),
the cache, and output files.

No algorithm logic and no configuration lives here; everything is a plain function a notebook can paste.
"""

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch


class RunError(SystemExit, RuntimeError):
    """A run's one-line error ("error: ..."). From the command line it ends the process with status 1 and
    the line, without a traceback, as SystemExit does; in a notebook `except Exception` catches it."""


def plain_args(args) -> dict:
    """The dataclass `args` as JSON values (config.json, checkpoints, trackers): a function given in a field
    (Args(reward=fn) in a notebook) is recorded by name, "python:module.qualname"."""
    def plain(value):
        return f"python:{value.__module__}.{value.__qualname__}" if callable(value) else value

    return {k: plain(v) for k, v in dataclasses.asdict(args).items()}


@contextlib.contextmanager
def timer(metrics: dict, name: str):
    """Add the seconds the block takes to metrics["time/NAME"]."""
    start = time.time()
    try:
        yield
    finally:
        metrics[f"time/{name}"] = metrics.get(f"time/{name}", 0.0) + time.time() - start


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


def with_lora(model, args):
    """The policy as a peft model with LoRA adapters, or the critic with adapters on its backbone (its value
    head stays whole and trainable); every other weight frozen."""
    lora = dict(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                target_modules=args.lora_target_modules)
    if hasattr(model, "value_head"):  # critic.ValueModel
        model.backbone = add_lora(model.backbone, causal_lm=False, **lora)
        return model
    return add_lora(model, **lora)


def lora_summary(models: dict) -> str:
    counts = []
    for role, model in models.items():
        if model is not None:
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            total = sum(p.numel() for p in model.parameters())
            counts.append(f"{role} {trainable:,} of {total:,} ({trainable / total:.2%})")
    return "LoRA: trainable parameters: " + ", ".join(counts)


def lora_problems(args) -> list[str]:
    """What is wrong with the LoRA arguments."""
    if not args.lora_r:
        return [f"--{flag} merges LoRA adapters: it needs --lora-r" for flag, on in
                (("merge-on-save", args.merge_on_save), ("merge-for-generation", args.merge_for_generation)) if on]
    problems = []
    if args.lora_r < 0 or (args.lora_alpha is not None and not args.lora_alpha > 0):
        problems.append("--lora-r must be >= 0 and --lora-alpha > 0")
    if not 0 <= args.lora_dropout < 1:
        problems.append(f"--lora-dropout {args.lora_dropout} must be in [0, 1)")
    # The rollout's (old) log-probs are taken without dropout; an update with dropout would then start from
    # a ratio other than 1. With one optimizer step per rollout the update's own log-probs are the old ones.
    if args.lora_dropout > 0 and (args.ppo_epochs * args.num_mini_batches > 1
                                  or (args.kl_coef > 0 and args.kl_estimator == "k1")):
        problems.append("--lora-dropout > 0 needs one optimizer step per rollout (--ppo-epochs 1 --num-mini-batches "
                        "1, no k1 KL): the old log-probs are taken without dropout, so the PPO ratio would not "
                        "start at 1")
    if not any(t.strip() for t in args.lora_target_modules.split(",")):
        problems.append("--lora-target-modules is empty")
    # With --bf16 the frozen base is held in bf16: W + BA - BA rounds to another W each step, and the drift adds up.
    if args.merge_for_generation and args.bf16:
        problems.append("--merge-for-generation with --bf16: the frozen base is bf16, where merging and unmerging "
                        "every step would round the base weights away from the base; drop one of the two")
    return problems


def warmup_constant(warmup_steps: int):
    """LambdaLR's factor: linear warm-up over `warmup_steps` scheduler steps, then constant."""
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def cache_root() -> Path:
    """Where built models are cached: $REASONER_ZERO_CACHE, else $XDG_CACHE_HOME/reasoner-zero (~/.cache)."""
    return Path(os.environ.get("REASONER_ZERO_CACHE")
                or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "reasoner-zero")


def build_once(path: Path, build: Callable[[Path], None], log=print, what: str = "it",
               check: Callable[[Path], str | None] = lambda p: None) -> Path:
    """Return `path`, first building it with `build(tmp_dir)` if it is not there yet, or if `check(path)`
    finds it incomplete (it returns why, or None), as an entry written by an older version may be.

    Processes that need it at once (tests, the processes of one run) build it once: the first takes a lock
    on the entry and builds into a temporary directory that is renamed to `path` when complete and checked,
    so a half-written entry is never taken for a finished one; the others wait on the lock. Temporary
    directories of killed builds are removed before building.
    """
    import shutil

    from filelock import FileLock, Timeout

    if path.is_dir() and check(path) is None:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path.with_name(path.name + ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log(f"waiting for another process that is building {what} ({path}) ...")
        lock.acquire()
    try:
        if path.is_dir() and (problem := check(path)) is not None:  # else built by the process we waited for
            log(f"rebuilding {what}: the copy at {path} {problem}")
            shutil.rmtree(path)
        if not path.is_dir():
            for stale in path.parent.glob(path.name + ".tmp*"):  # only the lock holder writes: killed builds
                shutil.rmtree(stale, ignore_errors=True)
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")
            build(tmp)
            if (problem := check(tmp)) is not None:
                raise RunError(f"error: building {what} failed: the build {problem}")
            os.replace(tmp, path)  # atomic
    finally:
        lock.release()
    return path


def saved_model_problem(path: Path) -> str | None:
    """Why the directory `path` is not a whole saved model (config.json and .safetensors weights), or None."""
    if not (path / "config.json").is_file():
        return "has no config.json"
    return None if any(path.glob("*.safetensors")) else "has no .safetensors weights"


def save_on_this_process(model, path: Path) -> None:
    """`model.save_pretrained(path)` on any process. Once torch.distributed is initialized, transformers (5.2x)
    writes only on global rank 0, whatever `is_main_process` says: a model built on another machine's process
    (a cache of its own) was left without weights or config."""
    model.should_save_on_this_rank = lambda is_main_process: is_main_process
    try:
        model.save_pretrained(path, safe_serialization=True)
    finally:
        del model.should_save_on_this_rank


def file_hash(path: Path) -> str:
    """xxh3-128 of a file's bytes: it catches torn or altered files as well as sha256 (no adversary here) at
    several GB/s, so that checking the tens of GB of a 7B run's checkpoint is bound by the disk."""
    import xxhash

    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


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
        raise RunError(error if accelerator.is_main_process else 1)
    return result


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

    def sync(self) -> None:
        """Make what was written survive a crash of the machine, not only of the process."""
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()
