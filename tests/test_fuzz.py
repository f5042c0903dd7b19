"""Fuzzing every parser of user input: model configs, prompt files in their three formats, and the
metadata `generate --from` reads. Whatever the input, the answer is a result or a clean SdcliError (which
the CLI prints as one line), never another exception."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import TINY_YAML
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image, PngImagePlugin

from sdcli.config import ModelConfig, parse_config
from sdcli.errors import SdcliError
from sdcli.jobs import ITEM_TYPES, derived_seed, plan, read_items
from sdcli.outputs import PNG_KEY, read_metadata
from sdcli.request import metadata_types

META_TYPES = metadata_types()

# Deterministic, so the suite passes or fails the same way on every run; a few seconds in all.
FUZZ = settings(
    max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
# Keys drawn mostly from the names the parsers know, so values reach the type and range checks.
KNOWN_KEYS = sorted({*ITEM_TYPES, *META_TYPES, "text", "unet", "vae", "schedule", "defaults", "layout", "width"})
keys = st.one_of(st.sampled_from(KNOWN_KEYS), st.text(max_size=8))
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5), max_leaves=12
)
YAML_CHARS = "abcdefghijklmnopqrstuvwxyz_0123456789.-+eE:,[]{}#&*!|>?%@`'\" \t\n"
yaml_text = st.text(alphabet=YAML_CHARS, max_size=200)


def clean(call):
    """Run a parser: a result or an SdcliError with a message pass; anything else fails the test."""
    try:
        return call()
    except SdcliError as exc:
        assert str(exc).strip(), repr(exc)
        return None


# --- model configs ---------------------------------------------------------------------------------------


def _mutations(draw) -> str:
    """The tiny config with some values replaced, keys dropped or added: a near-valid config."""
    config = yaml.safe_load(TINY_YAML)
    sections = [config] + [v for v in config.values() if isinstance(v, dict)]
    for _ in range(draw(st.integers(1, 4))):
        section = draw(st.sampled_from(sections))
        action = draw(st.sampled_from(["replace", "drop", "add"]))
        if action == "add" or not section:
            section[draw(keys)] = draw(values)
        elif action == "drop":
            del section[draw(st.sampled_from(sorted(section)))]
        else:
            section[draw(st.sampled_from(sorted(section)))] = draw(values)
    return yaml.safe_dump(config, allow_unicode=True)


@FUZZ
@given(st.data())
def test_near_valid_configs_parse_or_fail_cleanly(data):
    result = clean(lambda: parse_config(_mutations(data.draw)))
    assert result is None or isinstance(result, ModelConfig)


def test_the_unmutated_config_parses():
    assert parse_config(TINY_YAML).name == "tiny"


@FUZZ
@given(st.one_of(yaml_text, st.text(max_size=200)))
@example("name: !foo bar\n")
@example("name: !!int x\n")
@example("? [a]\n: 1\n")
@example("[" * 2000 + "]" * 2000)
def test_any_config_text_parses_or_fails_cleanly(text):
    clean(lambda: parse_config(text))


# --- prompt files ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _read_and_plan(path: Path, content: str | bytes, tiny_config) -> None:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    items = clean(lambda: read_items(str(path)))
    if items is not None:
        clean(lambda: plan(items, {}, tiny_config, seed_for=derived_seed))


@FUZZ
@given(st.sampled_from(["p.txt", "p.jsonl", "p.yaml", "p.json"]), st.one_of(yaml_text, st.text(), st.binary()))
@example("p.yaml", "[" * 2000)
@example("p.jsonl", "[" * 2000 + "]" * 2000)
@example("p.yaml", "- prompt: a\n  count: 1000000000000\n")
@example("p.jsonl", '{"prompt": "a", "width": 8e400}')
def test_any_prompt_file_reads_or_fails_cleanly(tiny_config, folder, name, content):
    _read_and_plan(folder / name, content, tiny_config)


@settings(FUZZ, max_examples=100)  # each example is read and planned twice, as JSON Lines and as YAML
@given(st.lists(st.one_of(st.text(max_size=30), st.dictionaries(keys, values, max_size=6), values), max_size=6))
def test_prompt_files_of_any_json_or_yaml_values(tiny_config, folder, entries):
    lines = "".join(json.dumps(entry, allow_nan=True) + "\n" for entry in entries)
    _read_and_plan(folder / "p.jsonl", lines, tiny_config)
    _read_and_plan(folder / "p.yaml", yaml.safe_dump(entries, allow_unicode=True), tiny_config)


# --- metadata read by --from -------------------------------------------------------------------------------

recipes = st.fixed_dictionaries(
    {key: st.one_of(st.from_type(kind), values) for key, kind in META_TYPES.items()},
)


def _png(path: Path, text: str) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_KEY, text)
    Image.new("RGB", (2, 2)).save(path, pnginfo=info)


@FUZZ
@given(st.one_of(recipes, values, st.dictionaries(st.sampled_from(sorted(META_TYPES)), values)))
def test_any_metadata_reads_or_fails_cleanly(folder, meta):
    text = json.dumps(meta, allow_nan=True)
    (folder / "m.json").write_text(text)
    _png(folder / "m.png", text)
    for path in (folder / "m.json", folder / "m.png"):
        result = clean(lambda: read_metadata(path))  # noqa: B023 - called at once
        if result is not None:
            assert isinstance(result["prompt"], str) and type(result["seed"]) is int


@FUZZ
@given(st.sampled_from(["m.json", "m.png"]), st.one_of(st.binary(max_size=300), yaml_text))
@example("m.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
@example("m.json", "[" * 5000)
def test_any_metadata_file_reads_or_fails_cleanly(folder, name, content):
    path = folder / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    clean(lambda: read_metadata(path))


@settings(FUZZ, max_examples=100)  # each example runs the command line
@given(recipes)
def test_from_on_the_command_line_never_crashes(cli, tiny_model, folder, monkeypatch, meta):
    """`generate --from` down to the render (replaced here): planning the recorded recipe, the recorded
    config and device; the CLI fixture fails the test on any exception that is not a clean exit."""
    import sdcli.cli

    monkeypatch.setattr(sdcli.cli, "run_job", lambda *args, **kwargs: None)
    meta = {**meta, "config": str(tiny_model) if meta["config"] == "tiny" else meta["config"]}
    path = folder / "from.json"
    path.write_text(json.dumps(meta, allow_nan=True))
    ran = cli("generate", "--from", path, "-o", folder / "out")
    assert ran.code in (0, 2), ran
    assert ran.code == 0 or (len(ran.err_lines) == 1 and ran.err_lines[0].startswith("sdcli: error: ")), ran
