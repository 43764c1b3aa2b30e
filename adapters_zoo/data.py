"""Training data: JSON Lines read and checked, encoded into token ids with their labels, padded.

    {"prompt": ..., "completion": ...}      loss on the completion (it ends with the tokenizer's EOS)
    {"messages": [{"role", "content"}, ...]}  rendered with the model's chat template, loss on the assistant turns

Labels are the token's id where there is a loss and ``IGNORE_INDEX`` where there is none (the
prompt, other turns, padding). Every problem with a file is a :class:`TrainingDataError`
naming the file and line. :func:`pad_batch` is the one way a batch is padded: right for
training, left for generation (serving pads its prompts with it too).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from adapters_zoo.errors import TrainingDataError

IGNORE_INDEX = -100  # label of prompt and padding tokens: no loss there

Example = dict[str, Any]  # {prompt, completion} or {messages}


def load_examples(path: str | Path, need_completion: bool = True) -> list[Example]:
    """Read a JSON Lines training file, checking every line.

    Two shapes, as TRL reads them, one per file: ``{"prompt", "completion"}`` and
    ``{"messages": [{"role", "content"}, ...]}`` (rendered with the model's chat template;
    the loss on the assistant turns). With ``need_completion=False`` (preserve files) a
    prompt line needs only ``prompt`` and a messages line any turns. The list returned
    carries ``.where`` (``file:line`` of each example) so later errors name the line.
    """
    path = Path(path)
    if not path.is_file():
        raise TrainingDataError(f"{path}: training file not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise TrainingDataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    examples = ExampleList()
    shape: tuple[str, int] | None = None  # (shape of the first example, its line)
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as err:
            reason = f"{err.msg} at column {err.colno}" if isinstance(err, json.JSONDecodeError) else "nested too deep"
            raise TrainingDataError(f"{where}: not valid JSON ({reason})") from None
        if not isinstance(record, dict):
            raise TrainingDataError(f"{where}: expected an object with 'prompt' and 'completion', or 'messages', "
                                    f"got {type(record).__name__}")
        this = "messages" if "messages" in record else "prompt"
        if shape is None:
            shape = (this, lineno)
        elif this != shape[0]:
            raise TrainingDataError(f"{where}: a {this!r} example in a file of {shape[0]!r} examples (line "
                                    f"{shape[1]}): use one shape per file")
        example = _messages_example(record, where, need_completion) if this == "messages" else \
            _prompt_example(record, where, need_completion)
        examples.append(example)
        examples.where.append(where)
    if not examples:
        raise TrainingDataError(f"{path}: no examples (the file is empty)")
    return examples


class ExampleList(list):
    """Examples read from a file, with ``where[i]`` = ``file:line`` of example i."""

    def __init__(self, *args):
        super().__init__(*args)
        self.where: list[str] = []


def encode_examples(tokenizer, examples: list[Example], max_length: int, add_eos: bool = True):
    """encode_example over ``examples``; an error names the file and line of the example (when known)."""
    where = getattr(examples, "where", None)
    encoded = []
    for i, ex in enumerate(examples):
        try:
            encoded.append(encode_example(tokenizer, ex, max_length, add_eos))
        except TrainingDataError as err:
            raise TrainingDataError(f"{where[i]}: {err}" if where else str(err)) from None
    return encoded


def _prompt_example(record: dict, where: str, need_completion: bool) -> Example:
    keys = ("prompt", "completion") if need_completion else ("prompt",)
    for key in keys:
        if key not in record:
            raise TrainingDataError(f"{where}: missing key {key!r}")
    for key in ("prompt", "completion"):
        if key in record and not isinstance(record[key], str):
            raise TrainingDataError(f"{where}: {key!r} must be a string, got {type(record[key]).__name__}")
    if need_completion and not record["completion"]:
        raise TrainingDataError(f"{where}: 'completion' is empty (the loss is on the completion)")
    return {k: record[k] for k in ("prompt", "completion") if k in record}


def _messages_example(record: dict, where: str, need_completion: bool) -> Example:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise TrainingDataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    for i, turn in enumerate(messages):
        if not (isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)):
            raise TrainingDataError(f"{where}: messages[{i}] must be an object with string 'role' and 'content'")
    if need_completion and not any(turn["role"] == "assistant" for turn in messages):
        raise TrainingDataError(f"{where}: no assistant turn (the loss is on the assistant turns)")
    return {"messages": [{"role": t["role"], "content": t["content"]} for t in messages]}


def _chat_template(tokenizer, example: Example):
    if not getattr(tokenizer, "chat_template", None):
        raise TrainingDataError("a 'messages' example, but the model's tokenizer has no chat template "
                                "(use prompt/completion lines)")
    return tokenizer.apply_chat_template


def prompt_text(tokenizer, example: Example) -> str:
    """What the model reads before it answers: the prompt, or the chat up to the last assistant turn."""
    if "messages" not in example:
        return example["prompt"]
    render = _chat_template(tokenizer, example)
    turns = example["messages"]
    last = max((i for i, t in enumerate(turns) if t["role"] == "assistant"), default=len(turns))
    return render(turns[:last], tokenize=False, add_generation_prompt=True)


def encode_example(
    tokenizer, example: Example, max_length: int, add_eos: bool = True
) -> tuple[list[int], list[int], bool]:
    """(input ids, labels, truncated): labels are −100 where there is no loss, the token's id where there is.

    prompt/completion: the loss on the completion, which ends with the tokenizer's EOS unless
    ``add_eos`` is False (or the completion already ends with it). messages: the loss on
    every assistant turn as the chat template renders it (its end-of-turn token included).
    """
    if "messages" in example:
        return _encode_messages(tokenizer, example, max_length)
    prompt = tokenizer(example["prompt"])["input_ids"]  # with the tokenizer's BOS, as at inference
    completion = tokenizer(example.get("completion", ""), add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if add_eos and completion and eos is not None and completion[-1] != eos:
        completion = completion + [eos]
    _check_prompt_fits(len(prompt), max_length, example)
    ids = (prompt + completion)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt) + completion)[:max_length]
    return ids, labels, len(prompt) + len(completion) > max_length


def _check_prompt_fits(prompt_tokens: int, max_length: int, example: Example) -> None:
    if prompt_tokens >= max_length:
        raise TrainingDataError(
            f"a prompt of {prompt_tokens} tokens leaves no room for its completion within "
            f"max_length={max_length}: {str(example.get('prompt', ''))[:60]!r}"
        )


def _encode_messages(tokenizer, example: Example, max_length: int) -> tuple[list[int], list[int], bool]:
    """Render the whole chat once; label the characters of each assistant turn (found by rendering the
    chat up to it with and without that turn), then the tokens whose text starts inside those spans."""
    render = _chat_template(tokenizer, example)
    turns = example["messages"]
    text = render(turns, tokenize=False)
    spans = []
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        start = len(render(turns[:i], tokenize=False, add_generation_prompt=True)) if i else 0
        end = len(render(turns[: i + 1], tokenize=False))
        if text[:end] != render(turns[: i + 1], tokenize=False) or start > end:
            raise TrainingDataError("the chat template does not render turn by turn "
                                    "(a prefix of the chat is not a prefix of its text)")
        spans.append((start, end))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [tok if any(s <= a < e for s, e in spans) else IGNORE_INDEX for tok, (a, _) in zip(ids, offsets)]
    first = next((i for i, lab in enumerate(labels) if lab != IGNORE_INDEX), len(ids))
    _check_prompt_fits(first, max_length, example)
    return ids[:max_length], labels[:max_length], len(ids) > max_length


def pad_batch(
    rows: list[tuple[list[int], list[int]]], pad_id: int, device, left: bool = False
) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask / labels, each (B, T): right padded (training), or left padded (generation)."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        real = slice(width - len(ids), width) if left else slice(0, len(ids))
        input_ids[i, real] = torch.tensor(ids, dtype=torch.long)
        labels[i, real.start : real.start + len(lab)] = torch.tensor(lab, dtype=torch.long)
        attention_mask[i, real] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}


def pad_id_of(tokenizer) -> int:
    for pad in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if pad is not None:
            return pad
    return 0  # padded positions are masked out and carry no loss: any id works
