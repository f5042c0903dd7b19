"""Score the demo model: render the held-out prompts through the sdcli pipeline and read each picture back.

A picture is read procedurally: the background is the border's median colour, the shape is the largest
blob of pixels far from it; its colour is the nearest palette entry to their median, its class the
outline (circle, square, triangle, diamond) of the same area and centre of mass that overlaps it best,
its position the box's centre on a 3x3 grid, its size the box's extent.

    python -m sdcli.demo.evaluate         # writes docs/demo-contact-sheet.png and docs/demo-scores.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from sdcli.config import load_config
from sdcli.demo.data import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, Scene, held_out_scenes, signed_distance
from sdcli.pipeline import Pipeline
from sdcli.request import Request

REPO = Path(__file__).resolve().parents[2]
ATTRIBUTES = ("colour", "shape", "position", "size", "background")
CHANCE = {"colour": 1 / len(COLOURS), "shape": 1 / len(SHAPES), "position": 1 / len(POSITIONS),
          "size": 1 / len(SIZES), "background": 1 / len(BACKGROUNDS)}
FOREGROUND_DISTANCE = 60.0  # RGB distance from the background that makes a pixel part of the shape
MIN_AREA = 0.005  # shapes covering less of the picture are read as nothing


@dataclass(frozen=True)
class Reading:
    """What a picture shows, as read back; None where nothing could be read."""

    colour: str | None
    shape: str | None
    position: str | None
    size: str | None
    background: str


def _nearest(value: torch.Tensor, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    distances = (torch.tensor([palette[n] for n in names], dtype=torch.float32) - value).norm(dim=1)
    return names[int(distances.argmin())]


def _third(centre: float) -> int:
    """0, 1 or 2: which third of the side a coordinate in [0, 1] falls in, with the middle third wider."""
    return 0 if centre < 0.375 else 2 if centre > 0.625 else 1


# area of each outline with half extent 1 (see data.signed_distance), and how far its centre of mass
# sits below the centre of its box (the triangle's apex is up)
UNIT_AREA = {"circle": math.pi, "square": 4.0, "triangle": 2.0, "diamond": 2.0}
MASS_DROP = {"circle": 0.0, "square": 0.0, "triangle": 1 / 3, "diamond": 0.0}


def _best_template(mask: torch.Tensor) -> str:
    """The outline that overlaps the mask best (IoU) when given the mask's area and centre of mass."""
    ys, xs = mask.nonzero(as_tuple=True)
    my, mx = ys.float().mean() + 0.5, xs.float().mean() + 0.5
    rows = torch.arange(mask.shape[0], dtype=torch.float32).view(-1, 1) + 0.5  # (H, 1)
    cols = torch.arange(mask.shape[1], dtype=torch.float32).view(1, -1) + 0.5  # (1, W)

    def iou(shape: str) -> float:
        r = (mask.sum() / UNIT_AREA[shape]).sqrt()
        dx, dy = (cols - mx).expand(mask.shape), (rows - (my - MASS_DROP[shape] * r)).expand(mask.shape)
        template = signed_distance(shape, dx, dy, r) < 0
        return float((template & mask).sum() / (template | mask).sum())

    return max(SHAPES, key=iou)


def _largest_component(mask: torch.Tensor) -> torch.Tensor:
    """The biggest 8-connected blob of a (H, W) mask, so that stray specks do not stretch the box."""
    labels = torch.where(mask, torch.arange(1, mask.numel() + 1, dtype=torch.float32).view(mask.shape), 0.0)
    while True:  # every pixel takes its neighbourhood's largest label until the blobs agree
        grown = torch.nn.functional.max_pool2d(labels[None, None], 3, stride=1, padding=1)[0, 0] * mask
        if torch.equal(grown, labels):
            break
        labels = grown
    values, counts = labels[mask].unique(return_counts=True)
    return labels == values[counts.argmax()]


def classify(image: Image.Image) -> Reading:
    """Read colour, shape, position, size and background back from a rendered picture."""
    pixels = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
    x = pixels.view(image.height, image.width, 3).float()
    border = torch.cat([x[0], x[-1], x[:, 0], x[:, -1]])  # (2H+2W, 3)
    bg = border.median(dim=0).values
    mask = (x - bg).norm(dim=-1) > FOREGROUND_DISTANCE  # (H, W)
    background = _nearest(bg, BACKGROUNDS)
    if mask.float().mean() < MIN_AREA:
        return Reading(None, None, None, None, background)
    mask = _largest_component(mask)
    colour = _nearest(x[mask].median(dim=0).values, COLOURS)
    ys, xs = mask.nonzero(as_tuple=True)
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    height, width = y1 - y0 + 1, x1 - x0 + 1
    shape = _best_template(mask)
    cx, cy = float((x0 + x1 + 1) / 2 / image.width), float((y0 + y1 + 1) / 2 / image.height)
    grid = {(_third(px), _third(py)): name for name, ((px, py), _) in POSITIONS.items()}
    position = grid[(_third(cx), _third(cy))]
    half = float(max(height, width)) / 2 / image.width
    size = min(SIZES, key=lambda s: abs(SIZES[s] - half))
    return Reading(colour, shape, position, size, background)


