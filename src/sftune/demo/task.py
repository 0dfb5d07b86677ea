"""The README demo task: read one order sentence, answer with the order as JSON in a fixed schema.

The schema is what the base model cannot guess and a short fine-tune can teach: exactly the keys
`item`, `qty`, `city` in that order, `item` singular and lowercase ("Kettles" -> "kettle"), `qty` an
integer even when the sentence spells it out ("a dozen" -> 12, "a lamp" -> 1), and the answer bare JSON
with nothing around it. The sentences vary (many phrasings, names, weekdays and order numbers as
distractors) so the model has to extract rather than copy a position.

Regenerate the shipped files (deterministic): `python -m sftune.demo.task --out src/sftune/demo/data`.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

INSTRUCTION = "Extract the order as JSON with keys item, qty, city."
SCHEMA_KEYS = ("item", "qty", "city")

TRAIN_SEED = 1234
HELDOUT_SEED = 5678
TRAIN_SIZE = 320
HELDOUT_SIZE = 40

# (singular, plural); the answer always uses the singular
ITEMS = [
    ("lamp", "lamps"),
    ("kettle", "kettles"),
    ("mug", "mugs"),
    ("chair", "chairs"),
    ("notebook", "notebooks"),
    ("umbrella", "umbrellas"),
    ("candle", "candles"),
    ("towel", "towels"),
    ("pillow", "pillows"),
    ("blanket", "blankets"),
    ("teapot", "teapots"),
    ("backpack", "backpacks"),
    ("stapler", "staplers"),
    ("helmet", "helmets"),
    ("jacket", "jackets"),
    ("mirror", "mirrors"),
    ("plate", "plates"),
    ("bottle", "bottles"),
    ("basket", "baskets"),
    ("scarf", "scarves"),
    ("box", "boxes"),
    ("brush", "brushes"),
    ("glass", "glasses"),
    ("knife", "knives"),
    ("shelf", "shelves"),
    ("battery", "batteries"),
    ("desk lamp", "desk lamps"),
    ("coffee mug", "coffee mugs"),
    ("phone case", "phone cases"),
    ("yoga mat", "yoga mats"),
]
CITIES = [
    "Oslo",
    "Lima",
    "Cairo",
    "Porto",
    "Denver",
    "Nairobi",
    "Dublin",
    "Kyoto",
    "Austin",
    "Lisbon",
    "Madrid",
    "Berlin",
    "Vienna",
    "Prague",
    "Seoul",
    "Hanoi",
    "Quito",
    "Accra",
    "Perth",
    "Boston",
    "Chicago",
    "Toronto",
    "Zurich",
    "Athens",
    "Warsaw",
    "Helsinki",
    "Manila",
    "Dakar",
    "New York",
    "Cape Town",
    "Buenos Aires",
    "San Diego",
    "Rio de Janeiro",
    "Kuala Lumpur",
]
NAMES = [
    "Maria",
    "Tom",
    "Aisha",
    "Kenji",
    "Lena",
    "Omar",
    "Priya",
    "Lucas",
    "Sofia",
    "Ivan",
    "Chloe",
    "Mateo",
    "Fatima",
    "Noah",
    "Yuki",
    "Elena",
    "Ben",
    "Amara",
    "Raj",
    "Ines",
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
NUMBER_WORDS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
]

# {goods} is the quantity and item as written in the sentence ("3 lamps", "five kettles", "a dozen mugs").
SENTENCES = [
    "Please send {goods} to {city}.",
    "Could you ship {goods} to {city}?",
    "{name} in {city} wants {goods}.",
    "I'd like {goods} delivered to {city}, thanks.",
    "Order for {city}: {goods}.",
    "We need {goods} at our {city} office.",
    "Deliver {goods} to {name} in {city} by {day}.",
    "Hi, {name} here. Can I get {goods} sent to {city}?",
    "Ship to {city}: {goods}, please.",
    "The {city} store ran out, so please send {goods}.",
    "Order #{number}: {goods} for the {city} branch.",
    "I live in {city} and want to buy {goods}.",
    "Can {city} get {goods} before {day}?",
    "Put me down for {goods}, shipping to {city}.",
    "{name} ordered {goods} on {day}; deliver to {city}.",
    "Need {goods} in {city} asap.",
    "Send {name} {goods} at the {city} address.",
    "From {city}: please add {goods} to my order.",
    "Requesting {goods} for delivery in {city}, ref {number}.",
    "{city} office here, we are short of {goods}.",
    "My team in {city} could use {goods} by {day}.",
    "Hello! {goods} to {city} for {name}, please.",
]


def make_rows(n: int, seed: int) -> list[dict[str, str]]:
    """`n` Alpaca rows ({"instruction", "input", "output"}) with distinct inputs, the same for the same seed."""
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    seen_inputs: set[str] = set()
    while len(rows) < n:
        row = _make_row(rng)
        if row["input"] not in seen_inputs:
            seen_inputs.add(row["input"])
            rows.append(row)
    return rows


def _make_row(rng: random.Random) -> dict[str, str]:
    singular, plural = rng.choice(ITEMS)
    qty = rng.choice([1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 12, 15, 18, 20, 24, 25, 30, 40, 50])
    city = rng.choice(CITIES)
    sentence = rng.choice(SENTENCES).format(
        goods=_write_goods(rng, qty, singular, plural),
        city=city,
        name=rng.choice(NAMES),
        day=rng.choice(DAYS),
        number=rng.randint(1000, 9999),
    )
    sentence = sentence[0].upper() + sentence[1:]  # "{goods}" can open the sentence
    answer = {"item": singular, "qty": qty, "city": city}
    return {"instruction": INSTRUCTION, "input": sentence, "output": json.dumps(answer)}


def _write_goods(rng: random.Random, qty: int, singular: str, plural: str) -> str:
    """The quantity and item as a person would type them: digits, words, "a"/"an", "a dozen"."""
    if rng.random() < 0.15:
        singular, plural = singular.capitalize(), plural.capitalize()
    if qty == 1:
        article = "an" if singular[0].lower() in "aeiou" else "a"
        return f"{rng.choice([article, 'one', '1'])} {singular}"
    if qty == 12 and rng.random() < 0.4:
        return f"a dozen {plural}"
    if qty < len(NUMBER_WORDS) and rng.random() < 0.45:
        return f"{NUMBER_WORDS[qty]} {plural}"
    return f"{qty} {plural}"


def write_splits(out_dir: Path) -> tuple[Path, Path]:
    """Write train.jsonl and heldout.jsonl into `out_dir`; fails if any input sentence is in both."""
    train = make_rows(TRAIN_SIZE, TRAIN_SEED)
    heldout = make_rows(HELDOUT_SIZE, HELDOUT_SEED)
    shared = {row["input"] for row in train} & {row["input"] for row in heldout}
    if shared:
        raise AssertionError(f"{len(shared)} held-out inputs are also in train, e.g. {sorted(shared)[0]!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = (out_dir / "train.jsonl", out_dir / "heldout.jsonl")
    for path, rows in zip(paths, (train, heldout), strict=True):
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the demo task's train.jsonl and heldout.jsonl.")
    parser.add_argument("--out", type=Path, required=True, help="folder to write the two .jsonl files into")
    args = parser.parse_args(argv)
    for path in write_splits(args.out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
