"""Exact-match scoring of a model on task examples: by generation (reported) and teacher-forced (selection).

Two ways to ask "does greedy decoding give the answer exactly":

- ``generation_hits``: what ``adapters_zoo.tasks.evaluate`` does (batched greedy
  ``generate``, cut at eos then newline, exact match). Every reported test number uses it.
- ``teacher_forced_hits``: one forward pass over prompt + answer. Greedy decoding yields the
  answer iff at every answer position the argmax is the answer's next token and, after the
  last one, the argmax ends the answer (eos or newline). That is the same test without 16
  sequential decoding steps (≈10× cheaper); it is used to choose hyperparameters on the
  validation split. It can differ from generation only on near-ties (batch shapes differ)
  and when greedy decoding emits a special token that decoding drops; the test suite
  checks the two agree on real adapters.

``merged_weights`` adds an adapter's dense ΔW into the model for a block and restores the
exact original weights afterwards: a fused model costs nothing more to run than the base.
"""

from __future__ import annotations

import torch

from adapters_zoo.basis import Basis
from adapters_zoo.format import Adapter
from adapters_zoo.tasks import answer_of, exact_match, generate_answers
from fusion.merge import merged

MAX_NEW_TOKENS = 16  # what the zoo's evaluation allows: every answer is shorter
GENERATION_BATCH = 256  # rows per generate call (the demo model is tiny: bigger batches, fewer steps)
FORWARD_BATCH = 512

Example = dict[str, str]


def merged_weights(model: torch.nn.Module, adapter: Adapter | None, basis: Basis):
    """``model`` with W + ΔW(adapter) for a block, W restored bit for bit after (``fusion.merge.merged``)."""
    return merged(model, adapter, basis)


def generation_hits(model, tokenizer, examples: list[Example], max_new_tokens: int = MAX_NEW_TOKENS,
                    batch_size: int = GENERATION_BATCH) -> list[bool]:
    """Per example: greedy generation gives the completion's answer exactly (as ``evaluate`` scores it)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["prompt"]))  # less padding per batch
    texts = generate_answers(model, tokenizer, [examples[i]["prompt"] for i in order], max_new_tokens, batch_size)
    hits = [False] * len(examples)
    for i, text in zip(order, texts):
        hits[i] = exact_match(text, examples[i]["completion"], tokenizer.eos_token)
    return hits


def _stop_ids(tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    newline = tokenizer.convert_tokens_to_ids("\n")
    if newline is not None and newline != tokenizer.unk_token_id:
        ids.add(newline)
    return {i for i in ids if i is not None}


@torch.inference_mode()
def teacher_forced_hits(model, tokenizer, examples: list[Example], max_new_tokens: int = MAX_NEW_TOKENS,
                        batch_size: int = FORWARD_BATCH) -> list[bool]:
    """Per example: the greedy answer is exact, read off one forward pass over prompt + answer."""
    stop = _stop_ids(tokenizer)
    stop_t = torch.tensor(sorted(stop))
    rows = []
    for ex in examples:
        prompt = tokenizer(ex["prompt"])["input_ids"]  # with BOS, as generation sees it
        answer = tokenizer(answer_of(ex["completion"], tokenizer.eos_token), add_special_tokens=False)["input_ids"]
        rows.append((prompt, answer))
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))  # less padding per batch
    hits = [False] * len(rows)
    try:
        for start in range(0, len(rows), batch_size):
            index = order[start : start + batch_size]
            chunk = [rows[i] for i in index]
            width = max(len(p) + len(a) for p, a in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, (p, a) in enumerate(chunk):  # right padded: real tokens never see the padding
                ids[i, : len(p) + len(a)] = torch.tensor(p + a)
                mask[i, : len(p) + len(a)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # (B, T, V)
            predicted = logits.argmax(-1).cpu()  # (B, T): token t predicts position t + 1
            for i, (p, a) in enumerate(chunk):
                if len(a) > max_new_tokens:
                    continue  # generation stops before the answer ends: a miss
                guess = predicted[i, len(p) - 1 : len(p) + len(a)]  # (len(a) + 1,)
                ok = guess[: len(a)].tolist() == a
                if ok and len(a) < max_new_tokens:  # the answer must also end there
                    ok = bool(torch.isin(guess[len(a)], stop_t))
                hits[index[i]] = ok
    finally:
        model.train(was_training)
    return hits


def accuracy(hits: list[bool]) -> float:
    return sum(hits) / len(hits) if hits else 0.0
