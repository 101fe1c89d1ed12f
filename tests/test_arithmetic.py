"""Generated arithmetic conversations: determinism, disjoint splits, correct answers, lengths.

    python -m pytest -q tests/test_arithmetic.py
"""

from __future__ import annotations

import re

import pytest

from dfactory_hf.demo.arithmetic import (
    NUM_ADD2_PROBLEMS,
    exact_match,
    extract_answer,
    make_arithmetic_dataset,
    normalize_number,
)

EQUATION = re.compile(r"(\d+(?: [-+*] \d+)+) = (\d+)")
ALLOWED_CHARACTERS = set("\n" + "".join(chr(code) for code in range(ord(" "), ord("~") + 1)))


def _questions(split) -> list[str]:
    return [messages[0]["content"] for messages in split["messages"]]


def _evaluate(expression: str) -> int:
    """Left-to-right with * first, for the "a op b op c" expressions the generator writes."""
    terms = expression.split(" ")
    values, ops = [int(terms[0])], []
    for op, number in zip(terms[1::2], terms[2::2], strict=True):
        if op == "*":
            values[-1] *= int(number)
        else:
            values.append(int(number))
            ops.append(op)
    result = values[0]
    for op, value in zip(ops, values[1:], strict=True):
        result = result + value if op == "+" else result - value
    return result


@pytest.mark.parametrize("task", ["add2", "word", "mixed"])
def test_same_seed_same_data_other_seed_other_data(task):
    first = make_arithmetic_dataset(200, 50, seed=3, task=task)
    again = make_arithmetic_dataset(200, 50, seed=3, task=task)
    other = make_arithmetic_dataset(200, 50, seed=4, task=task)
    for split in ("train", "test"):
        assert first[split].to_list() == again[split].to_list()
        assert _questions(first[split]) != _questions(other[split])
    assert first.column_names == {"train": ["messages", "answer"], "test": ["messages", "answer"]}
    assert (first["train"].num_rows, first["test"].num_rows) == (200, 50)


@pytest.mark.parametrize("task", ["add2", "word", "mixed"])
def test_splits_are_disjoint_and_questions_unique(task):
    dataset = make_arithmetic_dataset(3000, 300, seed=0, task=task)
    train, test = _questions(dataset["train"]), _questions(dataset["test"])
    assert len(set(train)) == len(train) and len(set(test)) == len(test)
    assert not set(train) & set(test)


@pytest.mark.parametrize("task", ["add2", "word", "mixed"])
def test_test_split_does_not_depend_on_num_train(task):
    small = make_arithmetic_dataset(10, 40, seed=7, task=task)["test"]
    large = make_arithmetic_dataset(500, 40, seed=7, task=task)["test"]
    assert small.to_list() == large.to_list()


def test_add2_answers_are_the_true_results():
    dataset = make_arithmetic_dataset(2000, 200, seed=0, task="add2")
    for row in [*dataset["train"], *dataset["test"]]:
        question, answer = row["messages"][0]["content"], row["messages"][1]["content"]
        assert [message["role"] for message in row["messages"]] == ["user", "assistant"]
        a, op, b = re.fullmatch(r"What is (\d\d) ([-+]) (\d\d)\?", question).groups()
        result = int(a) + int(b) if op == "+" else int(a) - int(b)
        assert result >= 0
        assert answer == f"{a} {op} {b} = {result}. The answer is {result}."
        assert row["answer"] == str(result) == extract_answer(answer)


def test_add2_covers_its_whole_problem_space_then_refuses():
    dataset = make_arithmetic_dataset(NUM_ADD2_PROBLEMS - 100, 100, seed=0, task="add2")
    assert len(set(_questions(dataset["train"])) | set(_questions(dataset["test"]))) == NUM_ADD2_PROBLEMS == 12195
    with pytest.raises(ValueError, match=r"needs 12196 distinct problems but only 12195 exist"):
        make_arithmetic_dataset(NUM_ADD2_PROBLEMS - 99, 100, task="add2")


def test_word_solutions_are_correct_step_by_step():
    dataset = make_arithmetic_dataset(2000, 200, seed=0, task="word")
    for row in [*dataset["train"], *dataset["test"]]:
        question, solution = row["messages"][0]["content"], row["messages"][1]["content"]
        lines = solution.split("\n")
        assert lines[-1] == f"The answer is {row['answer']}."
        equations = [EQUATION.search(line) for line in lines[:-1]]
        assert all(equations), solution
        assert 2 <= len(equations) <= 4
        for equation in equations:
            assert _evaluate(equation.group(1)) == int(equation.group(2)), solution
        assert equations[-1].group(2) == row["answer"] == extract_answer(solution)
        assert int(row["answer"]) >= 0
        assert question.endswith("?")
        assert set(question + solution) <= ALLOWED_CHARACTERS


def test_mixed_is_half_add2():
    train = make_arithmetic_dataset(1000, 0, seed=0, task="mixed")["train"]
    num_add2 = sum(re.fullmatch(r"What is \d\d [-+] \d\d\?", q) is not None for q in _questions(train))
    assert num_add2 == 500


def test_word_length_distribution_fits_the_packing_benchmark():
    train = make_arithmetic_dataset(3000, 0, seed=0, task="word")["train"]
    lengths = [len(m[0]["content"]) + len(m[1]["content"]) for m in train["messages"]]
    mean = sum(lengths) / len(lengths)
    over_512 = sum(length > 512 for length in lengths) / len(lengths)
    assert 90 <= mean <= 200, mean
    assert 0.002 <= over_512 <= 0.05, over_512
    assert 600 <= max(lengths) <= 900
    assert min(lengths) < 120
    add2 = make_arithmetic_dataset(500, 0, seed=0, task="add2")["train"]
    assert max(len(m[0]["content"]) + len(m[1]["content"]) for m in add2["messages"]) <= 50


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("37 + 48 = 85. The answer is 85.", "85"),
        ("The answer is 3. Wait, the answer is 1,234.", "1234"),
        ("the answer is: $12.50", "12.5"),
        ("The answer is -7", "-7"),
        ("The answer is 4.0.", "4"),
        ("Janet sells 16 - 3 - 4 = 9 eggs.\n#### 18", "18"),
        ("#### 5\nThe answer is 6.", "6"),
        ("The answer is 3. The answer is unknown.", None),
        ("The answer is", None),
        ("37 + 48 = 85.", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_normalize_number_and_exact_match():
    assert normalize_number(" 007 ") == "7"
    assert normalize_number("1,000.") == "1000"
    assert normalize_number("twelve") is None
    assert exact_match("so 12 + 3 = 15. The answer is 15.", "15")
    assert exact_match("The answer is 1,500.", "1500")
    assert exact_match("The answer is 15", "#### 15")
    assert not exact_match("The answer is 16.", "15")
    assert not exact_match("15", "15")  # no marker, no answer


def test_invalid_arguments_name_the_field():
    with pytest.raises(ValueError, match=r"`task` \('add3'\) must be one of"):
        make_arithmetic_dataset(10, 10, task="add3")
    with pytest.raises(ValueError, match=r"`num_train` \(-1\)"):
        make_arithmetic_dataset(-1, 10)


def test_add_task_is_addition_only_and_bounded():
    dataset = make_arithmetic_dataset(300, 50, seed=3, task="add")
    for row in list(dataset["train"]) + list(dataset["test"]):
        question = row["messages"][0]["content"]
        assert " + " in question and " - " not in question
    with pytest.raises(ValueError, match=r"needs 8101 distinct problems but only 8100 exist"):
        make_arithmetic_dataset(8001, 100, task="add")
