"""The report of clipped_tokens.jsonl, which :mod:`megatron_psft.observability.clipped_tokens` writes during
training: tables on stdout and, optionally, an SVG
word cloud; ``megatron-psft-clipped-tokens``, or ``python tools/clipped_tokens.py`` from a checkout):

    megatron-psft-clipped-tokens --clipped-tokens SAVE/clipped_tokens.jsonl --tokenizer HF_DIR \\
        [--top 30] [--min-count 5] [--steps 100:200] [--image cloud.svg]

``megatron_psft.train --log-clipped-tokens`` writes the file next to the metrics file, one line per
optimizer step: ``{"step": 7, "clipped": {"<token id>": count, ...}, "response": {...}}`` ("clipped":
response tokens whose ratio p_new/p_old exceeded 1+eps_high; "response": all response tokens). The
report sums the counts over the chosen steps and prints the most clipped tokens, the tokens with the
highest clip rate (clipped / occurrences, among tokens seen at least --min-count times) and a summary
line. A step that appears twice (a run resumed from a checkpoint older than its last logged step)
counts once, from its later line. The SVG needs nothing to render it but a browser.
"""

import argparse
import json
import math
import os
import unicodedata
from collections import Counter
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple
from xml.sax.saxutils import escape

from megatron_psft.observability.progress import ProgressBar, count_lines

MAX_FONT_PX = 64.0
MIN_FONT_PX = 10.0  # below this a word is unreadable; the only departure from size ~ sqrt(count)
CHAR_WIDTH_EM = 0.6  # advance of a monospace glyph; wide (CJK) glyphs take two
WORD_PADDING_PX = 3.0
# Light-to-dark would vanish on the white background at the low end, so every stop is dark enough to read.
RATE_COLOURS = ((0.0, (0x2b, 0x6c, 0xb0)), (0.5, (0x80, 0x5a, 0xd5)), (1.0, (0xc5, 0x30, 0x30)))


class ClippedTokenCounts(NamedTuple):
    steps: List[int]
    clipped: Counter
    response: Counter
    repeated_steps: int  # lines of these steps that a later line for the same step replaced


class TokenRow(NamedTuple):
    token: str
    token_id: int
    clipped: int
    occurrences: int

    @property
    def rate(self) -> float:
        return self.clipped / self.occurrences


# --- reading --------------------------------------------------------------------------------------

def parse_step_range(text: str) -> Tuple[Optional[int], Optional[int]]:
    """'A:B' -> (A, B), both ends included; either end may be left out ('100:', ':50')."""
    first, colon, last = text.partition(":")
    try:
        if not colon:
            raise ValueError
        bounds = (int(first) if first.strip() else None, int(last) if last.strip() else None)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected A:B (step numbers, either may be left out), got {text!r}") from None
    if None not in bounds and bounds[0] > bounds[1]:
        raise argparse.ArgumentTypeError(f"empty step range {text!r}: {bounds[0]} > {bounds[1]}")
    return bounds


def _token_counts(row: dict, key: str) -> Dict[int, int]:
    counts = row.get(key)
    if not isinstance(counts, dict):
        raise ValueError(f'"{key}" must be an object of token id -> count')
    parsed = {}
    for token_id, count in counts.items():
        if not token_id.isdigit() or not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ValueError(f'"{key}": expected "<token id>": count >= 0, got {json.dumps(token_id)}: {json.dumps(count)}')
        parsed[int(token_id)] = count
    return parsed


def parse_step_line(line: str) -> Tuple[int, Dict[int, int], Dict[int, int]]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"bad JSON: {e}") from None
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    step = row.get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        raise ValueError('"step" must be an integer')
    clipped, response = _token_counts(row, "clipped"), _token_counts(row, "response")
    for token_id, count in clipped.items():
        if count > response.get(token_id, 0):  # clipped tokens are a subset of the response tokens
            raise ValueError(f"token {token_id}: {count} clipped but only {response.get(token_id, 0)} in the response")
    return step, clipped, response


