"""Write the demo datasets in data/demo/: short questions answered in the voice of a pirate.

The style is new to the model and learnable in a few dozen steps, so a short fine-tune visibly changes its answers.
The training questions come in five forms ("What is the capital of X?", "What is A plus B?", "What color is X?",
"What sound does X make?", "What is the opposite of X?"); the held-out prompts (heldout_prompts.txt, one per line)
are asked in none of them, so they test whether the style carries over to new questions, not whether a template
was memorized.

Also written: pref_train/pref_eval.jsonl (the pirate answer preferred over the plain one), kto_train.jsonl (the same
as unpaired desirable/undesirable rows), text.jsonl (plain text, for continued pretraining) and
benchmark/pirate_style.jsonl, the data of the demo's lm-evaluation-harness task (benchmark/pirate_style.yaml): questions
in no training form, each with the same answer in two voices, the pirate's and a plain one, of equal token length.

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
# The demo benchmark: questions in no training form (none of the held-out prompts either), each with a plain answer
# that both choices share; only the voice around it differs.
BENCHMARK_FACTS = (
    ("How many days are in a week?", "a week has seven days"),
    ("What do bees make?", "bees make honey"),
    ("Which planet is closest to the sun?", "Mercury is closest to the sun"),
    ("How many hours are in a day?", "a day has twenty-four hours"),
    ("What do we call frozen water?", "frozen water is called ice"),
    ("Which animal is known as the king of the jungle?", "the lion is called the king of the jungle"),
    ("How many wheels does a bicycle have?", "a bicycle has two wheels"),
    ("What gas do plants take in from the air?", "plants take in carbon dioxide"),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote it"),
    ("How many continents are there?", "there are seven continents"),
    ("What is the largest ocean on Earth?", "the Pacific is the largest ocean"),
    ("Which bird is a symbol of peace?", "the dove is a symbol of peace"),
    ("What do caterpillars turn into?", "caterpillars turn into butterflies"),
    ("How many months are in a year?", "a year has twelve months"),
    ("What instrument has black and white keys?", "the piano has black and white keys"),
    ("Where do penguins mostly live?", "penguins mostly live in the far south"),
    ("What is the tallest animal?", "the giraffe is the tallest animal"),
    ("Which fruit keeps the doctor away?", "an apple a day keeps the doctor away"),
    ("How many sides does a triangle have?", "a triangle has three sides"),
    ("What do you use to write on a blackboard?", "you write on it with chalk"),
    ("Which star is at the center of our solar system?", "the sun is at its center"),
    ("What does a thermometer measure?", "a thermometer measures temperature"),
    ("How many players are on a soccer team on the field?", "a team has eleven players on the field"),
    ("What do cows drink?", "cows drink water"),
    ("Which metal is liquid at room temperature?", "mercury is liquid at room temperature"),
    ("How many teeth does an adult human usually have?", "an adult usually has thirty-two teeth"),
    ("What is the main language spoken in Brazil?", "people in Brazil speak Portuguese"),
    ("What shape has four equal sides?", "a square has four equal sides"),
    ("Which season comes after winter?", "spring comes after winter"),
    ("What do spiders spin?", "spiders spin webs"),
    ("How many strings does a violin have?", "a violin has four strings"),
    ("What is the boiling point of water at sea level?", "water boils at one hundred degrees Celsius"),
    ("Which organ pumps blood through the body?", "the heart pumps the blood"),
    ("What do you call a baby dog?", "a baby dog is called a puppy"),
    ("How many legs does an insect have?", "an insect has six legs"),
    ("Which way does a compass needle point?", "a compass needle points north"),
    ("What falls from clouds when it rains?", "drops of water fall from the clouds"),
    ("How many minutes are in an hour?", "an hour has sixty minutes"),
    ("What do you call the place where books are lent?", "that place is called a library"),
    ("Which animal has a long trunk?", "the elephant has a long trunk"),
)


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


def benchmark_rows(rng: random.Random) -> list[dict]:
    """Multiple choice between two voices of one answer: the pirate's ("Arr, <answer>, matey!") and a plain one
    ("Well, <answer>, my friend."). Both frames are two tokens before the answer and three after it for the demo
    model's tokenizer, so the choices have equal token length and summed log-likelihood accuracy is not biased by
    length; `label` is the index of the pirate's answer, whose position is shuffled."""
    rows = []
    for question, answer in BENCHMARK_FACTS:
        pirate, plain_voice = f"Arr, {answer}, matey!", f"Well, {answer}, my friend."
        label = rng.randrange(2)
        choices = [pirate, plain_voice] if label == 0 else [plain_voice, pirate]
        rows.append({"question": question, "choices": choices, "label": label})
    return rows


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
    (out / "benchmark").mkdir(exist_ok=True)
    write_jsonl(out / "benchmark" / "pirate_style.jsonl", benchmark_rows(random.Random(1)))


if __name__ == "__main__":
    main()
