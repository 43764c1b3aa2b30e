"""Text deltas with stop strings, request bounds, the left-padded batch cache."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from adapters_zoo.errors import InvalidRequest
from serving.generation import BatchKV, SamplingParams, TextStream


def stream_all(tokenizer, text, stop):
    s = TextStream(tokenizer, stop)
    out, hit = [], False
    for t in tokenizer(text, add_special_tokens=False)["input_ids"]:
        delta, hit = s.push(t)
        out.append(delta)
        if hit:
            break
    if not hit:
        out.append(s.flush())
    return "".join(out), hit, out


@pytest.mark.parametrize("text,stop,expected,hit", [
    ("hello world", ("wor",), "hello ", True),
    ("hello world", ("xyz",), "hello world", False),
    ("aaab", ("ab",), "aa", True),
    ("hello world", ("o w", "ll"), "he", True),
    ("hello", ("lo!",), "hello", False),  # a stop prefix held back, then released at the end
])
def test_text_stream_cuts_at_stop_and_never_leaks_part_of_one(tokenizer, text, stop, expected, hit):
    got, got_hit, deltas = stream_all(tokenizer, text, stop)
    assert (got, got_hit) == (expected, hit)
    for i in range(len(deltas)):
        emitted = "".join(deltas[: i + 1])
        assert not any(s in emitted for s in stop)


@pytest.mark.parametrize("params,param", [
    (SamplingParams(max_tokens=0), "max_tokens"),
    (SamplingParams(max_tokens=10**6), "max_tokens"),
    (SamplingParams(temperature=float("nan")), "temperature"),
    (SamplingParams(temperature=3.0), "temperature"),
    (SamplingParams(top_p=0.0), "top_p"),
    (SamplingParams(seed=-1), "seed"),
    (SamplingParams(stop=("",)), "stop"),
])
def test_sampling_bounds(params, param):
    with pytest.raises(InvalidRequest) as info:
        params.validate(max_tokens_bound=100)
    assert info.value.param == param


def _cache(keys: list[torch.Tensor]) -> DynamicCache:
    cache = DynamicCache()
    for layer, k in enumerate(keys):
        cache.update(k, k + 100, layer)
    return cache


def test_batch_kv_merges_left_padded_blocks_and_compacts():
    kv = BatchKV()
    a = torch.arange(1 * 1 * 4 * 2, dtype=torch.float32).reshape(1, 1, 4, 2)  # one row, 4 positions
    kv.merge(_cache([a]), torch.tensor([[0, 1, 1, 1]]))
    b = torch.ones(2, 1, 6, 2)
    kv.merge(_cache([b]), torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]]))
    assert kv.rows == 3 and kv.length == 6
    assert kv.mask.tolist()[0] == [0, 0, 0, 1, 1, 1]
    torch.testing.assert_close(kv.cache.layers[0].keys[0, :, 2:], a[0])  # shifted right by two
    mask, positions = kv.step_inputs()
    assert positions.flatten().tolist() == [3, 6, 2] and mask.shape == (3, 7)
    kv.cache.layers[0].keys = torch.cat([kv.cache.layers[0].keys, torch.zeros(3, 1, 1, 2)], dim=2)
    kv.cache.layers[0].values = torch.cat([kv.cache.layers[0].values, torch.zeros(3, 1, 1, 2)], dim=2)
    kv.keep([2, 0])  # drop the long row: columns no kept row uses go
    assert kv.rows == 2 and kv.mask.tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]]
    assert kv.cache.layers[0].keys.shape == (2, 1, 4, 2)
    torch.testing.assert_close(kv.cache.layers[0].keys[1, :, :3], a[0, :, 1:])  # its real tokens, now first
