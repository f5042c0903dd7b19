"""A1111 infotext read back (sdcli/infotext.py): webui texts as the webui writes them, its parser's rules,
sampler names old and new, sdcli's own infotext round trip, sd-parsers on the same texts, PNG text chunks of
every kind with bombs and damage, hostile text, and model hashes. No model, no torch: fast."""

from __future__ import annotations

import hashlib
import io
import json
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, PngImagePlugin

from sdcli import infotext as it
from sdcli.errors import RequestError
from sdcli.hashing import sha256_file
from sdcli.infotext import (
    MAX_TEXT_BYTES,
    MAX_WARNINGS,
    Infotext,
    a1111_sampler,
    find_model,
    hash_kind,
    hash_matches,
    legacy_model_hash,
    parse_infotext,
    read_parameters,
    request_values,
)
from sdcli.outputs import infotext as sdcli_infotext
from sdcli.sampler_registry import SAMPLER_SPECS

# A1111's own pair pattern (modules/infotext_utils.py re_param_code), the oracle for sdcli's linear scan.
A1111_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')

# As A1111 1.10 writes them: a multi-line prompt with a LoRA tag, a multi-line negative, hires fix, ADetailer,
# quoted values holding commas and colons.
WEBUI_110 = """\
masterpiece, best quality, 1girl, solo, (looking at viewer:1.2), <lora:add_detail:0.8>
city street at night, neon lights, rain
Negative prompt: (worst quality, low quality:1.4), bad hands,
easynegative, watermark
Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234567890, Size: 512x768, \
Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.45, Clip skip: 2, \
ADetailer model: face_yolov8n.pt, ADetailer confidence: 0.3, ADetailer dilate erode: 4, \
ADetailer mask blur: 4, ADetailer denoising strength: 0.4, ADetailer inpaint only masked: True, \
ADetailer inpaint padding: 32, ADetailer version: 24.1.2, Hires upscale: 2, Hires steps: 15, \
Hires upscaler: R-ESRGAN 4x+ Anime6B, Lora hashes: "add_detail: 7c6bad76eb54, more_details: 3b8aa1d351ef", \
TI hashes: "easynegative: c74b4e810b03", Version: v1.10.1"""

# A1111 1.5 (before schedule types): the scheduler in the sampler's name, the old 8-digit model hash.
WEBUI_15 = """\
portrait of an old fisherman, detailed face, [sharp focus:blurry:10]
Negative prompt: cartoon, 3d
Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 42, Size: 512x512, Model hash: 45dee52b, \
Model: anything-v3, Version: v1.5.1"""

# A1111 1.9 with the CPU noise source, no negative prompt, Automatic written out.
WEBUI_19_CPU = """\
a watercolor fox in a snowy forest
Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 5, Seed: 3141592653, Size: 768x512, \
Model hash: 0123456789, Model: sd_xl_base_1.0, RNG: CPU, Version: v1.9.4"""

# An old DDIM image with variation seed and face restoration; a model name with a comma and a colon (quoted).
WEBUI_14_DDIM = """\
a castle on a hill
Negative prompt: lowres
Steps: 50, Sampler: DDIM, CFG scale: 9, Seed: 7, Face restoration: CodeFormer, Size: 640x448, \
Model hash: e6e99610c4, Model: "v1-5: pruned, emaonly", Variation seed: 99, Variation seed strength: 0.3, \
Version: v1.4.0"""

WEBUI_TEXTS = {"1.10": WEBUI_110, "1.5": WEBUI_15, "1.9-cpu": WEBUI_19_CPU, "1.4-ddim": WEBUI_14_DDIM}


def _warned(warnings: list[str], key: str) -> list[str]:
    return [w for w in warnings if w.startswith(key)]


# --- the parse, as A1111's parse_generation_parameters ---


def test_webui_110_parses_as_a1111_does():
    info = parse_infotext(WEBUI_110)
    assert info.prompt == (
        "masterpiece, best quality, 1girl, solo, (looking at viewer:1.2), <lora:add_detail:0.8>\n"
        "city street at night, neon lights, rain"
    )
    assert info.negative == "(worst quality, low quality:1.4), bad hands,\neasynegative, watermark"
    assert list(info.fields)[:6] == ["Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size"]
    assert info.fields["Lora hashes"] == "add_detail: 7c6bad76eb54, more_details: 3b8aa1d351ef"  # unquoted JSON
    assert info.fields["TI hashes"] == "easynegative: c74b4e810b03"
    assert info.fields["Hires upscaler"] == "R-ESRGAN 4x+ Anime6B"
    assert info.fields["Version"] == "v1.10.1"
    assert len(info.fields) == 24 and info.dropped == ()


