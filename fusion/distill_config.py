"""What a distillation is asked to do: :class:`DistillConfig`, every field a ``specfuse fuse --method distill`` flag.

Nothing here imports torch, so ``specfuse --help`` (which builds the flags from these fields) stays fast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from adapters_zoo.config_flags import option
from adapters_zoo.errors import InvalidConfig


@dataclass
class DistillConfig:
    steps: int = option(300, "optimizer steps", metavar="N")
    lr: float = option(3e-3, "learning rate", metavar="LR")
    batch_size: int = option(32, "rows per step", metavar="B")
    warmup_ratio: float = option(0.05, "share of the steps the learning rate warms up over", metavar="R")
    max_length: int = option(256, "tokens per row (prompt + completion)", metavar="L")
    max_new_tokens: int = option(32, "longest completion a source writes for a prompt", metavar="T")
    # weights normalised: the mean for linear
    init: str = option("linear", "fusion method of the starting point", metavar="M")
    seed: int = option(0, "seed of the batches", flag=None)  # --seed, shared with the fusion methods (dare_*)
    device: str | None = option(None, "cuda, cpu, ... (default: cuda when available)", metavar="DEV")

    def validate(self) -> None:
        for name in ("steps", "batch_size", "max_length", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidConfig(f"distill {name} must be an integer ≥ 1, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise InvalidConfig(f"distill lr must be a finite number > 0, got {self.lr!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise InvalidConfig(f"distill warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
