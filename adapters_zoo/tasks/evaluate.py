"""Exact-match evaluation by batched greedy generation.

A completion's *answer* is its text before the end marker (the tokenizer's eos token, or
a newline). A generation is cut the same way: at the first eos token id, then at the
first newline; it scores 1 when what is left equals the answer exactly, else 0.
"""

from __future__ import annotations

import torch

from adapters_zoo.prompts import single_bos
from adapters_zoo.tasks.suites import Task, make_split

NEWLINE = "\n"


def answer_of(completion: str, eos: str | None) -> str:
    """The answer a completion asks for: text before the eos token or newline."""
    if eos and eos in completion:
        completion = completion[: completion.index(eos)]
    return completion.split(NEWLINE, 1)[0]


def exact_match(generated: str, completion: str, eos: str | None) -> bool:
    """Whether generated text (possibly running past the end marker) gives the answer."""
    return answer_of(generated, eos) == answer_of(completion, eos)


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 16, batch_size: int = 64) -> list[str]:
    """Greedy continuations of ``prompts`` (left padded, batched), cut at eos."""
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens}, {batch_size}")
    was_training, padding_side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    texts: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            texts_in = [single_bos(tokenizer, p) for p in prompts[start : start + batch_size]]
            batch = tokenizer(texts_in, return_tensors="pt", padding=True).to(device)
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=pad_id,
            )  # (B, T_prompt + T_new)
            for row in out[:, batch["input_ids"].shape[1] :].tolist():
                if tokenizer.eos_token_id in row:
                    row = row[: row.index(tokenizer.eos_token_id)]
                texts.append(tokenizer.decode(row, skip_special_tokens=True))
    finally:
        model.train(was_training)
        tokenizer.padding_side = padding_side
    return texts


def evaluate(model, tokenizer, examples: list[dict[str, str]], max_new_tokens: int = 16, batch_size: int = 64) -> float:
    """Fraction of ``examples`` whose greedy generation gives the completion's answer exactly."""
    if not examples:
        raise ValueError("evaluate needs at least one example")
    generated = generate_answers(model, tokenizer, [ex["prompt"] for ex in examples], max_new_tokens, batch_size)
    hits = sum(exact_match(g, ex["completion"], tokenizer.eos_token) for g, ex in zip(generated, examples))
    return hits / len(examples)


def evaluate_tasks(
    model,
    tokenizer,
    tasks: list[Task],
    split: str = "test",
    n: int = 100,
    seed: int = 0,
    max_new_tokens: int = 16,
    batch_size: int = 64,
) -> dict[str, float]:
    """Exact match per task on ``n`` examples of ``split``: ``{task.name: score}``."""
    return {
        task.name: evaluate(
            model,
            tokenizer,
            make_split(task, split, n, seed, eos=tokenizer.eos_token or ""),
            max_new_tokens,
            batch_size,
        )
        for task in tasks
    }
