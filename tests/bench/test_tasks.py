"""The benchmarks' synthetic tasks: disjoint seeded splits whose answers are right."""

from __future__ import annotations

import re

import pytest

from bench import tasks


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_every_task_has_seeded_disjoint_splits(name: str) -> None:
    task = tasks.TASKS[name](n_train=30, n_eval=10)

    assert task == tasks.TASKS[name](n_train=30, n_eval=10)
    assert (len(task.train), len(task.eval), len(task.unseen)) == (30, 10, 10)
    inputs = [i.input for i in task.train + task.eval + task.unseen]
    assert len(set(inputs)) == len(inputs)


def test_counting_sorting_and_sums_in_words_have_right_answers() -> None:
    counting, sorting, words = tasks.counting(40, 20), tasks.sorting(40, 20), tasks.arithmetic(2, 40, 20, words=True)

    for item in counting.train + counting.unseen:
        assert item.answer == str(len(re.search(r"'(\w+)'", item.input).group(1)))
    for item in sorting.train + sorting.unseen:
        numbers = [int(x) for x in re.findall(r"\d+", item.input)]
        assert item.answer == ", ".join(map(str, sorted(numbers))) and 4 <= len(numbers) <= 6
    assert all(max(map(int, re.findall(r"\d+", i.input))) >= 70 for i in sorting.unseen)
    assert not {re.search(r"'(\w+)'", i.input).group(1) for i in counting.unseen} & {
        re.search(r"'(\w+)'", i.input).group(1) for i in counting.train}
    for item in words.train:
        a, b = map(int, re.findall(r"\d+", item.input))
        assert item.answer == str(a + b) and "+" not in item.input
    assert {i.input.split()[0] for i in words.train} == {"What", "Add"}


def test_a_task_whose_pool_the_training_items_exhaust_is_refused() -> None:
    # counting has 2 phrasings of ~88 seen words: 176 questions, all taken by the training items
    with pytest.raises(ValueError, match="no question left to draw after 176"):
        tasks.counting(n_train=200, n_eval=50)
