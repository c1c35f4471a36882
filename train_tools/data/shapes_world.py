"""The shapes world: a small, generated world the demo model learns and the project measures learning on.

Each picture shows one shape (circle, square, triangle, star or ring) in one colour on a flat background of
another colour, at a size and a position drawn from a seeded RNG, and its caption says what it shows:
"a red circle on a blue background". Seven colours, far apart in RGB, so that a blurry picture still tells
them apart. Everything is deterministic from the seed (Python's ``random.Random``, PIL drawing at 4x and a
box filter down), so the same seed gives the same pictures, pixel for pixel, on every machine.

``shapes_checker`` judges pictures of this world (which shape, which colours) by the renderer's own measures.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# Seven colours at least ~130 apart in RGB from one another.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "yellow": (240, 210, 40),
    "green": (40, 160, 60),
    "blue": (40, 70, 210),
    "purple": (170, 50, 190),
    "white": (240, 240, 240),
    "black": (20, 20, 25),
}
SHAPES = ("circle", "square", "triangle", "star", "ring")
#: Shapes the renderer draws and the checker knows but the pretrained demo model never saw: the demo dataset's
#: new concept (a LoRA teaches one of them; the base model cannot draw it).
NEW_SHAPES = ("cross",)
SIZE = 64  # the demo's picture side: 8x8 latents in the tiny SD1 model
SUPERSAMPLE = 4
# The shape's radius (of the circle it is drawn in) as a fraction of the side, and the background margin kept
# free around it, so that the border of every picture is background (the checker measures it there).
MIN_RADIUS, MAX_RADIUS = 0.20, 0.34
MARGIN = 0.06
STAR_INNER = 0.5  # the star's inner radius over its outer one: arms thick enough to survive 8x downsampling
RING_WIDTH = 0.36  # the ring's width over its radius: the hole stays visible
CROSS_ARM = 0.3  # half arm width over the radius: arms 8-13 px wide at 64 px, inside the checker's middle cells


@dataclass(frozen=True)
class Scene:
    """What one picture shows; ``cx``, ``cy`` and ``radius`` are fractions of the side."""

    shape: str
    colour: str
    background: str
    cx: float
    cy: float
    radius: float

    @property
    def caption(self) -> str:
        return caption_for(self.shape, self.colour, self.background)


def caption_for(shape: str, colour: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def sample_scene(rng: random.Random, shapes: tuple[str, ...] = SHAPES) -> Scene:
    """One scene: every shape of ``shapes``, colour and background equally likely (colour != background)."""
    shape = rng.choice(shapes)
    colour, background = rng.sample(list(PALETTE), 2)
    radius = rng.uniform(MIN_RADIUS, MAX_RADIUS)
    low, high = radius + MARGIN, 1.0 - radius - MARGIN
    return Scene(shape, colour, background, rng.uniform(low, high), rng.uniform(low, high), radius)


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    points = []
    for i in range(10):
        radius = r if i % 2 == 0 else r * STAR_INNER
        angle = math.pi * i / 5 - math.pi / 2
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def render(scene: Scene, size: int = SIZE) -> Image.Image:
    """The scene as an RGB picture of ``size`` x ``size`` (drawn at 4x, then box-filtered: smooth edges)."""
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), PALETTE[scene.background])
    draw = ImageDraw.Draw(image)
    cx, cy, r = scene.cx * big, scene.cy * big, scene.radius * big
    fill = PALETTE[scene.colour]
    if scene.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif scene.shape == "square":
        half = r * 0.85  # about the circle's area, a little more
        draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif scene.shape == "triangle":
        # Pointing up, inscribed in the circle of radius r (centred a little low so it sits in the box).
        cy += r * 0.2
        draw.polygon([(cx, cy - r), (cx + r * 0.866, cy + r * 0.5), (cx - r * 0.866, cy + r * 0.5)], fill=fill)
    elif scene.shape == "star":
        draw.polygon(_star(cx, cy, r), fill=fill)
    elif scene.shape == "cross":
        arm = r * CROSS_ARM
        draw.rectangle((cx - r, cy - arm, cx + r, cy + arm), fill=fill)
        draw.rectangle((cx - arm, cy - r, cx + arm, cy + r), fill=fill)
    elif scene.shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        inner = r * (1.0 - RING_WIDTH)
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=PALETTE[scene.background])
    else:
        raise ValueError(f"Unknown shape {scene.shape!r}; expected one of {', '.join(SHAPES + NEW_SHAPES)}.")
    return image.resize((size, size), Image.Resampling.BOX)


@dataclass(frozen=True)
class WorldPicture:
    scene: Scene
    image: Image.Image

    @property
    def caption(self) -> str:
        return self.scene.caption


def world(seed: int, size: int = SIZE, shapes: tuple[str, ...] = SHAPES) -> Iterator[WorldPicture]:
    """An endless, deterministic stream of pictures of the world (of ``shapes``) from ``seed``."""
    rng = random.Random(seed)
    while True:
        scene = sample_scene(rng, shapes)
        yield WorldPicture(scene, render(scene, size))


def world_pictures(seed: int, n: int, size: int = SIZE, shapes: tuple[str, ...] = SHAPES) -> list[WorldPicture]:
    """The first ``n`` pictures of ``world(seed, size, shapes)``."""
    stream = world(seed, size, shapes)
    return [next(stream) for _ in range(n)]


def to_array(images: list[Image.Image]) -> np.ndarray:
    """(N, 3, H, W) float32 in [-1, 1], the VAE's input range."""
    stacked = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return (stacked.transpose(0, 3, 1, 2) / 127.5 - 1.0).astype(np.float32)


def all_prompts() -> list[tuple[str, str, str]]:
    """Every (shape, colour, background) of the world, in a fixed order: 5 x 7 x 6 = 210."""
    return [(s, c, b) for s in SHAPES for c in PALETTE for b in PALETTE if c != b]
