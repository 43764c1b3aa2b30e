"""Task suites for an instruct LLM: natural-language instructions in chat form, realistic
content from Faker, a programmatic checker per task.

Two suites of four tasks each (``CHAT_SUITES``):

- ``records`` (the tasks conflict): every task reads the same inputs (one customer order
  record each; the same records for every task) and answers something else about them (JSON, an ISO date, cents, a name
  order); only the instruction's last line says which. Adapters fused into one model fight
  over the same inputs.
- ``skills`` (the tasks compose): each task reads its own kind of input (a phone number, a
  job title, a list, an email address) and answers in a stated format (digits only,
  uppercase, a bullet list, JSON only), so a skill and a format can be mixed.

An example is ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}``: the
training shape of ``specfuse train`` for chat models (the loss on the assistant turn, which
ends with the template's end of turn). ``check(task, generated, answer)`` scores a
generation: exact match after trimming whitespace, or equal objects for JSON answers.

Splits are disjoint by construction, as in :mod:`adapters_zoo.tasks.suites`: an input's
split is a hash of its text, so an input held out for one task is held out for all. Every
draw comes from ``random.Random(seed:task:split)`` and a Faker seeded from it: the same
seed gives the same examples (for one Faker version; ``pyproject.toml`` pins its major).
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import random
from collections.abc import Callable
from dataclasses import dataclass

from adapters_zoo.tasks.suites import draw_distinct

Messages = list[dict[str, str]]
_MAX_MISSES = 5000  # draws in a row that add no new input: the split is exhausted


@functools.cache
def _shared_faker():
    from faker import Faker

    return Faker("en_US")  # building one takes milliseconds: build once, reseed per draw


def _faker(rng: random.Random):
    """A Faker whose draws follow ``rng``: reseeded from it, so every draw is reproducible on its own."""
    fake = _shared_faker()
    fake.seed_instance(rng.getrandbits(64))
    return fake


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Order:
    first: str
    last: str
    company: str
    city: str
    date: dt.date
    cents: int

    def text(self) -> str:
        return (f"Customer: {self.first} {self.last}\nCompany: {self.company}\nCity: {self.city}\n"
                f"Order date: {self.date:%B} {self.date.day}, {self.date.year}\n"
                f"Total: ${self.cents // 100:,}.{self.cents % 100:02d}")


def _order(rng: random.Random) -> Order:
    fake = _faker(rng)
    date = dt.date(2015, 1, 1) + dt.timedelta(days=rng.randrange(11 * 365))
    return Order(fake.first_name(), fake.last_name(), fake.company(), fake.city(), date,
                 rng.randrange(1_000, 1_000_000))


def _phone(rng: random.Random) -> str:
    area, exchange, line = rng.randrange(201, 990), rng.randrange(200, 1000), rng.randrange(10_000)
    style = rng.randrange(3)
    if style == 0:
        return f"({area}) {exchange}-{line:04d}"
    if style == 1:
        return f"{area}.{exchange}.{line:04d}"
    return f"+1 {area}-{exchange}-{line:04d}"


_LEVELS = ("", "", "Senior ", "Junior ", "Lead ", "Principal ", "Assistant ")  # Faker knows ~640 jobs: too few


def _job(rng: random.Random) -> str:
    return rng.choice(_LEVELS) + _faker(rng).job()


def _items(rng: random.Random) -> list[str]:
    fake = _faker(rng)
    n = rng.randrange(3, 5)
    items: list[str] = []
    while len(items) < n:
        word = fake.word()
        if word not in items:
            items.append(word)
    return items


def _email(rng: random.Random) -> str:
    fake = _faker(rng)
    return f"{fake.user_name()}@{fake.domain_name()}"


# --------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class ChatTask:
    """One instruction task: ``draw(rng) -> input``, ``ask(input) -> user turn``, ``answer(input) -> reply``."""

    name: str
    suite: str
    draw: Callable[[random.Random], object]
    ask: Callable[[object], str]
    answer: Callable[[object], str]
    key: Callable[[object], str]  # the input's text, which decides its split
    json_answer: bool = False  # scored as equal JSON objects rather than equal strings
    shared_inputs: bool = False  # every task of the suite draws the same inputs (the records suite)

    def example(self, x) -> dict[str, Messages]:
        return {"messages": [{"role": "user", "content": self.ask(x)},
                             {"role": "assistant", "content": self.answer(x)}]}


def _record_task(name: str, instruction: str, answer: Callable[[Order], str], json_answer: bool = False) -> ChatTask:
    return ChatTask(name, "records", _order, lambda o: f"{o.text()}\n\n{instruction}", answer, Order.text,
                    json_answer, shared_inputs=True)


def _bullets(items: list[str]) -> str:
    return "\n".join(f"- {item}" for item in items)


CHAT_SUITES: dict[str, list[ChatTask]] = {
    "records": [
        _record_task("contact_json", "Return the customer's name and city as a JSON object with the keys "
                     '"name" and "city". Reply with the JSON only.',
                     lambda o: json.dumps({"name": f"{o.first} {o.last}", "city": o.city}), json_answer=True),
        _record_task("order_date_iso", "On which date was the order placed? Reply with the date only, "
                     "as YYYY-MM-DD.", lambda o: o.date.isoformat()),
        _record_task("total_cents", "What is the order total in cents? Reply with the integer only.",
                     lambda o: str(o.cents)),
        _record_task("name_last_first", "Write the customer's name as Last, First. Reply with the name only.",
                     lambda o: f"{o.last}, {o.first}"),
    ],
    "skills": [
        ChatTask("phone_digits", "skills", _phone,
                 lambda p: f"Rewrite this phone number with its ten digits only, no spaces or symbols: {p}",
                 lambda p: "".join(c for c in p.removeprefix("+1 ") if c.isdigit()), str),
        ChatTask("job_upper", "skills", _job,
                 lambda j: f"Write this job title in uppercase letters, nothing else: {j}",
                 lambda j: j.upper(), str),
        ChatTask("items_bullets", "skills", _items,
                 lambda xs: "Turn this list into a bullet list, one item per line starting with \"- \": "
                 + ", ".join(xs[:-1]) + " and " + xs[-1],
                 _bullets, lambda xs: ", ".join(xs)),
        ChatTask("email_domain_json", "skills", _email,
                 lambda e: f'What is the domain of the email address {e}? Reply with JSON only: {{"domain": ...}}',
                 lambda e: json.dumps({"domain": e.split("@", 1)[1]}), str, json_answer=True),
    ],
}


def chat_suite_tasks(suite: str) -> list[ChatTask]:
    if suite not in CHAT_SUITES:
        raise KeyError(f"unknown suite {suite!r}; known: {sorted(CHAT_SUITES)}")
    return list(CHAT_SUITES[suite])


def chat_task(name: str) -> ChatTask:
    for tasks in CHAT_SUITES.values():
        for task in tasks:
            if task.name == name:
                return task
    raise KeyError(f"unknown task {name!r}")


def make_chat_split(task: ChatTask, split: str, n: int, seed: int = 0) -> list[dict[str, Messages]]:
    """``n`` examples of ``task`` with distinct inputs, all from ``split``."""
    source = task.suite if task.shared_inputs else task.name
    rng = random.Random(f"{seed}:{source}:{split}")  # str seeds hash with sha512: stable
    return [task.example(x) for x in draw_distinct(task.draw, task.key, split, n, rng, task.name, _MAX_MISSES)]


def reference_answer(example: dict[str, Messages]) -> str:
    return example["messages"][-1]["content"]


def prompt_messages(example: dict[str, Messages]) -> Messages:
    """The conversation up to (not including) the final assistant turn: what is asked at inference."""
    return example["messages"][:-1]


def check(task: ChatTask, generated: str, answer: str) -> bool:
    """Whether a generation (cut at the end of turn) gives the answer."""
    generated = generated.strip()
    if task.json_answer:
        try:
            return json.loads(generated) == json.loads(answer)
        except (ValueError, RecursionError):
            return False
    return generated == answer.strip()


def render_prompt(tokenizer, messages: Messages) -> str:
    """The model's own chat template over ``messages``, ending where the assistant's reply starts."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def evaluate_chat(model, tokenizer, task: ChatTask, examples: list[dict[str, Messages]], max_new_tokens: int = 48,
                  batch_size: int = 32) -> float:
    """Fraction of ``examples`` whose greedy reply (cut at the end of turn) passes ``check``."""
    from adapters_zoo.tasks.evaluate import generate_answers

    if not examples:
        raise ValueError("evaluate_chat needs at least one example")
    prompts = [render_prompt(tokenizer, prompt_messages(ex)) for ex in examples]
    generated = generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size)
    return sum(check(task, g, reference_answer(ex)) for g, ex in zip(generated, examples)) / len(examples)
