"""Seeded GSM8K-style arithmetic conversations for the CPU demo, the benchmarks and the tests.

    python -m dfactory_hf.demo.arithmetic --task word --num-train 2000   # prints samples and lengths

    from dfactory_hf.demo.arithmetic import make_arithmetic_dataset, exact_match
    dataset = make_arithmetic_dataset(4000, 200, seed=0, task="add2")   # DatasetDict train/test

Rows have `messages` ([user question, assistant answer]) and `answer` (the final number, a string).
Every answer ends with "The answer is N." so `extract_answer` scores a generation.

Tasks (lengths in characters = tokens of the demo tokenizer, question + answer; the chat
template adds 2 role tokens and training adds EOS):

- "add": "What is 37 + 48?" -> "37 + 48 = 85. The answer is 85." Two-digit addition only; 8,100
  distinct problems, ~50 tokens each: the embedded demo's task (a ~1M-parameter model learns it in a
  few thousand CPU steps, REFERENCE section 7).
- "add2": "add" plus subtraction with a non-negative result ("What is 82 - 47?"); 12,195 problems.
- "word": GSM8K-like multi-step word problems (inventory, shopping, wages, school, reading, ages)
  with 2-4 equations (+ - *) on small numbers, a worked solution with one equation per line (terse
  "4 * 8 = 32", or 20% in sentences) and the final line "The answer is N.". Story sentences that do
  not change the answer spread the lengths: mean ~190 tokens, median ~177, p99 ~650-700, ~1.3% above
  512, none above 900 (what the packing/padding benchmark needs at max_seq_len 512 and 1024).
  Too varied for a tiny model to learn well; it exists for throughput and length-bucketing work.
- "mixed": half of each split "add2", half "word", shuffled (mean ~120 tokens).

The test split is drawn first, so it depends only on `seed`, `task` and `num_test`, never on
`num_train`; no question appears twice in the dataset (train and test are disjoint).
10k conversations take ~0.3 s (add2) to ~0.6 s (word) on one core.
"""

from __future__ import annotations

import argparse
import random
import re
from decimal import Decimal, InvalidOperation

from datasets import Dataset, DatasetDict

TASKS = ("add", "add2", "word", "mixed")

# Every ordered pair of two-digit operands for "+", and a >= b for "-" (no negative answers).
_ADD2_OPERANDS = [(a, "+", b) for a in range(10, 100) for b in range(10, 100)] + [
    (a, "-", b) for a in range(10, 100) for b in range(10, a + 1)
]
NUM_ADD2_PROBLEMS = len(_ADD2_OPERANDS)
NUM_ADD_PROBLEMS = sum(op == "+" for _, op, _ in _ADD2_OPERANDS)  # additions come first in the list

_ANSWER_PATTERN = re.compile(r"the answer is|####", re.IGNORECASE)
_NUMBER_PATTERN = re.compile(r"\s*[:=]?\s*\$?\s*(-?[\d,]*\d(?:\.\d+)?)")


def _add2_problem(index: int) -> tuple[str, str, str]:
    """Problem number `index` of the enumerated add2 space: (question, solution, answer)."""
    a, op, b = _ADD2_OPERANDS[index]
    result = a + b if op == "+" else a - b
    return f"What is {a} {op} {b}?", f"{a} {op} {b} = {result}. The answer is {result}.", str(result)


# --- "word": GSM8K-style multi-step problems -------------------------------------------------

