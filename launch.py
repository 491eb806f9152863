"""Launch plumbing: how the processes of a launch (python, accelerate launch, torchrun) are set up, checked
against what the launch asked for, and ended, for one process, DDP, FSDP2 and DeepSpeed ZeRO-2/3 alike.

The training loop calls these and nothing in here reads its arguments beyond a few numbers. This is the file
that changes when accelerate or DeepSpeed change; the loop (train_ppo.py) does not.
"""

import math
import os

import torch

from utils import RunError


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def allow_cpu_fsdp(timeout_s: float = 1800.0) -> bool:
    """Let a launch that asks for FSDP shard on CPU processes, as it does on GPUs. accelerate 1.15 turns a
    launch's FSDP request (ACCELERATE_USE_FSDP) into FSDP only for GPU-type process groups: CPU processes
    (ACCELERATE_USE_CPU) come up as MULTI_CPU and the models get DistributedDataParallel instead, silently.
    Marking the process state (gloo, on the CPU) as multi-process before the Accelerator is built lets it
    shard as asked; FSDP2 itself runs on CPU tensors. accelerate keeps the type in a private shared
    state, so this reaches into it; `launch_problems` checks the result. Returns whether it applied."""
    if not (env_flag("ACCELERATE_USE_FSDP") and env_flag("ACCELERATE_USE_CPU")
            and int(os.environ.get("WORLD_SIZE", "1")) > 1):
        return False
    from datetime import timedelta

    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = PartialState(cpu=True, timeout=timedelta(seconds=timeout_s))  # it starts the process group
    if state.distributed_type != DistributedType.MULTI_CPU:
        return False
    state._shared_state["distributed_type"] = DistributedType.MULTI_GPU
    return True


def process_group_kwargs(timeout_s: float) -> list:
    """The Accelerator's handler for starting the process group: collectives wait at most `timeout_s` seconds
    for the other processes (a process that hangs or stops; one that dies breaks the connection at once).
    For a DeepSpeed launch on CPU processes (no CUDA; DeepSpeed then picks its CPU accelerator, or
    DS_ACCELERATOR=cpu) also the gloo backend: without it accelerate 1.15 reports one process on each rank
    while DeepSpeed uses all of them (`launch_problems` stops that). It also stops DeepSpeed from building its
    shared-memory all-reduce (a C++ op compiled on first use, minutes on a small machine): gloo does the same
    reductions. DeepSpeed keeps its op table in one module-level dict that it reads when it sets up
    communication; marking the op unavailable there makes it fall back to torch.distributed."""
    from datetime import timedelta

    from accelerate.utils import InitProcessGroupKwargs

    if not env_flag("ACCELERATE_USE_DEEPSPEED") or torch.cuda.is_available():
        return [InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))]
    if os.environ.get("DS_ACCELERATOR", "cpu") == "cpu":
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return [InitProcessGroupKwargs(backend="gloo", timeout=timedelta(seconds=timeout_s))]


def is_sharded(accelerator) -> bool:
    """Whether the models' weights are partitioned over the processes (FSDP, DeepSpeed ZeRO-3): then every
    process must run every forward pass, e.g. generate with synced_gpus."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP or deepspeed_stage(accelerator) == 3


def deepspeed_stage(accelerator) -> int | None:
    """The ZeRO stage the launch asked DeepSpeed for, or None without DeepSpeed."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return int(accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"]["stage"])


def fsdp_sharded(model) -> bool:
    """Whether FSDP2 holds `model`: its parameters are DTensors (shards of the full tensors)."""
    from torch.distributed.tensor import DTensor

    return all(isinstance(p, DTensor) for p in model.parameters())


def zero_stage_of(model) -> int | None:
    """The ZeRO stage of the DeepSpeed engine holding `model`, or None when no engine holds it."""
    return model.zero_optimization_stage() if hasattr(model, "zero_optimization_stage") else None


