"""The instruct task suites: chat shape, seeded, disjoint splits, checkers that accept the answer and nothing else."""

from __future__ import annotations

import json

import pytest

from adapters_zoo.tasks.chat import (
    CHAT_SUITES,
    chat_suite_tasks,
    chat_task,
    check,
    make_chat_split,
    prompt_messages,
    reference_answer,
)
from adapters_zoo.tasks.suites import split_of

TASKS = [t for tasks in CHAT_SUITES.values() for t in tasks]


def test_at_least_eight_tasks_in_two_suites():
    assert set(CHAT_SUITES) == {"records", "skills"}
    assert len(TASKS) >= 8 and len({t.name for t in TASKS}) == len(TASKS)
    assert all(t.suite == suite for suite, tasks in CHAT_SUITES.items() for t in tasks)


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
def test_examples_are_chat_turns_and_deterministic(task):
    a = make_chat_split(task, "train", 20, seed=3)
    assert a == make_chat_split(task, "train", 20, seed=3)
    assert a != make_chat_split(task, "train", 20, seed=4)
    for ex in a:
        user, assistant = ex["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert user["content"].strip() and assistant["content"].strip()
        assert prompt_messages(ex) == [user] and reference_answer(ex) == assistant["content"]
        assert check(task, assistant["content"], assistant["content"])


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
def test_splits_are_disjoint(task):
    splits = {s: make_chat_split(task, s, 30) for s in ("train", "validation", "test")}
    users = {s: {ex["messages"][0]["content"] for ex in exs} for s, exs in splits.items()}
    assert all(len(u) == 30 for u in users.values())
    assert not (users["train"] & users["test"]) and not (users["train"] & users["validation"])


def test_split_is_decided_by_the_input_for_every_record_task():
    """The records tasks share inputs: one order record lands in the same split for all of them."""
    records = chat_suite_tasks("records")
    inputs = {t.name: make_chat_split(t, "test", 10, seed=0) for t in records}
    for exs in inputs.values():
        for ex in exs:
            record = ex["messages"][0]["content"].split("\n\n")[0]
            assert split_of(record) == "test"
    first = [ex["messages"][0]["content"].split("\n\n")[0] for ex in inputs["contact_json"]]
    assert first == [ex["messages"][0]["content"].split("\n\n")[0] for ex in inputs["total_cents"]]


def test_records_answers_follow_the_record():
    ex = make_chat_split(chat_task("order_date_iso"), "train", 1, seed=0)[0]
    record = ex["messages"][0]["content"]
    year, month, day = reference_answer(ex).split("-")
    assert f", {year}" in record and f" {int(day)}, " in record and len(month) == 2
    cents = make_chat_split(chat_task("total_cents"), "train", 1, seed=0)[0]
    total = cents["messages"][0]["content"].split("Total: $")[1].split("\n")[0]
    assert int(total.replace(",", "").replace(".", "")) == int(reference_answer(cents))


def test_checkers():
    contact = chat_task("contact_json")
    answer = json.dumps({"name": "Ann Lee", "city": "Oslo"})
    assert check(contact, ' {"city": "Oslo", "name": "Ann Lee"}\n', answer)  # key order and spaces do not matter
    assert not check(contact, '{"name": "Ann Lee"}', answer)
    assert not check(contact, "```json\n" + answer + "\n```", answer)
    assert not check(contact, '{"name": ', answer)
    assert not check(contact, "[" * 5000, answer)  # deep nesting is a miss, not a crash
    digits = chat_task("phone_digits")
    assert check(digits, "5551234567", "5551234567") and not check(digits, "555-123-4567", "5551234567")
    bullets = chat_task("items_bullets")
    assert check(bullets, "- a\n- b\n- c", "- a\n- b\n- c") and not check(bullets, "- a\n- c\n- b", "- a\n- b\n- c")


def test_phone_answers_are_ten_digits():
    for ex in make_chat_split(chat_task("phone_digits"), "train", 50):
        answer = reference_answer(ex)
        assert len(answer) == 10 and answer.isdigit()


def test_unknown_names_are_errors():
    with pytest.raises(KeyError, match="unknown suite"):
        chat_suite_tasks("nope")
    with pytest.raises(KeyError, match="unknown task"):
        chat_task("nope")
    with pytest.raises(ValueError, match="split must be"):
        make_chat_split(TASKS[0], "dev", 1)


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
def test_every_task_has_enough_distinct_inputs_for_the_zoo(task):
    """The zoo draws up to 400 train and 100 validation / test examples per task (a real-base full build)."""
    for split, n in (("train", 400), ("validation", 100), ("test", 100)):
        assert len(make_chat_split(task, split, n)) == n
