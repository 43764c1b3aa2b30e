"""Synthetic, seeded text tasks for training and measuring adapters.

Two suites of eight tasks each (``SUITES``):

- ``conflicting``: every task reads the same kind of input (a short lowercase string)
  and answers differently; only the prefix says which task is asked, so adapters fused
  into one model fight over the same inputs.
- ``compatible``: each task reads its own kind of input (uppercase letters, digits,
  dates, addresses, brackets, ...), so a fused model could tell from the input alone.

Conventions (what ``specfuse train`` and the evaluation rely on):

- An example is ``{"prompt": "flip:abc=", "completion": "cba</s>"}``: prompt is
  ``{prefix}:{input}=``, completion is the answer followed by the end marker, which is
  the tokenizer's eos token (``EOS = "</s>"`` for the demo tokenizer, which encodes it as
  the single eos id). Answers never contain a newline, so a newline works as an end
  marker too; pass ``eos="\\n"`` to ``make_split`` for tokenizers with another eos.
- Loss is on the completion, eos included, so a trained model stops by itself.
- Evaluation is exact match of the greedy generation, cut at eos / newline, against the
  completion's answer (``evaluate``).
- Splits (``train``, ``validation``, ``test``) are disjoint: an input's split is a hash
  of the input string, the same for every task and for the demo base's pretraining.
- Each op is pretrained into the demo base under its own key (``rev:abc=cba``); suites
  ask for it under a new prefix (``flip:abc=``), so adapters elicit rather than teach.
"""

from adapters_zoo.tasks.evaluate import answer_of, evaluate, evaluate_tasks, exact_match, generate_answers
from adapters_zoo.tasks.ops import DOMAINS, OPS, Domain, Op
from adapters_zoo.tasks.suites import (
    EOS,
    SPLITS,
    SUITES,
    Task,
    make_split,
    pretraining_example,
    pretraining_tasks,
    read_jsonl,
    split_of,
    suite_tasks,
    write_jsonl,
    write_suite,
)

__all__ = [
    "DOMAINS",
    "EOS",
    "OPS",
    "SPLITS",
    "SUITES",
    "Domain",
    "Op",
    "Task",
    "answer_of",
    "evaluate",
    "evaluate_tasks",
    "exact_match",
    "generate_answers",
    "make_split",
    "pretraining_example",
    "pretraining_tasks",
    "read_jsonl",
    "split_of",
    "suite_tasks",
    "write_jsonl",
    "write_suite",
]