def agreement(scenes: list[Scene], readings: list[Reading]) -> dict[str, float]:
    """Share of pictures whose reading matches the scene, per attribute."""
    pairs = list(zip(scenes, readings, strict=True))
    return {a: sum(getattr(s, a) == getattr(r, a) for s, r in pairs) / len(pairs) for a in ATTRIBUTES}


def render(pipe: Pipeline, prompts: list[str], guidance: float, args: argparse.Namespace) -> list[Image.Image]:
    requests = [
        Request(prompt=p, negative="", seed=args.seed + i, steps=args.steps, guidance=guidance,
                sampler=args.sampler, width=args.size, height=args.size)
        for i, p in enumerate(prompts)
    ]
    return pipe.generate(requests)


def contact_sheet(
    scenes: list[Scene], renders: dict[str, list[Image.Image]], marks: list[bool], columns: int = 6
) -> Image.Image:
    """One cell per prompt: its renders side by side (one per guidance), framed green when read right."""
    keys = list(renders)
    side = renders[keys[0]][0].width
    pad, text_h = 4, 26
    cell_w, cell_h = len(keys) * side + 2 * pad, side + text_h + 2 * pad
    rows = -(-len(scenes) // columns)
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h + 20), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    legend = "each cell: " + ", ".join(keys) + "; green frame: colour and shape read right"
    draw.text((pad, rows * cell_h + 4), legend, fill=(0, 0, 0))
    for i, scene in enumerate(scenes):
        left, top = (i % columns) * cell_w, (i // columns) * cell_h
        draw.rectangle([left + 1, top + 1, left + cell_w - 2, top + side + 2 * pad - 2],
                       outline=(40, 170, 70) if marks[i] else (220, 40, 40), width=2)
        for j, key in enumerate(keys):
            sheet.paste(renders[key][i], (left + pad + j * side, top + pad))
        words = scene.caption().removeprefix("a ").split(" on a ")
        draw.text((left + pad, top + side + 2 * pad), words[0], fill=(0, 0, 0))
        draw.text((left + pad, top + side + 2 * pad + 12), f"on a {words[1]}", fill=(90, 90, 90))
    return sheet


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sdcli.demo.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="demo", help="bundled config name or path")
    p.add_argument("--weights", default=None, help="weights file (default: the config's)")
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0, 7.5])
    p.add_argument("--sampler", default=None, help="default: the config's")
    p.add_argument("--steps", type=int, default=None, help="default: the config's")
    p.add_argument("--seed", type=int, default=0, help="prompt i renders with seed + i")
    p.add_argument("--sheet", default=str(REPO / "docs" / "demo-contact-sheet.png"))
    p.add_argument("--scores", default=str(REPO / "docs" / "demo-scores.json"))
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    args.sampler = args.sampler or cfg.defaults.sampler
    args.steps = args.steps or cfg.defaults.steps
    args.size = cfg.defaults.width
    pipe = Pipeline.load(cfg, Path(args.weights) if args.weights else None, device="cpu", dtype="fp32")
    scenes = held_out_scenes()
    prompts = [s.caption() for s in scenes]
    start = time.monotonic()
    guidances = sorted({*args.guidance, cfg.defaults.guidance})  # the default always shows
    renders = {f"guidance {g:g}": render(pipe, prompts, g, args) for g in guidances}
    renders["empty prompt"] = render(pipe, [""] * len(prompts), cfg.defaults.guidance, args)
    seconds = time.monotonic() - start
    readings = {key: [classify(im) for im in images] for key, images in renders.items()}
    scores = {key: agreement(scenes, r) for key, r in readings.items()}
    default = f"guidance {cfg.defaults.guidance:g}"
    marks = [r.colour == s.colour and r.shape == s.shape for s, r in zip(scenes, readings[default], strict=True)]
    Path(args.sheet).parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(scenes, renders, marks).save(args.sheet)
    report = {
        "config": cfg.name,
        "weights": str(pipe.weights.name),
        "sampler": args.sampler,
        "steps": args.steps,
        "size": args.size,
        "prompts": len(prompts),
        "default_guidance": cfg.defaults.guidance,
        "render_seconds": round(seconds, 1),
        "chance": CHANCE,
        "scores": scores,
        "readings": {key: [asdict(r) for r in rs] for key, rs in readings.items()},
        "scenes": [asdict(s) for s in scenes],
    }
    Path(args.scores).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    header = f"{'':16}" + "".join(f"{a:>12}" for a in ATTRIBUTES)
    print(header)
    for key, row in [*scores.items(), ("chance", CHANCE)]:
        print(f"{key:16}" + "".join(f"{row[a]:>12.1%}" for a in ATTRIBUTES))
    print(f"{len(prompts)} held-out prompts, {args.sampler} {args.steps} steps, {seconds:.0f} s; "
          f"wrote {args.sheet} and {args.scores}", file=sys.stderr)


if __name__ == "__main__":
    main()
