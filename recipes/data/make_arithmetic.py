"""Generate the demo's GSM8K-style arithmetic word problems (``arithmetic/train.jsonl``, ``test.jsonl``).

    python recipes/data/make_arithmetic.py        # rewrites the two files; the output is deterministic

Each record has GSM8K's fields and answer format: ``question``, and ``answer`` with one line per step
(``<<a*b=c>>`` calculator annotations) and a final ``#### N`` line. The problems take one to three steps with
small numbers, so a 135M-parameter model learns them within minutes on a CPU; the same lm-eval GSM8K task
scores them (``python -m lora_over_trl.eval RUN --tasks gsm8k --gsm8k_dir recipes/data/arithmetic``).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = ["Ava", "Ben", "Carla", "Dev", "Elif", "Femi", "Gus", "Hana", "Ivan", "Jade", "Kofi", "Lena", "Mateo", "Nia"]
ITEMS = ["apples", "marbles", "stickers", "pencils", "cookies", "stamps", "shells", "cards", "books", "beads"]
CONTAINERS = ["bags", "boxes", "jars", "packs", "baskets"]


def _buy_groups(rng: random.Random) -> tuple[str, str]:
    name, item, box = rng.choice(NAMES), rng.choice(ITEMS), rng.choice(CONTAINERS)
    start, groups, each = rng.randint(2, 30), rng.randint(2, 6), rng.randint(2, 9)
    bought = groups * each
    total = start + bought
    question = (
        f"{name} has {start} {item}. {name} buys {groups} {box} with {each} {item} in each. "
        f"How many {item} does {name} have now?"
    )
    answer = (
        f"{name} buys {groups} * {each} = <<{groups}*{each}={bought}>>{bought} {item}.\n"
        f"Now {name} has {start} + {bought} = <<{start}+{bought}={total}>>{total} {item}.\n#### {total}"
    )
    return question, answer


def _give_away(rng: random.Random) -> tuple[str, str]:
    name, friend, item = *rng.sample(NAMES, 2), rng.choice(ITEMS)
    start = rng.randint(20, 90)
    given = rng.randint(2, start - 10)
    lost = rng.randint(1, start - given - 1)
    left = start - given - lost
    question = (
        f"{name} had {start} {item}. {name} gave {given} to {friend} and then lost {lost}. "
        f"How many {item} does {name} have left?"
    )
    answer = (
        f"After giving some away, {name} has {start} - {given} = <<{start}-{given}={start - given}>>{start - given} "
        f"{item}.\nAfter losing some, {name} has {start - given} - {lost} = <<{start - given}-{lost}={left}>>{left} "
        f"{item}.\n#### {left}"
    )
    return question, answer


def _share(rng: random.Random) -> tuple[str, str]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    people, each = rng.randint(2, 8), rng.randint(2, 12)
    total = people * each
    question = f"{name} shares {total} {item} equally among {people} friends. How many {item} does each friend get?"
    answer = f"Each friend gets {total} / {people} = <<{total}/{people}={each}>>{each} {item}.\n#### {each}"
    return question, answer


def _price(rng: random.Random) -> tuple[str, str]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    count, price, paid_extra = rng.randint(2, 9), rng.randint(2, 15), rng.randint(1, 20)
    cost = count * price
    paid = cost + paid_extra
    question = (
        f"{item.capitalize()} cost ${price} each. {name} buys {count} {item} and pays with ${paid}. "
        f"How much change does {name} get?"
    )
    answer = (
        f"The {item} cost {count} * {price} = <<{count}*{price}={cost}>>{cost} dollars.\n"
        f"The change is {paid} - {cost} = <<{paid}-{cost}={paid_extra}>>{paid_extra} dollars.\n#### {paid_extra}"
    )
    return question, answer


def _weekly(rng: random.Random) -> tuple[str, str]:
    name = rng.choice(NAMES)
    per_day, days, weeks = rng.randint(2, 12), rng.randint(2, 7), rng.randint(2, 4)
    per_week = per_day * days
    total = per_week * weeks
    question = (
        f"{name} reads {per_day} pages a day, {days} days a week. How many pages does {name} read in {weeks} weeks?"
    )
    answer = (
        f"In a week {name} reads {per_day} * {days} = <<{per_day}*{days}={per_week}>>{per_week} pages.\n"
        f"In {weeks} weeks {name} reads {per_week} * {weeks} = <<{per_week}*{weeks}={total}>>{total} pages.\n"
        f"#### {total}"
    )
    return question, answer


def _compare(rng: random.Random) -> tuple[str, str]:
    name, friend, item = *rng.sample(NAMES, 2), rng.choice(ITEMS)
    mine, factor, extra = rng.randint(3, 15), rng.randint(2, 4), rng.randint(1, 9)
    theirs = mine * factor + extra
    together = mine + theirs
    question = (
        f"{name} has {mine} {item}. {friend} has {extra} more than {factor} times as many as {name}. "
        f"How many {item} do they have together?"
    )
    answer = (
        f"{friend} has {mine} * {factor} + {extra} = <<{mine}*{factor}+{extra}={theirs}>>{theirs} {item}.\n"
        f"Together they have {mine} + {theirs} = <<{mine}+{theirs}={together}>>{together} {item}.\n#### {together}"
    )
    return question, answer


TEMPLATES = [_buy_groups, _give_away, _share, _price, _weekly, _compare]


def generate(count: int, seed: int) -> list[dict[str, str]]:
    """``count`` distinct problems, deterministic for a seed."""
    rng = random.Random(seed)
    seen: set[str] = set()
    records = []
    while len(records) < count:
        question, answer = rng.choice(TEMPLATES)(rng)
        if question not in seen:
            seen.add(question)
            records.append({"question": question, "answer": answer})
    return records


def write(folder: Path) -> None:
    """Write ``train.jsonl`` (2000) and ``test.jsonl`` (200 problems not in train)."""
    records = generate(2200, seed=0)
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", records[:2000]), ("test", records[2000:])):
        with open(folder / f"{name}.jsonl", "w") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in part)


if __name__ == "__main__":
    write(Path(__file__).resolve().parent / "arithmetic")
