"""img2img's parts alone: samplers started part-way against diffusers' scheduler loop (get_timesteps, set_begin_index,
add_noise), the start step from the strength and the evaluation count the progress display shows; init images read
as diffusers' load_image and VaeImageProcessor read them, bad files refused; the banded encoder."""

from __future__ import annotations

import inspect
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from test_samplers import SCHEDULES, SPACINGS, flat, reference_scheduler, smooth, spaced
from test_vae import VARIANTS, randomize, reference

from sdcli.errors import RequestError
from sdcli.images import image_tensor, read_image
from sdcli.nets.bands import encode_in_bands
from sdcli.nets.vae import AutoencoderKL
from sdcli.sampler_registry import SAMPLERS
from sdcli.samplers import evaluations, sample, start_step

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 notices raised inside diffusers
STRENGTHS = (0.3, 0.5, 0.75, 1.0)


def diffusers_img2img_loop(sampler, schedule, steps, strength, init, noise, seeds, net):
    """StableDiffusionImg2ImgPipeline's loop (guidance lives in `net`): the N-step schedule cut by get_timesteps,
    init noised by add_noise at the first kept timestep; returns latents and the t values the net saw."""
    scheduler = reference_scheduler(sampler, schedule)
    scheduler.set_timesteps(steps)
    t_start = max(steps - min(int(steps * strength), steps), 0)
    timesteps = scheduler.timesteps[t_start * scheduler.order :]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    x = scheduler.add_noise(init, noise, timesteps[:1].repeat(init.shape[0]))
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    extra = {"generator": generators} if "generator" in inspect.signature(scheduler.step).parameters else {}
    seen = []
    for t in timesteps:
        seen.append(t.to(torch.float32))
        x = scheduler.step(net(scheduler.scale_model_input(x, t), seen[-1]), t, x, **extra, return_dict=False)[0]
    return x, torch.stack(seen)


def sdcli_img2img(sampler, schedule, steps, strength, init, noise, seeds, net):
    seen, progress = [], []

    def model(x_in, t):
        seen.append(t)
        return net(x_in, t)

    generators = [torch.Generator().manual_seed(s) for s in seeds]
    x = sample(sampler, model, noise, steps, schedule, generators, lambda i, n: progress.append((i, n)), init=init,
               start=start_step(steps, strength))  # fmt: skip
    return x, torch.stack(seen), progress


def inputs(batch: int = 2):
    torch.manual_seed(0)
    return torch.randn(batch, 4, 6, 6) * 0.8 + 0.2, torch.randn(batch, 4, 6, 6)


