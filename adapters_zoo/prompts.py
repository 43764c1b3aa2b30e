"""Prompt text to token ids, one BOS however the text was made.

A chat template renders its own special tokens, BOS included on Llama- and Gemma-style
templates, and the tokenizer adds BOS again unless told not to; a prompt that starts
with two BOS tokens is one the model never saw in training (``data.encode_example``
tokenizes a rendered conversation without special tokens). Every place that tokenizes a
prompt it may have rendered (evaluation, signatures, scoring) passes it through
:func:`single_bos` first: a plain prompt gets the tokenizer's BOS, a rendered one keeps its own.
"""

from __future__ import annotations


def adds_bos(tokenizer) -> bool:
    """Whether ``tokenizer(text)`` puts its BOS token in front of the text."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("")["input_ids"][:1] == [bos]


def single_bos(tokenizer, text: str) -> str:
    """``text`` without a leading BOS token string when the tokenizer adds one itself."""
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and adds_bos(tokenizer):
        return text[len(bos):]
    return text