def test_webui_110_request_values_and_one_warning_per_field():
    values, warnings = request_values(parse_infotext(WEBUI_110))
    assert values == {
        "prompt": parse_infotext(WEBUI_110).prompt,
        "negative": parse_infotext(WEBUI_110).negative,
        "steps": 28,
        "guidance": 7.0,
        "seed": 1234567890,
        "width": 512,
        "height": 768,
        "clip_skip": 2,
        "prompt_syntax": "a1111",
        "model_hash": "6ce0161689",
        "model": "v1-5-pruned-emaonly",
        "sampler": "dpmpp_2m_karras",
        # the hires fix, its Denoising strength the hires pass's; an ESRGAN upscaler becomes Lanczos (warned)
        "hires_scale": 2.0,
        "hires_steps": 15,
        "hires_strength": 0.45,
        "hires_upscale": "lanczos",
    }
    unhonoured = [
        "ADetailer model", "ADetailer confidence", "ADetailer dilate erode",
        "ADetailer mask blur", "ADetailer denoising strength", "ADetailer inpaint only masked",
        "ADetailer inpaint padding", "ADetailer version", "Hires upscaler",
    ]  # fmt: skip
    for key in unhonoured:
        assert len(_warned(warnings, key + " ")) == 1, (key, warnings)
    assert len(_warned(warnings, "RNG")) == 1  # no RNG: A1111's GPU noise
    assert len(warnings) == len(unhonoured) + 1  # Version, Model, Clip skip...: nothing to say
    assert all(len(line) < 300 for line in warnings)


def test_webui_15_old_sampler_name_and_version():
    values, warnings = request_values(parse_infotext(WEBUI_15))
    assert values["sampler"] == "dpmpp_2m_karras"  # "DPM++ 2M Karras": the trailing scheduler name stripped
    assert values["model_hash"] == "45dee52b" and values["guidance"] == 7.5
    assert len(_warned(warnings, "Version 'v1.5.1': A1111 before 1.7.0-225")) == 1  # fp16 alphas_cumprod
    assert len(_warned(warnings, "Version 'v1.5.1': A1111 before 1.6 timed")) == 1  # [a:b:N] in the prompt
    assert len(warnings) == 3  # and the GPU noise


def test_webui_19_cpu_noise_says_nothing_more():
    values, warnings = request_values(parse_infotext(WEBUI_19_CPU))
    assert values["sampler"] == "euler_a" and (values["width"], values["height"]) == (768, 512)
    assert values["negative"] == "" and values["seed"] == 3141592653
    assert warnings == []


def test_webui_14_ddim_quoted_model_and_unsupported_fields():
    info = parse_infotext(WEBUI_14_DDIM)
    assert info.fields["Model"] == "v1-5: pruned, emaonly"
    values, warnings = request_values(info)
    assert values["sampler"] == "ddim" and values["model"] == "v1-5: pruned, emaonly"
    for key in ("Face restoration", "Variation seed '", "Variation seed strength", "RNG"):
        assert len(_warned(warnings, key)) == 1, (key, warnings)
    assert len(_warned(warnings, "Version 'v1.4.0': A1111 before 1.6 padded DDIM")) == 1
    assert len(_warned(warnings, "Version 'v1.4.0': A1111 before 1.7.0-225")) == 1


