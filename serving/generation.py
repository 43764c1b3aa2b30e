"""Decoding pieces the scheduler composes: sampling, text with stop strings, the batch KV cache.

KV cache layout (iteration-level batching on a transformers model): the running rows
share one ``DynamicCache`` of shape (rows, heads, L, head_dim) per layer, **left padded**
to a common length L. Each row has an ``attention_mask`` row (1 on its real tokens) and
its own ``position_ids`` (the count of its real tokens), so masked columns take exactly
zero attention weight and rotary positions are the ones a solo run would use: every row
computes what it would compute alone (up to floating-point summation order, which can
depend on the batch shape).

- Newcomers are prefilled together (left padded among themselves), then their block is
  merged into the running block: the shorter of the two is left padded to the longer
  one's length and the two are concatenated along the batch dimension.
- A decode step appends one column for every row.
- Finished rows are dropped (index_select), then leading columns that are padding in
  every remaining row are cut, so L follows the longest live row, not history.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from adapters_zoo.errors import InvalidRequest
from adapters_zoo.train import pad_batch

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


def choose_tokens(logits: torch.Tensor, params: list[SamplingParams], gens: list[torch.Generator]) -> list[int]:
    """Next token of every row of logits (rows, V): argmax on the device, sampling on the host."""
    tokens = logits.argmax(dim=-1).tolist()
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        rows = logits[sampled].float().cpu()  # (n, V); per-row generators keep results batch-independent
        for j, i in enumerate(sampled):
            tokens[i] = sample_row(rows[j], params[i], gens[i])
    return tokens


# --------------------------------------------------------------------------- text


class TextStream:
    """Generated ids -> text deltas, cut at the first stop string, never emitting part of one."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0  # characters of self.text already handed out

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add one token; return (text safe to emit now, whether a stop string was hit)."""
        self.ids.append(token_id)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.stop:
            hits = [i for i in (self.text.find(s, max(0, self.emitted - len(s) + 1)) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                return self._emit(len(self.text)), True
        safe = len(self.text)
        while safe > self.emitted and self.text[safe - 1] == "\ufffd":  # an unfinished multi-byte character
            safe -= 1
        safe -= self._stop_prefix_len(self.text[:safe])
        return self._emit(max(safe, self.emitted)), False

    def flush(self) -> str:
        """At the end (eos or length): whatever was held back."""
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


def _pad_left(t: torch.Tensor, extra: int) -> torch.Tensor:
    """Pad dim -2 of (n, H, L, D) (or dim -1 of (n, L)) on the left with zeros."""
    if extra == 0:
        return t
    dim = -2 if t.dim() == 4 else -1
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class BatchKV:
    """The running rows' KV cache and attention mask, left padded to one length."""

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # (rows, L) long

    @property
    def rows(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    @property
    def length(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    @staticmethod
    def check_layers(cache: DynamicCache) -> None:
        for layer in cache.layers:
            if type(layer) is not DynamicLayer:
                raise TypeError(f"KV cache layer {type(layer).__name__} is not supported (full attention only)")

    def merge(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Append a prefilled block (n rows, its own left-padded length) below the running rows."""
        self.check_layers(cache)
        if self.cache is None:
            self.cache, self.mask = cache, mask
            return
        length = max(self.length, mask.shape[1])
        pad_old, pad_new = length - self.length, length - mask.shape[1]
        for old, new in zip(self.cache.layers, cache.layers):
            old.keys = torch.cat([_pad_left(old.keys, pad_old), _pad_left(new.keys, pad_new)], dim=0)
            old.values = torch.cat([_pad_left(old.values, pad_old), _pad_left(new.values, pad_new)], dim=0)
        self.mask = torch.cat([_pad_left(self.mask, pad_old), _pad_left(mask, pad_new)], dim=0)

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """attention_mask (rows, L + 1) and position_ids (rows, 1) for one decode step."""
        positions = self.mask.sum(-1, keepdim=True)  # (rows, 1): each row's real tokens so far
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.rows, 1)], dim=1)
        return self.mask, positions

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in this order) and cut the columns no kept row uses."""
        if not rows:
            self.cache, self.mask = None, None
            return
        if rows == list(range(self.rows)):
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        self.mask = self.mask.index_select(0, index)
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else 0
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]