@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize("steps", [2, 4, 5, 10])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_started_samplers_match_diffusers(sampler, prediction, steps, strength):
    if int(steps * strength) < 1:
        pytest.skip("no step to run")
    init, noise = inputs()
    for net in (smooth, flat):
        expected, expected_t = diffusers_img2img_loop(sampler, SCHEDULES[prediction], steps, strength, init, noise,
                                                      [11, 12], net)  # fmt: skip
        actual, actual_t, progress = sdcli_img2img(sampler, SCHEDULES[prediction], steps, strength, init, noise,
                                                   [11, 12], net)  # fmt: skip
        assert torch.equal(actual_t, expected_t)
        assert (actual - expected).abs().max() <= 1e-5 * expected.abs().max()
        assert progress == [(i, len(expected_t)) for i in range(1, len(expected_t) + 1)]


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_started_samplers_match_diffusers_with_timestep_spacing(sampler, spacing):
    init, noise = inputs(1)
    schedule = spaced(SCHEDULES["epsilon"], spacing)
    for steps, strength in ((7, 0.6), (12, 0.75), (5, 1.0)):
        expected, expected_t = diffusers_img2img_loop(sampler, schedule, steps, strength, init, noise, [3], smooth)
        actual, actual_t, _ = sdcli_img2img(sampler, schedule, steps, strength, init, noise, [3], smooth)
        assert torch.equal(actual_t, expected_t)
        assert (actual - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_evaluations_count_what_the_cut_schedule_runs(sampler):
    for steps in (1, 2, 3, 8):
        for start in range(steps):
            scheduler = reference_scheduler(sampler, SCHEDULES["epsilon"])
            scheduler.set_timesteps(steps)
            assert evaluations(sampler, steps, start) == len(scheduler.timesteps[start * scheduler.order :])


def test_start_step_is_diffusers_get_timesteps():
    assert [start_step(10, s) for s in (0.1, 0.3, 0.75, 0.99, 1.0)] == [9, 7, 3, 1, 0]
    assert start_step(4, 0.3) == 3 and start_step(4, 0.75) == 1
    with pytest.raises(RequestError, match="strength 0.2 with 4 steps runs no step"):
        start_step(4, 0.2)


def test_strength_one_still_holds_the_init_image():
    """diffusers' img2img at strength 1 noises the init latents to the first level (it never starts from noise
    alone), so the result depends on them."""
    init, noise = inputs(1)
    runs = [sdcli_img2img("euler", SCHEDULES["epsilon"], 4, 1.0, x0, noise, [0], smooth)[0] for x0 in (init, -init)]
    assert (runs[0] - runs[1]).abs().max() > 1e-3


# --- reading init images ---------------------------------------------------------------------------------


def picture(mode: str = "RGB", size=(23, 17)) -> Image.Image:
    """A small image with distinct values in every channel, in `mode`."""
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    rgba = np.stack([x * 11 % 256, y * 15 % 256, (x * y) % 256, (x + y) * 7 % 256], -1).astype(np.uint8)
    image = Image.fromarray(rgba, "RGBA")
    if mode == "P":
        return image.convert("RGB").quantize(32)
    return image.convert(mode) if mode != "RGBA" else image


@pytest.mark.parametrize(
    "mode,suffix", [("RGB", ".png"), ("RGBA", ".png"), ("LA", ".png"), ("L", ".png"), ("P", ".png"), ("P", ".gif"),
                    ("1", ".bmp"), ("CMYK", ".jpg"), ("RGB", ".webp"), ("RGBA", ".tiff")],
)  # fmt: skip
def test_read_image_is_diffusers_load_image(tmp_path, mode, suffix):
    from diffusers.utils import load_image

    path = tmp_path / f"in{suffix}"
    picture(mode).save(path)
    got = read_image(path)
    assert got.mode == "RGB" and got.size == (23, 17)
    assert np.array_equal(np.asarray(got), np.asarray(load_image(str(path))))


def test_exif_orientation_is_applied_as_load_image_does(tmp_path):
    from diffusers.utils import load_image

    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned 90 degrees
    picture().save(path, exif=exif)
    got = read_image(path)
    assert got.size == (17, 23)
    assert np.array_equal(np.asarray(got), np.asarray(load_image(str(path))))


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    """Pillow's convert("RGB") clips 16-bit values at 255, so diffusers sees such a PNG as white."""
    values = (np.arange(23 * 17).reshape(17, 23) * 150).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    got = np.asarray(read_image(path))
    assert np.array_equal(got[..., 0], got[..., 2])
    assert np.abs(got[..., 0].astype(int) - np.round(values / 257)).max() <= 1


@pytest.mark.parametrize("size", [(64, 64), (80, 72), (40, 30), (64, 48)])
def test_image_tensor_is_vae_image_processor_preprocess(size):
    from diffusers.image_processor import VaeImageProcessor

    image = picture("RGB", size)
    expected = VaeImageProcessor(vae_scale_factor=8).preprocess(image, height=48, width=64)
    got = image_tensor(image, 64, 48)
    assert got.dtype == torch.float32 and got.shape == (1, 3, 48, 64)
    assert torch.equal(got, expected)


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares a size and holds no pixels: what a decompression bomb looks like before decoding."""
    body = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    ihdr = struct.pack(">I", 13) + body + struct.pack(">I", zlib.crc32(body))
    return b"\x89PNG\r\n\x1a\n" + ihdr + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))


@pytest.mark.parametrize(
    "content,message",
    [
        (None, "cannot open it"),
        (b"", "not a PNG, JPEG, WEBP, BMP, GIF or TIFF image"),
        (b"just some text\n" * 10, "not a PNG"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "not a PNG"),  # EPS would run Ghostscript
        (png_header(9000, 9000), "9000x9000 is more than 67108864 pixels"),
        (png_header(30000, 30000), "more than 67108864 pixels"),  # past Pillow's own limit too
        (png_header(20, 20), "damaged or truncated"),
    ],
    ids=["missing", "empty", "text", "eps", "large", "bomb", "no-pixels"],
)
def test_bad_files_are_one_line_request_errors(tmp_path, content, message):
    path = tmp_path / "bad\nname.png"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(RequestError, match=message) as caught:
        read_image(path)
    assert "init image 'bad\\nname.png'" in str(caught.value) and "\n" not in str(caught.value)


def test_a_folder_is_refused(tmp_path):
    with pytest.raises(RequestError, match="cannot open it"):
        read_image(tmp_path)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".gif", ".bmp", ".webp", ".tiff"])
def test_truncated_and_corrupt_files_are_request_errors(tmp_path, suffix):
    """Cut or overwritten anywhere, a file reads as an image or fails as a RequestError, never otherwise."""
    good = tmp_path / f"good{suffix}"
    picture("RGB", (40, 32)).save(good)
    data = good.read_bytes()
    rng = np.random.default_rng(0)
    bad = tmp_path / f"bad{suffix}"
    failures = 0
    for trial in range(60):
        if trial < 20:
            damaged = data[: len(data) * trial // 20]
        else:
            damaged = bytearray(data)
            for at in rng.integers(0, len(data), size=trial % 5 + 1):
                damaged[at] = int(rng.integers(0, 256))
        bad.write_bytes(bytes(damaged))
        try:
            assert read_image(bad).mode == "RGB"
        except RequestError:
            failures += 1
    assert failures >= 10  # the truncations at least


# --- the banded encoder ------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=list(VARIANTS))
def model(request):
    torch.manual_seed(0)
    return VARIANTS[request.param], randomize(AutoencoderKL(VARIANTS[request.param]))


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("band_pixels", [1, 40, 10**6])
@pytest.mark.parametrize("size", [(16, 16), (18, 14), (17, 11)], ids=["even", "taller", "odd"])
def test_banded_encode_equals_the_whole_encode(model, size, band_pixels, channels_last):
    """Only the GroupNorm sums run in another order: within 1e-5 relative (measured up to 2e-6); one band, the plain
    modules, is bit-equal image by image."""
    _, vae = model
    torch.manual_seed(1)
    x = torch.rand(2, 3, *size) * 2 - 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        whole = [vae.encode(x[i : i + 1]) for i in range(2)]
        banded = encode_in_bands(vae, x, band_pixels)
    for got, expected in zip(banded, (torch.cat(parts) for parts in zip(*whole, strict=True)), strict=True):
        assert got.shape == expected.shape
        assert relative_error(got, expected) <= 1e-5
        if band_pixels == 10**6:
            assert torch.equal(got, expected)


def test_banded_encode_matches_diffusers(model):
    cfg, vae = model
    torch.manual_seed(2)
    x = torch.rand(1, 3, 20, 14) * 2 - 1
    with torch.inference_mode():
        posterior = reference(vae, cfg).encode(x).latent_dist
        mean, logvar = encode_in_bands(vae, x, band_pixels=9)
    assert relative_error(mean, posterior.mean) <= 1e-4
    assert relative_error(logvar, posterior.logvar) <= 1e-4
