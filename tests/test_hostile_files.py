"""Hostile and broken input files: safetensors headers that are nested, overlapping or padded, the cheap
check `sdcli models` uses, and config values that are zero, negative, empty or huge. Each is a one-line
CheckpointError or ConfigError, never a traceback from deep inside json, torch or the tokenizer."""

from __future__ import annotations

import dataclasses
import json
import struct
import typing
from functools import cache
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_YAML
from safetensors import safe_open
from safetensors.torch import save_file

from sdcli.checkpoint import HEADER_DEPTH, read_header, weights_problem
from sdcli.config import (
    FIELD_BOUNDS,
    MIN_VOCAB,
    ModelConfig,
    ScheduleConfig,
    TextConfig,
    UNetConfig,
    VAEConfig,
    load_config,
    parse_config,
)
from sdcli.errors import CheckpointError, ConfigError
from sdcli.nets.text import BYTE_TOKENS, Tokenizer
from sdcli.samplers import sample
from sdcli.weights import build_on_meta

BUNDLED = Path(__file__).resolve().parent.parent / "configs"


# --- safetensors headers ------------------------------------------------------------------------------------


def _write(path: Path, header: bytes | dict, data: bytes = b"") -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _u8(start: int, end: int) -> dict:
    """A U8 tensor entry over bytes [start, end) of the data."""
    return {"dtype": "U8", "shape": [end - start], "data_offsets": [start, end]}


def _refusal(path: Path) -> str | None:
    """read_header's one-line message, or None when it accepts the file."""
    try:
        read_header(path)
    except CheckpointError as exc:
        assert "\n" not in str(exc)
        return str(exc)
    return None


