"""The run's output directory: one run at a time, checkpoints that a kill cannot tear, and resume.

A run locks its directory (`lock_output_dir`), decides before any model loads whether it starts afresh or
resumes (`plan_output_dir`: only the same run, with the same training arguments, is resumed), writes
checkpoints atomically with a manifest of hashes (`save_checkpoint`) and resumes from the newest intact one
(`resume`). SIGTERM/SIGINT ask for a checkpoint at the end of the step (`StopRequest`).
"""

import json
import math
import os
from dataclasses import MISSING, fields
from pathlib import Path

import torch

from utils import JsonlWriter, RunError, file_hash, main_process_decides, plain_args

CHECKPOINT_PREFIX = "step-"
MANIFEST = "manifest.json"  # in each checkpoint: its files' sizes and xxh3-128 hashes, written last
LOCK_FILE = ".lock"  # in the output directory: flocked by the run that uses it, holds its pid
CONFIG_TMP = ".config.json.tmp"  # config.json is written here first, then renamed
# What a run writes in its output directory; --overwrite removes these and nothing else (the lock file and
# the user's own files stay). "reasoner-zero" is tensorboard's directory (the project name of init_trackers).
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "samples.jsonl", "eval_problems.jsonl", "reward_audit.jsonl",
               "policy", "critic", "summary.json", "config.json", "reasoner-zero", "rollouts")
# The arguments that may differ between a checkpoint and the run resuming from it; all others shape
# training and must match. Free: the length of the run (max_steps: after warm-up the learning rate is
# constant, so a longer run continues the same schedule) and its bookkeeping (eval_every, save_every,
# keep_checkpoints, samples_per_step, audit_samples, report_to, max_nonfinite_updates, resume, overwrite, output_dir: a
# moved directory, collective_timeout, dump_rollouts); resources that do not change the objective: reward_workers,
# gradient_checkpointing, and how a batch is split (micro_batch_size, max_tokens_per_microbatch, max_padding:
# float round-off only) or generated (generation, refill_fraction, generation_batch_size: other draws from the same
# distribution). Not free, on purpose: eval_limit, eval_num_samples and eval_datasets define what
# eval/accuracy measures, so changing them mid-run would make one curve (and the summary's base -> final)
# compare two different measures; reward_timeout decides which rewards are 0.
RESUMABLE_ARGS = frozenset({
    "max_steps", "eval_every", "save_every", "keep_checkpoints", "samples_per_step", "report_to",
    "max_nonfinite_updates", "resume", "overwrite", "output_dir", "reward_workers", "gradient_checkpointing",
    "micro_batch_size", "max_tokens_per_microbatch", "max_padding", "generation", "refill_fraction",
    "generation_batch_size", "merge_on_save", "merge_for_generation", "audit_samples", "collective_timeout",
    "dump_rollouts"})
_HELD_LOCKS: list[int] = []  # file descriptors of the output-directory locks this process holds


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint directory `path` cannot be trusted, or None if it is intact: its manifest (written
    last, before the directory got its name) lists every file with its size and hash, each file matches and
    no other file is there,
    and trainer_state.json holds the step of the directory's name, the schedulers and the arguments."""
    try:
        files = json.loads((path / MANIFEST).read_text(encoding="utf-8"))["files"]
        entries = {name: (int(e["size"]), str(e["xxh3_128"])) for name, e in files.items()}
    except FileNotFoundError:
        return f"no {MANIFEST} (an incomplete write, or a checkpoint of an older version)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} is unreadable"
    for name, (size, digest) in entries.items():
        file = path / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            return f"{MANIFEST} names a file outside the checkpoint ({name})"
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {size}"
        if file_hash(file) != digest:
            return f"{name} does not match its hash in the manifest"
    # what the manifest does not list: a resume would hand it to accelerate, which fails on it at length
    strays = sorted(str(p.relative_to(path)) for p in path.rglob("*")
                    if not p.is_dir() and str(p.relative_to(path)) not in (*entries, MANIFEST))
    if strays:
        return f"it holds {strays[0]}, which its manifest does not list" + (
            f" (and {len(strays) - 1} more)" if len(strays) > 1 else "")
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        ok = (state["step"] == int(path.name[len(CHECKPOINT_PREFIX):]) and "schedulers" in state
              and isinstance(state["args"], dict))
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    return None if ok else "trainer_state.json lacks the step of its name, the schedulers or the arguments"


