"""Prompt text -> 77-token windows with a weight per token, the way A1111 feeds CLIP (sd_hijack_clip's
tokenize_line): each emphasis fragment tokenized on its own, 75 tokens a chunk, BREAK closing a chunk early,
and a chunk that fills up shortly after a comma handing the words after that comma to the next one; or, for
the plain syntax, diffusers' one window of literal text cut at 75 tokens.

Textual-inversion embeddings take one position per vector, under ids past the vocabulary that the text encoder
reads from the call's extra vectors. A1111 finds an embedding by its name's token ids (longest names first)
and moves it whole to the next chunk when it does not fit; diffusers (the plain syntax) by its name as text,
the way load_textual_inversion's added tokens and maybe_convert_prompt find it."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from sdcli.prompt_syntax import BREAK, parse_attention

CHUNK_TOKENS = 75  # a window's tokens between its start and end token
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default: how far back a full chunk may split at a comma
# CLIP's pre-tokenizer: BPE merges within each match only (the tokenizer adds its special tokens in front)
CLIP_WORDS = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"


class Vocabulary(Protocol):
    start_id: int
    end_id: int
    pad_id: int
    comma_id: int

    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class Trigger:
    """A textual-inversion embedding as the chunker sees it: the name that calls it and one id per vector."""

    name: str
    ids: tuple[int, ...]


@dataclass(frozen=True)
class Chunk:
    """One window: start, 75 tokens or padding, end (padding after the first end token is the encoder's pad
    id), each position's emphasis (1.0 for the special tokens and padding), and where a pooling encoder reads
    it: the first end token, or for the plain syntax the largest id, as transformers' CLIP does under the
    hub's legacy SDXL config (an added embedding token outranks the end token there)."""

    ids: tuple[int, ...]
    weights: tuple[float, ...]
    pool_at: int

    @property
    def emphasised(self) -> bool:
        return any(w != 1.0 for w in self.weights)


def chunk_prompt(
    text: str, vocab: Vocabulary, syntax: str, triggers: Sequence[Trigger] = ()
) -> tuple[list[Chunk], bool]:
    """The prompt's windows and whether text was cut off (only the plain syntax cuts)."""
    if syntax == "plain":
        tokens = _plain_tokens(text, vocab, triggers)
        kept = tokens[:CHUNK_TOKENS]
        chunk = _window(kept, [1.0] * len(kept), vocab)
        largest = max(range(len(chunk.ids)), key=chunk.ids.__getitem__)  # the first of equals
        return [Chunk(chunk.ids, chunk.weights, largest)], len(tokens) > len(kept)
    return _a1111_chunks(text, vocab, triggers), False


def _a1111_chunks(text: str, vocab: Vocabulary, triggers: Sequence[Trigger]) -> list[Chunk]:
    chunks: list[Chunk] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1
    names = _name_ids(vocab, triggers)

    def close(carry_from: int | None = None) -> None:
        """Emit the chunk so far (up to `carry_from`), starting the next with what lies after it (embedding
        positions travel with their vectors; A1111 leaves the vectors behind in the closed chunk)."""
        nonlocal tokens, weights, last_comma
        cut = len(tokens) if carry_from is None else carry_from
        chunks.append(_window(tokens[:cut], weights[:cut], vocab))
        tokens, weights, last_comma = tokens[cut:], weights[cut:], -1

    for part in parse_attention(text):
        if part is BREAK:
            close()
            continue
        fragment, weight = part
        pieces = vocab.encode(fragment)
        at = 0
        while at < len(pieces):
            token = pieces[at]
            if token == vocab.comma_id:
                last_comma = len(tokens)
            elif len(tokens) == CHUNK_TOKENS and last_comma != -1 and len(tokens) - last_comma <= COMMA_BACKTRACK:
                close(carry_from=last_comma + 1)
            if len(tokens) == CHUNK_TOKENS:
                close()
            ids, used = _at(pieces, at, names)
            if len(tokens) + len(ids) > CHUNK_TOKENS:
                close()  # an embedding that does not fit moves whole to the next chunk
            tokens += ids
            weights += [weight] * len(ids)
            at += used
    if tokens or not chunks:
        close()
    return chunks


def _name_ids(vocab: Vocabulary, triggers: Sequence[Trigger]) -> list[tuple[list[int], Trigger]]:
    """Each embedding's name as token ids, longest first (so the longer of two names sharing a start wins)."""
    names = [(vocab.encode(t.name), t) for t in triggers]
    return sorted([(ids, t) for ids, t in names if ids], key=lambda pair: len(pair[0]), reverse=True)


def _at(pieces: list[int], at: int, names: list[tuple[list[int], Trigger]]) -> tuple[tuple[int, ...], int]:
    """(ids to place, tokens used) at `pieces[at]`: an embedding's vectors where its name starts, else the token."""
    for ids, trigger in names:
        if pieces[at : at + len(ids)] == ids:
            return trigger.ids, len(ids)
    return (pieces[at],), 1


def _plain_tokens(text: str, vocab: Vocabulary, triggers: Sequence[Trigger]) -> list[int]:
    """diffusers' tokens for text with the embeddings loaded as added tokens `name`, `name_1`, ... (one per
    vector). Its tokenizer cuts an added token out wherever the text holds it, in any case, inside words too;
    maybe_convert_prompt spells a multi-vector name out as "name name_1 ..." first, though only where the text
    has it in exactly its case and only for a lower-case name (the tokenizer reports matches lower-cased)."""
    added = {spelling.lower(): i for t in triggers for spelling, i in zip(_spellings(t), t.ids, strict=True)}
    if not added:
        return vocab.encode(text)
    pattern = re.compile("|".join(map(re.escape, sorted(added, key=len, reverse=True))), re.IGNORECASE)
    found = {m.group(0).lower() for m in pattern.finditer(text)}
    for t in triggers:
        if t.name in found:
            text = text.replace(t.name, " ".join(_spellings(t)))
    tokens, at = [], 0
    for m in pattern.finditer(text):
        tokens += [*vocab.encode(text[at : m.start()]), added[m.group(0).lower()]]
        at = m.end()
    return tokens + vocab.encode(text[at:])


def _spellings(trigger: Trigger) -> list[str]:
    """diffusers' added tokens for an embedding: its name, then name_1, name_2, ... for further vectors."""
    return [trigger.name] + [f"{trigger.name}_{i}" for i in range(1, len(trigger.ids))]


def _window(tokens: list[int], weights: list[float], vocab: Vocabulary) -> Chunk:
    padding = CHUNK_TOKENS - len(tokens)
    ids = (vocab.start_id, *tokens, vocab.end_id, *[vocab.pad_id] * padding)
    return Chunk(ids, (1.0, *weights, 1.0, *[1.0] * padding), len(tokens) + 1)
