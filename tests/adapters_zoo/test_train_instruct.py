"""Training fit for instruct models: EOS ends completions, chat-format lines, the routing signature."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from adapters_zoo.basis import basis_from_model
from adapters_zoo.data import IGNORE_INDEX, encode_example, load_examples, prompt_text
from adapters_zoo.errors import TrainingDataError
from adapters_zoo.models import attached
from adapters_zoo.prompts import single_bos
from adapters_zoo.signatures import signature_from_prompts, signature_of
from adapters_zoo.train import train_adapter
from adapters_zoo.train_config import TrainConfig


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, local_files_only=True).eval()
    return model, basis_from_model(model, 8)


def _write_lines(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _labelled(tokenizer, ids, labels) -> str:
    return tokenizer.decode([t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX])


# --------------------------------------------------------------------------- EOS


def test_completion_ends_with_eos_by_default(tokenizer):
    ids, labels, cut = encode_example(tokenizer, {"prompt": "ab=", "completion": "ba"}, 64)
    assert ids[-1] == tokenizer.eos_token_id and labels[-1] == tokenizer.eos_token_id and not cut
    assert _labelled(tokenizer, ids, labels) == "ba" + tokenizer.eos_token


def test_no_eos_opts_out(tokenizer):
    ids, labels, _ = encode_example(tokenizer, {"prompt": "ab=", "completion": "ba"}, 64, add_eos=False)
    assert tokenizer.eos_token_id not in ids and _labelled(tokenizer, ids, labels) == "ba"


def test_a_completion_that_ends_with_eos_gets_no_second_one(tokenizer):
    ids, _, _ = encode_example(tokenizer, {"prompt": "ab=", "completion": "ba" + tokenizer.eos_token}, 64)
    assert ids.count(tokenizer.eos_token_id) == 1 and ids[-1] == tokenizer.eos_token_id


def _greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    batch = tokenizer([single_bos(tokenizer, prompt)], return_tensors="pt")  # a rendered chat has its own BOS
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return out[0, batch["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("add_eos", [True, False])
def test_an_adapter_trained_with_eos_stops(llama, tokenizer, add_eos):
    """The same data and budget: with EOS the adapter's greedy answer stops after it; without, it runs on."""
    model, basis = llama
    examples = [{"prompt": f"{c}{d}=", "completion": "xy"} for c in "abcdefgh" for d in "abcd"]
    cfg = TrainConfig(kind="lora", kind_config={"rank": 8}, steps=60, lr=0.05, batch_size=16, add_eos=add_eos,
                      signature=False)
    adapter, _ = train_adapter(model, tokenizer, basis, examples, cfg, progress=False)
    with attached(model, adapter, basis), torch.no_grad():
        new = _greedy(model, tokenizer, "cb=", max_new_tokens=12)
    assert tokenizer.decode(new[:2]) == "xy"
    if add_eos:
        assert new[2] == tokenizer.eos_token_id and len(new) == 3
    else:
        assert tokenizer.eos_token_id not in new[:3] and len(new) == 12
    assert adapter.meta["train"]["settings"]["add_eos"] is add_eos


# --------------------------------------------------------------------------- messages


CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"},
        {"role": "assistant", "content": "ba"}, {"role": "user", "content": "cd"},
        {"role": "assistant", "content": "dc"}]


def test_messages_loss_is_on_assistant_turns_only(tokenizer):
    ids, labels, cut = encode_example(tokenizer, {"messages": CHAT}, 256)
    text = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert tokenizer.decode(ids) == text and not cut
    # Each assistant turn as the template renders it: what follows the generation prompt, up to its end.
    turns = []
    for i, turn in enumerate(CHAT):
        if turn["role"] == "assistant":
            start = len(tokenizer.apply_chat_template(CHAT[:i], tokenize=False, add_generation_prompt=True))
            turns.append(text[start:len(tokenizer.apply_chat_template(CHAT[: i + 1], tokenize=False))])
    assert _labelled(tokenizer, ids, labels) == "".join(turns)
    assert "ba" in turns[0] and "dc" in turns[1] and "ab" not in "".join(turns)


