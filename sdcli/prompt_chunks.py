"""Prompt text -> 77-token windows with a weight per token, the way A1111 feeds CLIP (sd_hijack_clip's
tokenize_line): each emphasis fragment tokenized on its own, 75 tokens a chunk, BREAK closing a chunk early,
and a chunk that fills up shortly after a comma handing the words after that comma to the next one; or, for
the plain syntax, diffusers' one window of literal text cut at 75 tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from sdcli.prompt_syntax import BREAK, parse_attention

CHUNK_TOKENS = 75  # a window's tokens between its start and end token
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default: how far back a full chunk may split at a comma


class Vocabulary(Protocol):
    start_id: int
    end_id: int
    pad_id: int
    comma_id: int

    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class Chunk:
    """One window: start, 75 tokens or padding, end (padding after the first end token is the encoder's pad
    id), and each position's emphasis (1.0 for the special tokens and padding)."""

    ids: tuple[int, ...]
    weights: tuple[float, ...]

    @property
    def emphasised(self) -> bool:
        return any(w != 1.0 for w in self.weights)


def chunk_prompt(text: str, vocab: Vocabulary, syntax: str) -> tuple[list[Chunk], bool]:
    """The prompt's windows and whether text was cut off (only the plain syntax cuts)."""
    if syntax == "plain":
        tokens = vocab.encode(text)
        kept = tokens[:CHUNK_TOKENS]
        return [_window(kept, [1.0] * len(kept), vocab)], len(tokens) > len(kept)
    return _a1111_chunks(text, vocab), False


def _a1111_chunks(text: str, vocab: Vocabulary) -> list[Chunk]:
    chunks: list[Chunk] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close(carry_from: int | None = None) -> None:
        """Emit the chunk so far (up to `carry_from`), starting the next with what lies after it."""
        nonlocal tokens, weights, last_comma
        cut = len(tokens) if carry_from is None else carry_from
        chunks.append(_window(tokens[:cut], weights[:cut], vocab))
        tokens, weights, last_comma = tokens[cut:], weights[cut:], -1

    for part in parse_attention(text):
        if part is BREAK:
            close()
            continue
        fragment, weight = part
        for token in vocab.encode(fragment):
            if token == vocab.comma_id:
                last_comma = len(tokens)
            elif len(tokens) == CHUNK_TOKENS and last_comma != -1 and len(tokens) - last_comma <= COMMA_BACKTRACK:
                close(carry_from=last_comma + 1)
            if len(tokens) == CHUNK_TOKENS:
                close()
            tokens.append(token)
            weights.append(weight)
    if tokens or not chunks:
        close()
    return chunks


def _window(tokens: list[int], weights: list[float], vocab: Vocabulary) -> Chunk:
    padding = CHUNK_TOKENS - len(tokens)
    ids = (vocab.start_id, *tokens, vocab.end_id, *[vocab.pad_id] * padding)
    return Chunk(ids, (1.0, *weights, 1.0, *[1.0] * padding))