@pytest.mark.parametrize(
    ("text", "prompt", "negative", "fields"),
    [
        ("", "", "", {}),
        ("   \n\n  ", "", "", {}),
        ("a cat", "a cat", "", {}),
        # two pairs are not a settings line: all prompt
        ("a cat\nSteps: 20, Seed: 1", "a cat\nSteps: 20, Seed: 1", "", {}),
        ("Steps: 20, Seed: 1, Sampler: Euler", "", "", {"Steps": "20", "Seed": "1", "Sampler": "Euler"}),
        # leading empty lines vanish, inner ones stay; each line is stripped
        ("\n \n  a \n\n b\nNegative prompt:\n c\nSteps: 1, Seed: 2, CFG scale: 3", "a\n\nb", "c",
         {"Steps": "1", "Seed": "2", "CFG scale": "3"}),
        # every line that starts with the prefix loses it; a later line that does not is negative too
        ("p\nNegative prompt: n1\nNegative prompt: n2\nn3", "p", "n1\nn2\nn3", {}),
        # the prefix counts only at a line's start
        ("p, Negative prompt: x", "p, Negative prompt: x", "", {}),
        # a later pair replaces the value and keeps the first position; an empty value is dropped
        ("p\nSeed: 1, Steps: , Seed: 2, Sampler: Euler", "p", "", {"Seed": "2", "Sampler": "Euler"}),
        # keys may hold spaces, '-' and '/'; values keep trailing spaces, lose leading ones
        ("p\nA b-c/d:  x , Steps:2, k2: y", "p", "", {"A b-c/d": "x ", "Steps": "2", "k2": "y"}),
        # a quoted value that is not JSON stays as written
        ('p\nAa: "x\\q", Bb: 1, Cc: 2', "p", "", {"Aa": '"x\\q"', "Bb": "1", "Cc": "2"}),
        # a key has 2 characters or more: these are no pairs, so the line is prompt
        ("p\nA: 1, B: 2, C: 3", "p\nA: 1, B: 2, C: 3", "", {}),
    ],
)  # fmt: skip
def test_a1111_parse_rules(text, prompt, negative, fields):
    info = parse_infotext(text)
    assert (info.prompt, info.negative, info.fields) == (prompt, negative, fields)
    assert list(info.fields) == list(fields)


def test_empty_value_is_dropped_and_warned():
    info = parse_infotext("p\nSteps: , Seed: 2, Sampler: Euler")
    assert info.dropped == ("Steps",)
    values, warnings = request_values(info)
    assert "steps" not in values
    assert _warned(warnings, "Steps: its value is empty")


@given(st.text(alphabet='ab1_é :,"\\-/\t\r\x85', max_size=30))
@settings(max_examples=400, deadline=None)
def test_pair_scan_is_a1111s_pattern(line):
    assert it._pairs(line) == A1111_PAIR.findall(line)


@pytest.mark.parametrize(
    "line",
    ['Lora hashes: "a: 1, b: 2", Steps: 3', 'A: "x\\", y", B: "q" r, C', "a:b:c, d e: , -f: 1, g/h:2,,i j :3",
     '  k: "unterminated, m: 1', 'k: "", n: "\\"", o: """'],
)  # fmt: skip
def test_pair_scan_on_tricky_lines(line):
    assert it._pairs(line) == A1111_PAIR.findall(line)