_PEOPLE = [
    ("Mia", "she"), ("Liam", "he"), ("Ava", "she"), ("Noah", "he"), ("Emma", "she"), ("Omar", "he"),
    ("Sofia", "she"), ("Lucas", "he"), ("Priya", "she"), ("Kenji", "he"), ("Zoe", "she"), ("Mateo", "he"),
    ("Hana", "she"), ("Ben", "he"), ("Lena", "she"), ("Tariq", "he"), ("Grace", "she"), ("Diego", "he"),
    ("Nora", "she"), ("Sam", "he"), ("Ines", "she"), ("Felix", "he"), ("Aisha", "she"), ("Jonas", "he"),
]
_ITEMS = [
    ("apples", "bags"), ("marbles", "jars"), ("stickers", "sheets"), ("cookies", "boxes"), ("pencils", "packs"),
    ("baseball cards", "packs"), ("shells", "buckets"), ("eggs", "cartons"), ("crayons", "boxes"),
    ("beads", "strings"), ("stamps", "envelopes"), ("oranges", "crates"), ("balloons", "bags"),
]
_GOODS = [
    "notebooks", "pens", "erasers", "sandwiches", "movie tickets", "comic books", "toy cars", "cupcakes",
    "bottles of juice", "plants", "candles", "puzzles", "socks", "mugs",
]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_COLORS = ["red", "blue", "green", "yellow", "purple", "orange"]
# Story sentences that do not change the answer (some carry distracting numbers, as GSM8K does).
_FILLERS = [
    "It is a sunny {day} morning.",
    "{name} lives in a small town near the sea.",
    "{name}'s best friend is {friend}.",
    "{His} little brother is {n} years old.",
    "{He} likes to write everything down in a notebook.",
    "The shop on the corner opens at {n} o'clock.",
    "{friend} thinks this is a great idea.",
    "On the way, {he} sees {n} birds sitting on a fence.",
    "{He} has been looking forward to this for a long time.",
    "The weather forecast says it will rain later in the afternoon.",
    "{name} wants to tell {his} teacher about it on {day}.",
    "{His} favorite color is {color}.",
    "The bus ride into town takes {n} minutes.",
    "{He} listens to music while {he} walks.",
    "There is a long line at the counter, so {he} waits patiently.",
    "{friend} is {n} years old and lives next door.",
    "{name} keeps a careful record of everything {he} does.",
    "{His} grandmother used to tell {him} stories about the old market.",
    "The street is busy because of the festival.",
    "{He} wears {his} {color} jacket because it is a little cold.",
    "Later, {he} plans to call {friend} to talk about the weekend.",
    "Everyone in the family agrees that {name} is good at planning.",
    "{He} remembers that last year the same trip took much longer.",
    "A small dog follows {him} for a while and then runs away.",
]


def _person(rng: random.Random) -> dict[str, str]:
    name, he = rng.choice(_PEOPLE)
    friend = name
    while friend == name:
        friend = rng.choice(_PEOPLE)[0]
    his, him = ("her", "her") if he == "she" else ("his", "him")
    return {"name": name, "friend": friend, "he": he, "He": he.capitalize(), "his": his, "His": his.capitalize(),
            "him": him}  # fmt: skip


# A family returns (story sentences, final question, [(equation, verbose line)], answer). Each verbose
# line contains its equation verbatim, so both solution styles show every step "a op b = c".
_Family = tuple[list[str], str, list[tuple[str, str]], int]


