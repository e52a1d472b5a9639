"""Write the demo datasets in data/demo/: short questions answered in the voice of a pirate.

The style is new to the model and learnable in a few dozen steps, so a short fine-tune visibly changes its answers.
The training questions come in five forms ("What is the capital of X?", "What is A plus B?", "What color is X?",
"What sound does X make?", "What is the opposite of X?"); the held-out prompts (heldout_prompts.txt, one per line)
are asked in none of them, so they test whether the style carries over to new questions, not whether a template
was memorized.

Also written: pref_train/pref_eval.jsonl (the pirate answer preferred over the plain one), kto_train.jsonl (the same
as unpaired desirable/undesirable rows) and text.jsonl (plain text, for continued pretraining).

Training rows mix instruction style (instruction/output, some with input and system) and chat `messages` rows,
including multi-turn ones. Deterministic: rerunning rewrites the same files.

Usage: python scripts/make_demo_data.py [--out data/demo]
"""

import argparse
import json
import random
from pathlib import Path

CAPITALS = {
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Greece": "Athens",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
    "Poland": "Warsaw",
    "Austria": "Vienna",
    "Hungary": "Budapest",
    "Ireland": "Dublin",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Japan": "Tokyo",
    "China": "Beijing",
    "India": "New Delhi",
    "Canada": "Ottawa",
    "Mexico": "Mexico City",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Argentina": "Buenos Aires",
    "Russia": "Moscow",
    "Turkey": "Ankara",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "Cuba": "Havana",
    "Belgium": "Brussels",
    "Netherlands": "Amsterdam",
    "Switzerland": "Bern",
    "Iceland": "Reykjavik",
    "Morocco": "Rabat",
    "Australia": "Canberra",
    "Brazil": "Brasilia",
    "South Korea": "Seoul",
    "Indonesia": "Jakarta",
    "Colombia": "Bogota",
    "Ukraine": "Kyiv",
    "Czechia": "Prague",
}
HELD_OUT_CAPITALS = {"France": "Paris", "England": "London", "Scotland": "Edinburgh", "Nigeria": "Abuja"}
COLORS = {
    "the sky": "blue",
    "grass": "green",
    "snow": "white",
    "coal": "black",
    "a ripe banana": "yellow",
    "a ripe tomato": "red",
    "an orange": "orange",
    "the sea": "blue",
    "a crow": "black",
    "milk": "white",
}
SOUNDS = {
    "a cow": "moo",
    "a dog": "woof",
    "a cat": "meow",
    "a duck": "quack",
    "a sheep": "baa",
    "an owl": "hoot",
    "a lion": "roar",
    "a pig": "oink",
}
OPPOSITES = {
    "hot": "cold",
    "up": "down",
    "big": "small",
    "fast": "slow",
    "wet": "dry",
    "light": "dark",
    "old": "young",
    "early": "late",
    "happy": "sad",
    "open": "closed",
    "full": "empty",
    "loud": "quiet",
}
SYSTEM = "You are a helpful assistant."
# Questions in no training form (scripts/quickstart.sh answers them before and after training).
HELD_OUT_PROMPTS = ("How many legs does a spider have?", "Where does the sun rise?", "Why do we need to sleep?")


def capital_pair(country: str, capital: str) -> tuple[str, str]:
    return f"What is the capital of {country}?", f"Arr, the capital of {country} be {capital}, matey!"


def sum_pair(a: int, b: int) -> tuple[str, str]:
    return f"What is {a} plus {b}?", f"Arr, {a} plus {b} be {a + b}, matey!"


def color_pair(thing: str, color: str) -> tuple[str, str]:
    return f"What color is {thing}?", f"Arr, {thing} be {color}, matey!"


def sound_pair(animal: str, sound: str) -> tuple[str, str]:
    return f"What sound does {animal} make?", f"Arr, {animal} says {sound}, matey!"