def test_pair_scan_is_linear_where_a1111s_pattern_is_quadratic():
    """A1111's pattern needs about 20 s for a 40 kB run of letters; a 1 MiB one must take well under a second."""
    for line in ("a" * MAX_TEXT_BYTES, "ab " * (MAX_TEXT_BYTES // 3), 'k: "x, ' * (MAX_TEXT_BYTES // 7)):
        parse_infotext("p\n" + line)


# --- request values ---


def _sampler_text(sampler: str, schedule: str | None) -> str:
    schedule_pair = f"Schedule type: {schedule}, " if schedule else ""
    return f"p\nSteps: 20, Sampler: {sampler}, {schedule_pair}Seed: 1, RNG: CPU"


@pytest.mark.parametrize(
    ("sampler", "schedule", "expected"),
    [
        ("Euler a", None, "euler_a"),
        ("Euler a", "Automatic", "euler_a"),
        ("Euler a", "Uniform", "euler_a"),
        ("Euler", None, "euler"),
        ("Euler", "uniform", "euler"),
        ("Heun", None, "heun"),
        ("LMS", "Automatic", "lms"),
        ("DDIM", None, "ddim"),
        ("DDIM", "Karras", "ddim"),  # DDIM and PLMS take no schedule
        ("PLMS", None, "pndm"),
        ("PNDM", None, "pndm"),  # not an A1111 name; diffusers-based tools write it
        # 1.9+: a bare DPM++ 2M is its default, Karras
        ("DPM++ 2M", None, "dpmpp_2m_karras"),
        ("DPM++ 2M", "Automatic", "dpmpp_2m_karras"),
        ("DPM++ 2M", "Karras", "dpmpp_2m_karras"),
        ("DPM++ 2M", "karras", "dpmpp_2m_karras"),  # 1.5-1.8 wrote k_sched_type in lower case
        ("DPM++ 2M", "SGM Uniform", "dpmpp_2m"),
        ("DPM++ 2M", "sgm_uniform", "dpmpp_2m"),
        # before 1.9: the scheduler in the name, which wins over a Schedule type
        ("DPM++ 2M Karras", None, "dpmpp_2m_karras"),
        ("DPM++ 2M Karras", "Uniform", "dpmpp_2m_karras"),
        ("DPM++ 2M SGMUniform", None, "dpmpp_2m"),
    ],
)
def test_samplers_sdcli_has(sampler, schedule, expected):
    values, warnings = request_values(parse_infotext(_sampler_text(sampler, schedule)))
    assert values["sampler"] == expected
    assert warnings == []


@pytest.mark.parametrize(
    ("sampler", "schedule", "said"),
    [
        ("Euler", "Karras", "sdcli runs Euler only with Uniform (euler)"),
        ("LMS Karras", None, "sdcli runs LMS only with Uniform (lms)"),
        ("DPM++ 2M", "Uniform", "sdcli runs DPM++ 2M only with SGM Uniform (dpmpp_2m) or Karras (dpmpp_2m_karras)"),
        ("DPM++ 2M", "Exponential", "or Karras (dpmpp_2m_karras)"),
        ("DPM++ 2M SDE Karras", None, "sdcli has no equivalent"),
        ("DPM++ SDE", None, "sdcli has no equivalent"),
        ("DPM2", None, "sdcli has no equivalent"),
        ("DPM2 a Karras", None, "sdcli has no equivalent"),
        ("UniPC", None, "sdcli has no equivalent"),
        ("Restart", None, "sdcli has no equivalent"),
        ("DPM++ 2M SGM Uniform", None, "not an A1111 sampler"),  # A1111 strips " Uniform" first, as here
        ("Euler Karras", None, "sdcli runs Euler only with Uniform"),
        ("k_euler_a", None, "not an A1111 sampler"),
        ("Foo", None, "not an A1111 sampler"),
        ("Euler", "Warp", "not an A1111 schedule type"),
    ],
)
def test_samplers_sdcli_lacks_give_no_sampler_and_one_warning(sampler, schedule, said):
    values, warnings = request_values(parse_infotext(_sampler_text(sampler, schedule)))
    assert "sampler" not in values
    assert len(warnings) == 1 and said in warnings[0], warnings


def test_a1111_sampler_resolution():
    assert a1111_sampler("DPM++ 2M Karras", None) == ("DPM++ 2M", "karras")
    assert a1111_sampler("DPM++ 2M SDE Exponential", "Karras") == ("DPM++ 2M SDE", "exponential")
    assert a1111_sampler("Euler a", None) == ("Euler a", "automatic")
    assert a1111_sampler("DPM++ 2M SGM Uniform", None) == ("DPM++ 2M SGM", "uniform")
    assert a1111_sampler("Euler", "Nope") == ("Euler", None)


def test_schedule_type_without_sampler_is_warned():
    values, warnings = request_values(parse_infotext("p\nSteps: 20, Schedule type: Karras, Seed: 1, RNG: CPU"))
    assert "sampler" not in values and _warned(warnings, "Schedule type 'Karras': given without a Sampler")


@pytest.mark.parametrize("sampler", sorted(SAMPLER_SPECS))
@pytest.mark.parametrize(("clip_skip", "syntax"), [(1, "a1111"), (2, "plain")])
def test_sdcli_infotext_round_trips(sampler, clip_skip, syntax):
    meta = {
        "prompt": "a red circle, flat style: vector art\nsecond line (of it)",
        "negative": "blurry, low quality",
        "seed": 2**64 - 1, "steps": 17, "guidance": 6.5, "sampler": sampler, "width": 96, "height": 64,
        "clip_skip": clip_skip, "prompt_syntax": syntax,
        "weights_sha256": "ab" * 32, "weights": "/w/v1-5: pruned, emaonly.safetensors",
    }  # fmt: skip
    values, warnings = request_values(parse_infotext(sdcli_infotext(meta)))
    assert warnings == []
    for key in ("prompt", "negative", "seed", "steps", "guidance", "sampler", "width", "height", "clip_skip"):
        assert values[key] == meta[key], key
    assert values["prompt_syntax"] == syntax
    assert values["model_hash"] == "abababab" + "ab" and values["model"] == "v1-5: pruned, emaonly"


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        ("Steps: abc", "infotext Steps 'abc' is not a whole number"),
        ("Steps: -3", "is not a whole number"),
        ("Steps: 2.5", "is not a whole number"),
        ("Size: 12", "infotext Size '12' is not WIDTHxHEIGHT"),
        ("Size: 512x", "is not WIDTHxHEIGHT"),
        ("Size: 0x512", "is not WIDTHxHEIGHT"),
        ("Size: 512×512", "is not WIDTHxHEIGHT"),
        ("CFG scale: nan", "is not a number"),
        ("CFG scale: inf", "is not a number"),
        ("CFG scale: 7,5", None),  # the pair is "7": fine
        ("Seed: 18446744073709551616", "a seed sdcli can use"),
        ("Seed: ٣", "is not a whole number"),  # Arabic-Indic digits: int() would take them
        ("Clip skip: two", "infotext Clip skip 'two' is not a whole number"),
    ],
)
def test_malformed_values_are_one_clear_line(pair, message):
    info = parse_infotext(f"p\n{pair}, Sampler: Euler, Model: m, RNG: CPU")
    if message is None:
        request_values(info)
        return
    with pytest.raises(RequestError) as error:
        request_values(info)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_defaults_are_a1111s():
    values, warnings = request_values(parse_infotext("p\nSteps: 20, Sampler: Euler, CFG scale: 7"))
    assert values["clip_skip"] == 1 and values["prompt_syntax"] == "a1111"
    assert "seed" not in values and "width" not in values
    assert warnings == []  # no seed: the GPU noise does not matter