def launch_problems(accelerator, models: dict) -> list[str]:
    """How the distributed setup the Accelerator built differs from what the launch asked for (accelerate
    launch's environment: WORLD_SIZE, ACCELERATE_USE_FSDP, ACCELERATE_USE_DEEPSPEED), and prepared models
    (name -> model) that FSDP did not shard. Each mismatch would train silently wrong or not as asked."""
    from accelerate.utils import DistributedType

    got, processes = accelerator.distributed_type, accelerator.num_processes
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    problems = []
    if launched != processes:
        hint = ("; on CPU processes launch with ACCELERATE_USE_CPU=true (DeepSpeed without it)"
                if not torch.cuda.is_available() and not env_flag("ACCELERATE_USE_CPU") else "")
        problems.append(f"{launched} processes were launched (WORLD_SIZE) but accelerate sees {processes}: each "
                        f"would train on its own or count the batch wrongly{hint}")
    for flag, kind in (("ACCELERATE_USE_FSDP", DistributedType.FSDP),
                       ("ACCELERATE_USE_DEEPSPEED", DistributedType.DEEPSPEED)):
        if env_flag(flag) and got != kind:
            # accelerate lets ACCELERATE_USE_CPU override a DeepSpeed launch: the processes then run DDP
            hint = ("; DeepSpeed runs on CPU processes without ACCELERATE_USE_CPU (unset it)"
                    if kind == DistributedType.DEEPSPEED and env_flag("ACCELERATE_USE_CPU") else "")
            problems.append(f"the launch asked for {kind.value} but the processes run {got.value}{hint}")
    if got == DistributedType.FSDP:
        for name, model in models.items():
            if model is not None and not fsdp_sharded(model):
                problems.append(f"FSDP did not shard the {name} (its parameters are not DTensors)")
    if got == DistributedType.DEEPSPEED:
        stage = deepspeed_stage(accelerator)
        for name, model in models.items():  # the frozen reference model has an engine only under ZeRO-3
            if model is None or (name == "reference model" and stage != 3):
                continue
            held = zero_stage_of(model)
            if held != stage:
                problems.append(f"the launch asked for DeepSpeed ZeRO-{stage} but the {name} is held by "
                                + (f"a ZeRO-{held} engine" if held is not None else type(model).__name__))
    return problems


def stop_if_not_as_launched(accelerator, models: dict) -> None:
    problems = launch_problems(accelerator, models)
    if problems:
        raise RunError("error: this is not the run the launch asked for: " + "; ".join(problems))


def describe_setup(accelerator, models: dict) -> str:
    """One line: the distributed type, processes, backend and device, and how each prepared model is held."""
    held = []
    for name, model in models.items():
        if model is None:
            continue
        if fsdp_sharded(model):
            how = "sharded (FSDP2, DTensor parameters)"
        elif zero_stage_of(model) is not None:
            how = f"DeepSpeedEngine (ZeRO-{zero_stage_of(model)})"
        else:
            how = type(model).__name__ if type(model).__module__.startswith("torch.") else "whole"
        held.append(f"{name} {how}")
    backend = getattr(accelerator.state, "backend", None) or "none"
    return (f"distributed setup: {accelerator.distributed_type.value}, {accelerator.num_processes} process(es), "
            f"backend {backend}, device {accelerator.device}; " + ", ".join(held))


def configure_deepspeed(accelerator, max_grad_norm: float) -> None:
    """Put what the trainer owns into DeepSpeed's engine config, before any model is prepared. The update
    accumulates a varying number of micro-batches per optimizer step and normalises the loss over the whole
    mini-batch itself, so the engine must not divide by a fixed accumulation count nor step on its own:
    gradient_accumulation_steps 1 (no division) with managed_gradient_accumulation false, under which
    `engine.backward` only adds into the (ZeRO-2/3 partitioned) gradients and `engine.step` is the boundary
    that reduces, clips (gradient_clipping = `max_grad_norm`) and steps. Under ZeRO-3 the weights are
    gathered for the final save. The micro-batch size only
    enters DeepSpeed's sample counter."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config.update(gradient_accumulation_steps=1, managed_gradient_accumulation=False,
                  gradient_clipping=max_grad_norm, train_micro_batch_size_per_gpu=1,
                  train_batch_size=accelerator.num_processes)
    # The run ends by saving whole weights (checkpoint.save_models), which ZeRO-3 gathers only with this on.
    # accelerate's --zero_stage 3 flag and `accelerate config`'s default leave it off: the run then trained to
    # the end and crashed there without writing its model.
    if config.get("zero_optimization", {}).get("stage") == 3:
        config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True


def prepare_reference(accelerator, ref):
    """The frozen KL reference model, held like the trained ones but without optimizer or wrapper for
    gradients: sharded under FSDP2 (accelerate's prepare wants an optimizer with each FSDP2 model, so its
    FSDP2 step is called directly) and ZeRO-3 (an inference engine: partitioned weights), whole under
    ZeRO-2 (which partitions only gradients and optimizer states) and otherwise. Not in checkpoints."""
    from accelerate.utils import fsdp2_prepare_model

    stage = deepspeed_stage(accelerator)
    if stage == 3:
        import copy

        import deepspeed

        config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
        config.pop("optimizer", None)
        config.pop("scheduler", None)
        engine = deepspeed.initialize(model=ref, config=config)[0]
        engine.eval()  # DeepSpeedEngine.eval returns None, not the engine
        return engine
    if stage is not None:
        return ref.to(accelerator.device)
    return (fsdp2_prepare_model(accelerator, ref) if is_sharded(accelerator)
            else accelerator.prepare_model(ref, evaluation_mode=True))


def read_weights_only(engine) -> None:
    """Make a DeepSpeed engine read its checkpoint files (weights, ZeRO partitions, optimizer states) with
    torch's weights-only unpickler, as every other checkpoint file is read: DeepSpeed's own loader uses
    torch.load(weights_only=False), which runs whatever code a tampered file holds. Allowed besides tensors
    and plain data: the three data-holding classes DeepSpeed 0.19.8 writes into its files (found by loading
    ZeRO-2 and ZeRO-3 checkpoints of both models until nothing else was refused)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    def load(path: str, map_location=None):
        with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
            return torch.load(path, map_location=map_location, weights_only=True)

    engine.checkpoint_engine.load = load


