"""Prompt files written to hurt: alias bombs, cyclic aliases, duplicate keys, megabyte values, deep nesting.
Each must end in one short RequestError line, quickly, and legitimate aliases must keep working."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import pytest

from sdcli.errors import RequestError
from sdcli.jobs import read_items
from sdcli.text_limits import clip

MB = 1_000_000
HUGE = 100_000  # characters: far over any message, still quick for the pure-Python YAML scanner


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def refusal(tmp_path: Path, name: str, text: str) -> str:
    """The message of the RequestError that reading the file raises."""
    with pytest.raises(RequestError) as caught:
        read_items(write(tmp_path, name, text))
    return str(caught.value)


def billion_laughs() -> str:
    """One item whose negative is nine levels of ten-fold aliases: a billion values once expanded."""
    levels = ["&a [" + ", ".join(["x"] * 10) + "]"]
    for anchor, below in zip("bcdefghi", "abcdefgh", strict=True):
        levels.append(f"&{anchor} [" + ", ".join([f"*{below}"] * 10) + "]")
    return "- prompt: a cat\n  negative:\n" + "".join(f"    - {level}\n" for level in levels)


def _limit_memory() -> None:
    """Without the fix the child expands the bomb: let it fail on memory rather than swap the machine."""
    resource.setrlimit(resource.RLIMIT_AS, (4 * 2**30, 4 * 2**30))


def test_alias_bomb_is_refused_within_two_seconds(tmp_path):
    # A child process, because an expansion in C code (json.dumps) would not notice signal.alarm.
    path = write(tmp_path, "prompts.yaml", billion_laughs())
    script = (
        "import sys, time\n"
        "from sdcli.errors import RequestError\n"
        "from sdcli.jobs import read_items\n"
        "start = time.perf_counter()\n"
        "try:\n"
        "    read_items(sys.argv[1])\n"
        "except RequestError as exc:\n"
        "    print(exc)\n"
        "print(f'{time.perf_counter() - start:.3f}')\n"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", script, path],
            capture_output=True, text=True, timeout=15, preexec_fn=_limit_memory,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail("reading an alias bomb hung")
    message, seconds = (done.stdout.splitlines() + ["", ""])[:2]
    assert done.returncode == 0, done.stderr[-2000:]
    assert message.endswith("prompts.yaml:8: YAML aliases expand to too much data (over 1,000,000 values)")
    assert float(seconds) < 2


def test_aliases_repeating_a_long_text_are_refused(tmp_path):
    long = "x" * MB
    text = f"- prompt: &p {long}\n" + "- prompt: *p\n" * 100  # 100 MB of prompts from a 1 MB file
    message = refusal(tmp_path, "prompts.yaml", text)
    assert message.endswith(": YAML aliases expand to too much data (over 67,108,864 characters of text)")


@pytest.mark.parametrize(
    "text, line",
    [
        ("- &a [*a]\n", 1),
        ("- prompt: a\n- &m {prompt: b, negative: [x, *m]}\n", 2),
        ("- prompt: a\n- &m\n  prompt: b\n  <<: *m\n", 2),
    ],
)
def test_an_alias_inside_its_own_value_is_refused(tmp_path, text, line):
    message = refusal(tmp_path, "prompts.yaml", text)
    assert message.endswith(f"prompts.yaml:{line}: a YAML alias refers to a value it is inside")


def test_a_shared_negative_prompt_by_alias_works(tmp_path):
    text = (
        "- prompt: a red circle\n  negative: &neg blurry, low quality\n"
        "- prompt: a blue square\n  negative: *neg\n"
        "- {prompt: a green star, negative: *neg}\n"
    )
    items = read_items(write(tmp_path, "prompts.yaml", text))
    assert [i.values["negative"] for i in items] == ["blurry, low quality"] * 3


def test_merge_keys_work_and_a_local_key_overrides_a_merged_one(tmp_path):
    text = "- &base {prompt: a cat, steps: 3, sampler: ddim}\n- <<: *base\n  prompt: a dog\n  steps: 5\n"
    items = read_items(write(tmp_path, "prompts.yaml", text))
    assert [i.values for i in items] == [
        {"prompt": "a cat", "steps": 3, "sampler": "ddim"},
        {"prompt": "a dog", "steps": 5, "sampler": "ddim"},
    ]
    assert items[1].where.endswith("prompts.yaml:2")


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("prompts.yaml", "- prompt: a\n  prompt: b\n", "prompts.yaml:2: key 'prompt' given twice"),
        ("prompts.yaml", "- a\n- prompt: b\n  steps: 3\n  steps: 3\n", "prompts.yaml:4: key 'steps' given twice"),
        ("prompts.yaml", "- {prompt: a, 'prompt': b}\n", "prompts.yaml:1: key 'prompt' given twice"),
        ("prompts.json", '[{"prompt": "a",\n  "steps": 3, "steps": 4}]', "prompts.json:2: key 'steps' given twice"),
        ("prompts.yaml", "- &b {prompt: a}\n- <<: *b\n  <<: *b\n", "prompts.yaml:3: key '<<' given twice"),
        ("prompts.yaml", "- &b {prompt: a, seed: 1, seed: 2}\n- <<: *b\n", "prompts.yaml:1: key 'seed' given twice"),
    ],
)  # fmt: skip
def test_a_key_given_twice_is_refused_with_its_line(tmp_path, name, text, message):
    assert refusal(tmp_path, name, text).endswith(message)


@pytest.mark.parametrize(
    "text, start",
    [
        (f"- prompt: a\n  ? {'k' * HUGE}\n  : 1\n  ? {'k' * HUGE}\n  : 2\n", "prompts.yaml:4: key 'kkkk"),
        (f"- *{'a' * HUGE}\n", "prompts.yaml:1: not valid YAML: found undefined alias 'aaaa"),
        (f"- !{'t' * HUGE} x\n", "prompts.yaml:1: not valid YAML: could not determine a constructor for the tag '!ttt"),
    ],
)  # fmt: skip
def test_huge_values_in_messages_are_clipped(tmp_path, text, start):
    message = refusal(tmp_path, "prompts.yaml", text).rsplit("/", 1)[-1]
    assert message.startswith(start)
    assert len(message) < 300
    assert "characters)" in message


@pytest.mark.parametrize(
    "name, text",
    [
        ("prompts.yaml", "[" * 100_000 + "]" * 100_000),
        ("prompts.yaml", "- " * 100_000 + "x\n"),
        ("prompts.json", "[" * 100_000 + "]" * 100_000),
        ("prompts.json", '[{"a": ' * 100_000 + "1" + "}]" * 100_000),
        ("prompts.jsonl", "[" * 100_000 + "]" * 100_000 + "\n"),
    ],
)
def test_deep_nesting_is_one_error(tmp_path, name, text):
    message = refusal(tmp_path, name, text)
    assert message.endswith("nested too deeply")
    assert "\n" not in message and len(message) < 300


def test_clip_cuts_long_text_and_gives_its_length():
    shown = clip("a" * 5000)
    assert shown == "'" + "a" * 100 + "…' (5000 characters)"
    assert clip("steps") == "'steps'"


def test_clip_makes_one_printable_line():
    assert clip("a\nb\r\x1b[31m\u2028\t") == r"'a\nb\r\x1b[31m\u2028\t'"
    assert clip("it's \\n") == r"'it\'s \\n'"
    assert clip("\ud800").encode("utf-8") == rb"'\ud800'"


def test_clip_bounds_the_escaped_form_not_just_the_text():
    shown = clip("\x00" * MB)
    assert shown.startswith(r"'\x00\x00") and shown.endswith(f"…' ({MB} characters)")
    assert len(shown) < 150


def test_clip_shows_other_values_and_messages_unquoted():
    assert [clip(5), clip(None), clip([1, "x"])] == ["5", "None", "[1, 'x']"]
    assert clip("found alias 'x'\n", quote=False) == r"found alias 'x'\n"
    assert clip(list(range(MB))).endswith(" characters)")