def _inventory(rng: random.Random, p: dict[str, str]) -> _Family:
    item, container = rng.choice(_ITEMS)
    count = rng.randint(5, 60)
    sentences, steps = [f"{p['name']} has {count} {item}."], []
    kinds = ["gain", "lose", "containers", "double", "daily"]
    while len(steps) < 2 or (len(steps) < 4 and rng.random() < 0.3):
        kind = rng.choice(kinds if len(steps) < 3 else ["gain", "lose"])  # two-equation kinds need room
        if kind == "gain":
            k = rng.randint(2, 30)
            sentences.append(
                rng.choice([f"{p['He']} buys {k} more {item}.", f"{p['friend']} gives {p['him']} {k} {item}."])
            )
            eq = f"{count} + {k} = {count + k}"
            steps.append((eq, f"After getting {k} more, {p['name']} has {eq} {item}."))
            count += k
        elif kind == "lose" and count >= 2:
            k = rng.randint(1, min(count - 1, 30))
            sentences.append(f"{p['He']} gives {k} {item} to {p['friend']}.")
            eq = f"{count} - {k} = {count - k}"
            steps.append((eq, f"After giving {k} away, {p['he']} has {eq} {item}."))
            count -= k
        elif kind == "containers":
            c, e = rng.randint(2, 6), rng.randint(2, 12)
            sentences.append(f"{p['He']} buys {c} {container} with {e} {item} in each.")
            steps.append((f"{c} * {e} = {c * e}", f"The {container} hold {c} * {e} = {c * e} {item}."))
            eq = f"{count} + {c * e} = {count + c * e}"
            steps.append((eq, f"Now {p['he']} has {eq} {item}."))
            count += c * e
        elif kind == "double" and count <= 200:
            kinds.remove("double")  # "doubles. Then it doubles." reads oddly
            sentences.append(f"Then {p['his']} number of {item} doubles.")
            eq = f"{count} * 2 = {count * 2}"
            steps.append((eq, f"Doubling gives {eq} {item}."))
            count *= 2
        elif kind == "daily" and count >= 5:
            d = rng.randint(2, min(7, count - 1))
            k = rng.randint(1, (count - 1) // d)  # leaves at least one
            sentences.append(f"{p['He']} uses {k} {item} every day for {d} days.")
            steps.append((f"{k} * {d} = {k * d}", f"In {d} days {p['he']} uses {k} * {d} = {k * d} {item}."))
            eq = f"{count} - {k * d} = {count - k * d}"
            steps.append((eq, f"That leaves {eq} {item}."))
            count -= k * d
    return sentences, f"How many {item} does {p['he']} have now?", steps, count


def _shopping(rng: random.Random, p: dict[str, str]) -> _Family:
    first, second, third = rng.sample(_GOODS, 3)
    a, b, price_a, price_b = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 15), rng.randint(1, 15)
    sentences = [f"{p['name']} buys {a} {first} at ${price_a} each and {b} {second} at ${price_b} each."]
    steps = [
        (f"{a} * {price_a} = {a * price_a}", f"The {first} cost {a} * {price_a} = {a * price_a} dollars."),
        (f"{b} * {price_b} = {b * price_b}", f"The {second} cost {b} * {price_b} = {b * price_b} dollars."),
    ]
    parts = [a * price_a, b * price_b]
    if rng.random() < 0.3:
        parts.append(rng.randint(2, 20))
        sentences.append(f"{p['He']} also buys {third} for ${parts[-1]}.")
    total = sum(parts)
    eq = " + ".join(map(str, parts)) + f" = {total}"
    steps.append((eq, f"In total {p['he']} spends {eq} dollars."))
    if rng.random() < 0.6:
        return sentences, f"How much does {p['he']} spend?", steps, total
    bill = next(value for value in (20, 50, 100, 200, 500) if value > total)
    sentences.append(f"{p['He']} pays with a ${bill} bill.")
    eq = f"{bill} - {total} = {bill - total}"
    steps.append((eq, f"The change is {eq} dollars."))
    return sentences, f"How much change does {p['he']} get?", steps, bill - total


def _wages(rng: random.Random, p: dict[str, str]) -> _Family:
    wage, h1, h2 = rng.randint(5, 25), rng.randint(1, 8), rng.randint(1, 8)
    day1, day2 = rng.sample(_DAYS, 2)
    sentences = [f"{p['name']} earns ${wage} an hour.", f"{p['He']} works {h1} hours on {day1} and {h2} on {day2}."]
    hours, money = h1 + h2, wage * (h1 + h2)
    steps = [
        (f"{h1} + {h2} = {hours}", f"{p['He']} works {h1} + {h2} = {hours} hours."),
        (f"{wage} * {hours} = {money}", f"{p['He']} earns {wage} * {hours} = {money} dollars."),
    ]
    if rng.random() < 0.35:
        tip = rng.randint(3, 40)
        sentences.append(f"{p['He']} also gets a ${tip} tip.")
        eq = f"{money} + {tip} = {money + tip}"
        steps.append((eq, f"With the tip {p['he']} has {eq} dollars."))
        money += tip
    if rng.random() < 0.5:
        return sentences, f"How much does {p['he']} earn?", steps, money
    spent = rng.randint(1, money - 1)
    sentences.append(f"{p['He']} spends ${spent} on {rng.choice(_GOODS)}.")
    eq = f"{money} - {spent} = {money - spent}"
    steps.append((eq, f"After shopping {p['he']} has {eq} dollars left."))
    return sentences, f"How much money does {p['he']} have left?", steps, money - spent