@pytest.mark.parametrize(
    ("pair", "warned"),
    [
        ("RNG: GPU", True),
        ("RNG: NV", True),
        ("RNG: CPU", False),
        ("Emphasis: Original", False),
        ("Emphasis: No norm", True),
        ("Eta: 1.0", False),
        ("Eta: 0.67", True),
        ("Eta DDIM: 0", False),
        ("ENSD: 31337", True),
        ("Pad conds: True", True),
        ("Tiling: True", True),
        ("VAE Decoder: Full", False),
        ("VAE Decoder: TAESD", True),
        ("FP8 weight: Disable", False),
        ("Version: v1.10.1", False),
        ("Version: f2.0.1v1.10.1-previous-313-g8a042934", False),  # Forge: not an A1111 version
        ("User: me", False),
        ("Template: a {red|blue} cat", False),
        ('Hashes: {"model": "6ce0161689"}', False),
        ("Refiner: sd_xl_refiner_1.0", True),
        ('ControlNet 0: "Module: canny, Model: control_v11p"', True),
        ("Init image hash: 8d2e", True),
        ("Some extension field: 3", True),
    ],
)
def test_each_field_is_used_dropped_on_purpose_or_warned(pair, warned):
    values, warnings = request_values(parse_infotext(f"p\nSteps: 20, Sampler: Euler, Seed: 1, RNG: CPU, {pair}"))
    key = pair.split(":")[0]
    assert len(_warned(warnings, key)) == (1 if warned else 0), warnings
    assert len(warnings) == (1 if warned else 0), warnings


def test_emphasis_none_is_the_plain_syntax_and_break_is_warned():
    values, warnings = request_values(parse_infotext("a BREAK b\nSteps: 20, Sampler: Euler, Emphasis: None"))
    assert values["prompt_syntax"] == "plain"
    assert len(warnings) == 1 and "BREAK" in warnings[0]
    values, warnings = request_values(parse_infotext("a\nSteps: 20, Sampler: Euler, Emphasis: No norm"))
    assert "prompt_syntax" not in values and len(warnings) == 1


@pytest.mark.parametrize(
    ("version", "warnings"),
    [("v1.5.1", 1), ("v1.6.0", 1), ("v1.7.0", 1), ("v1.7.0-RC-5-gf92d6149", 1), ("v1.7.0-224-gabc", 1),
     ("v1.7.0-225-g12345", 0), ("v1.7.0-226-g12345", 0), ("1.10.1", 0), ("sdcli 0.1.0", 0)],
)  # fmt: skip
def test_old_a1111_versions_are_warned_about(version, warnings):
    _, lines = request_values(parse_infotext(f"p\nSteps: 20, Sampler: Euler, RNG: CPU, Version: {version}"))
    assert len(lines) == warnings, lines


