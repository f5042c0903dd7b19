"""Render docs/images-contact-sheet.png: what txt2img, img2img, inpainting, outpainting and the hires fix give
with the bundled demo model. Every tile is rendered through the CLI; run with the project's Python:

    .venv/bin/python docs/make_image_sheet.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

SDCLI = Path(sys.executable).with_name("sdcli")
RED = "a red circle on a white background"
TILE, LABEL = 128, 16  # tile height in pixels, label strip under it


def generate(out: Path, name: str, prompt: str, *options: str) -> Image.Image:
    """One render of the demo model (default config), seed 1234, as a PIL image."""
    args = [str(SDCLI), "generate", prompt, "--seed", "1234", "-o", str(out), "--name", name, "-q", *options]
    print(" ".join(args[1:]))
    subprocess.run(args, check=True)
    return Image.open(out / f"{name}.png").convert("RGB")


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        base = generate(out, "txt2img", RED)
        init = str(out / "txt2img.png")
        mask = Image.new("RGB", base.size, "black")
        ImageDraw.Draw(mask).rectangle((16, 16, 47, 47), fill="white")  # a white square in the middle
        mask.save(out / "mask.png")
        tiles = [
            ("txt2img", base),
            ("img2img blue 0.6", generate(out, "i2i-06", "a blue circle on a white background",
                                          "--init-image", init, "--strength", "0.6")),
            ("img2img blue 0.9", generate(out, "i2i-09", "a blue circle on a white background",
                                          "--init-image", init, "--strength", "0.9")),
            ("mask", mask),
            ("inpaint green sq.", generate(out, "inpaint", "a green square", "--init-image", init,
                                           "--mask", str(out / "mask.png"))),
            ("outpaint 16,0,16,0", generate(out, "outpaint", RED, "--init-image", init, "--pad", "16,0,16,0")),
            ("hires x2, 10 steps", generate(out, "hires", RED, "--hires-scale", "2", "--hires-steps", "10")),
        ]  # fmt: skip
        # Nearest-neighbour up to TILE pixels high (64 -> 128; the hires render is 128 already).
        scaled = [(label, im.resize((im.width * TILE // im.height, TILE), Image.NEAREST)) for label, im in tiles]
        gap = 8
        sheet = Image.new("RGB", (sum(im.width + gap for _, im in scaled) + gap, TILE + LABEL + 2 * gap), "white")
        draw, x = ImageDraw.Draw(sheet), gap
        for label, im in scaled:
            sheet.paste(im, (x, gap))
            draw.text((x, gap + TILE + 3), label, fill="black")  # PIL's default font
            x += im.width + gap
        target = Path(__file__).with_name("images-contact-sheet.png")
        sheet.save(target)
        print(f"wrote {target} ({sheet.width}x{sheet.height})")


if __name__ == "__main__":
    main()
