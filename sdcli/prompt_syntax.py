"""A1111's prompt emphasis: `(text)` x1.1, `[text]` /1.1, `(text:1.3)`, nesting multiplies, backslash
escapes, and `BREAK` (plain text only) starting a new chunk. The same fragments and weights as A1111's
parse_prompt_attention, so a prompt pasted from the webui means here what it meant there."""

from __future__ import annotations

import re
from typing import Final

ROUND, SQUARE = 1.1, 1 / 1.1
_TOKEN = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


class _Break:
    def __repr__(self) -> str:
        return "BREAK"


BREAK: Final = _Break()


def parse_attention(text: str) -> list:
    """Fragments (text, weight) in order, with BREAK where a plain-text BREAK closes the chunk. As in
    A1111: an unmatched closer is literal text, openers left open weight the rest, a BREAK inside brackets
    is just a word, and neighbours of equal weight merge."""
    parts: list[list] = []  # [text, weight]; a BREAK marker is ["BREAK", -1.0], as A1111 tells it apart
    opened: dict[str, list[int]] = {"(": [], "[": []}
    # A closer multiplies every fragment since its opener; factors are kept per opening position and
    # applied once at the end, so deep nesting costs a stack, not a pass over the fragments per bracket.
    factors: list[tuple[int, int, float]] = []
    for match in _TOKEN.finditer(text):
        piece, weight = match.group(0), match.group(1)
        if piece.startswith("\\") and len(piece) == 2:
            parts.append([piece[1], 1.0])
        elif piece in opened:
            opened[piece].append(len(parts))
        elif weight is not None and opened["("]:
            factors.append((opened["("].pop(), len(parts), _number(weight)))
        elif piece == ")" and opened["("]:
            factors.append((opened["("].pop(), len(parts), ROUND))
        elif piece == "]" and opened["["]:
            factors.append((opened["["].pop(), len(parts), SQUARE))
        else:
            for i, run in enumerate(_BREAK.split(piece)):
                if i:
                    parts.append(["BREAK", -1.0])
                parts.append([run, 1.0])
    for start in opened["("]:
        factors.append((start, len(parts), ROUND))
    for start in opened["["]:
        factors.append((start, len(parts), SQUARE))
    for start, end, factor in factors:  # in A1111's order: closers as met, then the still-open ones
        for part in parts[start:end]:
            part[1] *= factor
    if not parts:
        return [("", 1.0)]
    merged: list[list] = [parts[0]]
    for part in parts[1:]:
        if part[1] == merged[-1][1]:
            merged[-1][0] += part[0]
        else:
            merged.append(part)
    # what A1111's chunker takes for a break; one that brackets re-weighted stays the word
    return [BREAK if (text, weight) == ("BREAK", -1.0) else (text, weight) for text, weight in merged]


def _number(text: str) -> float:
    """A1111 reads the weight with float(); a malformed one ("1.2.3", ".") would crash it: here it is 1.0."""
    try:
        return float(text)
    except ValueError:
        return 1.0