def _safetensors_accepts(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                f.get_tensor(key)
    except Exception:  # safetensors reports every refusal as its own SafetensorError
        return False
    return True


# (header, data length); the data is zeros
LAYOUTS = {
    "contiguous": ({"a": _u8(0, 4), "b": _u8(4, 8)}, 8),
    "out-of-order": ({"b": _u8(4, 8), "a": _u8(0, 4)}, 8),
    "empty-tensors": ({"a": _u8(0, 0), "b": _u8(0, 4), "c": _u8(4, 4)}, 4),
    "no-tensors": ({}, 0),
    "overlap": ({"a": _u8(0, 4), "b": _u8(2, 6)}, 6),
    "same-bytes": ({"a": _u8(0, 4), "b": _u8(0, 4)}, 4),
    "gap": ({"a": _u8(0, 4), "b": _u8(5, 9)}, 9),
    "late-start": ({"a": _u8(1, 5)}, 5),
    "trailing-bytes": ({"a": _u8(0, 4)}, 5),
    "trailing-no-tensors": ({}, 1),
    "metadata": ({"__metadata__": {"format": "pt"}, "a": _u8(0, 4)}, 4),
    "metadata-null": ({"__metadata__": None, "a": _u8(0, 4)}, 4),
    "metadata-number": ({"__metadata__": {"format": 1}, "a": _u8(0, 4)}, 4),
    "metadata-list": ({"__metadata__": ["pt"], "a": _u8(0, 4)}, 4),
    "metadata-nested": ({"__metadata__": {"format": {"a": "b"}}, "a": _u8(0, 4)}, 4),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_header_rules_agree_with_safetensors(tmp_path, name):
    """What safetensors refuses, read_header refuses too, with one line; what it reads, read_header reads."""
    header, length = LAYOUTS[name]
    path = _write(tmp_path / "x.safetensors", header, bytes(length))
    assert (_refusal(path) is None) == _safetensors_accepts(path), _refusal(path)


@pytest.mark.parametrize(
    "name, message",
    [
        ("overlap", "tensor 'b' overlaps another tensor's bytes"),
        ("same-bytes", "tensor 'b' overlaps another tensor's bytes"),
        ("gap", "1 unused bytes before tensor 'b'"),
        ("late-start", "1 unused bytes before tensor 'a'"),
        ("trailing-bytes", "1 bytes after the last tensor"),
        ("metadata-number", "__metadata__ is not a table of text"),
        ("metadata-list", "__metadata__ is not a table of text"),
    ],
)
def test_header_refusals_say_what_is_wrong(tmp_path, name, message):
    header, length = LAYOUTS[name]
    path = _write(tmp_path / "x.safetensors", header, bytes(length))
    assert message in _refusal(path)


def test_truncation_is_still_named_as_such(tmp_path):
    path = _write(tmp_path / "x.safetensors", {"a": _u8(0, 4), "b": _u8(4, 8)}, bytes(6))
    assert "file is truncated (2 bytes missing)" in _refusal(path)


def test_a_long_tensor_name_is_cut_in_the_message(tmp_path):
    name = "k" * 5000 + "\nsecond line"
    path = _write(tmp_path / "x.safetensors", {"a": _u8(0, 4), name: _u8(2, 6)}, bytes(6))
    message = _refusal(path)
    assert "overlaps" in message and len(message) < len(str(path)) + 250


@pytest.mark.parametrize("depth", [200_000, HEADER_DEPTH + 1])
def test_a_deeply_nested_header_is_one_line(tmp_path, depth):
    """Refused by a scan before json recurses: also at a depth json itself would parse."""
    raw = b'{"a": ' + b"[" * depth + b"]" * depth + b"}"
    path = _write(tmp_path / "x.safetensors", raw)
    assert _refusal(path).endswith("corrupt safetensors header (nested too deeply)")


def test_an_unclosed_deep_header_is_one_line(tmp_path):
    """json would recurse into every opened bracket before finding that none is closed."""
    path = _write(tmp_path / "x.safetensors", b'{"a": ' + b"[" * 200_000)
    assert _refusal(path).endswith("corrupt safetensors header (not JSON)")


def test_brackets_in_names_and_ignored_fields_are_not_too_deep(tmp_path):
    """Brackets inside strings are text, and safetensors ignores extra entry fields nested a little."""
    name = '[[[[{{{{\\"[[[[' * 10
    entry = _u8(0, 4) | {"extra": [[["x"]]]}
    path = _write(tmp_path / "x.safetensors", {name: entry, "__metadata__": {"k": "]]]]}}}}"}}, bytes(4))
    assert _refusal(path) is None and _safetensors_accepts(path)
    assert list(read_header(path)) == [json.loads(json.dumps(name))]


# --- weights_problem, for `sdcli models` ---------------------------------------------------------------------


def test_weights_problem_is_none_for_good_files(tmp_path):
    path = tmp_path / "good.safetensors"
    save_file({"a": torch.zeros(3), "b": torch.ones(2, 2)}, str(path), metadata={"format": "pt"})
    assert weights_problem(path) is None
    assert weights_problem(load_config("demo").resolve_weights()) is None  # the bundled demo model


def test_weights_problem_names_each_fault(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"a": torch.zeros(64)}, str(good))
    data = good.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-10])
    deep = _write(tmp_path / "deep.safetensors", b"[" * 100_000 + b"]" * 100_000)
    overlap = _write(tmp_path / "overlap.safetensors", LAYOUTS["overlap"][0], bytes(6))
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    cases = {
        tmp_path / "absent.safetensors": "weights file not found",
        cut: "file is truncated (10 bytes missing)",
        deep: "nested too deeply",
        overlap: "overlaps",
        empty: "not a safetensors file",
        tmp_path: "cannot read weights",  # a folder where the file should be
    }
    for path, message in cases.items():
        problem = weights_problem(path)
        assert problem is not None and message in problem and "\n" not in problem, (path, problem)


def test_weights_problem_does_not_unpickle(tmp_path):
    """A pickle is only looked at: unpickling could run code, and a listing must not."""
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x04 not even a pickle")
    assert weights_problem(ckpt) is None
    ckpt.write_bytes(b"")
    assert "empty" in weights_problem(ckpt)
    assert "weights file not found" in weights_problem(tmp_path / "absent.ckpt")


# --- config values: every numeric and list field, at zero, negative, empty and huge -----------------------


CONFIG_TEXTS = {p.stem: p.read_text(encoding="utf-8") for p in sorted(BUNDLED.glob("*.yaml"))} | {"tiny": TINY_YAML}
def _section(hint):
    """The dataclass of a config section: the hint itself, or the entries of a list of sections (text)."""
    args = typing.get_args(hint)
    return args[0] if typing.get_origin(hint) is tuple and dataclasses.is_dataclass(args[0]) else hint


SECTIONS = {
    name: _section(hint) for name, hint in typing.get_type_hints(ModelConfig).items()
    if dataclasses.is_dataclass(_section(hint))
}  # fmt: skip


