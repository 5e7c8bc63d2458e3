"""Generate the tiny bundled assets used by the tests and the embedded default run.

    python tools/make_tiny_assets.py [--out-dir megatron_psft/assets]

Writes ``chat_data.jsonl`` (a few hundred short, learnable chat conversations) and ``tokenizer/``
(a byte-level BPE trained on that data, with Qwen-style special tokens and chat template, loadable
offline with ``transformers.AutoTokenizer``). Deterministic: the same command writes the same bytes.
"""

import argparse
import json
import os
import random

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

SEED = 1234
VOCAB_SIZE = 1000  # including the special tokens, which Qwen-style come after the learned vocabulary
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2's pre-tokenizer split: digits one by one, so arithmetic stays learnable.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

WORDS = [
    "apple", "banana", "cherry", "dog", "cat", "house", "river", "stone", "green", "water", "music",
    "light", "tiger", "paper", "robot", "cloud", "garden", "pencil", "summer", "winter", "orange",
    "planet", "bridge", "window", "rabbit", "silver", "forest", "candle", "rocket", "yellow",
]
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "Egypt": "Cairo", "Canada": "Ottawa", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo",
    "Greece": "Athens", "Poland": "Warsaw", "Chile": "Santiago", "India": "New Delhi",
    "China": "Beijing", "Russia": "Moscow", "Brazil": "Brasilia", "Portugal": "Lisbon",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "fast": "slow", "light": "dark", "happy": "sad",
    "old": "new", "open": "closed", "early": "late", "high": "low", "full": "empty", "hard": "soft",
}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
SYSTEM_PROMPTS = [None, None, "You are a helpful assistant.", "Answer briefly and exactly."]


def arithmetic(rng):
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(0, 12), rng.randint(0, 12)
    result = {"+": a + b, "-": a - b, "*": a * b}[op]
    return f"What is {a} {op} {b}?", f"{a} {op} {b} = {result}", result


def reverse_word(rng):
    word = rng.choice(WORDS)
    return f"Reverse the word \"{word}\".", word[::-1]


def uppercase(rng):
    text = " ".join(rng.sample(WORDS, rng.randint(1, 3)))
    return f"Write \"{text}\" in capital letters.", text.upper()


def count_letters(rng):
    word = rng.choice(WORDS)
    return f"How many letters are in \"{word}\"?", f"\"{word}\" has {len(word)} letters."


def count_char(rng):
    word = rng.choice(WORDS)
    char = rng.choice(sorted(set(word)))
    return f"How many times does \"{char}\" appear in \"{word}\"?", str(word.count(char))


def capital(rng):
    country = rng.choice(sorted(CAPITALS))
    return f"What is the capital of {country}?", f"The capital of {country} is {CAPITALS[country]}."


def opposite(rng):
    word = rng.choice(sorted(OPPOSITES))
    return f"What is the opposite of \"{word}\"?", OPPOSITES[word]


def next_day(rng):
    i = rng.randrange(7)
    return f"What day comes after {DAYS[i]}?", DAYS[(i + 1) % 7]


def sort_numbers(rng):
    numbers = rng.sample(range(100), rng.randint(3, 5))
    return f"Sort these numbers: {', '.join(map(str, numbers))}.", ", ".join(map(str, sorted(numbers)))


SINGLE_TURN_TASKS = [reverse_word, uppercase, count_letters, count_char, capital, opposite, next_day,
                     sort_numbers, lambda rng: arithmetic(rng)[:2]]


def multi_turn(rng):
    """Two or three turns where the follow-up refers back to the previous answer."""
    if rng.random() < 0.5:
        question, answer, result = arithmetic(rng)
        n = rng.randint(1, 20)
        turns = [(question, answer), (f"Now add {n} to that.", f"{result} + {n} = {result + n}")]
        if rng.random() < 0.5:
            turns.append(("Is that even or odd?", "even" if (result + n) % 2 == 0 else "odd"))
        return turns
    word = rng.choice(WORDS)
    return [(f"Reverse the word \"{word}\".", word[::-1]),
            ("Now write it in capital letters.", word[::-1].upper())]


def conversation(rng):
    system = rng.choice(SYSTEM_PROMPTS)
    turns = multi_turn(rng) if rng.random() < 0.25 else [rng.choice(SINGLE_TURN_TASKS)(rng)]
    messages = [{"role": "system", "content": system}] if system else []
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"messages": messages}


def make_chat_data(num_conversations=480, num_prompt_response=20):
    rng = random.Random(SEED)
    rows = [conversation(rng) for _ in range(num_conversations)]
    for _ in range(num_prompt_response):
        prompt, response = rng.choice(SINGLE_TURN_TASKS)(rng)
        rows.append({"prompt": prompt, "response": response})
    rng.shuffle(rows)
    return rows


def make_tokenizer(rows):
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)

    def texts():
        for row in rows:
            messages = row.get("messages") or [{"role": "user", "content": row["prompt"]},
                                               {"role": "assistant", "content": row["response"]}]
            for message in messages:
                yield f"{message['role']}\n{message['content']}\n"

    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts(), trainer=trainer)
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return tokenizer


def tokenizer_config(tokenizer):
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "added_tokens_decoder": {
            str(tokenizer.token_to_id(token)): {"content": token, "lstrip": False, "normalized": False,
                                                "rstrip": False, "single_word": False, "special": True}
            for token in SPECIAL_TOKENS
        },
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "split_special_tokens": False,
    }


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "..", "megatron_psft", "assets"))
    args = parser.parse_args()

    rows = make_chat_data()
    os.makedirs(os.path.join(args.out_dir, "tokenizer"), exist_ok=True)
    with open(os.path.join(args.out_dir, "chat_data.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    tokenizer = make_tokenizer(rows)
    tokenizer_dir = os.path.join(args.out_dir, "tokenizer")
    tokenizer.save(os.path.join(tokenizer_dir, "tokenizer.json"))
    write_json(os.path.join(tokenizer_dir, "tokenizer_config.json"), tokenizer_config(tokenizer))
    write_json(os.path.join(tokenizer_dir, "special_tokens_map.json"), {
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
    })
    print(f"wrote {len(rows)} conversations and a {tokenizer.get_vocab_size()}-token tokenizer to {args.out_dir}")


if __name__ == "__main__":
    main()
