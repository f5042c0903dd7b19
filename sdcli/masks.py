"""Inpainting masks and outpainting canvases, made as diffusers' inpainting pipelines make them.

White is repainted. A mask file is read as an init image is (images.read_image: diffusers' load_image), optionally
blurred by diffusers' `mask_processor.blur` (PIL's Gaussian, radius in pixels), then goes through the pipelines'
mask processor, VaeImageProcessor(do_normalize=False, do_binarize=True, do_convert_grayscale=True): Lanczos-resized
to the image's size, made grayscale, scaled to [0, 1] and cut at 0.5. After that cut a blur only rounds the
mask's corners and drops specks thinner than its radius, as in diffusers.

Outpainting grows the init image's canvas by (left, top, right, bottom) pixels, the new border copying the
nearest edge pixel (a neutral grey would turn into a grey frame wherever strength < 1 keeps some of it), and
paints the new area white in the mask.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageFilter, ImageOps

from sdcli.errors import RequestError
from sdcli.images import read_image
from sdcli.text_limits import clip

Pad = tuple[int, int, int, int]  # left, top, right, bottom, in pixels of the init image


def outpaint(image: Image.Image, mask: Image.Image | None, pad: Pad) -> tuple[Image.Image, Image.Image]:
    """The init image grown by `pad` (edge pixels repeated) and its mask: the given one (fitted to the image)
    or black, grown in white, so the new border is repainted along with whatever the mask already was."""
    if mask is None:
        mask = Image.new("RGB", image.size)
    elif mask.size != image.size:
        mask = mask.resize(image.size, resample=Image.Resampling.LANCZOS)
    return _edge_grown(image, pad), ImageOps.expand(mask, border=pad, fill=(255, 255, 255))


def _edge_grown(image: Image.Image, pad: Pad) -> Image.Image:
    """`image` with `pad` more columns and rows, each a copy of the nearest edge's: rows, then columns (as rows
    of the transposed image)."""
    left, top, right, bottom = pad
    flip = Image.Transpose.TRANSPOSE
    return _rows_repeated(_rows_repeated(image, top, bottom).transpose(flip), left, right).transpose(flip)


def _rows_repeated(image: Image.Image, top: int, bottom: int) -> Image.Image:
    """`image` with its first row repeated `top` times above it and its last `bottom` times below."""
    w, h = image.size
    grown = Image.new(image.mode, (w, top + h + bottom))
    if top:
        grown.paste(image.crop((0, 0, w, 1)).resize((w, top), Image.Resampling.NEAREST), (0, 0))
    if bottom:
        grown.paste(image.crop((0, h - 1, w, h)).resize((w, bottom), Image.Resampling.NEAREST), (0, top + h))
    grown.paste(image, (0, top))
    return grown


def blurred(mask: Image.Image, radius: int) -> Image.Image:
    """diffusers' mask_processor.blur: a Gaussian of `radius` pixels (PIL's GaussianBlur), none for 0."""
    return mask.filter(ImageFilter.GaussianBlur(radius)) if radius else mask


def mask_tensor(mask: Image.Image, width: int, height: int, name: str) -> torch.Tensor:
    """The mask processor's output: (1, 1, height, width) float32, 1 where repainted. A mask that repaints
    nothing is an error naming `name`: the result would be the init image again."""
    gray = mask.resize((width, height), resample=Image.Resampling.LANCZOS).convert("L")
    values = torch.frombuffer(bytearray(gray.tobytes()), dtype=torch.uint8).view(height, width).float() / 255
    binary = (values >= 0.5).float()  # diffusers' binarize of pil_to_numpy's float32 x / 255
    if not binary.any():
        raise RequestError(f"mask {name}: no white pixel at {width}x{height}, so nothing would be repainted")
    return binary[None, None]


def size_note(mask: Image.Image, image: Image.Image, name: str) -> str | None:
    """A line to warn with when the mask's size is not the image's: it is stretched onto the image."""
    if mask.size == image.size:
        return None
    (mw, mh), (iw, ih) = mask.size, image.size
    return f"mask {name} is {mw}x{mh} but the init image is {iw}x{ih}: the mask is resized to fit"


def prepare(
    image: Image.Image, mask_path: Path | None, pad: Pad | None, blur: int, width: int, height: int
) -> tuple[Image.Image, torch.Tensor, list[str]]:
    """What inpainting starts from: the image to encode (the init image, grown by `pad` when outpainting), its
    (1, 1, height, width) mask and notes to warn with. The image is still to be resized to width x height, as
    every init image is."""
    mask = read_image(mask_path, "mask") if mask_path is not None else None
    name = clip(Path(mask_path).name, 60) if mask_path is not None else "(the outpainting border)"
    notes = [note] if mask is not None and (note := size_note(mask, image, name)) else []
    if pad is not None and any(pad):
        image, mask = outpaint(image, mask, pad)
    if mask is None:
        raise RequestError("inpainting needs a mask or an outpainting pad")
    return image, mask_tensor(blurred(mask, blur), width, height, name), notes