def read_clipped_tokens(path: str, first_step: Optional[int] = None, last_step: Optional[int] = None) -> ClippedTokenCounts:
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path}: no such file (the trainer writes it with --log-clipped-tokens, PSFT steps only)")
    by_step = {}
    repeats = Counter()
    bar = ProgressBar(f"reading {os.path.basename(path)}", total=lambda: count_lines(path), unit="line")
    with bar, open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            bar.update()
            if not line.strip():
                continue
            try:
                step, clipped, response = parse_step_line(line)
            except ValueError as e:
                raise SystemExit(f"error: {path}:{number}: {e}") from None
            repeats[step] += step in by_step
            by_step[step] = (clipped, response)
    if not by_step:
        raise SystemExit(f"error: {path} is empty: no step was logged (were any PSFT steps run?)")
    steps = sorted(s for s in by_step if (first_step is None or s >= first_step) and (last_step is None or s <= last_step))
    if not steps:
        wanted = ":".join("" if bound is None else str(bound) for bound in (first_step, last_step))
        raise SystemExit(f"error: no step of {path} lies in --steps {wanted} "
                         f"(it has steps {min(by_step)}..{max(by_step)})")
    clipped_total, response_total = Counter(), Counter()
    for step in steps:
        clipped_total.update(by_step[step][0])
        response_total.update(by_step[step][1])
    return ClippedTokenCounts(steps, clipped_total, response_total, sum(repeats[step] for step in steps))


# --- token text -----------------------------------------------------------------------------------

def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError or others depending on what is missing
        raise SystemExit(f"error: cannot load a tokenizer from {name!r} (a local HF model or tokenizer directory): {e}") from None


