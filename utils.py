"""Small shared helpers: seeding, masked statistics, padding, argument parsing, output files.

No algorithm logic and no configuration lives here; everything is a plain function a notebook can paste.
"""

import json
import os
import random
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


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


def parse_args(args_class, argv: list[str] | None = None):
    """Parse a dataclass of arguments from the command line, with `--config FILE` (YAML or JSON) as defaults.

    Values on the command line override the file; unknown keys in the file are an error.
    """
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(args_class)
    parser.add_argument("--config", type=str, default=None, help="YAML or JSON file of argument defaults")
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            parser.error("--config needs a file")
        path = Path(argv[i + 1])
        try:
            text = path.read_text()
        except OSError as err:
            parser.error(f"cannot read config {path}: {err.strerror}")
        if path.suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
        names = {f.name for f in args_class.__dataclass_fields__.values()}
        unknown = sorted(k for k in values if k.replace("-", "_") not in names)
        if unknown:
            parser.error(f"{path}: unknown argument(s) {', '.join(unknown)}")
        parser.set_defaults(**{k.replace("-", "_"): v for k, v in values.items()})
    # The parser returns the dataclass, then a namespace holding `--config` itself.
    return parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)[0]


class JsonlWriter:
    """Append-only JSON Lines file, flushed per line so a killed run keeps everything written so far."""

    def __init__(self, path: str | os.PathLike):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the run

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()
