"""The metadata sdcli writes, read by the tools users have: sd-parsers (the A1111 infotext parser most image
browsers use) and exiftool (the PNG text chunks as they are). Images are real renders of the bundled demo model
through the command line; each reader is skipped when it is not installed. What A1111's own parser makes of
the same PNGs is in docs/metadata.md (checked by hand against its source, which stays out of this repo)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from sdcli.outputs import shareable

PROMPT = "a red circle, flat style: vector art"  # a comma and a colon: A1111's field separators
NEGATIVE = "blurry, low quality"
STEPS = 4  # the readers see a number; fewer steps keep the renders short

# What A1111 calls each sdcli sampler: its "Sampler:" and "Schedule type:" (None: no Schedule type written).
# A bare "DPM++ 2M" means Karras in A1111 1.9+, so the uniform one must say its schedule type.
A1111_NAMES = {
    "ddim": ("DDIM", None),
    "dpmpp_2m": ("DPM++ 2M", "SGM Uniform"),
    "dpmpp_2m_karras": ("DPM++ 2M", "Karras"),
    "euler_a": ("Euler a", "Uniform"),
}


def render(cli, out: Path, *args) -> tuple[Path, dict]:
    """One image of the demo model through the CLI; its PNG and its (local) sidecar metadata."""
    ran = cli("generate", *args, "--seed", 7, "--steps", STEPS, "-o", out, "--json", "-q")
    assert ran.code == 0, ran.err
    (line,) = ran.out.splitlines()
    record = json.loads(line)
    assert record["status"] == "written", record
    png = Path(record["image"])
    return png, json.loads(Path(record["metadata"]).read_text(encoding="utf-8"))


def png_text(png: Path) -> dict[str, str]:
    with Image.open(png) as image:
        return dict(image.text)


@pytest.fixture
def sd_parsers():
    return pytest.importorskip("sd_parsers", reason="sd-parsers not installed (pip install sd-parsers)")


def parse(sd_parsers, png: Path):
    info = sd_parsers.ParserManager().parse(png)
    assert info is not None, "sd-parsers found no generator"
    assert info.generator == sd_parsers.data.Generators.AUTOMATIC1111
    (sampler,) = info.samplers
    return info, sampler


def test_sd_parsers_reads_prompt_negative_and_settings(cli, sd_parsers, tmp_path):
    png, meta = render(cli, tmp_path, PROMPT, "-n", NEGATIVE, "--sampler", "euler_a")
    info, sampler = parse(sd_parsers, png)
    assert [p.value for p in sampler.prompts] == [PROMPT]
    assert [p.value for p in sampler.negative_prompts] == [NEGATIVE]
    assert sampler.name == "Euler a"
    assert sampler.parameters == {"scheduler": "Uniform", "cfg_scale": "5.0", "seed": "7", "steps": str(STEPS)}
    assert info.metadata["Size"] == "64x64"
    assert (sampler.model.name, sampler.model.hash) == ("demo", meta["weights_sha256"][:10])  # A1111's AutoV2
    assert info.metadata["RNG"] == "CPU"
    assert "Version" not in info.metadata  # A1111 would read a foreign version as an old one of its own


def test_sd_parsers_reads_no_negative_prompt_as_none(cli, sd_parsers, tmp_path):
    png, _ = render(cli, tmp_path, "a red circle", "--sampler", "dpmpp_2m")
    _, sampler = parse(sd_parsers, png)
    assert [p.value for p in sampler.prompts] == ["a red circle"]
    assert sampler.negative_prompts == []


@pytest.mark.parametrize("name", sorted(A1111_NAMES))
def test_sd_parsers_reads_sampler_and_schedule_type(cli, sd_parsers, tmp_path, name):
    png, meta = render(cli, tmp_path, "a red circle", "--sampler", name)
    assert meta["sampler"] == name
    _, sampler = parse(sd_parsers, png)
    a1111_sampler, schedule = A1111_NAMES[name]
    assert sampler.name == a1111_sampler
    assert sampler.parameters.get("scheduler") == schedule


@pytest.fixture
def exiftool():
    path = shutil.which("exiftool")
    if path is None:
        pytest.skip("exiftool not installed (Debian: apt-get install libimage-exiftool-perl)")

    def read(png: Path) -> dict:
        ran = subprocess.run([path, "-j", "-struct", str(png)], capture_output=True, text=True, check=True)
        (tags,) = json.loads(ran.stdout)
        return tags

    return read


def test_exiftool_reads_both_text_chunks(cli, exiftool, tmp_path):
    png, meta = render(cli, tmp_path, PROMPT + ", 日本の赤い円", "-n", NEGATIVE)  # non-Latin-1: iTXt chunks
    tags = exiftool(png)
    chunks = png_text(png)
    assert tags["Parameters"] == chunks["parameters"]  # newlines and all
    assert tags["Parameters"].splitlines()[:2] == [PROMPT + ", 日本の赤い円", f"Negative prompt: {NEGATIVE}"]
    assert json.loads(tags["Sdcli"]) == shareable(meta)
    assert (tags["ImageWidth"], tags["ImageHeight"]) == (64, 64)


ABSOLUTE_PATH = re.compile(r"(?<![\w.~-])/(?:[\w.~-]+/)+")  # /something/... (no relative names, no URLs' //)


def test_png_chunks_hold_no_local_paths(cli, exiftool, tiny_model, tmp_path):
    """The sidecar names the weights and config by absolute path; the PNG, which travels, holds neither (nor any
    other absolute path). A config outside the bundled folder, so that the sidecar has a config_path too."""
    png, meta = render(cli, tmp_path / "out", PROMPT, "-c", tiny_model)
    assert Path(meta["weights"]).is_absolute() and Path(meta["config_path"]).is_absolute()
    tags = exiftool(png)
    assert set(png_text(png)) == {"parameters", "sdcli"}  # no other text chunk
    texts = {"Parameters": tags["Parameters"], "Sdcli": tags["Sdcli"]}
    local = {meta["weights"], meta["config_path"], str(tmp_path), str(Path.home()), str(Path(__file__).parents[1])}
    for key, text in texts.items():
        assert ABSOLUTE_PATH.search(text) is None, (key, text)
        assert not [p for p in local if p in text], (key, text)
    shared = json.loads(tags["Sdcli"])
    assert "config_path" not in shared and shared["weights"] == "tiny.safetensors"
