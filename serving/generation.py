"""Decoding pieces the scheduler composes: sampling, text with stop strings, the batch KV cache.

KV cache layout (iteration-level batching on a transformers model): :class:`RowKV` holds
one preallocated buffer of shape (rows, heads, columns, head_dim) per layer and per K/V,
grown geometrically when a row or a column more is needed. A running request owns one
row; its tokens sit **left aligned** in it (column c holds position c), with a length per
row. A decode step writes every row's new key/value at that row's own length
and attends over columns ``[0, span)`` (``span`` = the longest live row + 1) through a
per-row mask, so masked columns take exactly zero attention weight and rotary positions
are the ones a solo run would use: every row computes what it would compute alone (up to
floating-point summation order, which can depend on the batch shape).

- Newcomers are prefilled together (left padded among themselves, a ``DynamicCache``),
  then only their real tokens are copied, left aligned, into the rows after the live
  ones: the running rows are not touched.
- A decode step runs rows ``[0, rows)`` and grows each by one column, in place.
- A finished row's place is taken by the last row (that one row's tokens are copied), so
  the live rows stay ``[0, rows)`` and a step never computes a dead row.
- Per-step inputs (ids, mask, positions, write index) are views of buffers allocated once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

from adapters_zoo.data import pad_batch
from adapters_zoo.errors import InvalidRequest

# --------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # OpenAI's default; 0 = greedy
    top_p: float = 1.0
    seed: int | None = None  # None: a fresh random seed per request
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # keep going past the end-of-sequence token (benchmarks, vLLM's flag)

    def validate(self, max_tokens_bound: int) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be a positive integer, got {self.max_tokens!r}", param="max_tokens")
        if self.max_tokens > max_tokens_bound:
            raise InvalidRequest(
                f"max_tokens is {self.max_tokens}, this server generates at most {max_tokens_bound}",
                param="max_tokens",
            )
        if not math.isfinite(self.temperature) or not 0 <= self.temperature <= 2:
            raise InvalidRequest(f"temperature must be in [0, 2], got {self.temperature}", param="temperature")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}", param="top_p")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidRequest(f"seed must be in [0, 2**63), got {self.seed}", param="seed")
        if len(self.stop) > 4 or any(not s for s in self.stop) or any(len(s) > 256 for s in self.stop):
            raise InvalidRequest("stop takes up to 4 non-empty strings of at most 256 characters", param="stop")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def sample_row(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> int:
    """One token from one row's logits (V,) (host, float32), temperature and nucleus sampling."""
    probs = torch.softmax(logits / params.temperature, dim=-1)  # (V,)
    if params.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < params.top_p  # always keeps the top token
        sorted_p = sorted_p * keep
        return int(order[torch.multinomial(sorted_p, 1, generator=gen)])
    return int(torch.multinomial(probs, 1, generator=gen))


def read_logits(logits: torch.Tensor, sampled: list[int]) -> tuple[list[int], list[bool], torch.Tensor | None]:
    """What the host needs from a step's logits (rows, V), in one device -> host transfer: every row's
    argmax, whether its logits are all finite, and the float32 logits of the ``sampled`` rows (n, V)."""
    greedy = logits.argmax(dim=-1)  # (rows,)
    finite = torch.isfinite(logits).all(dim=-1)  # (rows,): rows are independent, so is their NaN
    parts = [greedy, finite]
    if sampled:
        parts.append(logits[sampled].float())  # (n, V); sampled on the host by per-row generators
    host = to_host(parts)
    return host[0].tolist(), host[1].tolist(), host[2] if sampled else None


