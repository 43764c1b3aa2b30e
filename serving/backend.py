"""The batched mixture math: one target layer, a batch of rows, each row its own mixture.

What every backend computes, for a batch of rows ``i`` with slot ``s = slot[i]``
(``-1`` = the base model, stored as the all-zero slot ``S``)::

    h      = V.T @ x[i]                       # (k,)     one shared projection
    y[i]  += U @ (C[s] @ h)                   # (out,)   per-row k×k core, one shared U
    y[i]  += B[s] @ (A[s] @ x[i])             #          only rows whose slot has a residual

``C[s]`` is ``diag(d[s])`` for diagonal slots, and when every slot in the batch is
diagonal the core product is elementwise (``h * d[s]``). The tables are preallocated
per layer for a fixed number of slots, so shapes never change with the mixtures in a
batch; a step's :class:`Routing` (row → slot, computed once and shared by every layer)
is the only thing that varies. Layers only route (:class:`RoutedLinear`); the math is
here, behind :class:`Backend`, so another implementation (fused CUDA kernels) can
replace :class:`TorchBackend` and be tested against the same reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn


@dataclass
class LayerSlots:
    """One target layer's basis and slot tables, all on the serving device."""

    U: torch.Tensor  # (out, k)
    V: torch.Tensor  # (in, k)
    cores: torch.Tensor  # (S + 1, k, k); row S is all zero (the base model)
    diag: torch.Tensor  # (S + 1, k); diag(cores[s]), the elementwise fast path
    res_B: torch.Tensor  # (R, out, Q) residual factors of slots 0..R-1, zero padded
    res_A: torch.Tensor  # (R, Q, in)

    @classmethod
    def allocate(cls, U: torch.Tensor, V: torch.Tensor, slots: int, residual_slots: int, residual_rank: int,
                 dtype: torch.dtype, device: torch.device) -> LayerSlots:
        k = U.shape[1]
        out_f, in_f = U.shape[0], V.shape[0]
        return cls(
            U=U.to(device=device, dtype=dtype).contiguous(),
            V=V.to(device=device, dtype=dtype).contiguous(),
            cores=torch.zeros(slots + 1, k, k, dtype=dtype, device=device),
            diag=torch.zeros(slots + 1, k, dtype=dtype, device=device),
            res_B=torch.zeros(residual_slots, out_f, residual_rank, dtype=dtype, device=device),
            res_A=torch.zeros(residual_slots, residual_rank, in_f, dtype=dtype, device=device),
        )

    @property
    def num_slots(self) -> int:
        return self.cores.shape[0] - 1

    def write(self, slot: int, core: torch.Tensor | None, residual: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Store one mixture's core (k, k) and residual (B (out, q), A (q, in)) in ``slot``."""
        if core is None:
            self.cores[slot].zero_()
            self.diag[slot].zero_()
        else:
            self.cores[slot].copy_(core)
            self.diag[slot].copy_(torch.diagonal(core))
        if slot < self.res_B.shape[0]:
            self.res_B[slot].zero_()
            self.res_A[slot].zero_()
            if residual is not None:
                B, A = residual
                q = B.shape[1]
                self.res_B[slot, :, :q].copy_(B)
                self.res_A[slot, :q, :].copy_(A)
        elif residual is not None:
            raise ValueError(f"slot {slot} has no residual storage (only slots < {self.res_B.shape[0]} do)")


@dataclass
class Routing:
    """Which slot each row of the current batch uses; shared by every layer of one forward."""

    index: torch.Tensor  # (rows,) int64 on the device, in [0, S]; S = the zero (base) slot
    all_base: bool  # no row has an adapter: layers skip the adapter path
    all_diagonal: bool  # every row's core is diagonal: elementwise path
    residual_groups: list[tuple[int, torch.Tensor, int]] = field(default_factory=list)  # (slot, rows, rank q)

    @classmethod
    def build(cls, row_slots: list[int], num_slots: int, diagonal: list[bool], residual_rank: list[int],
              device: torch.device) -> Routing:
        """``row_slots[i]`` is a slot or -1; ``diagonal`` / ``residual_rank`` are per slot (host side)."""
        index = [num_slots if s < 0 else s for s in row_slots]
        used = sorted({s for s in row_slots if s >= 0})
        groups = []
        for s in used:
            if residual_rank[s] > 0:
                rows = torch.tensor([i for i, r in enumerate(row_slots) if r == s], dtype=torch.long, device=device)
                groups.append((s, rows, residual_rank[s]))
        return cls(
            index=torch.tensor(index, dtype=torch.long, device=device),
            all_base=not used,
            all_diagonal=all(diagonal[s] for s in used),
            residual_groups=groups,
        )


class Backend(Protocol):
    """The adapter term of one layer for a batch of rows, each row ``i`` in slot ``s = slot[i]``::

        for i in rows:                                   # x (rows, …, in), y (rows, …, out)
            y[i] += U @ (C[s] @ (V.T @ x[i]))            # C[S] = 0: base rows add nothing
            if residual_rank[s]: y[i] += B[s] @ (A[s] @ x[i])
    """

    def apply(self, y: torch.Tensor, x: torch.Tensor, slots: LayerSlots, routing: Routing) -> torch.Tensor:
        ...


class TorchBackend:
    """Batched gather + bmm; elementwise when the batch's cores are all diagonal."""

    def apply(self, y: torch.Tensor, x: torch.Tensor, slots: LayerSlots, routing: Routing) -> torch.Tensor:
        rows = x.shape[0]
        x3 = x.reshape(rows, -1, x.shape[-1]).to(slots.U.dtype)  # (rows, T, in); a no-op: model and tables share it
        h = x3 @ slots.V  # (rows, T, k)
        if routing.all_diagonal:
            h = h * slots.diag.index_select(0, routing.index).unsqueeze(1)  # (rows, T, k) · (rows, 1, k)
        else:
            cores = slots.cores.index_select(0, routing.index)  # (rows, k, k)
            h = torch.matmul(h, cores.transpose(1, 2))  # row i: C[slot i] h, (rows, T, k)
        out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), slots.U.T)  # y + h Uᵀ, (rows·T, out)
        out = out.view(rows, -1, out.shape[-1])
        for slot, row_idx, q in routing.residual_groups:
            xr = x3.index_select(0, row_idx)  # (r, T, in)
            r = (xr @ slots.res_A[slot, :q].T) @ slots.res_B[slot, :, :q].T  # (r, T, q) -> (r, T, out)
            out.index_add_(0, row_idx, r)
        return out.view(y.shape)