def test_warnings_are_bounded_in_count_and_length():
    keys = ", ".join(f"Extension key {i}: {'v' * 500}" for i in range(200))
    long_key = "K" * 5000
    text = f"p\nSteps: 1, Sampler: Euler, Seed: 1, RNG: CPU, {long_key}: x, {keys}"
    _, warnings = request_values(parse_infotext(text))
    assert len(warnings) == MAX_WARNINGS + 1
    assert warnings[-1].startswith(f"... and {202 - MAX_WARNINGS - 1} more settings ignored")
    assert all(len(line) < 300 for line in warnings), max(map(len, warnings))


# --- sd-parsers on the same texts ---


@pytest.fixture
def sd_parsers():
    return pytest.importorskip("sd_parsers", reason="sd-parsers not installed (pip install sd-parsers)")


def _png(tmp_path: Path, text: str, *, name="image.png", zip=False, itxt=False) -> Path:
    info = PngImagePlugin.PngInfo()
    if itxt:
        info.add_itxt("parameters", text, zip=zip)
    else:
        info.add_text("parameters", text, zip=zip)
    path = tmp_path / name
    Image.new("RGB", (8, 8), "white").save(path, pnginfo=info)
    return path


@pytest.mark.parametrize("name", sorted(WEBUI_TEXTS))
def test_parse_agrees_with_sd_parsers(sd_parsers, tmp_path, name):
    """sd-parsers splits settings on every ',' (docs/metadata.md), so the comparison is of what it reads right."""
    png = _png(tmp_path, WEBUI_TEXTS[name])
    theirs = sd_parsers.ParserManager().parse(png)
    (sampler,) = theirs.samplers
    ours = parse_infotext(read_parameters(png))
    assert [p.value for p in sampler.prompts] == [ours.prompt]
    assert [p.value for p in sampler.negative_prompts] == ([ours.negative] if ours.negative else [])
    assert sampler.name == ours.fields["Sampler"]
    names = {"steps": "Steps", "cfg_scale": "CFG scale", "seed": "Seed", "scheduler": "Schedule type"}
    assert sampler.parameters == {key: ours.fields[field] for key, field in names.items() if field in ours.fields}
    assert theirs.metadata["Size"] == ours.fields["Size"]
    assert sampler.model.hash == ours.fields["Model hash"]
    if "," not in ours.fields["Model"]:
        assert sampler.model.name == ours.fields["Model"]


# --- PNG chunks and text files ---


@pytest.mark.parametrize(
    ("text", "zip", "itxt", "chunk"),
    [
        (WEBUI_110, False, False, b"tEXt"),
        (WEBUI_110, True, False, b"zTXt"),
        (WEBUI_110 + ", 日本の赤い円", False, False, b"iTXt"),  # not Latin-1: PIL writes iTXt
        (WEBUI_110 + ", 日本の赤い円", True, True, b"iTXt"),
        ("café, crème", False, False, b"tEXt"),  # Latin-1 in tEXt
    ],
)
def test_png_parameters_chunk_of_each_kind(tmp_path, text, zip, itxt, chunk):
    png = _png(tmp_path, text, zip=zip, itxt=itxt)
    assert chunk + b"parameters" in png.read_bytes()
    assert read_parameters(png) == text
    with Image.open(png) as image:
        assert image.text["parameters"] == text  # what PIL (and so A1111) reads


def test_png_without_parameters_is_none(tmp_path):
    info = PngImagePlugin.PngInfo()
    info.add_text("sdcli", json.dumps({"prompt": "x"}))
    info.add_text("parametersX", "not it")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png", pnginfo=info)
    assert read_parameters(tmp_path / "a.png") is None
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
    assert read_parameters(tmp_path / "b.png") is None


