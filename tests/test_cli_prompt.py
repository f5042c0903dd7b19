"""The prompt language on the command line: --prompt-syntax and --clip-skip reach the pixels, the sidecar and
the infotext; a sidecar from before the options existed re-renders with diffusers' plain reading."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from sdcli.request import MAX_PROMPT_CHARS


def render(cli, tiny_model, out, *args):
    ran = cli("generate", "--seed", "5", *args, "-c", tiny_model, "-o", out, "--json")  # a later --seed wins
    assert ran.code == 0, ran.err
    record = json.loads(ran.out.splitlines()[-1])
    with Image.open(record["image"]) as image:
        return np.asarray(image), image.text, json.loads(open(record["metadata"], encoding="utf-8").read())


def test_brackets_change_pixels_only_under_a1111(cli, tiny_model, tmp_path):
    plain_words, _, _ = render(cli, tiny_model, tmp_path / "a", "a red circle")
    weighted, _, meta = render(cli, tiny_model, tmp_path / "b", "a (red:1.5) circle")
    literal, text, literal_meta = render(
        cli, tiny_model, tmp_path / "c", "a (red:1.5) circle", "--prompt-syntax", "plain"
    )
    assert meta["prompt_syntax"] == "a1111" and literal_meta["prompt_syntax"] == "plain"
    assert not np.array_equal(weighted, plain_words) and not np.array_equal(weighted, literal)
    assert "Emphasis: None" in text["parameters"]


def test_a_plain_prompt_is_the_same_under_both_syntaxes(cli, tiny_model, tmp_path):
    a1111, text, _ = render(cli, tiny_model, tmp_path / "a", "a red circle, on white")
    plain, _, _ = render(cli, tiny_model, tmp_path / "b", "a red circle, on white", "--prompt-syntax", "plain")
    assert np.array_equal(a1111, plain)
    assert "Emphasis" not in text["parameters"] and "Clip skip" not in text["parameters"]


def test_clip_skip_is_recorded_and_written_as_a1111_does(cli, tiny_model, tmp_path):
    _, text, meta = render(cli, tiny_model, tmp_path / "a", "a red circle", "--clip-skip", "2")
    assert meta["clip_skip"] == 2 and "Clip skip: 2" in text["parameters"]


def test_an_old_sidecar_means_plain_syntax(cli, tiny_model, tmp_path):
    """A sidecar written before --prompt-syntax re-renders its brackets literally, as they were rendered."""
    literal, _, meta = render(cli, tiny_model, tmp_path / "a", "a (red:1.5) circle", "--prompt-syntax", "plain")
    old = {k: v for k, v in meta.items() if k not in ("prompt_syntax", "clip_skip")}
    sidecar = tmp_path / "old.json"
    sidecar.write_text(json.dumps(old), encoding="utf-8")
    again, _, again_meta = render(cli, tiny_model, tmp_path / "b", "--from", str(sidecar))
    assert again_meta["prompt_syntax"] == "plain" and np.array_equal(again, literal)


@pytest.mark.parametrize(
    "args, message",
    [
        (["x", "--prompt-syntax", "comfy"], "unknown prompt syntax 'comfy'"),
        (["x", "--clip-skip", "99"], "--clip-skip must be between 1 and"),
        (["(" * (MAX_PROMPT_CHARS + 1)], f"at most {MAX_PROMPT_CHARS}"),
    ],
)
def test_bad_prompt_options_are_one_line(cli, tiny_model, tmp_path, args, message):
    ran = cli("generate", *args, "-c", tiny_model, "-o", tmp_path / "out")
    assert ran.code == 2 and message in ran.err and len(ran.err.splitlines()) == 1, ran.err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


A1111_PARAMETERS = """a (red:1.2) circle, on white
Negative prompt: blurry
Steps: 3, Sampler: Euler a, Schedule type: Automatic, CFG scale: 6, Seed: 77, Size: 32x32, Model hash: {hash}, \
Model: tiny, Clip skip: 2, ADetailer model: face_yolov8n.pt, Denoising strength: 0.5, RNG: CPU, Version: v1.10.1"""


def test_from_an_a1111_png_renders_its_settings_and_names_what_it_drops(cli, tiny_model, tmp_path, monkeypatch):
    import hashlib

    from PIL import PngImagePlugin

    weights = tiny_model.parent / "tiny.safetensors"
    short = hashlib.sha256(weights.read_bytes()).hexdigest()[:10]
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", A1111_PARAMETERS.format(hash=short))  # tEXt, as the webui writes it
    source = tmp_path / "00012-77.png"
    Image.new("RGB", (32, 32)).save(source, pnginfo=info)
    store = tmp_path / "store"
    store.mkdir()
    (store / "renamed.safetensors").write_bytes(weights.read_bytes())
    monkeypatch.setenv("SDCLI_WEIGHTS_DIR", str(store))  # found by its hash, not told
    ran = cli("generate", "--from", source, "-o", tmp_path / "a", "--json", "--config", tiny_model)
    assert ran.code == 0, ran.err
    warned = [line for line in ran.err.splitlines() if "warning" in line]
    assert any("ADetailer model" in line for line in warned) and any("Denoising strength" in line for line in warned)
    record = json.loads(ran.out.splitlines()[-1])
    expected = {"prompt": "a (red:1.2) circle, on white", "negative": "blurry", "steps": 3, "sampler": "euler_a",
                "guidance": 6.0, "seed": 77, "width": 32, "height": 32, "clip_skip": 2, "prompt_syntax": "a1111"}
    assert {k: record[k] for k in expected} == expected and record["weights"] == str(store / "renamed.safetensors")
    direct, _, _ = render(
        cli, tiny_model, tmp_path / "b", "a (red:1.2) circle, on white", "-n", "blurry", "--steps", "3",
        "--sampler", "euler_a", "-g", "6", "-W", "32", "-H", "32", "--clip-skip", "2", "--seed", "77",
    )  # fmt: skip
    with Image.open(record["image"]) as image:
        assert np.array_equal(np.asarray(image), direct)


def test_from_an_a1111_text_without_a_known_model_asks_for_one(cli, tmp_path, monkeypatch):
    source = tmp_path / "params.txt"
    source.write_text(A1111_PARAMETERS.format(hash="0123456789"), encoding="utf-8")
    monkeypatch.setenv("SDCLI_WEIGHTS_DIR", str(tmp_path))
    ran = cli("generate", "--from", source, "-o", tmp_path / "out")
    assert ran.code == 2 and "pass --weights or --config" in ran.err.splitlines()[-1]
    assert not (tmp_path / "out").exists()