def _classroom(rng: random.Random, p: dict[str, str]) -> _Family:
    classes, size = rng.randint(2, 9), rng.randint(12, 30)
    students = classes * size
    sentences = [f"{p['name']}'s school has {classes} classes of {size} students."]
    steps = [(f"{classes} * {size} = {students}", f"The school has {classes} * {size} = {students} students.")]
    events = [("-", "Today {k} students are absent."), ("-", "{k} students leave early for a game."),
              ("+", "{k} new students join the school."), ("+", "{k} students visit from a town.")]  # fmt: skip
    for sign, template in rng.sample(events, rng.randint(1, 2)):
        k = rng.randint(1, min(15, students - 1))
        sentences.append(template.format(k=k))
        after = students - k if sign == "-" else students + k
        eq = f"{students} {sign} {k} = {after}"
        steps.append((eq, f"That makes {eq} students."))
        students = after
    return sentences, "How many students are there now?", steps, students


def _reading(rng: random.Random, p: dict[str, str]) -> _Family:
    per_day, days, extra = rng.randint(3, 25), rng.randint(2, 9), rng.randint(5, 40)
    pages = per_day * days
    sentences = [f"{p['name']} reads {per_day} pages a day for {days} days.", f"Then {p['he']} reads {extra} more."]
    steps = [
        (f"{per_day} * {days} = {pages}", f"In {days} days {p['he']} reads {per_day} * {days} = {pages} pages."),
        (f"{pages} + {extra} = {pages + extra}", f"In all {p['he']} reads {pages} + {extra} = {pages + extra} pages."),
    ]
    return sentences, f"How many pages does {p['he']} read?", steps, pages + extra


def _ages(rng: random.Random, p: dict[str, str]) -> _Family:
    age, older, factor = rng.randint(3, 15), rng.randint(1, 9), rng.randint(2, 4)
    sibling = rng.choice(["brother", "sister", "cousin"])
    sibling_age = age + older
    sentences = [f"{p['name']} is {age} years old.", f"{p['His']} {sibling} is {older} years older."]
    steps = [(f"{age} + {older} = {sibling_age}", f"The {sibling} is {age} + {older} = {sibling_age} years old.")]
    if rng.random() < 0.5:
        sentences.append(f"{p['His']} aunt is {factor} times as old as the {sibling}.")
        eq = f"{sibling_age} * {factor} = {sibling_age * factor}"
        steps.append((eq, f"The aunt is {eq} years old."))
        return sentences, f"How old is {p['his']} aunt?", steps, sibling_age * factor
    eq = f"{age} + {sibling_age} = {age + sibling_age}"
    steps.append((eq, f"Together they are {eq} years old."))
    return sentences, "What is the sum of their ages?", steps, age + sibling_age


_FAMILIES = (_inventory, _shopping, _wages, _classroom, _reading, _ages)
MAX_WORD_PROBLEM_CHARS = 900  # question + solution; long stories lose filler sentences to fit


def _num_fillers(rng: random.Random) -> int:
    """Mostly none or one story sentence; 1.5% long stories (7-18 sentences) make the tail past 512."""
    if rng.random() < 0.015:
        return rng.randint(7, 18)
    count = 0
    while rng.random() < 0.15 and count < 5:
        count += 1
    return count


def sample_word_problem(rng: random.Random) -> tuple[str, str, str]:
    """One GSM8K-style problem: (question, worked solution ending "The answer is N.", answer)."""
    p = _person(rng)
    sentences, question, steps, answer = rng.choice(_FAMILIES)(rng, p)
    fillers = [
        template.format(**p, day=rng.choice(_DAYS), color=rng.choice(_COLORS), n=rng.randint(3, 12))
        for template in rng.sample(_FILLERS, _num_fillers(rng))
    ]
    verbose = rng.random() < 0.2
    solution = "\n".join([line if verbose else equation for equation, line in steps] + [f"The answer is {answer}."])
    # Sentences are joined by one space: the question is sum(len + 1) + len(question) - 1 characters.
    room = MAX_WORD_PROBLEM_CHARS - len(solution) - len(question) - sum(len(s) + 1 for s in sentences)
    while fillers and sum(len(f) + 1 for f in fillers) > room:
        fillers.pop()
    # The first sentence opens the story; fillers land anywhere after it, keeping the events' order.
    story = list(sentences)
    for filler in fillers:
        story.insert(rng.randint(1, len(story)), filler)
    return " ".join(story + [question]), solution, str(answer)


def _row(question: str, solution: str, answer: str) -> dict:
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": solution}]
    return {"messages": messages, "answer": answer}


