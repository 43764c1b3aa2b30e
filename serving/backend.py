"""The batched mixture math: target layers, a batch of rows, each row its own mixture.

What every backend computes, for a batch of rows ``i`` with slot ``s = slot[i]``
(``-1`` = the base model, stored as the all-zero slot ``S``)::

    h      = V.T @ x[i]                       # (k,)     one shared projection
    y[i]  += U @ (C[s] @ h)                   # (out,)   per-row k×k core, one shared U
    y[i]  += B[s] @ (A[s] @ x[i])             #          only rows whose slot has a residual

in two halves, as vLLM's punica kernels split LoRA: ``shrink`` (``C[s] V.T x``, to k
columns) and ``expand`` (``U h``, back to the layer's width). Target layers that read the
same input (q/k/v, gate/up: a :class:`SlotGroup`) share one shrink, ``x @ [V_q|V_k|V_v]``
with every member's core applied, and each member expands its own k columns of it.
``C[s]`` is ``diag(d[s])`` for diagonal slots, and when every slot in the batch is
diagonal the core product is elementwise (``h * d[s]``).

The tables are preallocated per group for a fixed number of slots, so shapes never change
with the mixtures in a batch; a step's :class:`Routing` (row → slot, in buffers allocated
once and filled in place, shared by every layer) is the only thing that varies, and
nothing on the decode path waits for the device. Layers only route
(:class:`RoutedLinear`); the math is here, behind :class:`Backend`, so another
implementation (fused CUDA kernels) can replace :class:`TorchBackend` and be tested
against the same loop (:class:`LoopBackend`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

# Sibling layers that read the same input in the architectures transformers ships (Llama/Mistral/Qwen
# attention and MLP, BERT-style attention, Mixtral experts): their shrinks are one projection.
SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"), ("w1", "w3"))


@dataclass(eq=False)
class LayerSlots:
    """One target layer's basis and slot tables: views into its group's tensors, on the serving device."""

    U: torch.Tensor  # (out, k)
    Ut: torch.Tensor  # (k, out) contiguous: the expand GEMM reads it row by row
    V: torch.Tensor  # (in, k), its columns of group.V
    cores: torch.Tensor  # (S + 1, k, k), group.cores[:, member]; row S is all zero (the base model)
    diag: torch.Tensor  # (S + 1, k), diag(cores[s]): the elementwise fast path
    res_B: torch.Tensor  # (R, out, Q) residual factors of slots 0..R-1, zero padded
    res_A: torch.Tensor  # (R, Q, in)
    group: SlotGroup
    columns: slice  # this layer's k columns of the group's shrink
    position: int  # this layer's index in its group's store (cores = store.cores[:, position])

    @property
    def k(self) -> int:
        return self.U.shape[1]

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
        self.write_residual(slot, residual)

    def write_residual(self, slot: int, residual: tuple[torch.Tensor, torch.Tensor] | None) -> None:
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


@dataclass(eq=False)
class CoreStore:
    """The core tables of many layers of one k in two tensors: a mixture is written into a slot of all of
    them with one copy (``SlotTable``), not one per layer."""

    cores: torch.Tensor  # (S + 1, L, k, k); row S is all zero
    diag: torch.Tensor  # (S + 1, L·k)

    @classmethod
    def allocate(cls, layers: int, k: int, slots: int, dtype: torch.dtype, device: torch.device) -> CoreStore:
        return cls(torch.zeros(slots + 1, layers, k, k, dtype=dtype, device=device),
                   torch.zeros(slots + 1, layers * k, dtype=dtype, device=device))


@dataclass(eq=False)
class SlotGroup:
    """Target layers that read the same input: one shrink ``x @ [V_1|…|V_G]`` serves all of them."""

    V: torch.Tensor  # (in, G·k)
    cores: torch.Tensor  # (S + 1, G, k, k), store.cores[:, start : start + G]; row S is all zero
    diag: torch.Tensor  # (S + 1, G·k); row S is all zero
    layers: list[LayerSlots]
    store: CoreStore
    columns: slice  # this group's columns of store.diag (diag = store.diag[:, columns])

    @classmethod
    def allocate(cls, bases: list[tuple[torch.Tensor, torch.Tensor]], slots: int, residual_slots: int,
                 residual_rank: int, dtype: torch.dtype, device: torch.device, store: CoreStore | None = None,
                 start: int = 0) -> SlotGroup:
        """``bases``: (U (out_j, k), V (in, k)) of each member; one ``in`` and one ``k`` for all. The cores
        live in ``store`` at layers ``start ..`` (a store of the group's own by default)."""
        in_f, k = bases[0][1].shape
        if any(V.shape != (in_f, k) or U.shape[1] != k for U, V in bases):
            raise ValueError(f"a slot group needs one input width and one k, got V shapes "
                             f"{[tuple(V.shape) for _, V in bases]}")
        g = len(bases)
        store = store or CoreStore.allocate(g, k, slots, dtype, device)
        V = torch.cat([V for _, V in bases], dim=1).to(device=device, dtype=dtype).contiguous()  # (in, G·k)
        columns = slice(start * k, (start + g) * k)
        group = cls(V=V, cores=store.cores[:, start : start + g], diag=store.diag[:, columns], layers=[], store=store,
                    columns=columns)
        for j, (U, _) in enumerate(bases):
            U = U.to(device=device, dtype=dtype).contiguous()
            cols = slice(j * k, (j + 1) * k)
            group.layers.append(LayerSlots(
                U=U, Ut=U.T.contiguous(), V=V[:, cols], cores=group.cores[:, j], diag=group.diag[:, cols],
                res_B=torch.zeros(residual_slots, U.shape[0], residual_rank, dtype=dtype, device=device),
                res_A=torch.zeros(residual_slots, residual_rank, in_f, dtype=dtype, device=device),
                group=group, columns=cols, position=start + j))
        return group


def allocate_groups(groups: list[list[tuple[torch.Tensor, torch.Tensor]]], slots: int, residual_slots: int,
                    residual_rank: int, dtype: torch.dtype, device: torch.device) -> list[SlotGroup]:
    """Slot groups whose cores share one :class:`CoreStore` per k, members in the order given."""
    sizes: dict[int, int] = {}
    for bases in groups:
        k = bases[0][1].shape[1]
        sizes[k] = sizes.get(k, 0) + len(bases)
    stores = {k: CoreStore.allocate(n, k, slots, dtype, device) for k, n in sizes.items()}
    used = dict.fromkeys(sizes, 0)
    out = []
    for bases in groups:
        k = bases[0][1].shape[1]
        out.append(SlotGroup.allocate(bases, slots, residual_slots, residual_rank, dtype, device, stores[k], used[k]))
        used[k] += len(bases)
    return out


def shared_input_groups(shapes: dict[str, tuple[int, int]]) -> list[list[str]]:
    """Layer names (name -> (in, k)) grouped by shared input: siblings named in SHARED_INPUTS, one (in, k)."""
    groups: list[list[str]] = []
    placed: set[str] = set()
    for name in shapes:
        parent, _, leaf = name.rpartition(".")
        for pack in SHARED_INPUTS:
            if leaf in pack and name not in placed:
                members = [f"{parent}.{m}" if parent else m for m in pack]
                members = [m for m in members if m in shapes and shapes[m] == shapes[name] and m not in placed]
                groups.append(members)
                placed.update(members)
        if name not in placed:
            groups.append([name])
            placed.add(name)
    return groups


class Routing:
    """Which slot each row of the current step uses; shared by every layer of one forward.

    Buffers are allocated once (for ``capacity`` rows, grown only when a batch outgrows
    them) and filled in place each step, as vLLM's ``punica_wrapper.update_metadata``
    does: ``index`` is a view of the first ``rows`` entries. The host flags decide the
    path (skip, elementwise, gathered k×k) without reading the device.
    """

    def __init__(self, num_slots: int, capacity: int, device: torch.device):
        self.num_slots = num_slots
        self.device = torch.device(device)
        self._allocate(max(1, capacity))
        self.index = self._index[:0]  # (rows,) int64 in [0, S]; S = the zero (base) slot
        self.all_base = True  # no row has an adapter: layers skip the adapter path
        self.all_diagonal = True  # every row's core is diagonal: elementwise path
        self.residual_groups: list[tuple[int, torch.Tensor, int]] = []  # (slot, its rows (r,), rank q)
        self._diag_rows: dict[int, torch.Tensor] = {}  # id(store) -> its diagonals gathered for this step's rows

    def _allocate(self, capacity: int) -> None:
        self.capacity, self.rows = capacity, 0
        on_cuda = self.device.type == "cuda"
        # rows 0..n-1: the slot index; rows n..2n-1: the rows that have a residual, grouped by slot
        self._host = torch.full((2 * capacity,), self.num_slots, dtype=torch.long, pin_memory=on_cuda)
        self._host_np = self._host.numpy()
        self._buffer = torch.empty_like(self._host, device=self.device) if on_cuda else self._host
        self._index, self._residual_rows = self._buffer[:capacity], self._buffer[capacity:]
        self._copied = torch.cuda.Event() if on_cuda else None

    @classmethod
    def build(cls, row_slots: list[int], num_slots: int, diagonal: list[bool], residual_rank: list[int],
              device: torch.device) -> Routing:
        """A one-off routing (tests, probes); the engine keeps one and calls :meth:`update`."""
        return cls(num_slots, len(row_slots), device).update(row_slots, diagonal, residual_rank)

    def update(self, row_slots: list[int], diagonal: list[bool], residual_rank: list[int]) -> Routing:
        """Fill the buffers for this step: ``row_slots[i]`` is a slot or -1; ``diagonal`` / ``residual_rank``
        are per slot (host side)."""
        rows = len(row_slots)
        if rows > self.capacity:
            self._allocate(max(rows, 2 * self.capacity))
        if self._copied is not None:
            self._copied.synchronize()  # the last step's copy has left the host buffer (it normally has)
        n, stale = self.capacity, max(self.rows, rows)
        used = sorted({s for s in row_slots if s >= 0})
        self._host_np[:rows] = [self.num_slots if s < 0 else s for s in row_slots]
        self._host_np[rows:stale] = self.num_slots  # past the batch: the zero slot (a padded batch adds nothing)
        groups, filled = [], 0
        for s in used:
            if residual_rank[s] > 0:
                mine = [i for i, r in enumerate(row_slots) if r == s]
                self._host_np[n + filled : n + filled + len(mine)] = mine
                groups.append((s, filled, len(mine), residual_rank[s]))
                filled += len(mine)
        if self._copied is not None:
            self._buffer[:stale].copy_(self._host[:stale], non_blocking=True)
            self._buffer[n : n + filled].copy_(self._host[n : n + filled], non_blocking=True)
            self._copied.record()
        self.rows = rows
        self.index = self._index[:rows]
        self.all_base = not used
        self.all_diagonal = all(diagonal[s] for s in used)
        self.residual_groups = [(s, self._residual_rows[start : start + count], q) for s, start, count, q in groups]
        self._diag_rows.clear()
        return self

    def diag_rows(self, store: CoreStore) -> torch.Tensor:
        """Every row's diagonals in ``store`` (rows, 1, L·k): one gather per store and step, which every
        group of the store slices (slots are written between steps, never during one)."""
        rows = self._diag_rows.get(id(store))
        if rows is None:
            rows = self._diag_rows[id(store)] = store.diag.index_select(0, self.index).unsqueeze(1)
        return rows


class Backend(ABC):
    """The adapter term of a group of layers for a batch of rows, each row ``i`` in slot ``s = slot[i]``::

        shrink:  h[i, j] = C_j[s] @ (V_j.T @ x[i])       for every layer j of the group; C[S] = 0
        expand:  y[i] += U @ h[i, j]                      for one layer j
                 if residual_rank[s]: y[i] += B[s] @ (A[s] @ x[i])
    """

    @abstractmethod
    def shrink(self, x: torch.Tensor, group: SlotGroup, routing: Routing) -> torch.Tensor:
        """x (rows, T, in) -> h (rows, T, G·k), layer j's core applied to its k columns."""

    @abstractmethod
    def expand(self, y: torch.Tensor, h: torch.Tensor, x: torch.Tensor, slots: LayerSlots,
               routing: Routing) -> torch.Tensor:
        """y (rows, T, out) plus ``slots``' adapter term, from the group's h; may update y in place."""

    def apply(self, y: torch.Tensor, x: torch.Tensor, slots: LayerSlots, routing: Routing) -> torch.Tensor:
        """One layer alone: shrink its group, expand its columns."""
        return self.expand(y, self.shrink(x, slots.group, routing), x, slots, routing)


class TorchBackend(Backend):
    """One GEMM per group to k columns, elementwise (diagonal) or gathered-bmm (dense) cores, one GEMM back."""

    def shrink(self, x: torch.Tensor, group: SlotGroup, routing: Routing) -> torch.Tensor:
        rows, gk = x.shape[0], group.V.shape[1]
        h = (x if x.dim() == 3 else x.reshape(rows, -1, x.shape[-1])) @ group.V  # (rows, T, G·k); one dtype
        if routing.all_diagonal:
            return h.mul_(routing.diag_rows(group.store)[..., group.columns])  # · (rows, 1, G·k)
        g, k = group.cores.shape[1], group.cores.shape[2]
        cores = group.cores.index_select(0, routing.index)  # (rows, G, k, k)
        h = h.view(rows, -1, g, k).transpose(1, 2)  # (rows, G, T, k); a view at decode (T = 1)
        h = torch.matmul(h, cores.transpose(-1, -2))  # row i, layer j: C_j[slot i] h, (rows, G, T, k)
        return h.transpose(1, 2).reshape(rows, -1, gk)  # (rows, T, G·k)

    def expand(self, y: torch.Tensor, h: torch.Tensor, x: torch.Tensor, slots: LayerSlots,
               routing: Routing) -> torch.Tensor:
        out = y.reshape(-1, y.shape[-1])  # (rows·T, out); the base layer's fresh output, updated in place
        out.addmm_(h.reshape(-1, h.shape[-1])[:, slots.columns], slots.Ut)  # y += h Uᵀ; h's columns: a strided view
        if routing.residual_groups:
            x3 = x.reshape(x.shape[0], -1, x.shape[-1])  # (rows, T, in)
            out3 = out.view(x.shape[0], -1, out.shape[-1])  # (rows, T, out)
            for slot, row_idx, q in routing.residual_groups:
                xr = x3.index_select(0, row_idx)  # (r, T, in)
                r = (xr @ slots.res_A[slot, :q].T) @ slots.res_B[slot, :, :q].T  # (r, T, q) -> (r, T, out)
                out3.index_add_(0, row_idx, r)
        return out.view(y.shape)


class LoopBackend(Backend):
    """The same math one row and one layer at a time, with explicit cores: the fast paths are tested against it."""

    def shrink(self, x: torch.Tensor, group: SlotGroup, routing: Routing) -> torch.Tensor:
        x3 = x.reshape(x.shape[0], -1, x.shape[-1])
        h = x3.new_zeros(x3.shape[0], x3.shape[1], group.V.shape[1])
        for i in range(x3.shape[0]):
            s = int(routing.index[i])
            for t in range(x3.shape[1]):
                for layer in group.layers:
                    cols = layer.columns
                    h[i, t, cols] = layer.cores[s] @ (layer.V.T @ x3[i, t])  # (k,)
        return h

    def expand(self, y: torch.Tensor, h: torch.Tensor, x: torch.Tensor, slots: LayerSlots,
               routing: Routing) -> torch.Tensor:
        rows = x.shape[0]
        x3 = x.reshape(rows, -1, x.shape[-1])
        out = y.reshape(rows, -1, y.shape[-1]).clone()
        residual_rank = {slot: q for slot, _, q in routing.residual_groups}
        for i in range(rows):
            s = int(routing.index[i])
            if s == slots.num_slots:
                continue
            for t in range(x3.shape[1]):
                d = slots.U @ h[i, t, slots.columns]  # (out,)
                q = residual_rank.get(s, 0)
                if q:
                    d = d + slots.res_B[s, :, :q] @ (slots.res_A[s, :q] @ x3[i, t])
                out[i, t] += d.to(out.dtype)
        return out.reshape(y.shape)


class RoutingContext:
    """The routing of the forward in progress (None: base model), read by every RoutedLinear, and the
    shrinks computed so far in it: the first layer of a group to see an input computes the group's."""

    def __init__(self) -> None:
        self.routing: Routing | None = None
        self._shrunk: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(group) -> (input, h)

    def begin(self, routing: Routing) -> None:
        self.routing = routing
        self._shrunk.clear()

    def end(self) -> None:
        self.routing = None
        self._shrunk.clear()  # and the inputs they hold

    def shrunk(self, group: SlotGroup, x: torch.Tensor, backend: Backend) -> torch.Tensor:
        # Siblings are called on the very same tensor (transformers' attention and MLP), which this
        # reference keeps alive, so identity means same input; any other input gets its own shrink.
        held = self._shrunk.get(id(group))
        if held is not None and held[0] is x:
            return held[1]
        h = backend.shrink(x, group, self.routing)
        self._shrunk[id(group)] = (x, h)
        return h


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
        h = self.context.shrunk(self.slots.group, x, self.backend)
        return self.backend.expand(y, h, x, self.slots, routing)

