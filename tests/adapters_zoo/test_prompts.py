"""One BOS per prompt, whether the text is plain or a rendered chat template."""

from __future__ import annotations

from transformers import GPT2TokenizerFast

from adapters_zoo.prompts import adds_bos, single_bos
from adapters_zoo.tasks.chat import render_prompt


def test_a_rendered_chat_keeps_one_bos(tokenizer):
    text = render_prompt(tokenizer, [{"role": "user", "content": "ab"}])
    assert text.startswith(tokenizer.bos_token) and adds_bos(tokenizer)
    ids = tokenizer(single_bos(tokenizer, text))["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]  # as training tokenizes a conversation
    assert tokenizer(text)["input_ids"][:2] == [tokenizer.bos_token_id] * 2  # what it fixes


def test_a_plain_prompt_gets_the_tokenizers_bos(tokenizer):
    assert single_bos(tokenizer, "ab=") == "ab="
    assert tokenizer(single_bos(tokenizer, "ab="))["input_ids"][0] == tokenizer.bos_token_id


def test_a_tokenizer_that_adds_no_bos_keeps_the_text(tmp_path):
    vocab = {"<|endoftext|>": 0, "a": 1, "b": 2}
    (tmp_path / "vocab.json").write_text(__import__("json").dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tok = GPT2TokenizerFast(vocab_file=str(tmp_path / "vocab.json"), merges_file=str(tmp_path / "merges.txt"))
    assert not adds_bos(tok)
    assert single_bos(tok, "<|endoftext|>ab") == "<|endoftext|>ab"
