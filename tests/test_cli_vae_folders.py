"""--vae and diffusers folders through the real command line and against diffusers' pixels: a folder renders its
single file's image; a separate VAE gives diffusers' image with `AutoencoderKL.from_single_file` swapped in; both
are recorded by hash so --from re-renders exactly; a file that is no VAE is one line."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from sdcli.checkpoint import VAE_PREFIX
from sdcli.pipeline import Pipeline
from sdcli.request import Request

from reference import diffusers_pipeline, diffusers_render, psnr, tiny_config, torch_threads, write_random_checkpoint
from test_cli_render import pairs, pixels

PROMPT, NEGATIVE, SEED, STEPS, GUIDANCE, SIZE = "a photo of a lighthouse at dusk", "blurry", 5, 4, 5.0, 64


def config_yaml(config, weights: Path) -> str:
    """A YAML config file for a ModelConfig (the tiny ones of reference.py), naming `weights`."""
    def plain(value):
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.name != "source"}
        return [plain(v) for v in value] if isinstance(value, tuple) else value

    data = {k: v for k, v in plain(config).items() if v is not None} | {"weights": str(weights)}
    return yaml.safe_dump(data, sort_keys=False)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny SD 1.x single file and its config, diffusers' folder of it, and another model's VAE alone."""
    root, config = tmp_path_factory.mktemp("vae-folders"), tiny_config("sd1")
    checkpoint = write_random_checkpoint(config, root / "tiny.safetensors", dtype=torch.float32, seed=3)
    other = write_random_checkpoint(config, root / "other.safetensors", dtype=torch.float32, seed=4)
    vae = root / "vae-ft.safetensors"
    save_file({k: v.half() for k, v in load_file(other).items() if k.startswith(VAE_PREFIX)}, str(vae))
    (root / "tiny.yaml").write_text(config_yaml(config, checkpoint), encoding="utf-8")
    with torch_threads(1):
        diffusers_pipeline(config, checkpoint, "euler").save_pretrained(root / "folder")
    return config, root / "tiny.yaml", checkpoint, root / "folder", vae


def render(cli, yaml_path, out, *args):
    ran = cli("generate", PROMPT, "-n", NEGATIVE, "-c", yaml_path, "-o", out, "--seed", SEED, "--steps", STEPS,
              "-g", GUIDANCE, "--threads", 1, "--json", *args)  # fmt: skip
    assert ran.code == 0, ran.err
    made = json.loads(ran.out)
    return made, pixels(made["image"])


def test_a_folder_renders_its_single_file(cli, model, tmp_path):
    _, yaml_path, checkpoint, folder, _ = model
    from_file, file_pixels = render(cli, yaml_path, tmp_path / "file")
    from_folder, folder_pixels = render(cli, yaml_path, tmp_path / "folder", "--weights", folder)
    assert np.array_equal(file_pixels, folder_pixels)
    assert from_folder["weights"] == str(folder) and len(from_folder["weights_sha256"]) == 64
    assert from_folder["weights_sha256"] != from_file["weights_sha256"]
    stem = pairs(tmp_path / "folder")[0]
    again = cli("generate", "--from", tmp_path / "folder" / f"{stem}.json", "-o", tmp_path / "again", "--json")
    assert again.code == 0, again.err
    assert np.array_equal(pixels(json.loads(again.out)["image"]), folder_pixels)


def test_vae_override_matches_diffusers_with_the_vae_swapped(model):
    from diffusers import AutoencoderKL

    config, _, checkpoint, folder, vae = model
    with torch_threads(1):
        ours = Pipeline.load(config, checkpoint, device="cpu", dtype="fp32", vae=vae)
        mine = np.asarray(ours.generate([Request(PROMPT, NEGATIVE, SEED, STEPS, GUIDANCE, "euler", SIZE, SIZE)])[0])
        theirs = diffusers_pipeline(config, checkpoint, "euler")
        base = diffusers_render(theirs, PROMPT, NEGATIVE, SEED, STEPS, GUIDANCE, SIZE, SIZE)
        theirs.vae = AutoencoderKL.from_single_file(str(vae), config=str(folder / "vae"), local_files_only=True,
                                                    torch_dtype=torch.float32)  # fmt: skip
        swapped = diffusers_render(theirs, PROMPT, NEGATIVE, SEED, STEPS, GUIDANCE, SIZE, SIZE)
    assert psnr(mine, swapped) >= 40
    assert psnr(mine, base) < 30  # the override really decoded with the other VAE


def test_vae_is_recorded_and_from_reuses_it(cli, model, tmp_path, monkeypatch):
    _, yaml_path, _, _, vae = model
    _, base = render(cli, yaml_path, tmp_path / "base")
    made, image = render(cli, yaml_path, tmp_path / "vae", "--vae", vae)
    assert not np.array_equal(image, base)
    import hashlib

    assert made["vae"] == str(vae) and made["vae_sha256"] == hashlib.sha256(vae.read_bytes()).hexdigest()
    stem = pairs(tmp_path / "vae")[0]
    from PIL import Image

    with Image.open(tmp_path / "vae" / f"{stem}.png") as png:
        assert json.loads(png.text["sdcli"])["vae"] == "vae-ft.safetensors"
        assert f"VAE hash: {made['vae_sha256'][:10]}, VAE: vae-ft.safetensors" in png.text["parameters"]
    again = cli("generate", "--from", tmp_path / "vae" / f"{stem}.json", "-o", tmp_path / "a", "--json")
    assert np.array_equal(pixels(json.loads(again.out)["image"]), image)
    monkeypatch.chdir(vae.parent)  # the PNG names the VAE's file only: found where weights are looked up
    again = cli("generate", "--from", tmp_path / "vae" / f"{stem}.png", "-c", yaml_path, "-o", tmp_path / "b", "--json")
    assert again.code == 0, again.err
    assert np.array_equal(pixels(json.loads(again.out)["image"]), image)
    resumed = cli("batch", _prompt_file(tmp_path), "-c", yaml_path, "-o", tmp_path / "r", "--vae", vae)
    assert resumed.code == 0, resumed.err
    resumed = cli("batch", _prompt_file(tmp_path), "-c", yaml_path, "-o", tmp_path / "r")
    assert "done: 1 written, 0 skipped" in resumed.err  # another VAE is another image


def _prompt_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text(PROMPT + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("which, message", [("unet", "not a VAE"), ("missing", "VAE file not found")])
def test_a_bad_vae_is_one_line(cli, model, tmp_path, which, message):
    _, yaml_path, checkpoint, _, _ = model
    path = tmp_path / "bad.safetensors"
    if which == "unet":
        save_file({k: v for k, v in load_file(checkpoint).items() if k.startswith("model.diffusion_model.")}, str(path))
    ran = cli("generate", "x", "-c", yaml_path, "-o", tmp_path / "out", "--vae", path)
    assert ran.code == 2 and ran.out == "", ran
    assert ran.err_lines[-1].startswith("sdcli: error: ") and message in ran.err_lines[-1], ran.err
    assert not (tmp_path / "out").exists() or pairs(tmp_path / "out") == []


def test_a_config_names_its_default_vae(cli, model, tmp_path):
    _, yaml_path, _, _, vae = model
    _, with_option = render(cli, yaml_path, tmp_path / "a", "--vae", vae)
    own = tmp_path / "own.yaml"
    own.write_text(yaml_path.read_text(encoding="utf-8") + f"vae_weights: {vae}\n", encoding="utf-8")
    made, with_config = render(cli, own, tmp_path / "b")
    assert np.array_equal(with_option, with_config) and made["vae"] == str(vae)