def _byte_level_alphabet() -> Dict[str, int]:
    """GPT-2's byte-level BPE spelling: each byte is one printable character. Character -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


BYTE_LEVEL_ALPHABET = _byte_level_alphabet()


def visible(text: str) -> str:
    """Whitespace and control characters made visible: a space is '▁', a newline '\\n'."""
    out = []
    for char in text:
        if char == " ":
            out.append("▁")
        elif char in "\n\t\r":
            out.append({"\n": "\\n", "\t": "\\t", "\r": "\\r"}[char])
        elif unicodedata.category(char) in ("Cc", "Cs") or char.isspace():
            out.append(f"\\x{ord(char):02x}" if ord(char) < 256 else f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return "".join(out)


def token_text(tokenizer, token_id: int) -> str:
    """The token as it reads in text, whitespace made visible; a piece of a multi-byte character as its bytes."""
    text = tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if "\ufffd" not in text:
        return visible(text)
    raw = tokenizer.convert_ids_to_tokens(token_id)
    if raw and all(char in BYTE_LEVEL_ALPHABET for char in raw):
        return "".join(visible(chr(b)) if b < 0x80 else f"\\x{b:02x}" for b in (BYTE_LEVEL_ALPHABET[c] for c in raw))
    return visible(raw or text)  # e.g. SentencePiece's byte-fallback tokens already read '<0xE2>'


def token_rows(counts: ClippedTokenCounts, tokenizer) -> List[TokenRow]:
    """One row per clipped token id, most clipped first (ties: lower id first)."""
    vocab = len(tokenizer)
    unknown = sorted(i for i in counts.response if i >= vocab)
    if unknown:
        raise SystemExit(f"error: token id {unknown[0]} is beyond the tokenizer's {vocab} ids: wrong --tokenizer?")
    return sorted((TokenRow(token_text(tokenizer, i), i, c, counts.response[i]) for i, c in counts.clipped.items() if c),
                  key=lambda row: (-row.clipped, row.token_id))


# --- tables ---------------------------------------------------------------------------------------

def format_rate(rate: float) -> str:
    return f"{100 * rate:.2f}%"


def format_table(title: str, rows: List[TokenRow]) -> str:
    header = ("rank", "token", "id", "clipped", "occurrences", "clip rate")
    cells = [(str(rank), row.token, str(row.token_id), str(row.clipped), str(row.occurrences), format_rate(row.rate))
             for rank, row in enumerate(rows, 1)]
    widths = [max(len(line[col]) for line in [header, *cells]) for col in range(len(header))]
    lines = [title]
    for line in [header, *cells]:  # the token column is left-aligned, numbers right-aligned
        lines.append("  ".join(cell.ljust(w) if col == 1 else cell.rjust(w) for col, (cell, w) in enumerate(zip(line, widths))))
    return "\n".join(lines)


def clipped_share(counts: ClippedTokenCounts) -> str:
    clipped, response = sum(counts.clipped.values()), sum(counts.response.values())
    return f"{clipped} / {response} response tokens ({format_rate(clipped / response) if response else 'n/a'})"


def summary_line(counts: ClippedTokenCounts) -> str:
    repeated = f"; {counts.repeated_steps} repeated step line(s), the later kept" if counts.repeated_steps else ""
    return (f"steps read: {len(counts.steps)} ({counts.steps[0]}..{counts.steps[-1]}){repeated}; "
            f"clipped tokens: {clipped_share(counts)}; "
            f"distinct clipped ids: {sum(1 for c in counts.clipped.values() if c)}")


# --- SVG word cloud -------------------------------------------------------------------------------

class PlacedWord(NamedTuple):
    row: TokenRow
    font_px: float
    width: float
    x: float  # left edge
    baseline: float

    def box(self) -> Tuple[float, float, float, float]:
        """Left, top, right, bottom of the glyphs (monospace ascent ~0.8em, descent ~0.25em), padded."""
        return (self.x - WORD_PADDING_PX, self.baseline - 0.8 * self.font_px - WORD_PADDING_PX,
                self.x + self.width + WORD_PADDING_PX, self.baseline + 0.25 * self.font_px + WORD_PADDING_PX)


def text_width(text: str, font_px: float) -> float:
    columns = sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)
    return columns * CHAR_WIDTH_EM * font_px


def _overlaps(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def cloud_layout(rows: List[TokenRow]) -> List[PlacedWord]:
    """Place the words, biggest first, at the first free spot along a spiral out from the centre.

    Coordinates are relative to the centre; the spiral is twice as wide as tall so the cloud comes
    out landscape. Each word's width is what the SVG forces with textLength, so boxes never overlap.
    """
    most = max(row.clipped for row in rows)
    placed: List[PlacedWord] = []
    placed_boxes = []
    last_collision = None  # the box that blocked the last try usually blocks the next one too: test it first
    for row in rows:
        font_px = max(MIN_FONT_PX, MAX_FONT_PX * math.sqrt(row.clipped / most))
        width = text_width(row.token, font_px)
        angle = 0.0
        while True:
            radius = 2.0 * angle  # 4*pi px further out each turn
            centre_x, centre_y = 2.0 * radius * math.cos(angle), radius * math.sin(angle)
            word = PlacedWord(row, font_px, width, centre_x - width / 2, centre_y + 0.275 * font_px)
            box = word.box()
            if last_collision is None or not _overlaps(box, last_collision):
                last_collision = next((placed_box for placed_box in placed_boxes if _overlaps(box, placed_box)), None)
                if last_collision is None:
                    placed.append(word)
                    placed_boxes.append(box)
                    break
            angle += 4.0 / max(radius, 4.0)  # ~4 px along the spiral per try
    return placed


def rate_colour(fraction: float) -> str:
    for (low, low_rgb), (high, high_rgb) in zip(RATE_COLOURS, RATE_COLOURS[1:]):
        if fraction <= high:
            t = (fraction - low) / (high - low)
            return "#" + "".join(f"{round(a + t * (b - a)):02x}" for a, b in zip(low_rgb, high_rgb))
    return "#" + "".join(f"{c:02x}" for c in RATE_COLOURS[-1][1])


def cloud_svg(rows: List[TokenRow], counts: ClippedTokenCounts) -> str:
    """The cloud of `rows` (most clipped first) under a title, with a legend; just the title if `rows` is empty."""
    margin, title_px, legend_px = 20.0, 18.0, 12.0
    title = f"PSFT clipped tokens, steps {counts.steps[0]}..{counts.steps[-1]}: {clipped_share(counts)} clipped"
    words = cloud_layout(rows) if rows else []
    boxes = [word.box() for word in words] or [(0.0, 0.0, 0.0, 0.0)]
    left, top = min(b[0] for b in boxes), min(b[1] for b in boxes)
    right, bottom = max(b[2] for b in boxes), max(b[3] for b in boxes)
    cloud_top = margin + 2 * title_px
    legend_top = cloud_top + (bottom - top) + margin
    width = max(right - left, 0.55 * title_px * len(title), 400.0) + 2 * margin  # 0.55em: a sans-serif character
    height = legend_top + (5 * legend_px + margin if rows else 0.0)
    shift_x, shift_y = (width - (right - left)) / 2 - left, cloud_top - top
    highest_rate = max((row.rate for row in rows), default=0.0)

    out = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.1f} {height:.1f}">',
        '<rect width="100%" height="100%" fill="white"/>',
        f'<text x="{width / 2:.1f}" y="{margin + title_px:.1f}" font-family="sans-serif" font-size="{title_px:.0f}" '
        f'text-anchor="middle" fill="#222">{escape(title)}</text>',
        '<g font-family="DejaVu Sans Mono, Menlo, Consolas, monospace">',
    ]
    for word in words:
        row = word.row
        tooltip = f"id {row.token_id}: {row.clipped} clipped of {row.occurrences} ({format_rate(row.rate)})"
        # textLength pins the rendered width to the laid-out one, whatever monospace font the viewer has.
        out.append(f'<g><title>{escape(tooltip)}</title><text x="{word.x + shift_x:.1f}" y="{word.baseline + shift_y:.1f}" '
                   f'font-size="{word.font_px:.1f}" textLength="{word.width:.1f}" lengthAdjust="spacingAndGlyphs" '
                   f'fill="{rate_colour(row.rate / highest_rate if highest_rate else 0.0)}" '
                   f'data-token-id="{row.token_id}">{escape(row.token)}</text></g>')
    out.append("</g>")

    if rows:
        bar_width, bar_y = 160.0, legend_top + legend_px * 1.5
        stops = "".join(f'<stop offset="{offset:.2f}" stop-color="{rate_colour(offset)}"/>' for offset, _ in RATE_COLOURS)
        out += [
            f'<defs><linearGradient id="rate">{stops}</linearGradient></defs>',
            f'<g font-family="sans-serif" font-size="{legend_px:.0f}" fill="#444">',
            f'<text x="{margin:.1f}" y="{bar_y - 4:.1f}">colour: clip rate (clipped / occurrences)</text>',
            f'<rect x="{margin:.1f}" y="{bar_y:.1f}" width="{bar_width:.0f}" height="{legend_px:.0f}" fill="url(#rate)"/>',
            f'<text x="{margin:.1f}" y="{bar_y + 2 * legend_px:.1f}">0%</text>',
            f'<text x="{margin + bar_width:.1f}" y="{bar_y + 2 * legend_px:.1f}" text-anchor="end">'
            f'{format_rate(highest_rate)}</text>',
            f'<text x="{margin:.1f}" y="{bar_y + 3.5 * legend_px:.1f}">size: square root of the clipped count '
            f'(largest {rows[0].clipped}); the {len(rows)} most clipped tokens</text>',
            "</g>",
        ]
    out.append("</svg>")
    return "\n".join(out) + "\n"


# --- main -----------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    def positive(text):
        value = int(text)
        if value < 1:
            raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
        return value

    parser = argparse.ArgumentParser(
        description="Report which tokens PSFT clips most: tables on stdout and, optionally, an SVG word cloud.")
    parser.add_argument("--clipped-tokens", required=True, metavar="PATH", help="clipped_tokens.jsonl from the trainer")
    parser.add_argument("--tokenizer", required=True, metavar="DIR", help="HF tokenizer (or model) directory, loaded offline")
    parser.add_argument("--top", type=positive, default=30, metavar="N", help="rows per table and words in the cloud (default 30)")
    parser.add_argument("--min-count", type=positive, default=5, metavar="K",
                        help="tokens seen fewer times are left out of the clip-rate table (default 5)")
    parser.add_argument("--steps", type=parse_step_range, metavar="A:B",
                        help="only steps A..B, both included; either end may be left out (100:, :50)")
    parser.add_argument("--image", metavar="OUT.svg", help="also write an SVG word cloud of the --top most clipped tokens")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    first_step, last_step = args.steps or (None, None)
    counts = read_clipped_tokens(args.clipped_tokens, first_step, last_step)
    rows = token_rows(counts, load_tokenizer(args.tokenizer))

    if rows:
        print(format_table(f"Most clipped tokens (top {args.top} by clipped count)", rows[:args.top]))
        by_rate = sorted((row for row in rows if row.occurrences >= args.min_count),
                         key=lambda row: (-row.rate, -row.clipped, row.token_id))
        print()
        print(format_table(f"Highest clip rate (top {args.top}, tokens seen >= {args.min_count} times)", by_rate[:args.top])
              if by_rate else f"Highest clip rate: no clipped token was seen >= {args.min_count} times")
    else:
        print("No token was clipped in these steps.")
    print()
    print(summary_line(counts))

    if args.image:
        os.makedirs(os.path.dirname(os.path.abspath(args.image)), exist_ok=True)
        with open(args.image, "w", encoding="utf-8") as image:
            image.write(cloud_svg(rows[:args.top], counts))
        print(f"wrote {args.image}")


if __name__ == "__main__":
    main()
