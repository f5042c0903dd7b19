"""Bounds on how much of a user's value a message may echo: a 1 MB prompt or key must not become a 1 MB line."""

from __future__ import annotations


def clip(text: object, limit: int = 100, *, quote: bool = True) -> str:
    """A user's value as one printable line of at most about `limit` characters, safe for any stream encoding.

    Text is quoted (pass `quote=False` for text that is already a message); other values are shown as
    their repr. A cut value ends in '…' and gives its full length: `'aaaa…' (5000 characters)`."""
    if not isinstance(text, str):
        text, quote = repr(text), False
    pieces: list[str] = []
    used = taken = 0
    for char in text[:limit]:  # each character shows as at least one, so `limit` of them always suffice
        piece = _escape(char, quote)
        if used + len(piece) > limit:
            break
        pieces.append(piece)
        used += len(piece)
        taken += 1
    shown = "".join(pieces) + ("…" if taken < len(text) else "")
    shown = f"'{shown}'" if quote else shown
    return f"{shown} ({len(text)} characters)" if taken < len(text) else shown


def _escape(char: str, quote: bool) -> str:
    """One character as it may be printed: line breaks, controls and lone surrogates become escapes."""
    if quote and char in "\\'":
        return "\\" + char  # so that the quotes and escapes around it stay unambiguous
    return char if char.isprintable() else repr(char)[1:-1]