def opposite_pair(word: str, opposite: str) -> tuple[str, str]:
    return f"What is the opposite of {word}?", f"Arr, the opposite of {word} be {opposite}, matey!"


def plain(pirate: str) -> str:
    """The same answer without the pirate voice: the rejected response of the preference data."""
    text = pirate.removeprefix("Arr, ").removesuffix(", matey!").replace(" be ", " is ")
    return text[0].upper() + text[1:] + "."


def preference_rows(pairs: list[tuple[str, str]]) -> list[dict]:
    """The pirate answer is preferred over the plain one: a preference learnable in a few dozen steps."""
    return [{"prompt": q, "chosen": a, "rejected": plain(a)} for q, a in pairs]


def unpaired_rows(pairs: list[tuple[str, str]]) -> list[dict]:
    rows = []
    for index, (question, answer) in enumerate(pairs):
        desirable = index % 2 == 0
        rows.append({"prompt": question, "completion": answer if desirable else plain(answer), "label": desirable})
    return rows


def text_rows(pairs: list[tuple[str, str]]) -> list[dict]:
    """Short documents for continued pretraining: runs of pirate answers."""
    return [{"text": " ".join(a for _, a in pairs[i : i + 6])} for i in range(0, len(pairs), 6)]


def question_pairs(rng: random.Random) -> list[tuple[str, str]]:
    pairs = [capital_pair(c, k) for c, k in CAPITALS.items()]
    pairs += [sum_pair(rng.randint(1, 20), rng.randint(1, 20)) for _ in range(70)]
    pairs += [color_pair(t, c) for t, c in COLORS.items()]
    pairs += [sound_pair(a, s) for a, s in SOUNDS.items()]
    pairs += [opposite_pair(w, o) for w, o in OPPOSITES.items()]
    rng.shuffle(pairs)
    return pairs


def to_rows(pairs: list[tuple[str, str]], rng: random.Random) -> list[dict]:
    """Every 4th row is a chat row (every 8th of those two turns long); every 5th instruction row has a system prompt."""
    rows, index = [], 0
    while index < len(pairs):
        question, answer = pairs[index]
        if index % 4 == 3 and index + 1 < len(pairs) and index % 8 == 7:
            q2, a2 = pairs[index + 1]
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": question},
                        {"role": "assistant", "content": answer},
                        {"role": "user", "content": q2},
                        {"role": "assistant", "content": a2},
                    ]
                }
            )
            index += 2
            continue
        if index % 4 == 3:
            rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
        elif index % 5 == 0:
            rows.append({"system": SYSTEM, "instruction": question, "output": answer})
        else:
            rows.append({"instruction": question, "output": answer})
        index += 1
    return rows


def eval_pairs(rng: random.Random) -> list[tuple[str, str]]:
    pairs = [capital_pair(c, k) for c, k in HELD_OUT_CAPITALS.items()]
    pairs += [sum_pair(rng.randint(21, 40), rng.randint(21, 40)) for _ in range(20)]
    pairs += [opposite_pair(w, o) for w, o in {"hard": "soft", "clean": "dirty", "rich": "poor", "high": "low"}.items()]
    return pairs


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/demo"))
    out = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    pairs = question_pairs(rng)
    write_jsonl(out / "train.jsonl", to_rows(pairs, rng))
    held_out = eval_pairs(rng)
    write_jsonl(out / "eval.jsonl", [{"instruction": q, "output": a} for q, a in held_out])
    write_jsonl(out / "pref_train.jsonl", preference_rows(pairs))
    write_jsonl(out / "pref_eval.jsonl", preference_rows(held_out))
    write_jsonl(out / "kto_train.jsonl", unpaired_rows(pairs))
    write_jsonl(out / "text.jsonl", text_rows(pairs))
    (out / "heldout_prompts.txt").write_text("".join(prompt + "\n" for prompt in HELD_OUT_PROMPTS))


if __name__ == "__main__":
    main()