def test_prompt_text_is_the_chat_up_to_the_last_assistant_turn(tokenizer):
    expected = tokenizer.apply_chat_template(CHAT[:4], tokenize=False, add_generation_prompt=True)
    assert prompt_text(tokenizer, {"messages": CHAT}) == expected
    assert prompt_text(tokenizer, {"prompt": "ab=", "completion": "ba"}) == "ab="


def test_messages_files_load(tmp_path):
    path = _write_lines(tmp_path / "chat.jsonl", [{"messages": CHAT}, {"messages": CHAT[1:3]}])
    assert load_examples(path) == [{"messages": CHAT}, {"messages": CHAT[1:3]}]


@pytest.mark.parametrize("records,message", [
    ([{"prompt": "a", "completion": "b"}, {"messages": CHAT}], r":2: a 'messages' example in a file of 'prompt'"),
    ([{"messages": CHAT}, {"messages": CHAT}, {"prompt": "a", "completion": "b"}],
     r":3: a 'prompt' example in a file of 'messages'"),
    ([{"messages": []}], r":1: 'messages' must be a non-empty list"),
    ([{"messages": [{"role": "user"}]}], r":1: messages\[0\] must be an object with string 'role' and 'content'"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], r":1: no assistant turn"),
])
def test_bad_messages_files_name_the_line(tmp_path, records, message):
    with pytest.raises(TrainingDataError, match=message):
        load_examples(_write_lines(tmp_path / "bad.jsonl", records))


def test_messages_without_a_chat_template_name_the_line(tmp_path, llama, tokenizer):
    model, basis = llama
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    examples = load_examples(_write_lines(tmp_path / "chat.jsonl", [{"messages": CHAT}] * 3))
    with pytest.raises(TrainingDataError, match=r"chat\.jsonl:1: .*no chat template"):
        train_adapter(model, plain, basis, examples, TrainConfig(steps=1), progress=False)


def test_an_adapter_learns_from_messages(llama, tokenizer):
    model, basis = llama
    examples = [{"messages": [{"role": "user", "content": f"{c}{d}"}, {"role": "assistant", "content": "ok"}]}
                for c in "abcdefgh" for d in "abcd"]
    cfg = TrainConfig(kind="lora", kind_config={"rank": 8}, steps=60, lr=0.05, batch_size=16)
    adapter, stats = train_adapter(model, tokenizer, basis, examples, cfg, progress=False)
    assert stats.final_loss < stats.first_loss / 4
    prompt = prompt_text(tokenizer, {"messages": [{"role": "user", "content": "hd"}, {"role": "assistant",
                                                                                      "content": ""}]})
    with attached(model, adapter, basis), torch.no_grad():
        new = _greedy(model, tokenizer, prompt, max_new_tokens=8)
    assert tokenizer.decode(new, skip_special_tokens=True).startswith("ok")


# --------------------------------------------------------------------------- signature


def test_train_stores_the_routing_signature(llama, tokenizer):
    model, basis = llama
    examples = [{"prompt": f"{c}=", "completion": "z"} for c in "abcdefgh"]
    adapter, _ = train_adapter(model, tokenizer, basis, examples, TrainConfig(steps=2), progress=False)
    stored = signature_of(adapter.meta, basis.fingerprint, model.config.hidden_size)
    assert stored is not None and adapter.meta["signature_model"] == basis.fingerprint
    expected = signature_from_prompts(model, tokenizer, [ex["prompt"] for ex in examples])
    torch.testing.assert_close(stored, expected, atol=1e-5, rtol=0)
    bare, _ = train_adapter(model, tokenizer, basis, examples, TrainConfig(steps=2, signature=False), progress=False)
    assert "signature" not in bare.meta
