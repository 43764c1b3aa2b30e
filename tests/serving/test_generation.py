"""Text deltas with stop strings (incremental, equal to full decoding), request bounds, the row KV cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, DynamicCache, PreTrainedTokenizerFast

from adapters_zoo.errors import InvalidRequest
from serving.generation import RowKV, SamplingParams, TextStream


def stream_all(tokenizer, text, stop):
    text_out, hit, out, _ = streamed(tokenizer, tokenizer(text, add_special_tokens=False)["input_ids"], tuple(stop))
    return text_out, hit, out


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


def test_row_kv_joins_into_free_rows_without_touching_running_ones():
    kv = RowKV()
    a = torch.arange(1 * 1 * 4 * 2, dtype=torch.float32).reshape(1, 1, 4, 2)  # one row, 4 positions
    assert kv.join(_cache([a]), torch.tensor([[0, 1, 1, 1]]), [0]) == [0]
    layer = kv.layers[0]
    storage = layer.keys.data_ptr()
    b = torch.arange(2 * 1 * 6 * 2, dtype=torch.float32).reshape(2, 1, 6, 2) + 50
    assert kv.join(_cache([b]), torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]]), [0, 1]) == [1, 2]
    assert layer.keys.data_ptr() == storage  # the running row was not recopied
    assert kv.rows == 3 and kv.lengths == [3, 6, 2]
    torch.testing.assert_close(layer.keys[0, :, :3], a[0, :, 1:])  # real tokens only, left aligned
    torch.testing.assert_close(layer.values[0, :, :3], a[0, :, 1:] + 100)
    torch.testing.assert_close(layer.keys[1, :, :6], b[0])
    torch.testing.assert_close(layer.keys[2, :, :2], b[1, :, 4:])
    assert not layer.keys[2, :, 2:].any()  # zeros past a row's tokens

    ids, mask, positions, cache = kv.step_inputs()
    assert ids.shape == (3, 1) and positions.flatten().tolist() == [3, 6, 2]
    assert mask.int().tolist() == [[1, 1, 1, 1, 0, 0, 0], [1] * 7, [1, 1, 1, 0, 0, 0, 0]]
    new = torch.full((3, 1, 1, 2), -1.0)
    keys, values = cache.update(new, new - 1, 0)
    assert keys.shape == (3, 1, 7, 2) and cache.get_mask_sizes(1, 0) == (7, 0)
    assert keys[0, 0, 3].tolist() == [-1, -1] and keys[1, 0, 6].tolist() == [-1, -1]
    assert keys[2, 0, 2].tolist() == [-1, -1] and values[2, 0, 2].tolist() == [-2, -2]
    torch.testing.assert_close(keys[0, :, :3], a[0, :, 1:])  # the rest as it was
    kv.advance()
    assert kv.lengths == [4, 7, 3]

    assert kv.leave(1) == 2  # the long row goes: the last row moves into its place, alone
    assert kv.rows == 2 and kv.lengths == [4, 3]
    torch.testing.assert_close(layer.keys[0, :, :3], a[0, :, 1:])  # untouched
    torch.testing.assert_close(layer.keys[1, :, :2], b[1, :, 4:])
    assert layer.keys[1, 0, 2].tolist() == [-1, -1] and not layer.keys[1, :, 3:].any()
    c = torch.full((1, 1, 2, 2), 7.0)
    assert kv.join(_cache([c]), torch.tensor([[1, 1]]), [0]) == [2]  # after the live rows
    assert layer.keys.data_ptr() == storage
    assert layer.keys[2, 0, :2].eq(7).all() and not layer.keys[2, :, 2:].any()
    _, mask, positions, _ = kv.step_inputs()
    assert positions.flatten().tolist() == [4, 3, 2] and mask.shape == (3, 5)
    assert mask.int().tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]

    assert kv.leave(2) is None  # the last row: nothing moves
    assert kv.leave(0) == 1
    assert kv.rows == 1 and kv.step_inputs()[1].shape == (1, 4)
    torch.testing.assert_close(layer.keys[0, :, :2], b[1, :, 4:])
    kv.leave(0)
    assert kv.rows == 0 and not kv.layers  # empty: the buffers are let go
    with pytest.raises(ValueError, match="no running rows"):
        kv.step_inputs()
    with pytest.raises(ValueError, match="not live"):
        kv.leave(0)


def test_row_kv_grows_rows_and_columns_keeping_what_it_holds():
    kv = RowKV(mask_4d=True)
    block = torch.randn(3, 2, 5, 4)
    kv.join(_cache([block]), torch.ones(3, 5, dtype=torch.long), [0, 1, 2])
    more = torch.randn(4, 2, 40, 4)  # four more rows (past the first 4) and a longer prompt (past 16 columns)
    assert kv.join(_cache([more]), torch.ones(4, 40, dtype=torch.long), [0, 1, 2, 3]) == [3, 4, 5, 6]
    layer = kv.layers[0]
    assert layer.keys.shape[0] >= 7 and layer.keys.shape[2] >= 41
    torch.testing.assert_close(layer.keys[:3, :, :5], block)
    torch.testing.assert_close(layer.keys[3:7, :, :40], more)
    _, mask, positions, _ = kv.step_inputs()
    assert mask.shape == (7, 1, 1, 41) and positions.flatten().tolist() == [5] * 3 + [40] * 4
    assert mask[:, 0, 0].sum(-1).tolist() == [6] * 3 + [41] * 4


# --------------------------------------------------------------------------- incremental text


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with no merges: every UTF-8 byte its own token, so characters split across tokens."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<eos>": 0, **{ch: i + 1 for i, ch in enumerate(sorted(alphabet))}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", clean_up_tokenization_spaces=False)


TRICKY = ["héllo wörld", "日本語のテキスト", "emoji 😀👍🏽 and ❤️ mixed", "a\u0301 combining", "tabs\tand\nnewlines  x"]


def streamed(tokenizer, ids: list[int], stop: tuple[str, ...] = ()) -> tuple[str, bool, list[str], str]:
    s = TextStream(tokenizer, stop)
    out, hit = [], False
    for t in ids:
        delta, hit = s.push(t)
        out.append(delta)
        if hit:
            break
    if not hit:
        out.append(s.flush())
    return "".join(out), hit, out, s.text


def check_equals_full_decode(tokenizer, ids: list[int]) -> None:
    full = tokenizer.decode(ids, skip_special_tokens=True)
    got, hit, deltas, text = streamed(tokenizer, ids)
    assert (got, text, hit) == (full, full, False)
    for n in range(1, len(ids) + 1):  # every prefix: what was emitted is a prefix of that prefix's full text
        partial = "".join(streamed(tokenizer, ids[:n])[2][:-1])
        assert tokenizer.decode(ids[:n], skip_special_tokens=True).startswith(partial)


@pytest.mark.parametrize("text", TRICKY)
def test_incremental_text_equals_full_decoding_on_split_characters(text):
    tok = byte_tokenizer()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode())  # one token a byte: multi-byte characters are split
    check_equals_full_decode(tok, ids)
    s = TextStream(tok)
    deltas = [s.push(t)[0] for t in ids]
    assert "\ufffd" not in "".join(deltas)  # half a character is never emitted


def test_incremental_text_equals_full_decoding_on_invalid_bytes_and_specials():
    tok = byte_tokenizer()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(tok), (300,), generator=gen).tolist()  # stray continuation bytes, <eos>s
    check_equals_full_decode(tok, ids)


@pytest.mark.parametrize("text,stop", [("héllo wörld", ("o wö",)), ("日本語のテキスト", ("のテ",)),
                                       ("a 😀 b", ("😀",))])
def test_stop_strings_across_byte_tokens(text, stop):
    tok = byte_tokenizer()
    got, hit, deltas, _ = streamed(tok, tok(text, add_special_tokens=False)["input_ids"], stop)
    assert (got, hit) == (text[: text.find(stop[0])], True)
    assert not any(stop[0] in "".join(deltas[: i + 1]) for i in range(len(deltas)))


def real_tokenizer():
    home = os.environ.get("SPECFUSE_TEST_REAL_HOME")
    path = Path(home or "/nonexistent") / "bases" / "smollm2-135m-instruct"
    if not (path / "tokenizer.json").exists():
        pytest.skip("set SPECFUSE_TEST_REAL_HOME to a home with the smollm2-135m-instruct base")
    return AutoTokenizer.from_pretrained(path)


def test_incremental_text_equals_full_decoding_with_the_real_tokenizer():
    tok = real_tokenizer()
    for text in [*TRICKY, "Hello , world . It 's a test ; isn't it ?  Spaces   kept."]:
        check_equals_full_decode(tok, tok(text, add_special_tokens=False)["input_ids"])
    gen = torch.Generator().manual_seed(1)
    check_equals_full_decode(tok, torch.randint(0, len(tok), (400,), generator=gen).tolist())