def _entries(data: dict, section: str) -> list[dict]:
    """The mappings a section's value sets: each text encoder of a list, or the one mapping."""
    value = data.setdefault(section, {})
    return value if isinstance(value, list) else [value]
EXCLUSIVE = {"num_heads": "head_dim", "head_dim": "num_heads"}  # setting one drops the other
HUGE = 10**9


def _kind(hint) -> str | None:
    """'list', 'number' or None for a field's type hint (an optional number is a number)."""
    if typing.get_origin(hint) is tuple:
        return "list"
    inner = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return "number" if inner[0] in (int, float) else None


def _numeric_fields() -> list[tuple[str, str, str]]:
    out = []
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        out += [(section, f.name, _kind(hints[f.name])) for f in dataclasses.fields(cls) if _kind(hints[f.name])]
    return out


NUMERIC_FIELDS = _numeric_fields()
VALUES = {"number": [0, -1, HUGE, 2**70], "list": [[], [0], [-1], [HUGE], [1] * 1000]}


def test_every_numeric_field_has_bounds():
    """A new number in a config gets a range in the table, and a new list a length, or this fails."""
    assert {(s, n) for s, n, _ in NUMERIC_FIELDS} == {
        (section, name) for section, cls in SECTIONS.items() for name in FIELD_BOUNDS[cls]
    }
    for section, name, kind in NUMERIC_FIELDS:
        assert (FIELD_BOUNDS[SECTIONS[section]][name].items is not None) == (kind == "list"), name


def test_vocabulary_floor_is_the_tokenizers():
    assert MIN_VOCAB == 2 * BYTE_TOKENS + 2


_BUILT: set[tuple[TextConfig, UNetConfig, VAEConfig]] = set()


def _builds(config: ModelConfig) -> None:
    """The networks build on the meta device and the tokenizer from its vocabulary; once per set of networks,
    since most values a config accepts change only the defaults or the schedule."""
    networks = (config.text, config.unet, config.vae)
    if networks not in _BUILT:
        build_on_meta(config)
        for text in config.text:
            Tokenizer(text)(["a red square"])
        _BUILT.add(networks)


@cache
def _samples(sampler: str, steps: int, schedule: ScheduleConfig) -> None:
    """The default sampler runs its default steps over the schedule, to finite latents."""
    noise = torch.randn(1, 4, 1, 1)
    done = sample(sampler, lambda x, t: torch.zeros_like(x), noise, steps, schedule, [torch.Generator().manual_seed(0)])
    assert torch.isfinite(done).all()


def _runs(config: ModelConfig) -> None:
    """Everything a config feeds that a bad number could break, short of running the networks."""
    _builds(config)
    _samples(config.defaults.sampler, config.defaults.steps, config.schedule)


@pytest.mark.parametrize("section, name, kind", NUMERIC_FIELDS, ids=[f"{s}.{n}" for s, n, _ in NUMERIC_FIELDS])
@pytest.mark.parametrize("config_name", CONFIG_TEXTS)
def test_zero_negative_empty_and_huge_values_are_refused_or_work(config_name, section, name, kind):
    for value in VALUES[kind]:
        data = yaml.safe_load(CONFIG_TEXTS[config_name])
        for entry in _entries(data, section):
            entry[name] = value
            if name in EXCLUSIVE:
                entry.pop(EXCLUSIVE[name], None)
        text = yaml.safe_dump(data)
        try:
            config = parse_config(text, source=Path("model.yaml"))
        except ConfigError as exc:
            assert str(exc).startswith("model.yaml:") and "\n" not in str(exc), str(exc)
            continue
        _runs(config)


# --- the rules that tie fields together, and where the message points -----------------------------------------


def _error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source=Path("model.yaml"))
    assert "\n" not in str(info.value)
    return str(info.value)


def _edit(name: str, section: str, **values) -> str:
    data = yaml.safe_load(CONFIG_TEXTS[name])
    for entry in _entries(data, section):
        entry.update(values)
    return yaml.safe_dump(data, sort_keys=False)


def test_a_range_error_names_the_key_its_line_and_the_value():
    text = CONFIG_TEXTS["sd21-v"].replace("head_dim: 64", "head_dim: 0")
    line = text.splitlines().index("  head_dim: 0") + 1
    assert _error(text) == f"model.yaml:{line}: 'unet.head_dim' must be at least 1, got 0"


