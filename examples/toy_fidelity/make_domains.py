"""Two synthetic chat domains for the toy fidelity experiment (examples/toy_fidelity.sh).

    python examples/toy_fidelity/make_domains.py --out-dir DIR [--train-samples N] [--eval-samples M]

Domain A ("numbers") and domain B ("words") are templated single-turn chat tasks with disjoint
vocabularies and different answer structures: A answers with digits, number lists and short
number statements; B answers with spelled-out letters, reordered words and animal facts. Writes
DIR/{a,b}_{train,eval}.jsonl in the chat format tools/preprocess_data.py reads. The eval split of a
domain shares no conversation with its train split (it is drawn from its own seed and every
conversation already in train is skipped; a train split may repeat one), so eval NLL measures held-out samples. Deterministic:
the same arguments write the same bytes.
"""

import argparse
import json
import os
import random

SEED = 20250823

# --- domain A: numbers ------------------------------------------------------------------------------


def count_up(rng):
    start = rng.randint(0, 200)
    stop = start + rng.randint(2, 6)
    return f"Count from {start} to {stop}.", ", ".join(str(n) for n in range(start, stop + 1))


def successor(rng):
    n = rng.randint(0, 998)
    return f"What number comes after {n}?", f"{n + 1} comes after {n}."


def repeat_digits(rng):
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 5)))
    return f"Repeat {digits} two times.", f"{digits} {digits}"


def parity(rng):
    n = rng.randint(0, 9999)
    return f"Is {n} even or odd?", f"{n} is {'even' if n % 2 == 0 else 'odd'}."


# --- domain B: words --------------------------------------------------------------------------------

WORDS = ["moon", "frog", "lamp", "boat", "king", "snow", "wolf", "rose", "drum", "kite",
         "milk", "shoe", "ship", "bell", "fish", "corn", "duck", "nest", "ring", "sock"]
ANIMAL_SOUNDS = {"cow": "moo", "dog": "woof", "cat": "meow", "duck": "quack", "sheep": "baa",
                 "horse": "neigh", "owl": "hoot", "frog": "croak", "lion": "roar", "bee": "buzz",
                 "pig": "oink", "snake": "hiss"}
ADJECTIVES = ["quiet", "little", "sleepy", "brave", "happy", "hungry", "lazy", "clever"]
OWNERS = ["Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Hugo", "Iris", "Jonas"]


def spell(rng):
    words = rng.sample(WORDS, 2)
    return f"Spell {' '.join(words)}.", " ".join("-".join(word) for word in words)


def swap(rng):
    first, second = rng.sample(WORDS, 2)
    return f"Swap {first} and {second}.", f"{second} and {first}"


def animal_sound(rng):
    owner, adjective = rng.choice(OWNERS), rng.choice(ADJECTIVES)
    animal = rng.choice(sorted(ANIMAL_SOUNDS))
    return (f"What does {owner}'s {adjective} {animal} say?",
            f"{owner}'s {adjective} {animal} says {ANIMAL_SOUNDS[animal]}.")


def first_letters(rng):
    words = rng.sample(WORDS, 3)
    return f"Give the first letters of {' '.join(words)}.", " ".join(word[0] for word in words)


DOMAINS = {"a": [count_up, successor, repeat_digits, parity], "b": [spell, swap, animal_sound, first_letters]}


def conversations(tasks, seed, count, exclude=None):
    """`count` conversations, round-robin over `tasks` (equal shares). With `exclude` (a set of
    (prompt, response) pairs) they are also distinct and none of them is in `exclude`."""
    rng = random.Random(seed)
    rows, seen = [], None if exclude is None else set(exclude)
    attempts = 0
    while len(rows) < count:
        attempts += 1
        if attempts > 100 * count:
            raise ValueError(f"cannot draw {count} held-out conversations from {[t.__name__ for t in tasks]}: "
                             f"lower --train-samples or --eval-samples")
        prompt, response = tasks[len(rows) % len(tasks)](rng)
        if seen is not None:
            if (prompt, response) in seen:
                continue
            seen.add((prompt, response))
        rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]})
    return rows


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--train-samples", type=int, default=2048, help="conversations per domain's train split")
    parser.add_argument("--eval-samples", type=int, default=128, help="conversations per domain's eval split")
    args = parser.parse_args()

    os.makedirs(args.out_dir, exist_ok=True)
    for offset, (name, tasks) in enumerate(sorted(DOMAINS.items())):
        train = conversations(tasks, SEED + 2 * offset, args.train_samples)
        train_pairs = {(row["messages"][0]["content"], row["messages"][1]["content"]) for row in train}
        held_out = conversations(tasks, SEED + 2 * offset + 1, args.eval_samples, exclude=train_pairs)
        write_jsonl(os.path.join(args.out_dir, f"{name}_train.jsonl"), train)
        write_jsonl(os.path.join(args.out_dir, f"{name}_eval.jsonl"), held_out)
        print(f"domain {name.upper()}: {len(train)} train, {len(held_out)} eval conversations in {args.out_dir}")


if __name__ == "__main__":
    main()
