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

Chat examples (``{"messages": [...]}``, the real base's suites) are scored the same two
ways under the model's chat template: ``chat_generation_hits`` decodes greedily and asks the
task's checker (``adapters_zoo.tasks.chat.check``: exact after trimming, or equal JSON);
``chat_forced_hits`` reads off one forward pass whether every answer token and then the end
of turn are the argmax. The forward test is stricter where the checker is lenient (a JSON
answer spelled another way, surrounding whitespace), so it only selects; reported chat
numbers come from generation.

``merged_weights`` adds an adapter's dense ΔW into the model for a block and restores the
exact original weights afterwards: a fused model costs nothing more to run than the base.
``LowPrecisionTwin`` scores a merged model in bfloat16: the merge stays in float32, the
twin receives a rounded copy of the merged weights (AMX matmuls, ~2–3× faster on CPU).
"""

from __future__ import annotations

import torch

from adapters_zoo.basis import Basis
from adapters_zoo.format import Adapter
from adapters_zoo.prompts import single_bos
from adapters_zoo.tasks import answer_of, exact_match, generate_answers
from adapters_zoo.tasks.chat import ChatTask, check, prompt_messages, reference_answer, render_prompt
from fusion.merge import merged

MAX_NEW_TOKENS = 16  # what the zoo's evaluation allows: every answer is shorter
CHAT_MAX_NEW_TOKENS = 48  # the real-base zoo's evaluation (ZooSettings.max_new_tokens)
CHAT_BATCH = 50  # rows per generate / forward call on the real base (a whole test split)
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


def teacher_forced_hits(model, tokenizer, examples: list[Example], max_new_tokens: int = MAX_NEW_TOKENS,
                        batch_size: int = FORWARD_BATCH) -> list[bool]:
    """Per example: the greedy answer is exact, read off one forward pass over prompt + answer."""
    rows = []
    for ex in examples:
        prompt = tokenizer(ex["prompt"])["input_ids"]  # with BOS, as generation sees it
        answer = tokenizer(answer_of(ex["completion"], tokenizer.eos_token), add_special_tokens=False)["input_ids"]
        rows.append((prompt, answer))
    return _forced_hits(model, rows, _stop_ids(tokenizer), _pad_id(tokenizer), max_new_tokens, batch_size)


def chat_forced_hits(model, tokenizer, examples: list[dict], max_new_tokens: int = CHAT_MAX_NEW_TOKENS,
                     batch_size: int = CHAT_BATCH) -> list[bool]:
    """Per chat example: greedy decoding under the chat template gives the reference answer's tokens, then the
    end of turn (unless the budget ends with the answer: generation stops there too)."""
    rows = []
    for ex in examples:
        text = single_bos(tokenizer, render_prompt(tokenizer, prompt_messages(ex)))
        prompt = tokenizer(text)["input_ids"]  # as generation sees it
        rows.append((prompt, tokenizer(reference_answer(ex), add_special_tokens=False)["input_ids"]))
    return _forced_hits(model, rows, {tokenizer.eos_token_id}, _pad_id(tokenizer), max_new_tokens, batch_size)


def chat_generation_hits(model, tokenizer, task: ChatTask, examples: list[dict],
                         max_new_tokens: int = CHAT_MAX_NEW_TOKENS, batch_size: int = CHAT_BATCH) -> list[bool]:
    """Per chat example: the greedy reply (cut at the end of turn) passes the task's checker."""
    prompts = [render_prompt(tokenizer, prompt_messages(ex)) for ex in examples]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # less padding per batch
    texts = generate_answers(model, tokenizer, [prompts[i] for i in order], max_new_tokens, batch_size)
    hits = [False] * len(examples)
    for i, text in zip(order, texts):
        hits[i] = check(task, text, reference_answer(examples[i]))
    return hits


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@torch.inference_mode()
def _forced_hits(model, rows: list[tuple[list[int], list[int]]], stop: set[int], pad: int, max_new_tokens: int,
                 batch_size: int) -> list[bool]:
    """Per (prompt ids, target ids): the argmax at every target position is the target token and, when the
    budget allows one more token, the argmax after the target is one of ``stop`` (the answer ends there)."""
    stop_t = torch.tensor(sorted(stop), dtype=torch.long)
    device = next(model.parameters()).device
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


class LowPrecisionTwin:
    """A bfloat16 copy of a model that scores its current (merged) weights: ``twin.of(model)``.

    Merges and restores happen on the float32 model, exactly; the twin copies its weights
    (rounded) before each scoring, ~0.2 s for the real base. A PeftModel's merged weights are
    read through its LoRA wrappers (``base_layer``), its LoRA factors ignored (merged already).
    """

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16):
        """``model``: a plain transformers model (not PEFT-wrapped) of the architecture to score."""
        import copy

        self.dtype = dtype
        self.model = copy.deepcopy(model).to(dtype).eval()

    @torch.no_grad()
    def of(self, model: torch.nn.Module) -> torch.nn.Module:
        state = {k.replace(".base_layer.", "."): v for k, v in _plain(model).state_dict().items() if "lora_" not in k}
        self.model.load_state_dict(state, strict=True)
        return self.model


def _plain(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PeftModel wrapper (itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
