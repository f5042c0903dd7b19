"""A1111's prompt reading, torch-free: the emphasis parser on A1111's own documented examples, escapes,
BREAK, hostile text; and the 75-token chunking with its comma backtrack."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdcli.prompt_chunks import CHUNK_TOKENS, chunk_prompt
from sdcli.prompt_syntax import BREAK, parse_attention


@pytest.mark.parametrize(
    "text, parsed",
    [  # the examples of A1111's parse_prompt_attention docstring, weights to the last bit
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
             (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)],
        ),  # fmt: skip
        ("", [("", 1.0)]),
        ("[less]", [("less", 1 / 1.1)]),
        ("((a) b)", [("a", 1.1 * 1.1), (" b", 1.1)]),
        ("( x : 1.3 )", [(" x ", 1.3)]),
        ("a \\\\ b (\\))", [("a \\ b ", 1.0), (")", 1.1)]),  # escapes are text, and weigh with brackets
        ("x) y] z", [("x) y] z", 1.0)]),  # closers without an opener are text
        ("(x:1.2.3)", [("x", 1.0)]),  # A1111's float() would raise; a malformed weight counts as 1
    ],
)
def test_a1111_examples(text, parsed):
    assert parse_attention(text) == parsed


def test_break_outside_brackets_splits_and_inside_is_a_word():
    assert parse_attention("a BREAK b") == [("a", 1.0), BREAK, ("b", 1.0)]
    assert parse_attention("BREAKfast, aBREAK") == [("BREAKfast, aBREAK", 1.0)]
    # brackets weigh A1111's marker too, which is then just the word, at the bracket's (negative) weight
    assert parse_attention("(a BREAK b)") == [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]
    assert parse_attention("BREAK") == [("", 1.0), BREAK, ("", 1.0)]


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_any_text_parses(text):
    for part in parse_attention(text):
        assert part is BREAK or (isinstance(part[0], str) and isinstance(part[1], float))


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_characters="()[]\\:")))
def test_text_without_syntax_is_itself(text):
    if "BREAK" not in text:
        assert "".join(text for text, _ in parse_attention(text)) == text


def test_deep_nesting_at_the_size_limit_is_quick():
    start = time.perf_counter()
    parse_attention("(a" * 6600 + ")" * 6600)
    assert time.perf_counter() - start < 20  # quadratic in depth, bounded by the prompt length limit


class Words:
    """A vocabulary of one token per word, ',' its own token."""

    start_id, end_id, pad_id, comma_id = 1, 2, 0, 3

    def encode(self, text: str) -> list[int]:
        return [3 if word == "," else 10 + len(word) for word in text.replace(",", " , ").split()]


def test_a_chunk_full_soon_after_a_comma_moves_the_words_after_it():
    chunks, cut = chunk_prompt(" ".join(["w"] * 70) + " , " + " ".join(["ww"] * 10), Words(), "a1111")
    assert not cut and len(chunks) == 2
    first, second = chunks
    assert first.ids[:72] == (1, *[11] * 70, 3) and first.ids[72:] == (2, *[0] * 4)
    assert second.ids[:12] == (1, *[12] * 10, 2) and len(second.ids) == CHUNK_TOKENS + 2


def test_without_a_near_comma_a_chunk_takes_75_tokens():
    chunks, _ = chunk_prompt(" ".join(["w"] * 40) + " , " + " ".join(["ww"] * 40), Words(), "a1111")
    assert [sum(t >= 10 or t == 3 for t in c.ids) for c in chunks] == [75, 6]


def test_break_weights_and_empty_prompt():
    a, b = chunk_prompt("x BREAK (y:1.5)", Words(), "a1111")[0]
    assert a.ids[:3] == (1, 11, 2) and b.ids[:3] == (1, 11, 2) and b.weights[:3] == (1.0, 1.5, 1.0)
    assert a.emphasised is False and b.emphasised is True
    (empty,), _ = chunk_prompt("", Words(), "a1111")
    assert empty.ids == (1, 2, *[0] * CHUNK_TOKENS)


def test_plain_cuts_at_75_and_says_so():
    (chunk,), cut = chunk_prompt(" ".join(["(w)"] * 80), Words(), "plain")
    assert cut and chunk.ids[1:76] == (13,) * 75 and chunk.ids[76] == 2