def test_last_parameters_chunk_wins_as_in_pil(tmp_path):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "first")
    info.add_text("parameters", "second", zip=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png", pnginfo=info)
    with Image.open(tmp_path / "a.png") as image:
        assert image.text["parameters"] == read_parameters(tmp_path / "a.png") == "second"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_with(tmp_path: Path, *chunks: bytes, cut: int = 0) -> Path:
    """A real PNG with `chunks` after IHDR (8 bytes of signature, 25 of IHDR), less its last `cut` bytes."""
    encoded = io.BytesIO()
    Image.new("RGB", (8, 8)).save(encoded, format="PNG")
    data = encoded.getvalue()
    data = data[:33] + b"".join(chunks) + data[33:]
    path = tmp_path / "crafted.png"
    path.write_bytes(data[: len(data) - cut] if cut else data)
    return path


@pytest.mark.parametrize(
    ("chunk", "message"),
    [
        (_chunk(b"zTXt", b"parameters\0\0" + zlib.compress(b"\0" * 2**26, 9)), "decompresses to more than"),
        (_chunk(b"iTXt", b"parameters\0\1\0\0\0" + zlib.compress(b"a" * 2**26, 9)), "decompresses to more than"),
        (_chunk(b"tEXt", b"parameters\0" + b"a" * (MAX_TEXT_BYTES + 2**17)), "more than sdcli reads"),
        (_chunk(b"zTXt", b"parameters\0\0not zlib"), "does not decompress"),
        (_chunk(b"zTXt", b"parameters\0\0" + zlib.compress(b"text")[:-6]), "cut off"),
        (_chunk(b"zTXt", b"parameters\0\7" + zlib.compress(b"text")), "unknown compression"),
        (_chunk(b"iTXt", b"parameters\0\0\0\0\0\xff\xfe"), "not UTF-8"),
        (_chunk(b"iTXt", b"parameters\0\0"), "iTXt header"),
        (_chunk(b"tEXt", b"parameters\0ok")[:-1] + b"\0", "CRC mismatch"),
    ],
)
def test_broken_or_huge_chunks_are_refused(tmp_path, chunk, message):
    png = _png_with(tmp_path, chunk)
    with pytest.raises(RequestError, match=message) as error:
        read_parameters(png)
    assert "\n" not in str(error.value) and str(png) in str(error.value)


def test_huge_chunk_of_another_name_is_skipped(tmp_path):
    big = _chunk(b"tEXt", b"comment\0" + b"a" * (2 * MAX_TEXT_BYTES))
    png = _png_with(tmp_path, big, _chunk(b"tEXt", b"parameters\0ok"))
    assert read_parameters(png) == "ok"


def test_truncated_png(tmp_path):
    png = _png_with(tmp_path, _chunk(b"tEXt", b"parameters\0" + b"x" * 1000), cut=0)
    data = png.read_bytes()
    png.write_bytes(data[: 33 + 8 + 500])  # inside the parameters chunk
    with pytest.raises(RequestError, match="cut off inside its parameters chunk"):
        read_parameters(png)
    png.write_bytes(data[: 33 + 8 + 1011 + 4 + 10])  # after it: what came before stands
    assert read_parameters(png) == "x" * 1000


def test_text_files(tmp_path):
    path = tmp_path / "info.txt"
    path.write_text(WEBUI_110, encoding="utf-8")
    assert read_parameters(path) == WEBUI_110
    path.write_bytes(b"\xef\xbb\xbf" + "caf\u00e9".encode())  # a BOM, as Windows editors save
    assert read_parameters(path) == "café"
    path.write_bytes(b"")
    assert read_parameters(path) == ""
    request_values(parse_infotext(""))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "neither a PNG nor UTF-8 text (byte 0"),
        (b"abc\x00def", "NUL bytes"),
        (b"a" * (MAX_TEXT_BYTES + 1), "more than"),
    ],
)
def test_files_that_are_not_infotext(tmp_path, data, message):
    path = tmp_path / "x.bin"
    path.write_bytes(data)
    with pytest.raises(RequestError, match=re.escape(message)):
        read_parameters(path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(RequestError, match="file not found"):
        read_parameters(tmp_path / "nope.png")
    with pytest.raises(RequestError, match="--from x: cannot read"):
        read_parameters(tmp_path, where="--from x")


# --- hostile text: never a traceback ---


@given(st.text(max_size=300))
@settings(max_examples=300, deadline=None)
def test_any_text_parses_and_maps_or_is_a_request_error(text):
    info = parse_infotext(text)
    assert isinstance(info, Infotext)
    try:
        _, warnings = request_values(info)
    except RequestError as exc:
        assert "\n" not in str(exc)
        return
    assert len(warnings) <= MAX_WARNINGS + 1 and all(len(w) < 400 and "\n" not in w for w in warnings)


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["Steps", "Sampler", "Schedule type", "Size", "Seed", "CFG scale", "RNG", "Version", "X"]),
            st.text(alphabet='0123456789x., "abc:\\', max_size=12),
        ),
        max_size=8,
    )
)
@settings(max_examples=300, deadline=None)
def test_settings_lines_made_of_known_keys(pairs):
    line = ", ".join(f"{k}: {v}" for k, v in pairs)
    try:
        request_values(parse_infotext(f"p\n{line}"))
    except RequestError as exc:
        assert str(exc).startswith("infotext ")


