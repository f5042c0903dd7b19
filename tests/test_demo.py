"""The bundled demo model: its data, its reader, its weights file, and a smoke render that must follow the prompt."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from sdcli.checkpoint import TEXT_PREFIXES, UNET_PREFIX, VAE_PREFIX
from sdcli.config import load_config
from sdcli.demo import train
from sdcli.demo.data import SHAPES, Scene, held_out_scenes, random_caption, render, sample_scenes
from sdcli.demo.evaluate import agreement, classify
from sdcli.nets.text import Tokenizer
from sdcli.pipeline import Pipeline
from sdcli.request import Request

DEMO_YAML = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(((image + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy())


def test_reader_reads_every_attribute_of_rendered_scenes():
    rng, gen = random.Random(0), torch.Generator().manual_seed(0)
    scenes = sample_scenes(40, rng) + held_out_scenes()
    readings = [classify(to_pil(x)) for x in render(scenes, 64, gen)]
    assert agreement(scenes, readings) == {a: 1.0 for a in ("colour", "shape", "position", "size", "background")}


def test_reader_finds_nothing_on_a_blank_picture():
    reading = classify(Image.new("RGB", (64, 64), (250, 250, 250)))
    assert (reading.colour, reading.shape, reading.background) == (None, None, "white")


def test_held_out_combinations_are_never_drawn_for_training():
    held = held_out_scenes()
    assert len(held) >= 40 and len({s.key() for s in held}) == len(held)
    assert {s.shape for s in held} == set(SHAPES)
    drawn = {s.key() for s in sample_scenes(5000, random.Random(1))}
    assert not drawn & {s.key() for s in held}


def test_captions_name_what_they_say_and_fit_the_context():
    scene = Scene("blue", "triangle", "top left", "small", "gray")
    assert scene.caption() == "a small blue triangle in the top left on a gray background"
    rng = random.Random(2)
    captions = {random_caption(scene, rng) for _ in range(200)}
    assert "a blue triangle" in captions and "a blue shape" in captions
    _, truncated = Tokenizer(load_config(str(DEMO_YAML)).text[0])([scene.caption()])
    assert truncated == [False]


def test_training_writes_a_checkpoint_the_pipeline_loads(tmp_path):
    config = tmp_path / "demo.yaml"
    shutil.copy(DEMO_YAML, config)
    out = tmp_path / "demo.safetensors"
    threads = torch.get_num_threads()  # train.main sets its own count; give the session back its own
    train.main([
        "--config", str(config), "--out", str(out), "--work", str(tmp_path / "work"), "--vae-steps", "2",
        "--vae-batch", "2", "--decoder-steps", "2", "--steps", "2", "--batch", "2", "--pool", "8", "--save-every", "1",
    ])
    torch.set_num_threads(threads)
    cfg = load_config(str(config))  # the measured scale_factor was written into it and still parses
    with safe_open(str(out), "pt") as f:
        keys = list(f.keys())
        assert {f.get_slice(k).get_dtype() for k in keys} == {"F16"}
    prefixes = (UNET_PREFIX, VAE_PREFIX, TEXT_PREFIXES["open_clip"])
    assert all(k.startswith(prefixes) for k in keys)
    pipe = Pipeline.load(cfg, out, device="cpu", dtype="fp32")
    request = Request("a red circle", "", 0, 2, 3.0, "ddim", 64, 64)
    assert pipe.generate([request])[0].size == (64, 64)


def test_scale_factor_is_written_into_the_config_line(tmp_path):
    config = tmp_path / "demo.yaml"
    shutil.copy(DEMO_YAML, config)
    train.write_scale_factor(config, 0.4321)
    assert load_config(str(config)).vae.scale_factor == 0.4321
    assert config.read_text().count("\n") == DEMO_YAML.read_text().count("\n")


def test_bundled_weights_are_small_fp16_in_the_sd_layout():
    path = load_config("demo").resolve_weights()
    assert path.stat().st_size < 15 * 2**20
    with safe_open(str(path), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
        assert any(k.startswith(TEXT_PREFIXES["open_clip"]) for k in f.keys())


# Smoke renders with the bundled model at its defaults: the pictures must show what the prompts say.
SMOKE = [
    Scene("red", "circle", "center", "large", "white"),
    Scene("blue", "square", "top left", "medium", "black"),
    Scene("yellow", "triangle", "bottom right", "large", "gray"),
    Scene("green", "diamond", "left", "large", "white"),
]


@pytest.fixture(scope="module")
def demo_pipeline() -> Pipeline:
    return Pipeline.load(load_config("demo"), device="cpu", dtype="fp32")


def test_bundled_model_draws_what_the_prompt_says(demo_pipeline):
    d = demo_pipeline.config.defaults
    requests = [Request(s.caption(), "", 0, d.steps, d.guidance, d.sampler, d.width, d.height) for s in SMOKE]
    readings = [classify(im) for im in demo_pipeline.generate(requests)]
    assert [(r.colour, r.shape, r.background) for r in readings] == [(s.colour, s.shape, s.background) for s in SMOKE]


def test_bundled_model_without_a_prompt_draws_no_particular_picture(demo_pipeline):
    d = demo_pipeline.config.defaults
    requests = [Request("", "", seed, d.steps, d.guidance, d.sampler, d.width, d.height) for seed in range(4)]
    readings = [classify(im) for im in demo_pipeline.generate(requests)]
    assert len({(r.colour, r.shape) for r in readings}) > 1
