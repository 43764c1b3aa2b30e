import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapters_zoo.demo_model import (
    CHARS,
    build_tiny_model,
    build_tokenizer,
    pretrain_base,
    save_tiny_model,
)
from adapters_zoo.tasks import EOS, generate_answers

TINY_PRETRAIN = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
}
PRETRAIN_ARGS = {"model_overrides": TINY_PRETRAIN, "progress": False, "threads": 1}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"), seed=0)


def test_tokenizer_round_trip():
    tok = build_tokenizer()
    text = "flip:a B\n~{}=9+1"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == len(text) + 1  # one token per character
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(tok(CHARS)["input_ids"], skip_special_tokens=True) == CHARS
    completion = tok("cba" + EOS, add_special_tokens=False)["input_ids"]
    assert completion[-1] == tok.eos_token_id and len(completion) == 4
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}) == 4
    assert tok("é")["input_ids"][1] == tok.unk_token_id


def test_chat_template_renders_the_task_prompt():
    tok = build_tokenizer()
    messages = [{"role": "system", "content": "ignored"}, {"role": "user", "content": "flip:abc="}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == "<s>flip:abc="
    turns = messages + [{"role": "assistant", "content": "cba"}, {"role": "user", "content": "next:ab="}]
    assert tok.apply_chat_template(turns, tokenize=False) == "<s>flip:abc=cba</s>next:ab="


def test_tiny_model_is_tiny_and_seeded():
    model = build_tiny_model(seed=0)
    assert sum(p.numel() for p in model.parameters()) < 50_000
    assert model.config.tie_word_embeddings is False
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (16, 32)  # grouped-query: not square
    same, other = build_tiny_model(seed=0), build_tiny_model(seed=1)
    for (name, p), q in zip(model.named_parameters(), same.parameters()):
        assert torch.equal(p, q), name
    assert not all(torch.equal(p, r) for p, r in zip(model.parameters(), other.parameters()))
    assert build_tiny_model(seed=0, num_hidden_layers=3).config.num_hidden_layers == 3


def test_saved_tiny_model_reloads_with_auto_classes(tiny_dir):
    assert (tiny_dir / "model.safetensors").is_file() and (tiny_dir / "tokenizer.json").is_file()
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    assert tok.padding_side == "left" and tok.eos_token == EOS and tok.chat_template
    assert tok.decode(tok("rev:abc=cba")["input_ids"], skip_special_tokens=True) == "rev:abc=cba"
    batch = tok(["flip:abc=", "x"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = build_tiny_model(seed=0)(**batch).logits
        assert torch.equal(reloaded(**batch).logits, expected)


def test_left_padded_batches_generate_as_single_prompts(tiny_dir):
    model, tok = build_tiny_model(seed=0), build_tokenizer()
    prompts = ["flip:abcdef=", "sum:1+2=", "x", "when:2024-01-31="]
    # float results may differ with batch shape; on this model no greedy token is a near-tie
    assert generate_answers(model, tok, prompts, 6, batch_size=4) == [
        generate_answers(model, tok, [p], 6, batch_size=1)[0] for p in prompts
    ]


def test_pretraining_is_deterministic_and_cached(tmp_path):
    first = pretrain_base(tmp_path / "a", seed=3, steps=4, **PRETRAIN_ARGS)
    second = pretrain_base(tmp_path / "b", seed=3, steps=4, **PRETRAIN_ARGS)
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()

    record = json.loads((first / "pretrain.json").read_text())
    assert record["settings"]["seed"] == 3 and record["settings"]["steps"] == 4
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert pretrain_base(first, seed=3, steps=4, **PRETRAIN_ARGS) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not retrained

    other = pretrain_base(first, seed=4, steps=4, **PRETRAIN_ARGS)
    assert json.loads((other / "pretrain.json").read_text())["settings"]["seed"] == 4
    assert not torch.equal(load_file(other / "model.safetensors")["lm_head.weight"], a["lm_head.weight"])
    tok = AutoTokenizer.from_pretrained(first)
    assert tok.eos_token == EOS
    with pytest.raises(ValueError, match="steps"):
        pretrain_base(tmp_path / "c", steps=0)
