"""Replay one step's update from a rollout that `--dump-rollouts` saved: the same weights, optimizer states,
learning-rate schedule and experience (ids, masks, rewards, log-probs, values, advantages), updated again
without sampling, so that a loss spike or a NaN can be studied (printed, stepped through in a debugger,
run with a changed loss) as often as needed. The replayed update is the original one, bit for bit, when
run as the training ran it (the same process count and threads; tests/test_train.py checks the weights).

    python train_grpo.py --output-dir runs/spike --dump-rollouts 12
    python replay.py runs/spike/rollouts/rollout-000012   # the update's metrics; the state after it goes
                                                          # to runs/spike/rollouts/rollout-000012/replay/
    accelerate launch --num_processes 2 replay.py DIR     # a dump of a 2-process run

The dump directory holds a checkpoint of the state before the step's update (step-<step>/, the state that
continues at that step) and each process's rollout (experience-rank<N>.safetensors); the replay writes
replay/update.json (the metrics) and replay/checkpoints/step-<step + 1>/ (the state after the update, as
training's checkpoint after that step).
"""

import train_ppo  # noqa: I001 - first, so that it sets OpenMP's spin count before torch loads (see there)

import json
from dataclasses import fields, replace
from pathlib import Path

import torch

from checkpoint import CHECKPOINT_PREFIX, checkpoint_problem, load_experience, releases_output_locks, resume
from launch import end_launched_process, leave_process_group, names_lost_processes
from rollout import Experience
from update import update_models
from utils import RunError, trainable_state_only

# What a replay changes in the run's arguments: it writes to its own directory, evaluates and samples
# nothing (no vLLM engine is started; the sampler's log-probs are in the dump), scores nothing (the rewards
# are too) and saves once, after the update.
REPLAY_SETTINGS = {"overwrite": True, "resume": False, "eval_every": 0, "save_every": 0, "dump_rollouts": [],
                   "report_to": "none", "reward": "math", "reward_workers": 0, "rollout_engine": "hf"}


def read_dump(dump: Path) -> tuple[Path, dict]:
    """The dump's checkpoint and its trainer state, or a one-line error naming what is wrong."""
    checkpoints = sorted(dump.glob(CHECKPOINT_PREFIX + "*")) if dump.is_dir() else []
    if not checkpoints:
        raise RunError(f"error: {dump}: not a rollout dump (no {CHECKPOINT_PREFIX}* in it; --dump-rollouts STEPS "
                       "writes OUTPUT_DIR/rollouts/rollout-N)")
    if problem := checkpoint_problem(checkpoints[-1]):
        raise RunError(f"error: {checkpoints[-1]}: {problem}")
    state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
    by_function = [k for k, v in state["args"].items() if isinstance(v, str) and v.startswith("python:")
                   and k != "reward"]
    if by_function:
        raise RunError(f"error: {dump}: the run was given functions ({', '.join(by_function)}); a replay rebuilds "
                       "its arguments by name: call update.update_models in Python instead")
    return checkpoints[-1], state


@releases_output_locks
@names_lost_processes
def main(dump: str) -> dict:
    dump = Path(dump)
    checkpoint, state = read_dump(dump)
    step = state["step"]
    args = train_ppo.Args(**{**state["args"], **REPLAY_SETTINGS, "output_dir": str(dump / "replay"),
                             "max_steps": step + 1})
    run = train_ppo.setup(args)
    accelerator = run.accelerator
    experience = dump / f"experience-rank{accelerator.process_index}.safetensors"
    if not experience.is_file() or (dump / f"experience-rank{accelerator.num_processes}.safetensors").exists():
        made = len(list(dump.glob("experience-rank*.safetensors")))
        raise RunError(f"error: {dump} was dumped by {made} process(es); replay it with as many (this launch has "
                       f"{accelerator.num_processes})")
    with trainable_state_only([accelerator.unwrap_model(m) for m in (run.policy, run.critic)
                               if m is not None and args.lora_r]):
        resume(accelerator, checkpoint, list(run.schedulers.values()))
    exp = Experience(**{f.name: None for f in fields(Experience)} | load_experience(experience, accelerator.device))
    metrics = {"step": step}
    stats, policy_trains = update_models(run, exp, step, metrics)
    for role in ("critic", "policy") if policy_trains else ("critic",):  # as training does after its update
        if role in run.schedulers:
            run.schedulers[role].step()
    lengths = exp.response_mask.sum(dim=1)
    nothing = torch.zeros_like(exp.rewards, dtype=torch.bool)
    # the update's own metrics, computed as training logs them (the rollout's are in the run's metrics.jsonl)
    logged = train_ppo.step_metrics(accelerator, exp, lengths, nothing, nothing, {}, stats)
    metrics.update({k: v for k, v in logged.items()
                    if k.split("/")[0] in ("loss", "policy", "critic") or k == "train/nonfinite_updates"})
    # the state after the update as training's checkpoint of it holds it: the run's own arguments, base
    # accuracy and the curriculum's rates after this step's groups
    rates = state.get("pass_rates_after", state.get("pass_rates", {}))
    run = replace(run, args=train_ppo.Args(**state["args"]), base_accuracy=state["base_accuracy"],
                  pass_rates={int(k): v for k, v in rates.items()})
    after = train_ppo.save_state(run, Path(args.output_dir) / "checkpoints", step + 1, keep=1)
    if accelerator.is_main_process:
        (Path(args.output_dir) / "update.json").write_text(json.dumps(metrics, indent=1))
        for k, v in metrics.items():
            print(f"{k}: {v:.6g}" if isinstance(v, float) else f"{k}: {v}")
        print(f"replayed step {step}'s update from {dump}; the state after it: {after}")
    run.pool.close()
    leave_process_group(accelerator)
    return metrics


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dump", help="a dump directory: OUTPUT_DIR/rollouts/rollout-N")
    main(parser.parse_args().dump)  # a RunError ends the process with its one line
    end_launched_process()
