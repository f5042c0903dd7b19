"""Input images: a user's file read safely, as diffusers' load_image sees it, and images to and from the tensors
the VAE works on, converted as diffusers' VaeImageProcessor converts them (so renders match it pixel for pixel)."""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from sdcli.errors import RequestError
from sdcli.text_limits import clip

# Pillow decodes these itself; others may run programs (EPS calls Ghostscript) or are rarely what a user means
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
MAX_PIXELS = 1 << 26  # 8192x8192, twice the largest side sdcli renders; past it, a decompression bomb
# what a corrupt or truncated file makes Pillow's decoders raise
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError, KeyError)
BOMBS = (Image.DecompressionBombError, Image.DecompressionBombWarning)  # Pillow's own limit, past MAX_PIXELS


def read_image(path: str | Path, what: str = "init image") -> Image.Image:
    """The file's (first) picture as RGB, as diffusers' load_image gives it: EXIF orientation applied, then
    convert("RGB"), which drops alpha and expands palettes; 16-bit grayscale, which that would clip to white, is
    scaled to 8 bits instead. Any fault is one RequestError naming the file."""
    name = f"{what} {clip(Path(path).name, 60)}"
    try:
        file = open(path, "rb")
    except OSError as exc:
        raise RequestError(f"{name}: cannot open it ({exc.strerror or exc})") from None
    try:
        with file, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's notes on odd files; what matters is whether the image reads
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file, formats=FORMATS) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise RequestError(f"{name}: {image.width}x{image.height} is more than {MAX_PIXELS} pixels")
                return _rgb(ImageOps.exif_transpose(image))
    except BOMBS:
        raise RequestError(f"{name}: more than {MAX_PIXELS} pixels") from None
    except UnidentifiedImageError:
        raise RequestError(f"{name}: not a {', '.join(FORMATS[:-1])} or {FORMATS[-1]} image") from None
    except DECODE_ERRORS as exc:
        raise RequestError(f"{name}: cannot be read, the file is damaged or truncated ({clip(str(exc), 80)})") from None


def _rgb(image: Image.Image) -> Image.Image:
    """An opened image as a loaded RGB one."""
    if image.mode.startswith("I;16"):
        image = image.convert("I").point(lambda v: v * (1 / 257) + 0.5).convert("L")  # 65535 -> 255, rounded
    return image.convert("RGB")


def image_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """An RGB image -> (1, 3, height, width) float32 in [-1, 1], as VaeImageProcessor.preprocess makes it: resized
    with PIL's Lanczos filter (not at all when the size is right), x/255, then 2x - 1."""
    image = image.resize((width, height), Image.Resampling.LANCZOS)
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(height, width, 3)
    return 2 * (data.permute(2, 0, 1)[None].float() / 255) - 1


def pixels(images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] -> uint8 (B, H, W, 3), rounded as diffusers' numpy_to_pil rounds them."""
    return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


def to_pil(pixels: torch.Tensor) -> Image.Image:
    """One uint8 (H, W, 3) image as a PIL image."""
    height, width, _ = pixels.shape
    return Image.frombytes("RGB", (width, height), pixels.contiguous().numpy().tobytes())