def _draw_split(
    num_add2: int, num_word: int, add2_order: list[int], rng: random.Random, seen: set[str]
) -> list[dict]:
    rows = []
    while num_add2 > len(rows):
        question, solution, answer = _add2_problem(add2_order.pop())
        seen.add(question)  # the permutation never repeats a question
        rows.append(_row(question, solution, answer))
    attempts = 0
    while num_word + num_add2 > len(rows):
        attempts += 1
        if attempts > 20 * num_word + 1000:
            raise RuntimeError("word-problem generator keeps repeating questions; widen its templates")
        question, solution, answer = sample_word_problem(rng)
        if question not in seen:
            seen.add(question)
            rows.append(_row(question, solution, answer))
    rng.shuffle(rows)
    return rows


def make_arithmetic_dataset(num_train: int, num_test: int, *, seed: int = 0, task: str = "add2") -> DatasetDict:
    """Splits `train` and `test` of arithmetic conversations; deterministic for a given seed."""
    if task not in TASKS:
        raise ValueError(f"`task` ({task!r}) must be one of {TASKS}")
    if num_train < 0 or num_test < 0:
        raise ValueError(f"`num_train` ({num_train}) and `num_test` ({num_test}) must be >= 0")
    add2_share = {"add": 1.0, "add2": 1.0, "word": 0.0, "mixed": 0.5}[task]
    pool_size = NUM_ADD_PROBLEMS if task == "add" else NUM_ADD2_PROBLEMS
    num_add2 = {"test": round(num_test * add2_share), "train": round(num_train * add2_share)}
    if num_add2["test"] + num_add2["train"] > pool_size:
        raise ValueError(
            f"task {task!r} needs {num_add2['test'] + num_add2['train']} distinct problems but only "
            f"{pool_size} exist; lower `num_train` ({num_train}) + `num_test` ({num_test}) or use task 'word'"
        )
    rng = random.Random(seed)
    add2_order = list(range(pool_size))
    rng.shuffle(add2_order)  # popped from the end: test takes the first problems, train the next
    seen: set[str] = set()
    test = _draw_split(num_add2["test"], num_test - num_add2["test"], add2_order, rng, seen)
    train = _draw_split(num_add2["train"], num_train - num_add2["train"], add2_order, rng, seen)
    return DatasetDict({name: Dataset.from_list(rows) for name, rows in (("train", train), ("test", test))})


def normalize_number(text: str) -> str | None:
    """'1,234' -> '1234', '$12' -> '12', '85.' -> '85', '3.50' -> '3.5', '007' -> '7'; None if not a number."""
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_answer(text: str) -> str | None:
    """The number after the last "The answer is" (or GSM8K "#### N"), normalized; None when absent.

    Only the last marker counts: "The answer is 3. The answer is x" gives None, not "3".
    """
    markers = list(_ANSWER_PATTERN.finditer(text))
    if not markers:
        return None
    number = _NUMBER_PATTERN.match(text, markers[-1].end())
    return normalize_number(number.group(1)) if number else None


def exact_match(prediction_text: str, reference: str) -> bool:
    """Whether the generation's extracted answer equals `reference` (a number, or a text with a marker)."""
    predicted = extract_answer(prediction_text)
    expected = extract_answer(reference) if _ANSWER_PATTERN.search(reference) else normalize_number(reference)
    return predicted is not None and predicted == expected


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="print samples and length statistics of a task")
    parser.add_argument("--task", default="word", choices=TASKS)
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train = make_arithmetic_dataset(args.num_train, 0, seed=args.seed, task=args.task)["train"]
    for messages in train["messages"][:3]:
        print(f"USER: {messages[0]['content']}\nASSISTANT: {messages[1]['content']}\n")
    lengths = sorted(len(m[0]["content"]) + len(m[1]["content"]) for m in train["messages"])
    over_512 = sum(length > 512 for length in lengths)
    print(
        f"{args.task}: {len(lengths)} rows, characters (question + answer) mean {sum(lengths) / len(lengths):.0f}, "
        f"median {lengths[len(lengths) // 2]}, p99 {lengths[int(0.99 * len(lengths))]}, max {lengths[-1]}, "
        f"{over_512} above 512"
    )


if __name__ == "__main__":
    main()