class LoopBackend:
    """The same math one row at a time, with explicit cores: the fast paths are tested against it."""

    def apply(self, y: torch.Tensor, x: torch.Tensor, slots: LayerSlots, routing: Routing) -> torch.Tensor:
        rows = x.shape[0]
        x3 = x.reshape(rows, -1, x.shape[-1]).to(slots.U.dtype)
        out = y.reshape(rows, -1, y.shape[-1]).clone()
        residual_rank = {slot: q for slot, _, q in routing.residual_groups}
        for i in range(rows):
            s = int(routing.index[i])
            if s == slots.num_slots:
                continue
            for t in range(x3.shape[1]):
                xi = x3[i, t]  # (in,)
                d = slots.U @ (slots.cores[s] @ (slots.V.T @ xi))  # (out,)
                q = residual_rank.get(s, 0)
                if q:
                    d = d + slots.res_B[s, :, :q] @ (slots.res_A[s, :q] @ xi)
                out[i, t] += d.to(out.dtype)
        return out.reshape(y.shape)


class RoutingContext:
    """The routing of the forward in progress, read by every RoutedLinear (None: base model)."""

    def __init__(self) -> None:
        self.routing: Routing | None = None


class RoutedLinear(nn.Module):
    """A target layer: the frozen base layer plus whatever its routed slots add."""

    def __init__(self, base_layer: nn.Module, name: str, slots: LayerSlots, context: RoutingContext,
                 backend: Backend):
        super().__init__()
        self.base_layer = base_layer
        self.name = name
        self.slots = slots
        self.context = context
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        routing = self.context.routing
        if routing is None or routing.all_base:
            return y
        return self.backend.apply(y, x, self.slots, routing)