def to_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copy tensors to the host with a single wait for the device."""
    if not tensors or tensors[0].device.type != "cuda":
        return [t.cpu() for t in tensors]
    out = [t.to("cpu", non_blocking=True) for t in tensors]  # into pinned memory, queued on the stream
    torch.cuda.current_stream(tensors[0].device).synchronize()
    return out


# --------------------------------------------------------------------------- text


class TextStream:
    """Generated ids -> text deltas, cut at the first stop string, never emitting part of one.

    Incremental: each token decodes only a short window of recent ids (those since the
    last complete text, plus the ones before them as context for the tokenizer's spacing
    rules), so a token costs the same at position 10 and 10,000. Text grows only when the
    window ends on a complete character; an unfinished multi-byte character waits."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0  # characters of self.text already handed out
        self._prefix = 0  # ids[_prefix:_read] decode to the text the window's new text follows
        self._read = 0  # ids before this are in self.text
        self._cut = False  # a stop string cut self.text: nothing more is added

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add one token; return (text safe to emit now, whether a stop string was hit)."""
        self.ids.append(token_id)
        self._extend(final=False)
        if self.stop:
            hits = [i for i in (self.text.find(s, max(0, self.emitted - len(s) + 1)) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self._cut = True
                return self._emit(len(self.text)), True
        safe = len(self.text) - self._stop_prefix_len(self.text)
        return self._emit(max(safe, self.emitted)), False

    def _extend(self, final: bool) -> None:
        """Append the text of ids[_read:] once it ends on a complete character (at the end: whatever it is)."""
        if self._cut or self._read == len(self.ids):
            return
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix : self._read], skip_special_tokens=True)
        window = decode(self.ids[self._prefix :], skip_special_tokens=True)
        if final or (len(window) > len(before) and not window.endswith("\ufffd")):
            self.text += window[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)

    def flush(self) -> str:
        """At the end (eos or length): whatever was held back."""
        self._extend(final=True)
        return self._emit(len(self.text))

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that could be the start of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if s.startswith(text[-n:]):
                    best = n
                    break
        return best

    def _emit(self, upto: int) -> str:
        delta = self.text[self.emitted : upto]
        self.emitted = upto
        return delta


# --------------------------------------------------------------------------- KV cache


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> input_ids (n, T) and attention_mask (n, T), left padded (the one pad_batch)."""
    batch = pad_batch([(p, []) for p in prompts], pad_id, device, left=True)
    return batch["input_ids"], batch["attention_mask"]


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    """position_ids (n, T) of a left-padded mask: 0.. on real tokens, 0 on padding."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


class RowKV:
    """The running rows' KV cache: rows [0, rows) live, one per request, left aligned, a length per row.

        rows = kv.join(cache, mask, keep)    # prefilled block -> the rows its kept entries now own
        kv.set_next(row, token)              # the token each row feeds next
        ids, mask, positions, cache = kv.step_inputs()   # views over rows [0, rows)
        logits = model(ids, mask, positions, cache)      # writes each row's new K/V at its length
        kv.advance()                                     # every row is one token longer
        moved = kv.leave(row)                            # the last row moves into the hole (or None)
    """

    def __init__(self, mask_4d: bool = False) -> None:
        self.mask_4d = mask_4d  # hand attention a ready (rows, 1, 1, span) mask (sdpa), not a 2D one
        self.layers: list[RowLayer] = []
        self.lengths: list[int] = []  # host copy of every live row's length
        self.capacity = 0  # rows the buffers hold
        self.columns = 0  # columns they hold
        self.span = 0  # columns [0, span) take part in the step being run
        self._mask: torch.Tensor | None = None  # (R, C) bool, True on a row's real tokens
        self._length: torch.Tensor | None = None  # (R,) long, each row's length on the device
        self._ids: torch.Tensor | None = None  # (R,) long, the tokens fed next
        self._host_ids: np.ndarray | None = None  # (R,) staging for _ids
        self._host_ids_t: torch.Tensor | None = None  # the same memory as a (pinned) tensor
        self.write: torch.Tensor | None = None  # (rows, H, 1, D) long: this step's column of every row

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @staticmethod
    def check_layers(cache: DynamicCache) -> None:
        for layer in cache.layers:
            if type(layer) is not DynamicLayer:
                raise TypeError(f"KV cache layer {type(layer).__name__} is not supported (full attention only)")

    # ------------------------------------------------------------------ join / leave

    def join(self, cache: DynamicCache, mask: torch.Tensor, keep: list[int]) -> list[int]:
        """Copy the ``keep`` entries of a prefilled, left-padded block (cache and mask (n, T)) into the rows
        after the live ones, left aligned; return the row each now owns. The running rows are not touched."""
        self.check_layers(cache)
        if not keep:
            return []
        device, width = cache.layers[0].keys.device, mask.shape[1]
        self._ensure_layers(cache)
        self._reserve(self.rows + len(keep), width + 1)
        lengths = [int(n) for n in mask.sum(-1).tolist()]  # prompt lengths (prefill time; not per step)
        kept = [lengths[j] for j in keep]
        lo, hi = self.rows, self.rows + len(keep)
        index = torch.tensor(keep, device=device)
        cols = torch.arange(width, device=device)  # (T,)
        shift = torch.tensor([width - n for n in kept], device=device)  # each entry's leading pad columns
        src = (cols + shift[:, None]).clamp(max=width - 1)  # (k, T): the block column of aligned column t
        valid = cols < torch.tensor(kept, device=device)[:, None]  # (k, T)
        for layer, block in zip(self.layers, cache.layers):
            for buffer, states in ((layer.keys, block.keys), (layer.values, block.values)):
                picked = states.index_select(0, index)  # (k, H, T, D)
                gather = src[:, None, :, None].expand(-1, picked.shape[1], -1, picked.shape[3])
                buffer[lo:hi, :, :width] = picked.gather(2, gather) * valid[:, None, :, None]  # zeros past a row
                buffer[lo:hi, :, width:] = 0  # a previous owner's values (even NaN) never meet a mask's zero
        self._mask[lo:hi] = False
        self._mask[lo:hi, :width] = valid
        self._length[lo:hi] = torch.tensor(kept, device=device)
        self.lengths += kept
        return list(range(lo, hi))

    def leave(self, row: int) -> int | None:
        """Free ``row``: the last live row moves into it (its tokens only, one row's copy), so rows
        [0, rows) stay the live ones. Returns the row that moved (now ``row``), or None."""
        last = self.rows - 1
        if not 0 <= row <= last:
            raise ValueError(f"row {row} is not live ({self.rows} rows)")
        moved = None
        if row != last:
            n, old = self.lengths[last], self.lengths[row]
            for layer in self.layers:
                for buffer in (layer.keys, layer.values):
                    buffer[row, :, :n] = buffer[last, :, :n]
                    if old > n:
                        buffer[row, :, n:old] = 0
            self._mask[row] = self._mask[last]
            self._length[row] = self._length[last]
            self._host_ids[row] = self._host_ids[last]
            self.lengths[row] = n
            moved = last
        self.lengths.pop()
        if not self.lengths:
            self.__init__(self.mask_4d)  # empty: the memory goes back
        return moved

    # ------------------------------------------------------------------ a step

    def set_next(self, row: int, token: int) -> None:
        self._host_ids[row] = token

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Cache]:
        """input_ids (rows, 1), attention mask (rows, span) (or (rows, 1, 1, span)), position_ids (rows, 1)
        and the cache for one decode step; every tensor a view of a buffer allocated once."""
        n = self.rows
        if n == 0:
            raise ValueError("no running rows")
        span = max(self.lengths) + 1
        self._reserve(n, span)
        self.span = span
        self._ids[:n].copy_(self._host_ids_t[:n], non_blocking=True)
        length = self._length[:n].unsqueeze(1)  # (rows, 1): a row's length is its new token's position
        self._mask[:n].scatter_(1, length, True)  # the new column
        head = self.layers[0].keys
        self.write = length[:, :, None, None].expand(n, head.shape[1], 1, head.shape[3])  # (rows, H, 1, D)
        mask = self._mask[:n, :span]
        if self.mask_4d:
            mask = mask[:, None, None, :]  # (rows, 1, 1, span): attend where True
        return self._ids[:n, None], mask, length, RowCache(self)

    def advance(self) -> None:
        """After a step's forward: every row holds one token more."""
        self._length[: self.rows].add_(1)
        self.lengths = [n + 1 for n in self.lengths]

    # ------------------------------------------------------------------ buffers

    def _ensure_layers(self, cache: DynamicCache) -> None:
        """One empty layer per layer of a prefilled block (its heads, head dim, dtype, device)."""
        if self.layers:
            return
        for block in cache.layers:
            k, v = block.keys, block.values
            self.layers.append(RowLayer(self, k.new_zeros(0, k.shape[1], 0, k.shape[3]),
                                        v.new_zeros(0, v.shape[1], 0, v.shape[3])))

    def _reserve(self, rows: int, columns: int) -> None:
        """Grow the buffers (doubling) to hold ``rows`` rows of ``columns`` columns."""
        new_rows = max(self.capacity, 4)
        while new_rows < rows:
            new_rows *= 2
        new_cols = max(self.columns, 16)
        while new_cols < columns:
            new_cols *= 2
        if (new_rows, new_cols) != (self.capacity, self.columns):
            self._allocate(new_rows, new_cols)

    def _allocate(self, rows: int, cols: int) -> None:
        """(Re)allocate every buffer at (rows, cols), keeping what the old ones held."""
        device = self.layers[0].keys.device
        for layer in self.layers:
            for name in ("keys", "values"):
                old = getattr(layer, name)
                new = old.new_zeros(rows, old.shape[1], cols, old.shape[3])
                new[: old.shape[0], :, : old.shape[2]] = old
                setattr(layer, name, new)

        def grow(old: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            new = torch.zeros(shape, dtype=dtype, device=device)
            if old is not None:
                new[tuple(slice(0, s) for s in old.shape)] = old
            return new

        self._mask = grow(self._mask, (rows, cols), torch.bool)
        self._length = grow(self._length, (rows,), torch.long)
        self._ids = grow(self._ids, (rows,), torch.long)
        host = torch.zeros(rows, dtype=torch.long, pin_memory=device.type == "cuda")
        if self._host_ids_t is not None:
            host[: self.capacity] = self._host_ids_t
        self._host_ids_t, self._host_ids = host, host.numpy()  # one memory: numpy writes, torch copies
        self.capacity, self.columns = rows, cols


class RowLayer(CacheLayerMixin):
    """One layer of a :class:`RowKV` seen by the model for one decode step: ``update`` writes
    each row's new key/value at its own column and returns columns [0, span)."""

    is_sliding = False

    def __init__(self, kv: RowKV, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.kv, self.keys, self.values = kv, keys, values
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        n, span = self.kv.rows, self.kv.span
        if key_states.shape[0] != n or key_states.shape[2] != 1:
            raise ValueError(f"a RowKV step takes one token for each of {n} rows, got {tuple(key_states.shape)}")
        self.keys[:n].scatter_(2, self.kv.write, key_states.to(self.keys.dtype))
        self.values[:n].scatter_(2, self.kv.write, value_states.to(self.values.dtype))
        return self.keys[:n, :, :span], self.values[:n, :, :span]  # (rows, H, span, D)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.kv.span, 0

    def get_seq_length(self) -> int:
        return self.kv.span - 1  # the query sits at the last column: causality lets it see every one

    def get_max_length(self) -> int:
        return -1


class RowCache(Cache):
    """The ``Cache`` a model's forward takes for one :class:`RowKV` step."""

    def __init__(self, kv: RowKV) -> None:
        super().__init__(layers=kv.layers)
