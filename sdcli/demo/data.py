"""Procedural scenes for the demo model: one coloured shape on a plain background, with captions.

A scene is five attributes (colour, shape, position, size, background). Training captions name a random
subset of them, so a prompt constrains only what it says; a fixed set of attribute combinations is never
drawn in training and serves as the held-out evaluation grid.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from torch import Tensor

# sRGB values, far apart so that the nearest palette entry is unambiguous
COLOURS = {
    "red": (220, 40, 40),
    "orange": (245, 145, 25),
    "yellow": (240, 220, 40),
    "green": (40, 170, 70),
    "blue": (40, 90, 225),
    "purple": (145, 60, 195),
}
BACKGROUNDS = {"white": (250, 250, 250), "black": (15, 15, 15), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle", "diamond")
# centre of each position on the unit canvas (x right, y down) and how a caption says it
POSITIONS = {
    "top left": ((0.25, 0.25), "in the top left"),
    "top": ((0.5, 0.25), "at the top"),
    "top right": ((0.75, 0.25), "in the top right"),
    "left": ((0.25, 0.5), "on the left"),
    "center": ((0.5, 0.5), "in the center"),
    "right": ((0.75, 0.5), "on the right"),
    "bottom left": ((0.25, 0.75), "in the bottom left"),
    "bottom": ((0.5, 0.75), "at the bottom"),
    "bottom right": ((0.75, 0.75), "in the bottom right"),
}
SIZES = {"small": 0.1, "medium": 0.15, "large": 0.21}  # half the shape's extent, as a share of the side
CENTRE_JITTER = 0.025  # uniform +- on each centre coordinate
SIZE_JITTER = 0.1  # uniform +- share of the half extent
COLOUR_JITTER = 12  # uniform +- on each channel, in 0..255 units
HELD_OUT = 48  # scenes in the evaluation grid
HELD_OUT_SEED = 4  # fixes which combinations are held out


@dataclass(frozen=True)
class Scene:
    """What one picture shows."""

    colour: str
    shape: str
    position: str
    size: str
    background: str

    def key(self) -> tuple[str, str, str, str]:
        """The combination held out of training (size is free)."""
        return (self.colour, self.shape, self.position, self.background)

    def caption(self) -> str:
        """The full caption, naming every attribute."""
        return describe(self, set(MENTIONS))


MENTIONS = ("colour", "shape", "position", "size", "background")
MENTION_P = {"colour": 0.9, "shape": 0.9, "position": 0.75, "size": 0.5, "background": 0.6}


def describe(scene: Scene, said: set[str]) -> str:
    """A caption that names the attributes in `said`, e.g. 'a small red circle in the top left'."""
    words = ["a"]
    if "size" in said and scene.size != "medium":
        words.append(scene.size)
    if "colour" in said:
        words.append(scene.colour)
    words.append(scene.shape if "shape" in said else "shape")
    if "position" in said:
        words.append(POSITIONS[scene.position][1])
    if "background" in said:
        words.append(f"on a {scene.background} background")
    return " ".join(words)


def random_caption(scene: Scene, rng: random.Random) -> str:
    """A training caption naming a random subset of the scene's attributes."""
    return describe(scene, {m for m in MENTIONS if rng.random() < MENTION_P[m]})


def all_keys() -> list[tuple[str, str, str, str]]:
    return [(c, s, p, b) for c in COLOURS for s in SHAPES for p in POSITIONS for b in BACKGROUNDS]


def held_out_scenes() -> list[Scene]:
    """The evaluation grid: HELD_OUT combinations, balanced over colours and shapes, never drawn in training."""
    rng = random.Random(HELD_OUT_SEED)
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    rng.shuffle(pairs)
    scenes = []
    for i in range(HELD_OUT):
        colour, shape = pairs[i % len(pairs)]
        position = rng.choice(list(POSITIONS))
        background = rng.choice(list(BACKGROUNDS))
        size = ("small", "medium", "large")[i % 3]
        scenes.append(Scene(colour, shape, position, size, background))
    assert len({s.key() for s in scenes}) == HELD_OUT, "held-out combinations must be distinct"
    return scenes


def sample_scenes(n: int, rng: random.Random) -> list[Scene]:
    """`n` random training scenes, none of them a held-out combination."""
    held = {s.key() for s in held_out_scenes()}
    keys = [k for k in all_keys() if k not in held]
    scenes = []
    for _ in range(n):
        colour, shape, position, background = rng.choice(keys)
        scenes.append(Scene(colour, shape, position, rng.choice(list(SIZES)), background))
    return scenes


def signed_distance(shape: str, dx: Tensor, dy: Tensor, r: Tensor) -> Tensor:
    """Approximate distance to the shape's edge (negative inside), in canvas units."""
    if shape == "circle":
        return torch.sqrt(dx**2 + dy**2) - r
    if shape == "square":
        return torch.maximum(dx.abs(), dy.abs()) - r
    if shape == "diamond":
        return (dx.abs() + dy.abs() - r) / math.sqrt(2)
    # an upward triangle with apex (0, -r) and base from (-r, r) to (r, r)
    slanted = (2 * dx.abs() - dy - r) / math.sqrt(5)
    return torch.maximum(dy - r, slanted)


def render(scenes: list[Scene], resolution: int, generator: torch.Generator | None = None) -> Tensor:
    """Anti-aliased pictures of `scenes`, (B, 3, res, res) in [-1, 1]; jittered when a generator is given."""
    n = len(scenes)
    jitter = generator is not None

    def noise(*shape: int) -> Tensor:
        if not jitter:
            return torch.zeros(shape)
        return torch.rand(shape, generator=generator) * 2 - 1

    centres = torch.tensor([POSITIONS[s.position][0] for s in scenes]) + CENTRE_JITTER * noise(n, 2)  # (B, 2)
    radii = torch.tensor([SIZES[s.size] for s in scenes]) * (1 + SIZE_JITTER * noise(n))  # (B,)
    fg = torch.tensor([COLOURS[s.colour] for s in scenes], dtype=torch.float32) + COLOUR_JITTER * noise(n, 3)
    bg = torch.tensor([BACKGROUNDS[s.background] for s in scenes], dtype=torch.float32)
    grid = (torch.arange(resolution, dtype=torch.float32) + 0.5) / resolution
    dx = grid.view(1, 1, -1) - centres[:, 0].view(-1, 1, 1)  # (B, 1, W)
    dy = grid.view(1, -1, 1) - centres[:, 1].view(-1, 1, 1)  # (B, H, 1)
    dx, dy = dx.expand(n, resolution, resolution), dy.expand(n, resolution, resolution)
    coverage = torch.empty(n, resolution, resolution)
    for shape in SHAPES:
        rows = [i for i, s in enumerate(scenes) if s.shape == shape]
        if rows:
            d = signed_distance(shape, dx[rows], dy[rows], radii[rows].view(-1, 1, 1))
            coverage[rows] = (0.5 - d * resolution).clamp(0, 1)  # one-pixel linear edge ramp
    alpha = coverage.unsqueeze(1)  # (B, 1, H, W)
    image = alpha * fg.view(n, 3, 1, 1) + (1 - alpha) * bg.view(n, 3, 1, 1)
    return (image.clamp(0, 255) / 127.5 - 1).contiguous()