def latest_checkpoint(root: Path) -> tuple[Path | None, list[str]]:
    """The newest intact checkpoint under `root` (a `step-N` directory that `checkpoint_problem` accepts),
    and one line for each newer one skipped, saying why."""
    found = [(int(p.name[len(CHECKPOINT_PREFIX):]), p) for p in root.glob(CHECKPOINT_PREFIX + "*")
             if p.is_dir() and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    skipped = []
    for _, path in sorted(found, reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, skipped
        skipped.append(f"skipped checkpoint {path}: {problem}")
    return None, skipped


def arg_differences(saved: dict, args) -> list[str]:
    """`--flag saved -> now` for each argument outside RESUMABLE_ARGS whose value in `args` differs from
    `saved` (the arguments a checkpoint or config.json recorded); an argument `saved` lacks counts as
    its default. Example: saved lr 1e-4, now 5e-4 -> ["--lr 0.0001 -> 0.0005"]."""

    def show(value) -> str:
        return value if isinstance(value, str) else json.dumps(value)

    now = json.loads(json.dumps(plain_args(args)))  # compared as saved: through JSON
    defaults = {f.name: f.default if f.default_factory is MISSING else f.default_factory() for f in fields(args)}
    return [f"--{name.replace('_', '-')} {show(saved.get(name, defaults[name]))} -> {show(value)}"
            for name, value in now.items()
            if name not in RESUMABLE_ARGS and saved.get(name, defaults[name]) != value]


def lock_output_dir(out: Path) -> None:
    """Lock `out` for this process until `main` ends (flock on out/.lock, which records the holder's pid
    and host). The kernel drops a flock when its process ends, however it ends, so a killed run leaves no
    lock behind; the file stays (removing it would let two runs lock different files). Raises SystemExit
    naming the holder if another run has the lock."""
    import errno
    import fcntl
    import socket

    out.mkdir(parents=True, exist_ok=True)
    refuse_links(out)
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").split()
        os.close(fd)
        who = f"pid {holder[0]} on {holder[1]}" if len(holder) >= 2 else "a process that has just started"
        raise RunError(f"error: --output-dir {out} is in use by another run ({who}); wait for it to end, "
                       "or choose another --output-dir") from None
    except OSError as err:  # file systems without flock (Lustre mounted noflock, some NFS): run unlocked
        if err.errno not in (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP):
            raise
        os.close(fd)
        print(f"warning: --output-dir {out}: its file system cannot lock files ({err.strerror}); nothing stops "
              "a second run from using it at the same time")
        return
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    _HELD_LOCKS.append(fd)


def refuse_links(out: Path) -> None:
    """Stop with one line if a name the run writes in `out` is a symbolic link: writing through it would
    truncate or overwrite a file elsewhere (the lock, config.json's temporary copy), or fail at the first
    checkpoint (a dangling `checkpoints`)."""
    for name in (LOCK_FILE, CONFIG_TMP, *RUN_OUTPUTS):
        if (out / name).is_symlink():
            raise RunError(f"error: --output-dir {out}: {name} is a symbolic link (to {os.readlink(out / name)}); a "
                           "run writes only its own files there: remove the link, or choose another --output-dir")


def releases_output_locks(fn):
    """Decorator: the output-directory locks taken during `fn` are released when it returns or raises, so
    that a notebook can call `main` again (a process that ends releases them anyway)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        held = len(_HELD_LOCKS)
        try:
            return fn(*args, **kwargs)
        finally:
            while len(_HELD_LOCKS) > held:
                os.close(_HELD_LOCKS.pop())
    return wrapper


def plan_output_dir(args, out: Path) -> dict:
    """How this run starts in `out`, decided before any model loads: {"checkpoint": the one to resume from
    or None, "clean": remove RUN_OUTPUTS first, "continue_finished": a finished run continued to a larger
    --max-steps, "notes": lines to print, "finished": the summary of this very run, already finished with
    these arguments and --max-steps, else None}. A directory is reused only for the same run: resuming needs the
    checkpoint's training arguments (`arg_differences`), and without a usable checkpoint only the leftovers
    of this run killed before its first checkpoint are replaced. Everything else (a finished run, a run of
    other arguments, a run whose checkpoints are all damaged or that saved none) is refused with one line,
    unless --overwrite."""
    ways_out = "start afresh there with --overwrite, or choose another --output-dir"
    if args.overwrite and args.resume:
        raise RunError("error: --overwrite (start afresh) and --resume contradict each other; choose one")
    present = [name for name in RUN_OUTPUTS if (out / name).exists() and not (
        (out / name).is_dir() and not any((out / name).iterdir()))]
    saved = read_run_config(out)
    if args.overwrite:
        if (out / "config.json").exists() and saved is None:  # e.g. a model directory: not ours to clean
            raise RunError(f"error: --overwrite: {out} holds a config.json that is not a run's; choose "
                           "another --output-dir")
        return _start(clean=bool(present))
    ckpt, skipped = latest_checkpoint(out / "checkpoints")
    why = f" ({'; '.join(skipped)})" if skipped else ""
    finished = (out / "summary.json").exists()
    try:
        summary = json.loads((out / "summary.json").read_text()) if finished else None
        finished_steps = summary["steps"] if finished else None
    except (OSError, ValueError, KeyError, TypeError):
        finished_steps = None
    # The same run asked for again once it has finished (a scheduler re-queuing a job that ended well):
    # nothing to do, and not a failure.
    if finished_steps == args.max_steps and saved is not None and not arg_differences(saved, args):
        return _start(finished=summary)
    if ckpt is None:
        if args.resume:
            raise RunError(f"error: --resume: no usable checkpoint in {out / 'checkpoints'}{why}")
        if finished:
            raise RunError(f"error: {out} holds a finished run (summary.json) and no usable checkpoint to "
                           f"continue it from{why}; {ways_out}")
        if present and not killed_before_first_checkpoint(out, args, skipped, saved):
            diffs = arg_differences(saved, args) if saved is not None else []
            other = f", of other training arguments ({'; '.join(diffs)})," if diffs else ""
            raise RunError(f"error: {out} holds a run ({', '.join(present)}){other} but no usable checkpoint "
                           f"to resume from{why}; {ways_out}")
        return _start(clean=bool(present), notes=skipped)
    state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
    diffs = arg_differences(state["args"], args)
    if diffs:
        raise RunError(f"error: {out} holds a run with other training arguments ({'; '.join(diffs)}); "
                       f"resume it with the same ones, {ways_out}")
    if state["step"] > args.max_steps:
        raise RunError(f"error: --max-steps {args.max_steps} is below the step of the checkpoint to resume "
                       f"from ({ckpt}); raise it, {ways_out}")
    if finished and finished_steps is None:
        raise RunError(f"error: {out} holds a finished run (summary.json, unreadable); {ways_out}")
    if finished and args.max_steps <= finished_steps:
        raise RunError(f"error: {out} holds a finished run ({finished_steps} steps); to train it further "
                       f"from {ckpt}, raise --max-steps above {finished_steps}; or {ways_out}")
    return _start(checkpoint=str(ckpt), continue_finished=finished, notes=skipped)


def _start(checkpoint: str | None = None, clean: bool = False, continue_finished: bool = False,
           notes: list[str] | None = None, finished: dict | None = None) -> dict:
    """A plan of `plan_output_dir`."""
    return {"checkpoint": checkpoint, "clean": clean, "continue_finished": continue_finished,
            "notes": notes or [], "finished": finished}


def read_run_config(out: Path) -> dict | None:
    """The arguments recorded in out/config.json if it is a run's (it names an advantage estimator and a
    step count), else None (missing, unreadable, or another tool's config.json, such as a model's)."""
    try:
        saved = json.loads((out / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) and {"advantage", "max_steps"} <= saved.keys() else None


def killed_before_first_checkpoint(out: Path, args, skipped: list[str], saved: dict | None) -> bool:
    """Whether `out` holds only what a run of these training arguments writes before its first checkpoint
    (it was killed early): its config.json (`saved`, from `read_run_config`) agrees with `args`, no checkpoint
    (even a damaged one) nor final output exists, and every logged step precedes the first checkpoint.
    Starting again loses nothing more."""
    if saved is None:
        return False
    try:
        first_checkpoint = int(saved["save_every"])
        logged = read_jsonl_before(out / "metrics.jsonl", math.inf)
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return (not skipped and not arg_differences(saved, args) and first_checkpoint > 0
            and not any((out / name).exists() for name in ("policy", "critic", "summary.json"))
            and all(row["step"] < first_checkpoint for row in logged))


def claim_output_dir(accelerator, args) -> dict:
    """Lock the output directory and decide how to start in it (`plan_output_dir`), on the main process
    before any model loads; every process gets the decision, and all stop together on a refusal."""
    out = Path(args.output_dir)

    def lock_and_plan() -> dict:
        lock_output_dir(out)
        return plan_output_dir(args, out)

    decision = main_process_decides(accelerator, lock_and_plan, what=f"error: --output-dir {out}")
    for note in decision["notes"]:
        accelerator.print(f"warning: {note}")
    return decision


def prepare_output_dir(out: Path, plan: dict, args) -> None:
    """Carry out `plan_output_dir`'s plan (main process, once the models have loaded): remove the outputs of
    the previous run for a fresh start, the summary of a finished run that is continued, and partial
    checkpoints of a killed write; then record this run's arguments in config.json."""
    import shutil

    if plan["clean"]:
        for name in RUN_OUTPUTS:
            path = out / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
    if plan["continue_finished"]:  # no longer finished: a killed continuation must read as a plain resume
        (out / "summary.json").unlink(missing_ok=True)
    for tmp in (out / "checkpoints").glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    tmp = out / CONFIG_TMP
    tmp.unlink(missing_ok=True)  # never written through a link placed there
    tmp.write_text(json.dumps(plain_args(args), indent=2))
    os.replace(tmp, out / "config.json")


def parameters_finite(*models) -> bool:
    """Whether every parameter of `models` (this process's shards; None entries ignored) is finite. Under
    DeepSpeed ZeRO-3 a parameter is an empty placeholder and this process's shard is its `ds_tensor`."""
    return all(bool(torch.isfinite(getattr(p, "ds_tensor", p)).all())
               for m in models if m is not None for p in m.parameters())


def nonfinite_stop_message(step: int, count: int, last_saved: Path | None) -> str:
    """The error of a run stopped after `count` non-finite updates in a row ending at `step`. Nothing is
    saved then (the finite update just before the streak may already have wrecked the weights); the
    message names the newest checkpoint, which predates the streak since none is written during one."""
    first = step - count + 1
    if last_saved is None:
        where = "no checkpoint was saved before they began"
    else:
        after = int(last_saved.name[len(CHECKPOINT_PREFIX):]) - 1
        where = (f"the last checkpoint saved before they began is {last_saved}, the state after step {after}"
                 + (" (whose update came just before the first failure: check it before resuming)"
                    if after == first - 1 else ""))
    return (f"error: step {step}: {count} updates in a row had a NaN or infinite loss or gradient and were "
            f"skipped (steps {first}-{step}); stopping without saving this state; {where}")


class TiedWeightsNote:
    """A logging filter, on while a checkpoint is written: drops accelerate's note "Removed shared tensor
    {'lm_head.weight'} while saving" when every name it lists is a weight tied to another one in the model
    (`tied`, e.g. transformers' `all_tied_weights_keys`). The checkpoint holds the weight it is tied to and
    loading ties them again (the resume tests check it), so the note said nothing, at every checkpoint."""

    def __init__(self, tied):
        self.tied = set(tied)

    def filter(self, record) -> bool:
        import re

        message = record.getMessage()
        if "Removed shared tensor" not in message:  # accelerate prefixes "[RANK 0] "
            return True
        names = re.findall(r"'([^']+)'", message.partition(" while saving")[0])
        return not names or not all(any(n == t or n.endswith("." + t) for t in self.tied) for n in names)


def save_checkpoint(accelerator, root: Path, state: dict, keep: int, tied=()) -> Path:
    """Everything needed to continue at `state["step"]`: models, optimizers, every process's RNG states
    (accelerate's `save_state`: weights as safetensors, or under FSDP and DeepSpeed in their formats;
    everything is read back with torch's weights-only loader), `state` as JSON (with the schedulers:
    nothing is unpickled on resume) and, last, a manifest of every file's size and hash. Written to a
    temporary directory, fsynced, then renamed, so a kill at any
    instant leaves the previous checkpoint whole. A failed write (a full disk) removes the temporary
    directory and stops every process with one line; the previous checkpoints are untouched. `tied`: the
    names of weights tied to others (`TiedWeightsNote`)."""
    import logging

    note = TiedWeightsNote(tied)
    logging.getLogger("accelerate.utils.other").addFilter(note)
    try:
        return _save_checkpoint(accelerator, root, state, keep)
    finally:
        logging.getLogger("accelerate.utils.other").removeFilter(note)


def _save_checkpoint(accelerator, root: Path, state: dict, keep: int) -> Path:
    import shutil

    from accelerate.utils import gather_object
    from safetensors import SafetensorError

    final = root / f"{CHECKPOINT_PREFIX}{state['step']:06d}"
    tmp = root / f".tmp-{final.name}"
    # torch.save reports a failed write as a RuntimeError
    write_errors = (OSError, RuntimeError, SafetensorError)

    def attempt(write) -> None:  # run `write`; then every process knows whether any write failed
        try:
            write()
            problem = None
        except write_errors as err:
            problem = " ".join(f"{type(err).__name__}: {err}".split())[:300]
        problems = [p for p in gather_object([problem]) if p]
        if problems and not accelerator.is_main_process:
            raise RunError(1)  # the main process says why
        if problems:
            shutil.rmtree(tmp, ignore_errors=True)
            older = sorted(p.name for p in root.glob(CHECKPOINT_PREFIX + "*") if p != final)
            last = f"the last checkpoint, {older[-1]}, is untouched" if older else "there is no earlier one"
            free = shutil.disk_usage(next(p for p in (root, *root.parents) if p.exists())).free / 2**30
            raise RunError(f"error: writing checkpoint {final} failed ({problems[0]}; {free:.1f} GiB "
                           f"free there): the partial copy is removed and {last}; free some space and run "
                           "the same command again to resume")

    def prepare() -> None:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)

    def finish() -> None:
        if not accelerator.is_main_process:
            return
        (tmp / "trainer_state.json").write_text(json.dumps(state))
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {str(p.relative_to(tmp)): {"size": p.stat().st_size, "xxh3_128": file_hash(p)}
                    for p in files}
        (tmp / MANIFEST).write_text(json.dumps({"files": manifest}, indent=1))
        for path in [*tmp.rglob("*"), tmp]:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fd = os.open(root, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)

    attempt(prepare)
    attempt(lambda: accelerator.save_state(str(tmp), safe_serialization=True))
    attempt(finish)
    if accelerator.is_main_process:
        done = sorted((p for p in root.glob(CHECKPOINT_PREFIX + "*") if p != final), key=lambda p: p.name)
        for old in done[:max(len(done) - keep + 1, 0)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def save_experience(path: Path, exp) -> None:
    """A rollout's tensors (`rollout.Experience`: ids, masks, rewards, log-probs, values, advantages, ...) as
    safetensors, written to a temporary name and renamed; fields that are None are left out."""
    from safetensors.torch import save_file

    tensors = {f.name: getattr(exp, f.name).detach().cpu().contiguous() for f in fields(exp)
               if torch.is_tensor(getattr(exp, f.name))}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def load_experience(path: Path, device) -> dict:
    """The tensors `save_experience` wrote, on `device`: the keyword arguments of `rollout.Experience`."""
    from safetensors.torch import load_file

    return {k: v.to(device) for k, v in load_file(str(path)).items()}


def read_jsonl_before(path: Path, step: float) -> list[dict]:
    """The records of a JSONL file with "step" < `step`. Lines a kill tore (also inside a multi-byte
    character) or that hold no record are dropped."""
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] < step:
                rows.append(row)
    return rows


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the end of the step and exits."""

    def __init__(self):
        import signal
        import threading

        self.signal = None
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        if self.signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum


def resume(accelerator, checkpoint: Path | None, schedulers: list) -> dict:
    """Load `checkpoint` (models, optimizers, RNG states, then the schedulers) into the prepared run; returns
    its trainer state {"step", "base_accuracy", ...}, or the state of a fresh start when there is none."""
    if checkpoint is None:
        return {"step": 0, "base_accuracy": None}
    accelerator.load_state(str(checkpoint))
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    for scheduler, saved in zip(schedulers, state["schedulers"], strict=True):
        scheduler.load_state_dict(saved)
    accelerator.print(f"resuming from {checkpoint} at step {state['step']} (--overwrite starts afresh)")
    return state


def open_logs(accelerator, out: Path, start_step: int) -> dict:
    """The run's JSON Lines logs (metrics, samples, per-problem evaluations, reward audit), opened for
    appending on the main process ({} elsewhere), holding only the rows before `start_step`: what a killed
    run wrote after its last checkpoint is dropped."""
    names = ("metrics.jsonl", "samples.jsonl", "eval_problems.jsonl", "reward_audit.jsonl")
    kept = {name: read_jsonl_before(out / name, start_step) for name in names}
    missing = sorted(set(range(start_step)) - {row["step"] for row in kept["metrics.jsonl"]})
    if missing:  # synced before each checkpoint: cut or removed since the run stopped
        accelerator.print(f"warning: {out / 'metrics.jsonl'} lacks the rows of {len(missing)} of the {start_step} "
                          f"steps before the checkpoint (steps {step_ranges(missing)}): the resumed log has a gap")
    accelerator.wait_for_everyone()  # every process has read the files before the main process rewrites them
    if not accelerator.is_main_process:
        return {}
    logs = {name: JsonlWriter(out / name) for name in names}
    for name, log in logs.items():
        log.file.truncate(0)
        for row in kept[name]:
            log.write(row)
    return logs



def step_ranges(steps: list[int]) -> str:
    """Sorted step numbers, compactly: [1, 2, 3, 7] -> "1-3, 7"."""
    runs = []
    for step in steps:
        if runs and step == runs[-1][1] + 1:
            runs[-1][1] = step
        else:
            runs.append([step, step])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)


def output_dir_problems(path: str) -> list[str]:
    """[] if `path` can be created and written, else one message."""
    import tempfile

    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        return [f"--output-dir {path}: cannot write there ({err.strerror or err})"]
    return []


def save_models(accelerator, out: Path, policy, critic, tokenizer, peft_policy=None, merge_lora: bool = False) -> None:
    """The trained models as the run's result: policy/ (with its tokenizer) and critic/, loadable with
    from_pretrained (`critic.ValueModel` for the critic). With LoRA (`peft_policy`) the adapters alone in
    peft's format, or with `merge_lora` the base with the adapters merged in. Every process must call it
    (sharded models are gathered); the main process writes."""
    from launch import full_state_dict
    from utils import lora_scaling, merge_lora_state_dict

    model = accelerator.unwrap_model(policy)
    save_kw = dict(is_main_process=accelerator.is_main_process, save_function=accelerator.save, safe_serialization=True)
    state = full_state_dict(accelerator, policy)
    if peft_policy is not None and merge_lora:  # the base model with W + (alpha / r) B A in each adapted weight
        state = merge_lora_state_dict(state, lora_scaling(peft_policy))
    elif peft_policy is not None:  # peft writes the adapters alone, named as in its own model
        state, model = {"base_model.model." + k: v for k, v in state.items()}, peft_policy
    # the saved policy keeps the checkpoint's own generation settings for whoever uses it next
    model.generation_config = getattr(model, "reasoner_zero_original_generation_config", model.generation_config)
    # a gathered (FSDP) state dict holds tied weights as separate tensors: save_pretrained would write both
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    state = {k: v for k, v in state.items() if k not in tied}
    model.save_pretrained(out / "policy", state_dict=state, **save_kw)  # with LoRA unmerged: the adapters alone
    if critic is not None:
        accelerator.unwrap_model(critic).save_pretrained(
            str(out / "critic"), state_dict=full_state_dict(accelerator, critic), merge_lora=merge_lora, **save_kw)
    if accelerator.is_main_process:
        tokenizer.save_pretrained(out / "policy")
