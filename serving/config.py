"""Server settings, written once: the engine's, the scheduler's and the request limits.

    settings = ServerSettings(model_dir, home, device="cpu", slots=8, max_batch=16)  # any field, by name
    add_flags(parser)                          # --device ... --default-chat-tokens, one per field
    settings = ServerSettings.from_args(args, model_dir, home)

Every field of :class:`EngineConfig`, :class:`SchedulerConfig` and :class:`Limits` is a
``specfuse serve`` / ``specfuse demo`` flag named after it (``max_batch`` is
``--max-batch``), its default and help read from the field by :mod:`adapters_zoo.config_flags`;
a field with a ``flag`` in its metadata is given in another unit (``mixture_cache_bytes`` as
``--mixture-cache-mb``).
Nothing here imports torch, so ``specfuse --help`` stays fast.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from adapters_zoo import config_flags
from adapters_zoo.config_flags import option
from adapters_zoo.errors import InvalidConfig
from adapters_zoo.registry.mixture import SERVED_MIXTURE

DTYPE_NAMES = ("float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda")


@dataclass
class EngineConfig:
    device: str | None = option(None, "cpu or cuda (default: cuda when present)", choices=DEVICES)
    dtype: str | None = option(None, "default: bfloat16 on GPU (float16 without bf16 support), float32 on CPU",
                             choices=DTYPE_NAMES)
    slots: int = option(32, "mixtures resident on the device (preallocated: device memory for mixtures never grows)")
    residual_slots: int = option(8, "of which this many also hold a residual (LoRA part) outside the basis")
    max_residual_rank: int = option(64, "rank of the largest residual a slot holds (concatenated LoRAs grow it)")
    mixture_cache: int = option(1024, "reduced mixtures kept on the host (LRU)")
    mixture_cache_bytes: int = option(256 << 20, "host memory for reduced mixtures, LRU (the device slot table is "
                                    "fixed by --slots)", flag="mixture-cache-mb", unit=1 << 20)
    adapter_cache_bytes: int = option(64 << 20, "host memory for parsed registry adapters and their cores, LRU (a "
                                    "mixture of adapters not held re-reads and re-evaluates them)",
                                    flag="adapter-cache-mb", unit=1 << 20)

    def validate(self) -> None:
        if self.slots < 1:
            raise InvalidConfig(f"slots must be ≥ 1, got {self.slots}")
        if not 0 <= self.residual_slots <= self.slots:
            raise InvalidConfig(f"residual_slots must be in [0, slots={self.slots}], got {self.residual_slots}")
        if self.max_residual_rank < 0 or self.mixture_cache < 1 or self.mixture_cache_bytes < 1:
            raise InvalidConfig("max_residual_rank must be ≥ 0, mixture_cache and mixture_cache_bytes ≥ 1")
        if self.adapter_cache_bytes < 1:
            raise InvalidConfig(f"adapter_cache_bytes must be ≥ 1, got {self.adapter_cache_bytes}")
        if self.dtype is not None and self.dtype not in DTYPE_NAMES:
            raise InvalidConfig(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {self.dtype!r}")
        if self.device is not None and self.device.split(":")[0] not in DEVICES:
            raise InvalidConfig(f"device must be cpu or cuda, got {self.device!r}")


@dataclass
class SchedulerConfig:
    max_batch: int = option(32, "rows decoded together")
    max_queue: int = option(256, "requests waiting for a row before 429")
    max_prefill_tokens: int = option(8192, "prompt tokens prefilled in one iteration (at least one request)")
    heap_trim_s: float = option(10.0, "seconds between handing freed host memory back to the OS (glibc malloc_trim, "
                              "also once on falling idle; 0: never)")

    def validate(self) -> None:
        for name in ("max_batch", "max_queue", "max_prefill_tokens"):
            if getattr(self, name) < 1:
                raise InvalidConfig(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if not self.heap_trim_s >= 0:  # NaN too
            raise InvalidConfig(f"heap_trim_s must be ≥ 0, got {self.heap_trim_s}")


@dataclass
class Limits:
    max_prompt_tokens: int = option(2048, "tokens in one prompt; past it: 413")
    max_tokens: int = option(1024, "bound on a request's max_tokens; past it: 400")
    max_mixture: int = option(SERVED_MIXTURE, "adapters in one mixture; past it: 400")
    max_body_bytes: int = option(1 << 20, "bytes of a JSON body; past it: 413")
    max_upload_bytes: int = option(64 << 20, "bytes of an adapter upload; past it: 413")
    default_completion_tokens: int = option(16, "max_tokens of a completion that names none (OpenAI's default)")
    default_chat_tokens: int = option(256, "max_tokens of a chat completion that names none")

    def validate(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < 1:
                raise InvalidConfig(f"{f.name} must be ≥ 1, got {getattr(self, f.name)}")


SECTIONS = {"engine": EngineConfig, "scheduler": SchedulerConfig, "limits": Limits}


class ServerSettings:
    """What ``specfuse serve`` runs: the model, the registry home, the response name, and the three configs.

    Any field of the configs may be given by name: ``ServerSettings(dir, home, slots=8, max_batch=4)``.
    """

    def __init__(self, model_dir: Path, home: Path | None = None, name: str | None = None, **values: Any):
        self.model_dir, self.home, self.name = Path(model_dir), home, name
        known = {f.name for cls in SECTIONS.values() for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TypeError(f"ServerSettings has no setting {unknown[0]!r}")

        def of(cls):
            return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})

        self.engine, self.scheduler, self.limits = of(EngineConfig), of(SchedulerConfig), of(Limits)

    @classmethod
    def from_args(cls, args: argparse.Namespace, model_dir: Path, home: Path | None) -> ServerSettings:
        values = {k: v for config in SECTIONS.values() for k, v in config_flags.values_from_args(args, config).items()}
        return cls(model_dir, home, args.name, **values)


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field: its default and help from the field."""
    for title, config in SECTIONS.items():
        group = parser.add_argument_group("request limits" if title == "limits" else f"{title} settings")
        config_flags.add_flags(group, config)