@pytest.mark.parametrize(
    "name, section, values, message",
    [
        ("sd15", "text", {"heads": 7}, "'text.heads' must divide width 768, got 7"),
        ("sd15", "text", {"pad_id": 49408}, "'text.pad_id' must be below vocab_size 49408"),
        ("sd15", "text", {"vocab_size": 100}, "'text.vocab_size' must be at least 514"),
        ("sd21-v", "text", {"layers": 1}, "'text.layers' must be at least 2 for output_layer penultimate"),
        ("tiny", "text", {"mlp_ratio": 0.01}, "'text.mlp_ratio' makes the MLP 0 wide"),
        ("sd15", "text", {"context_length": 1}, "'text.context_length' must be at least 3"),
        ("sd15", "unet", {"context_dim": 512}, "'unet.context_dim' must equal the text encoders' widths together, 768"),
        ("sd15", "unet", {"in_channels": 5}, "'unet.in_channels' must be vae.latent_channels 4, or 9 for an"),
        ("sd15", "unet", {"out_channels": 8}, "'unet.out_channels' must equal vae.latent_channels 4"),
        ("sd15", "unet", {"norm_groups": 48}, "'unet' level 0 has 320 channels, not divisible by norm_groups 48"),
        (
            "sd15",
            "unet",
            {"model_channels": 48, "channel_mult": [2, 4], "attention_levels": [0]},
            "'unet' model_channels 48 is not divisible by norm_groups 32",
        ),
        ("sd15", "unet", {"num_heads": 7}, "'unet' level 0 has 320 channels, not divisible by num_heads 7"),
        ("sd15", "unet", {"channel_mult": [1, 2, 4, 4000]}, "'unet' level 3 has 1280000 channels, more than 65536"),
        ("sd15", "vae", {"norm_groups": 7}, "'vae' level 0 has 128 channels, not divisible by norm_groups 7"),
        ("sd15", "vae", {"base_channels": 48, "channel_mult": [2, 4]}, "'vae' base_channels 48 is not divisible"),
        ("sd15", "vae", {"channel_mult": [1] * 17}, "'vae.channel_mult' must have 1 to 16 items, got 17"),
        ("sd15", "vae", {"image_channels": 4}, "'vae.image_channels' must be 3, got 4"),
        ("sd15", "vae", {"scale_factor": 0}, "'vae.scale_factor' must be above 0, got 0"),
        ("sd15", "vae", {"scale_factor": float("inf")}, "'vae.scale_factor' must be a finite number"),
        ("sd15", "schedule", {"steps_offset": 1000}, "'schedule.steps_offset' must be below num_train_timesteps"),
        ("sd15", "schedule", {"beta_end": 1.0}, "'schedule.beta_end' must be below 1, got 1.0"),
        ("sd15", "defaults", {"width": 500}, "'defaults.width' must be a multiple of 8 (the VAE's downsampling)"),
        ("sd15", "defaults", {"steps": 1001}, "'defaults.steps' must be at most num_train_timesteps 1000"),
        ("sd15", "defaults", {"guidance": float("nan")}, "'defaults.guidance' must be a finite number"),
    ],
)
def test_rules_between_fields(name, section, values, message):
    assert message in _error(_edit(name, section, **values))


@pytest.mark.parametrize("config_name", CONFIG_TEXTS)
def test_each_config_runs_on_the_meta_device(config_name):
    """The networks fit together at the default size, as the pipeline wires them."""
    config = parse_config(CONFIG_TEXTS[config_name])
    _runs(config)
    nets = build_on_meta(config)
    encoders = zip(nets.text, config.text, strict=True)
    outputs = [net(Tokenizer(cfg)(["a red square"])[0].to("meta")) for net, cfg in encoders]
    context = torch.cat([c for c, _ in outputs], dim=-1)
    y = None if config.unet.adm_in_channels is None else torch.empty(1, config.unet.adm_in_channels, device="meta")
    factor = config.vae.downsample
    latents = torch.empty(1, config.unet.in_channels, config.defaults.height // factor,
                          config.defaults.width // factor, device="meta")  # fmt: skip
    image = nets.vae.decode(nets.unet(latents, torch.zeros(1, device="meta"), context, y))
    assert tuple(image.shape) == (1, 3, config.defaults.height, config.defaults.width)
