import json
import random

import pytest

from adapters_zoo.demo_model import build_tiny_model, build_tokenizer
from adapters_zoo.tasks import (
    EOS,
    OPS,
    SPLITS,
    SUITES,
    answer_of,
    evaluate,
    evaluate_tasks,
    exact_match,
    make_split,
    pretraining_example,
    pretraining_tasks,
    read_jsonl,
    split_of,
    suite_tasks,
    write_jsonl,
    write_suite,
)
from adapters_zoo.tasks.ops import (
    cipher,
    close_brackets,
    count_stars,
    double,
    host_of,
    keep_digits,
    match_brackets,
    reformat_date,
    reverse,
    rotate,
    shift,
    sort_chars,
    swap_pairs,
    upper,
    user_of,
)

ALL_TASKS = [task for tasks in SUITES.values() for task in tasks]


def _input_of(example: dict[str, str]) -> str:
    return example["prompt"].split(":", 1)[1][:-1]


@pytest.mark.parametrize(
    "fn, x, expected",
    [
        (reverse, "abc", "cba"),
        (shift, "xyz", "yza"),
        (upper, "abc", "ABC"),
        (cipher, "abz", "qwm"),
        (double, "ab", "aabb"),
        (sort_chars, "cab", "abc"),
        (rotate, "abcd", "bcda"),
        (swap_pairs, "abcde", "badce"),
        (count_stars, "*-**-", "3"),
        (reformat_date, "2023-04-05", "05/04/2023"),
        (host_of, "ann@mail.org", "mail.org"),
        (close_brackets, "([<{", "}>])"),
        (keep_digits, "a1b22c", "122"),
        (match_brackets, "([<{", ")]>}"),
        (user_of, "ann@mail.org", "ann"),
    ],
)
def test_ops(fn, x, expected):
    assert fn(x) == expected


def test_suites_have_eight_distinct_tasks_with_new_prefixes():
    for suite in SUITES:
        tasks = suite_tasks(suite)
        assert len(tasks) == 8
        assert len({t.name for t in tasks}) == len({t.prefix for t in tasks}) == 8
        for task in tasks:  # a suite prefix is never the op's pretraining key
            assert not any(task.prefix.startswith(key) for key in OPS), task.prefix
    with pytest.raises(KeyError, match="unknown suite"):
        suite_tasks("nope")


def test_conflicting_tasks_share_inputs_and_disagree():
    tasks = suite_tasks("conflicting")
    assert len({t.domain.name for t in tasks}) == 1
    x = "kqmfa"
    assert len({t.fn(x) for t in tasks}) == 8


def test_compatible_tasks_have_distinct_input_domains():
    tasks = suite_tasks("compatible")
    assert len({t.domain.name for t in tasks}) == 8
    charsets = {t.name: {c for ex in make_split(t, "train", 50) for c in _input_of(ex)} for t in tasks}
    # no task's inputs fit inside another's alphabet unless the shapes differ (date vs digits)
    assert charsets["reverse_upper"].isdisjoint(charsets["shift_lower"] | charsets["sort_digits"])
    assert charsets["count_stars"].isdisjoint(charsets["close_brackets"])


def test_examples_follow_the_convention():
    for task in ALL_TASKS:
        for ex in make_split(task, "train", 5, seed=3):
            assert set(ex) == {"prompt", "completion"}
            assert ex["prompt"].startswith(task.prefix + ":") and ex["prompt"].endswith("=")
            assert ex["completion"] == task.fn(_input_of(ex)) + EOS
            assert "\n" not in ex["completion"]


def test_generation_is_deterministic_for_a_seed():
    task = SUITES["conflicting"][0]
    assert make_split(task, "train", 30, seed=7) == make_split(task, "train", 30, seed=7)
    assert make_split(task, "train", 30, seed=7) != make_split(task, "train", 30, seed=8)


def test_splits_are_disjoint_and_distinct():
    for task in ALL_TASKS:
        inputs = {split: [_input_of(ex) for ex in make_split(task, split, 60, seed=1)] for split in SPLITS}
        for split, xs in inputs.items():
            assert len(set(xs)) == len(xs)
            assert all(split_of(x) == split for x in xs)
        assert not set(inputs["train"]) & set(inputs["validation"])
        assert not set(inputs["train"]) & set(inputs["test"])
        assert not set(inputs["validation"]) & set(inputs["test"])


def test_pretraining_covers_every_task_on_train_inputs_only():
    tasks = pretraining_tasks()
    pairs = {(t.op.key, t.domain.name) for t in tasks}
    assert pairs >= {(t.op.key, t.domain.name) for t in ALL_TASKS}
    for domain in {t.domain.name for t in ALL_TASKS}:  # no input kind implies its op
        assert len({key for key, d in pairs if d == domain}) >= 2, domain
    assert len({t.name for t in tasks}) == len(tasks)
    assert all(t.prefix == t.op.key for t in tasks)
    rng = random.Random(0)
    for task in tasks:
        ex = pretraining_example(task, rng)
        assert ex["prompt"].startswith(task.op.key + ":")
        assert split_of(_input_of(ex)) == "train"


def test_make_split_refuses_more_than_a_domain_holds():
    close = next(t for t in ALL_TASKS if t.name == "close_brackets")  # 4^2 + ... + 4^6 inputs
    with pytest.raises(ValueError, match="distinct test inputs"):
        make_split(close, "test", 600)
    with pytest.raises(ValueError, match="split must be"):
        make_split(close, "dev", 1)


def test_jsonl_round_trip(tmp_path):
    examples = make_split(SUITES["compatible"][4], "validation", 10)
    path = write_jsonl(tmp_path / "a" / "date.jsonl", examples)
    assert read_jsonl(path) == examples
    first = json.loads(path.read_text().splitlines()[0])
    assert set(first) == {"prompt", "completion"}
    written = write_suite(tmp_path / "suite", "conflicting", {"train": 20, "test": 5}, seed=2)
    assert set(written) == {t.name for t in SUITES["conflicting"]}
    assert len(read_jsonl(written["reverse"]["test"])) == 5


@pytest.mark.parametrize(
    "generated, completion, hit",
    [
        ("cba", "cba</s>", True),
        ("cba</s>junk", "cba</s>", True),
        ("cba\nmore", "cba</s>", True),
        ("cba\n", "cba\n", True),
        ("cb", "cba</s>", False),
        ("cbaa", "cba</s>", False),
        (" cba", "cba</s>", False),
        ("", "</s>", True),
    ],
)
def test_exact_match(generated, completion, hit):
    assert exact_match(generated, completion, EOS) is hit


def test_answer_of_without_eos():
    assert answer_of("12\n", None) == "12"
    assert answer_of("12", "") == "12"


def test_evaluate_on_a_tiny_random_model():
    model, tokenizer = build_tiny_model(seed=0), build_tokenizer()
    examples = make_split(SUITES["conflicting"][0], "test", 10)
    score = evaluate(model, tokenizer, examples, max_new_tokens=8, batch_size=4)
    assert 0.0 <= score <= 1.0
    assert tokenizer.padding_side == "left" and not model.training
    scores = evaluate_tasks(model, tokenizer, SUITES["compatible"][:2], n=4, max_new_tokens=4)
    assert set(scores) == {"reverse_upper", "sort_digits"}
    with pytest.raises(ValueError, match="at least one"):
        evaluate(model, tokenizer, [])