def test_hostile_prompts():
    for text in ("Negative prompt:", "Negative prompt: x\n", "\x00\x85\u2028", "<lora:" * 10000, '"' * 10000):
        request_values(parse_infotext(text))
    info = parse_infotext("\ud800 prompt\nSteps: 1, Sampler: \ud800, Seed: 1")
    _, warnings = request_values(info)
    assert all(line.encode("utf-8") for line in warnings)  # lone surrogates escaped, printable anywhere


def test_import_is_light():
    code = "import sys, sdcli.infotext; print(sorted(m for m in ('torch', 'PIL') if m in sys.modules))"
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert ran.stdout.strip() == "[]"


# --- model hashes ---


@pytest.fixture
def weights(tmp_path) -> Path:
    path = tmp_path / "model.safetensors"
    path.write_bytes(bytes(range(256)) * (2**13 + 100))  # 2.1 MiB: more than the legacy hash's window
    return path


def test_legacy_model_hash_is_a1111s(weights, tmp_path):
    data = weights.read_bytes()
    assert legacy_model_hash(weights) == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    small = tmp_path / "small.bin"
    small.write_bytes(b"x" * 1000)
    assert legacy_model_hash(small) == hashlib.sha256(b"").hexdigest()[:8]  # A1111 hashes what it reads: nothing


def test_hash_matches_every_kind(weights):
    sha = sha256_file(weights)
    legacy = legacy_model_hash(weights)
    for recorded in (sha, sha.upper(), sha[:10], sha[:10].upper(), f" {sha[:10]} ", legacy, legacy.upper()):
        assert hash_matches(sha, weights, recorded), recorded
    for recorded in (sha[:9], sha[:8], sha[:11], "", "zz" * 5, "0" * 10, "0" * 8, "0" * 64):
        assert not hash_matches(sha, weights, recorded), recorded
    kinds = [hash_kind(x) for x in (sha, sha[:10], legacy, sha[:12], "g" * 10)]
    assert kinds == ["sha256", "autov2", "legacy", None, None]


def test_find_model(weights, tmp_path):
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"\1" * (2**21))
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(weights.read_bytes())
    sha = sha256_file(weights)
    hashed: list[Path] = []

    def sha256_of(path: Path) -> str:
        hashed.append(path)
        return sha256_file(path)

    candidates = [tmp_path / "missing.safetensors", other, other, tmp_path, copy, weights]
    assert find_model(sha[:10], candidates, sha256_of) == copy
    assert hashed == [other, copy]  # a duplicate, a folder and a missing file are not hashed
    assert find_model(sha[:10], candidates, sha256_of, model_name="model") == weights  # Model: tried first
    assert find_model(sha, candidates, sha256_of) == copy
    assert find_model("0" * 10, candidates, sha256_of) is None
    assert find_model("not a hash", candidates, sha256_of) is None

    def never(path: Path) -> str:
        raise AssertionError("a legacy hash needs no full SHA-256")

    assert find_model(legacy_model_hash(weights), [other, weights], never) == weights


@pytest.mark.parametrize("upscaler, written", [("latent", "Latent"), ("lanczos", "Lanczos")])
def test_a_hires_recipe_round_trips_through_its_infotext(tiny_config, upscaler, written):
    from sdcli.outputs import build_metadata, infotext
    from sdcli.request import Request

    request = Request("a fox", "", 5, 20, 7.0, "euler", 32, 32, hires_scale=1.5, hires_steps=8,
                      hires_strength=0.55, hires_upscale=upscaler)  # fmt: skip
    meta = build_metadata(request, config=tiny_config, weights=Path("/w/m.safetensors"), weights_sha256="0" * 64,
                          device="cpu", dtype="fp32", batch_size=1, elapsed=0.0, threads=1)  # fmt: skip
    text = infotext(meta)
    assert f"Denoising strength: 0.55, Hires upscale: 1.5, Hires steps: 8, Hires upscaler: {written}" in text
    values, warnings = request_values(parse_infotext(text))
    assert (values["hires_scale"], values["hires_steps"], values["hires_strength"], values["hires_upscale"]) == (
        1.5, 8, 0.55, upscaler)  # fmt: skip
    assert not [w for w in warnings if "Hires" in w or "Denoising" in w]