def reduce_sum(accelerator, x) -> torch.Tensor:
    """The sum of `x` (a number or a tensor) over all processes, as a float32 tensor."""
    return accelerator.reduce(torch.as_tensor(x, dtype=torch.float32, device=accelerator.device), "sum")


def clip_gradients(accelerator, model, max_norm: float) -> float:
    """Clip `model`'s gradients to `max_norm`, returning the norm before clipping. Under FSDP, accelerate
    finds the model by comparing parameter lists with ==, which raises when the policy and the critic have
    as many parameters; clip the given model directly instead."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.FSDP:
        return float(accelerator.clip_grad_norm_(model.parameters(), max_norm))
    if hasattr(model, "clip_grad_norm_"):  # FSDP1 wrapper
        return float(model.clip_grad_norm_(max_norm))
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)  # FSDP2: DTensor gradients
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def accelerate_backward(accelerator, model, optimizer, loss: torch.Tensor, role: str, max_norm: float) -> dict:
    """Backward of one micro-batch with accelerate (one process, DDP, FSDP); at the accumulation boundary
    (the mini-batch's last micro-batch) also the step: clip to `max_norm` (a global norm, the same on all
    processes), and skip the step, counted, when the norm is not finite (a NaN/inf loss or gradient).
    `loss` is already the share of the whole mini-batch's objective and DDP's averaging undone by the caller;
    accelerate divides by the accumulation steps, which is undone here."""
    accelerator.backward(loss * accelerator.gradient_accumulation_steps)
    if not accelerator.sync_gradients:
        return {}
    norm = clip_gradients(accelerator, model, max_norm)
    if math.isfinite(norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {f"{role}/grad_norm": norm, "train/nonfinite_updates": float(not math.isfinite(norm))}


def deepspeed_backward(engine, loss: torch.Tensor, role: str, last: bool) -> dict:
    """Backward of one micro-batch under DeepSpeed (see `configure_deepspeed`); on the mini-batch's last
    micro-batch also the optimizer step. `loss` is already the share of the whole mini-batch's objective;
    ZeRO averages gradients over processes as DDP does, which the caller undoes as for DDP.
    A NaN or infinite loss or gradient: DeepSpeed's own check (ZeRO-2 and ZeRO-3 test the global gradient
    norm before stepping, in fp32 and, with bf16's default check_grad_overflow, in bf16) skips the step and
    clears the gradients; the engine then
    reports the step not applied and the norm as inf, counted here as a non-finite update."""
    engine.backward(loss)
    if not last:
        return {}
    engine.step()
    norm = engine.get_global_grad_norm()
    norm = float("inf") if norm is None else float(norm)
    return {f"{role}/grad_norm": norm, "train/nonfinite_updates": float(not engine.was_step_applied())}


def full_state_dict(accelerator, model) -> dict:
    """`model`'s full weights on the main process, for save_pretrained; every process must call it (sharded
    models gather). Empty elsewhere under FSDP; ZeRO-3 returns None there, made empty here too."""
    return accelerator.get_state_dict(model) or {}


def tracker_problems(report_to: str) -> list[str]:
    """[] if the --report-to tracker is installed (accelerate would only warn and log nowhere)."""
    from accelerate import utils

    available = {"none": lambda: True, "tensorboard": utils.is_tensorboard_available,
                 "wandb": utils.is_wandb_available}[report_to]
    if available():
        return []
    return [f"--report-to {report_to}: {report_to} is not installed "
            f"(pip install {report_to}, or --report-to none)"]


BEFORE_LEAVING: list = []  # callables run once, first, by `leave_process_group` (a vLLM engine's shutdown)


def leave_process_group(accelerator=None) -> None:
    """End this process's part in the process group, on every process at the same point of a run that ends
    well. A process that exits with the group alive can abort at exit (SIGABRT, "terminate called without an
    active exception": gloo's worker threads outlive the interpreter, pytorch/pytorch#190489); two-process ZeRO-3
    runs of the test suite did, now and then. What registered in BEFORE_LEAVING runs first: a vLLM engine
    tears down its own process groups, which it cannot do once the default group is gone. With `accelerator`
    its trackers end too (`end_training`, which also leaves the group)."""
    while BEFORE_LEAVING:
        BEFORE_LEAVING.pop()()
    if accelerator is not None:
        accelerator.end_training()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def end_launched_process() -> None:
    """After a run that ended well in a process of a multi-process launch: exit at once, without the
    interpreter's teardown. Two-process CPU test runs (gloo) aborted now and then in that teardown
    ("terminate called without an active exception", SIGABRT) after every output was written, even with
    the process group destroyed (`leave_process_group`), turning a finished run into a failed launch; not
    root-caused. The likeliest mechanism is the one pytorch/pytorch#179291 (a fix proposed, then abandoned)
    describes: gloo's C++ worker threads still hold work whose tensors reference Python objects, and releasing
    them during interpreter finalization takes the GIL and aborts. The default group is destroyed before this
    point, so the remaining suspects are groups that libraries make themselves (DeepSpeed's, vLLM's) and
    threads outside torch (peft's arrival made it more frequent). Without this exit, 30 two-process launches here
    did not abort (2026-12-07: DDP with LoRA and reward workers, FSDP2 PPO with a reference model), still too
    few to rule the abort out at about one per full suite of some 25 launches. Everything the run writes is closed and
    synced by then; stdout and stderr are flushed here."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def make_accelerator(bf16: bool, log_with: str | None, project_dir: str, collective_timeout: float = 1800.0):
    """The Accelerator of this process, set up as the launch asked (FSDP on CPU processes, gloo for DeepSpeed
    on CPU), its collectives waiting at most `collective_timeout` seconds; stops with one line if the processes
    it sees are not the ones launched. Records every process's pid and host (`PEERS`)."""
    from accelerate import Accelerator

    allow_cpu_fsdp(collective_timeout)  # before the Accelerator: CPU processes launched for FSDP shard as asked
    # Processes launched on a machine without a GPU (notebook_launcher, or a launch without ACCELERATE_USE_CPU)
    # are CPU processes; FSDP and DeepSpeed launches say so themselves (`allow_cpu_fsdp`, DS_ACCELERATOR).
    cpu = (not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
           and not env_flag("ACCELERATE_USE_FSDP") and not env_flag("ACCELERATE_USE_DEEPSPEED"))
    accelerator = Accelerator(cpu=cpu, mixed_precision="bf16" if bf16 else "no", log_with=log_with,
                              project_dir=project_dir, kwargs_handlers=process_group_kwargs(collective_timeout))
    stop_if_not_as_launched(accelerator, {})  # the processes themselves: before any model loads
    record_peers(accelerator)
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) and not env_flag("TORCH_DISABLE_SHARE_RDZV_TCP_STORE"):
        accelerator.print("warning: restarted processes can fail or hang connecting to each other when the "
                          "launcher shares its rendezvous store with them (pytorch/pytorch#135712): launch with "
                          "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 and --rdzv_backend c10d")
    return accelerator


def weights_digest(model_path: str) -> str | None:
    """One xxh3 digest of the .safetensors files of a model directory (names and bytes), or None for a hub id."""
    from pathlib import Path

    import xxhash

    from utils import file_hash

    files = sorted(Path(model_path).glob("*.safetensors")) if Path(model_path).is_dir() else []
    return xxhash.xxh3_128("".join(f"{f.name}:{file_hash(f)};" for f in files).encode()).hexdigest() if files else None


def stop_unless_same_weights(accelerator, model_path: str) -> None:
    """Stop every process with one line unless all machines load the same weights for the model: each machine
    resolves --model in its own cache (the tiny base, a GGUF file's copy), and DDP broadcasts only the trained
    models: the KL reference model would stay each machine's own. Hashed once per machine, and only when the
    processes load from more than one place (machine and directory): a one-machine run hashes nothing."""
    import socket
    from pathlib import Path

    from accelerate.utils import gather_object

    if accelerator.num_processes == 1:
        return
    place = (socket.gethostname(), str(Path(model_path).resolve()))
    if len(set(gather_object([place]))) == 1:
        return
    digest = weights_digest(model_path) if accelerator.is_local_main_process else None
    found = [row for row in gather_object([(accelerator.process_index, *place, digest)]) if row[3]]
    other = next((row for row in found if row[3] != found[0][3]), None)
    if other is not None:
        raise RunError(f"error: the processes would not start from the same model: its weight files ({other[2]} "
                       f"on process {other[0]}, {other[1]}) differ from process {found[0][0]}'s ({found[0][1]}); "
                       "give every machine the same files (for the tiny base or a GGUF copy, copy the cache "
                       "directory of one machine to the others)")


PEERS: list = []  # (rank, pid, host) of each process of a multi-process launch, from `record_peers`


def record_peers(accelerator) -> None:
    """Every process's rank, pid and host, for naming a process that is lost later (`lost_processes`)."""
    import socket

    from accelerate.utils import gather_object

    PEERS[:] = (gather_object([(accelerator.process_index, os.getpid(), socket.gethostname())])
                if accelerator.num_processes > 1 else [])


def process_state(pid: int) -> str:
    """"gone", "stopped" (SIGSTOP, a debugger) or "running", for a process of this machine."""
    try:
        stat = open(f"/proc/{pid}/stat").read()  # noqa: SIM115 - one read
    except OSError:
        return "gone"
    return {"Z": "gone", "X": "gone", "T": "stopped", "t": "stopped"}.get(stat.rsplit(")", 1)[-1].split()[0],
                                                                         "running")


def lost_processes(err: BaseException) -> str | None:
    """What a failed collective of a multi-process launch lost, in one line: the other processes that are gone
    or stopped (those of this machine are looked up; another machine's cannot be), and the collective's own
    first line. None if `err` is not a collective's failure (no other process is lost and its text names no
    transport error): a plain bug keeps its traceback."""
    import socket

    if not PEERS:
        return None
    host = socket.gethostname()
    others = [(rank, pid, h) for rank, pid, h in PEERS if (pid, h) != (os.getpid(), host)]
    lost = [f"process {rank} (pid {pid}) is {state}" for rank, pid, h in others
            if h == host and (state := process_state(pid)) != "running"]
    import re

    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", text).split(". ")[0]  # gloo's source line; its advice
    if not lost and not isinstance(err, torch.distributed.DistError) and not any(
            word in text for word in ("gloo", "Gloo", "NCCL", "Connection", "onnection reset", "imed out")):
        return None
    remote = sorted({h for _, _, h in others if h != host})
    who = "; ".join(lost) if lost else "no process of this machine is gone or stopped"
    where = f"; processes on {', '.join(remote)} cannot be looked up from here" if remote else ""
    return f"a collective with the other {len(others)} process(es) failed: {who}{where} ({text[:200]})"


def names_lost_processes(fn):
    """Decorator for `main`: when a collective fails because another process of the launch died or stopped,
    or because it waited past the collective timeout, the run ends with one line naming them (`RunError`),
    not the collective's traceback. Its checkpoints are whole: the same command resumes."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RuntimeError as err:  # torch.distributed's errors are RuntimeErrors (RunError, our own, too)
            message = None if isinstance(err, SystemExit) else lost_processes(err)
            if message is None:
                raise
            restart, restarts = (int(os.environ.get(f"TORCHELASTIC_{key}", "0"))
                                 for key in ("RESTART_COUNT", "MAX_RESTARTS"))
            then = (f"the launcher restarts the processes (restart {restart + 1} of {restarts}) and they resume"
                    if restart < restarts else "run the same command again to resume")
            raise RunError(f"error: {message}; {then} from the last checkpoint") from None
    return wrapper


def leaves_the_process_as_found(fn):
    """Decorator for `main`, so that a notebook can call it again, or accelerate's notebook_launcher after it:
    in a process of its own, the SIGINT and SIGTERM handlers that `fn` installs (checkpoint.StopRequest) are put
    back when it returns or raises (an interrupt after `main` interrupts the kernel again), and accelerate's
    process-wide state is cleared (notebook_launcher refuses to start beside an Accelerator built before)."""
    import functools
    import signal
    import threading

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        # One process of several ends with `main`: its handlers stay, so that the launcher's SIGTERM, sent as
        # soon as another process died, cannot kill it before it has said why it stops.
        alone = int(os.environ.get("WORLD_SIZE", "1")) <= 1
        main_thread = threading.current_thread() is threading.main_thread()
        saved = ({sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
                 if main_thread and alone else {})
        try:
            return fn(*args, **kwargs)
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)
            if alone:
                from accelerate.state import AcceleratorState, GradientState

                AcceleratorState._reset_state(reset_partial_state=True)
                GradientState._reset_state()
    return wrapper
