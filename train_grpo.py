"""Train a base LM to reason with GRPO: PPO's clipped loss with a group baseline instead of a critic.

GRPO (DeepSeekMath, arXiv:2402.03300v3, sec. 4.1): several samples per prompt; each sample's advantage is
its reward minus the mean reward of its group, divided by the group's std (`--no-scale-by-std` drops the
division, as Dr. GRPO arXiv:2503.20783v1 recommends). This file only changes the defaults of
`train_ppo.py`, whose single training loop runs every estimator; see its docstring for the deviations.

Deviations from the GRPO paper, numbered:
  1. No KL term by default (ORZ found it unnecessary; `--kl-coef 0.001` turns on k3 in the loss).
  2. Token-mean loss over the whole batch (DAPO) instead of the mean of per-sequence means
     (`--loss-agg seq-mean-token-mean` is the paper's).

Run it:
    python train_grpo.py                              # built-in default: tiny model, CPU, a few minutes
    python train_grpo.py --advantage rloo             # leave-one-out baseline instead
    accelerate launch --num_processes 8 train_grpo.py --model Qwen/Qwen2.5-1.5B --dataset orz_math_57k.json
"""

from dataclasses import dataclass, field

from cli import parse_args
from train_ppo import Args as PPOArgs
from train_ppo import end_launched_process, main


@dataclass
class Args(PPOArgs):
    advantage: str = field(default="grpo", metadata={
        "help": "advantage estimator, a name in algos.ADVANTAGE_ESTIMATORS: gae (PPO critic), grpo (group mean/std), "
                "rloo (leave-one-out); in Python also a function"})
    output_dir: str = field(default="runs/grpo", metadata={"help": "where metrics, samples and the final model go"})


if __name__ == "__main__":
    main(parse_args(Args, description=__doc__))
    end_launched_process()
