"""What a training run is asked to do: :class:`TrainConfig`, every field a ``specfuse train`` flag.

Nothing here imports torch, so ``specfuse --help`` (which builds the flags from these fields) stays fast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from adapters_zoo.config_flags import option
from adapters_zoo.errors import InvalidConfig

PRECISIONS = ("fp32", "bf16", "fp16")  # dtypes of the base weights (adapters_zoo.train_runtime.DTYPES)


@dataclass
class TrainConfig:
    kind: str = option("scale", "adapter kind", flag=None)  # --kind, with the other adapter-kind options
    kind_config: dict[str, Any] = field(default_factory=dict, metadata={"flag": None})  # the kind's own fields
    targets: str | list[str] | None = option(None, "comma-separated layer names (default: every basis layer)")
    steps: int = option(100, "optimizer steps", metavar="N")
    # adapters start at the identity with few parameters: larger than full fine-tuning
    lr: float = option(1e-2, "learning rate", metavar="LR")
    batch_size: int = option(8, "examples per micro-batch (an optimizer step takes --grad-accum of them)", metavar="B")
    warmup_ratio: float = option(0.06, "share of the steps the learning rate warms up over", metavar="R")
    # decay pulls toward 0, which is not the identity for every kind (rotation's c)
    weight_decay: float = option(0.0, "AdamW weight decay", metavar="W")
    seed: int = option(0, "seed of the batches", metavar="S")
    preserve: str | None = option(None, "JSONL of prompts to leave unchanged (KL term)", metavar="FILE")
    kl_weight: float = option(1.0, "weight of the KL term on the --preserve prompts", metavar="W")
    max_length: int = option(256, "tokens per example (prompt + completion); longer completions are cut", metavar="T")
    add_eos: bool = option(True, "do not end completions with the tokenizer's EOS (the adapter then never learns "
                           "to stop)", flag="no-eos")  # as TRL does
    signature: bool = option(True, "store no routing signature (base features of the prompts) for auto routing")
    device: str | None = option(None, "default: cuda when present", choices=["cpu", "cuda"])
    precision: str = option("fp32", "dtype of the base weights: fp32, bf16 or fp16 (adapter parameters and "
                            "optimizer state stay float32)")
    grad_accum: int = option(1, "micro-batches of --batch-size per optimizer step", metavar="N")
    gradient_checkpointing: bool = option(False, "recompute each decoder layer in backward (the model's own): "
                                          "less memory, more time")
    save_every: int = option(0, "write a checkpoint OUT.ckpt every N steps (atomically; removed when the run "
                             "completes; 0: none)", metavar="N")

    def validate(self) -> None:
        checks = [
            (self.steps >= 1, f"steps must be ≥ 1, got {self.steps}"),
            (self.lr > 0 and math.isfinite(self.lr), f"lr must be a positive number, got {self.lr}"),
            (self.batch_size >= 1, f"batch_size must be ≥ 1, got {self.batch_size}"),
            (0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}"),
            (self.weight_decay >= 0, f"weight_decay must be ≥ 0, got {self.weight_decay}"),
            (self.kl_weight >= 0, f"kl_weight must be ≥ 0, got {self.kl_weight}"),
            (self.max_length >= 2, f"max_length must be ≥ 2, got {self.max_length}"),
            (self.grad_accum >= 1, f"grad_accum must be ≥ 1, got {self.grad_accum}"),
            (self.save_every >= 0, f"save_every must be ≥ 0, got {self.save_every}"),
            (self.precision in PRECISIONS, f"unknown precision {self.precision!r} (use {', '.join(PRECISIONS)})"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidConfig(message)
