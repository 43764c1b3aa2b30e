"""How a training run uses the hardware: precision, gradient checkpointing, data-parallel ranks.

    base weights: fp32 | bf16 | fp16        adapter parameters, optimizer state, basis: float32

The base is frozen, so holding it in bf16/fp16 halves its memory without touching what is
learnt: the adapter's parameters (and so AdamW's moments) stay float32, and each
SpectralLinear computes its core in float32 and casts only its output to the layer's dtype.
The forward runs under ``torch.autocast`` in the low precision, which keeps the ops autocast
lists as unsafe (softmax, norms, losses) in float32. fp16 gradients can underflow, so fp16
scales the loss (``torch.amp.GradScaler``); bf16 has float32's range and needs no scaling.

Data-parallel training runs on torch.distributed as ``torchrun`` (or ``accelerate launch``)
sets it up: every rank draws the same global batch from the same seed, computes its shard,
and the gradients are summed across ranks (each rank's loss is already divided by the
global batch's token count), so N ranks of batch B step exactly as one process of batch N·B.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os

import torch
import torch.distributed as dist

from adapters_zoo.errors import DistributedError, InvalidConfig
from adapters_zoo.train_config import PRECISIONS

DTYPES = dict(zip(PRECISIONS, (torch.float32, torch.bfloat16, torch.float16), strict=True))
# A rank that dies leaves the others waiting in a collective: they give up after this long
# (seconds) with a DistributedError instead of hanging. SPECFUSE_DIST_TIMEOUT overrides it.
DIST_TIMEOUT = 300


def precision_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype of the base weights for ``precision``; InvalidConfig when unknown or not on ``device``."""
    if precision not in DTYPES:
        raise InvalidConfig(f"unknown precision {precision!r} (use {', '.join(PRECISIONS)})")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise InvalidConfig(f"precision bf16 asked for, but {torch.cuda.get_device_name(device)} has no bfloat16 "
                            "support (use fp16 or fp32)")
    return DTYPES[precision]


def cast_base(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Hold every floating weight and buffer of ``model`` in ``dtype`` (attach adapters after this)."""
    model.to(dtype)


def autocast(device: torch.device, dtype: torch.dtype):
    """The forward's autocast context: a no-op in float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype) -> torch.amp.GradScaler | None:
    return torch.amp.GradScaler(device.type) if dtype == torch.float16 else None


@contextlib.contextmanager
def gradient_checkpointing(model: torch.nn.Module, enabled: bool):
    """The model's own gradient checkpointing (transformers' ``gradient_checkpointing_enable``) for the block.

    transformers checkpoints a decoder layer only in training mode; the base runs in eval mode
    (no dropout), so only the checkpointed layers themselves are flagged as training, not
    their submodules: activations are recomputed in backward, dropout stays off.
    """
    if not enabled:
        yield model
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise InvalidConfig(f"{type(model).__name__} does not support gradient checkpointing")
    from transformers.modeling_layers import GradientCheckpointingLayer

    # transformers ≥ 5.24 names it activation checkpointing; earlier versions gradient checkpointing
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable({"use_reentrant": False})
        disable = model.activation_checkpointing_disable
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        disable = model.gradient_checkpointing_disable
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    flags = [m.training for m in layers]
    for m in layers:
        m.training = True
    try:
        yield model
    finally:
        for m, flag in zip(layers, flags):
            m.training = flag
        disable()


# --------------------------------------------------------------------------- ranks


def world() -> tuple[int, int]:
    """(rank, world size): (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device: torch.device) -> bool:
    """Join the process group torchrun / accelerate describe in the environment (WORLD_SIZE > 1).

    Returns whether this process is one rank of several. gloo on CPU, nccl on CUDA.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=float(os.environ.get("SPECFUSE_DIST_TIMEOUT", DIST_TIMEOUT)))
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timeout)
        atexit.register(dist.destroy_process_group)
    return True


def all_reduce_sum(tensors: list[torch.Tensor]) -> None:
    """Sum ``tensors`` over every rank in place, as one flat buffer; a no-op in one process."""
    if world()[1] == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    try:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    except RuntimeError as err:  # gloo / nccl errors and timeouts (DistBackendError is one)
        rank, size = world()
        raise DistributedError(f"rank {rank} of {size}: a collective failed, another rank died or stopped "
                               f"answering ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def barrier() -> None:
    """Wait for every rank (a no-op in one process)."""
    if world()[1] > 1:
        try:
            dist.barrier()
        except RuntimeError as err:
            rank, size = world()
            raise DistributedError(f"rank {rank} of {size}: another rank died or stopped answering "
                                   f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None


def all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    all_reduce_sum([p.grad for p in params])
