"""Pictures in through the real command line with the tiny model: img2img, inpainting, outpainting and the hires
fix render, record their inputs by hash so --from re-renders exactly, size themselves from the init image, and
refuse bad pictures in one line with nothing written. (Parity with diffusers: test_img2img_parity.py,
test_inpaint_parity.py.)"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from test_cli_render import pairs, pixels


def picture(path, size=(32, 32), seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def mask_of(path, size=(32, 32), box=(8, 8, 24, 24), fill=255):
    mask = np.zeros((size[1], size[0]), np.uint8)
    mask[box[1] : box[3], box[0] : box[2]] = fill
    Image.fromarray(mask).save(path)
    return path


def render(cli, tiny_model, out, *args, prompt="a red circle"):
    ran = cli("generate", prompt, "-c", tiny_model, "-o", out, "--seed", "3", "--json", *args)
    assert ran.code == 0, ran.err
    made = json.loads(ran.out)
    return made, pixels(made["image"])


def test_img2img_is_recorded_and_from_reproduces_it(cli, tiny_model, tmp_path):
    init = picture(tmp_path / "init.png")
    _, plain = render(cli, tiny_model, tmp_path / "t")
    made, image = render(cli, tiny_model, tmp_path / "i", "--init-image", init, "--strength", "0.5")
    assert not np.array_equal(image, plain)
    sha = hashlib.sha256(init.read_bytes()).hexdigest()
    assert made["init_image"] == [{"file": str(init), "weight": 1.0, "sha256": sha}] and made["strength"] == 0.5
    stem = pairs(tmp_path / "i")[0]
    with Image.open(tmp_path / "i" / f"{stem}.png") as png:
        assert "Denoising strength: 0.5" in png.text["parameters"]
    again = cli("generate", "--from", tmp_path / "i" / f"{stem}.json", "-o", tmp_path / "a", "--json")
    assert np.array_equal(pixels(json.loads(again.out)["image"]), image)
    picture(init, seed=1)  # the file changed since
    again = cli("generate", "--from", tmp_path / "i" / f"{stem}.json", "-o", tmp_path / "b", "--json")
    assert again.code == 0 and "is not the file" in again.err


def test_without_a_size_the_init_image_gives_it(cli, tiny_model, tmp_path):
    made, image = render(cli, tiny_model, tmp_path / "o", "--init-image", picture(tmp_path / "i.png", (45, 27)))
    assert (made["width"], made["height"]) == (44, 26) and image.shape == (26, 44, 3)  # the tiny VAE's step is 2
    made, _ = render(cli, tiny_model, tmp_path / "p", "--init-image", tmp_path / "i.png", "--pad", "8,0,16,8")
    assert (made["width"], made["height"]) == (68, 34)


def test_inpainting_keeps_what_the_mask_keeps(cli, tiny_model, tmp_path):
    init = picture(tmp_path / "init.png")
    _, img2img = render(cli, tiny_model, tmp_path / "i", "--init-image", init, "--strength", "0.8")
    made, inpainted = render(cli, tiny_model, tmp_path / "m", "--init-image", init, "--strength", "0.8",
                             "--mask", mask_of(tmp_path / "mask.png"))  # fmt: skip
    assert not np.array_equal(inpainted, img2img)
    assert made["mask"][0]["file"] == str(tmp_path / "mask.png")


def test_hires_fix_renders_the_larger_image(cli, tiny_model, tmp_path):
    for upscaler in ("latent", "lanczos"):
        made, image = render(cli, tiny_model, tmp_path / upscaler, "--hires-scale", "1.5", "--hires-steps", "2",
                             "--hires-upscale", upscaler)  # fmt: skip
        assert image.shape == (48, 48, 3) and (made["width"], made["hires_scale"]) == (32, 1.5)
        stem = pairs(tmp_path / upscaler)[0]
        with Image.open(tmp_path / upscaler / f"{stem}.png") as png:
            assert f"Hires upscale: 1.5, Hires steps: 2, Hires upscaler: {upscaler.title()}" in png.text["parameters"]


def test_batch_items_take_images_beside_the_prompt_file(cli, tiny_model, tmp_path):
    folder = tmp_path / "job"
    folder.mkdir()
    picture(folder / "a.png")
    mask_of(folder / "m.png")
    (folder / "p.yaml").write_text(
        "- {prompt: x, init_image: a.png, strength: 0.6}\n- {prompt: y, init_image: a.png, mask: m.png}\n- z\n",
        encoding="utf-8",
    )
    ran = cli("batch", folder / "p.yaml", "-c", tiny_model, "-o", tmp_path / "out")
    assert ran.code == 0, ran.err
    assert len(pairs(tmp_path / "out")) == 3
    again = cli("batch", folder / "p.yaml", "-c", tiny_model, "-o", tmp_path / "out")
    assert "done: 0 written, 3 skipped" in again.err


@pytest.mark.parametrize(
    "make, args, message",
    [
        (lambda d: None, ["--init-image", "{d}/missing.png"], "init image 'missing.png': cannot open it"),
        (lambda d: (d / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage"), ["--init-image", "{d}/bad.png"],
         "init image 'bad.png': "),
        (lambda d: picture(d / "i.png"), ["--init-image", "{d}/i.png", "--strength", "1.5"], "--strength must be in"),
        (lambda d: (d / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage"), ["--init-image", "{d}/bad.png", "-W",
         "32", "-H", "32"], "init image 'bad.png': "),
        (lambda d: mask_of(d / "m.png"), ["--mask", "{d}/m.png"], "--mask needs an --init-image"),
        (lambda d: (picture(d / "i.png"), mask_of(d / "m.png", fill=0)), ["--init-image", "{d}/i.png", "--mask",
         "{d}/m.png"], "no white"),
        (lambda d: picture(d / "i.png"), ["--init-image", "{d}/i.png", "--hires-scale", "9"], "--hires-scale must be"),
        (lambda d: picture(d / "i.png"), ["--init-image", "{d}/i.png", "--strength", "0.1"], "runs no step"),
    ],
)  # fmt: skip
def test_bad_pictures_are_one_line_and_write_nothing(cli, tiny_model, tmp_path, make, args, message):
    make(tmp_path)
    ran = cli("generate", "x", "-c", tiny_model, "-o", tmp_path / "out", *[a.format(d=tmp_path) for a in args])
    assert ran.code == 2 and ran.out == "", ran
    assert ran.err_lines[-1].startswith("sdcli: error: ") and message in ran.err_lines[-1], ran.err
    assert not any("loading" in line for line in ran.err_lines), ran.err  # found at planning, before the model
    assert not (tmp_path / "out").exists() or pairs(tmp_path / "out") == []
