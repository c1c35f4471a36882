"""Demo pictures: a small generated dataset so a newcomer can run the whole flow without pictures of their own.

Simple shapes on colour fields, of varied sizes and aspect ratios (some landscape, some portrait, the rest
square), each with a short caption naming what it shows. They go in through ``add_originals`` like any upload,
so existing files are never overwritten and adding the demo twice adds nothing the second time.
"""

from __future__ import annotations

import logging
import random
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

from .uploads import add_originals

log = logging.getLogger(__name__)

_COLOURS = {
    "red": (210, 40, 40),
    "orange": (240, 140, 30),
    "yellow": (235, 210, 40),
    "green": (50, 160, 70),
    "teal": (30, 150, 150),
    "blue": (40, 80, 200),
    "purple": (130, 60, 170),
    "pink": (235, 120, 170),
    "white": (245, 245, 240),
    "black": (25, 25, 30),
}
_SHAPES = ("circle", "square", "triangle", "star", "ring")
_LANDSCAPE = ((640, 384), (576, 320), (512, 384))
_PORTRAIT = ((384, 640), (320, 576), (384, 512))
_SQUARE = (256, 320, 384, 448, 512, 576, 640)


def _sizes(n: int, rng: random.Random) -> list[tuple[int, int]]:
    """3 landscape and 3 portrait sizes (fewer when n is small), the rest square."""
    wide = min(3, n // 4 if n < 12 else 3)
    sizes = list(_LANDSCAPE[:wide]) + list(_PORTRAIT[:wide])
    while len(sizes) < n:
        side = rng.choice(_SQUARE)
        sizes.append((side, side))
    return sizes[:n]


def _background(
    draw: ImageDraw.ImageDraw, size: tuple[int, int], top: tuple[int, int, int], bottom: tuple[int, int, int]
) -> None:
    """A vertical gradient, so the pictures are not flat fields."""
    w, h = size
    for y in range(h):
        t = y / max(1, h - 1)
        colour = tuple(round(a + (b - a) * t) for a, b in zip(top, bottom, strict=False))
        draw.line([(0, y), (w, y)], fill=colour)


def _star(cx: float, cy: float, r: float, points: int = 5) -> list[tuple[float, float]]:
    import math

    out = []
    for i in range(points * 2):
        radius = r if i % 2 == 0 else r * 0.45
        angle = math.pi * i / points - math.pi / 2
        out.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return out


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], colour: tuple[int, int, int]
) -> None:
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=colour)
    elif shape == "star":
        draw.polygon(_star(cx, cy, r), fill=colour)
    else:
        draw.ellipse(box, outline=colour, width=max(4, int(r / 4)))


def _picture(size: tuple[int, int], rng: random.Random) -> tuple[Image.Image, str]:
    names = list(_COLOURS)
    shape = rng.choice(_SHAPES)
    colour, back = rng.sample(names, 2)
    image = Image.new("RGB", size)
    draw = ImageDraw.Draw(image)
    base = _COLOURS[back]
    r0, g0, b0 = base
    darker = (max(0, r0 - 60), max(0, g0 - 60), max(0, b0 - 60))
    _background(draw, size, base, darker)
    w, h = size
    r = rng.uniform(0.22, 0.34) * min(w, h)
    cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    _draw_shape(draw, shape, (cx - r, cy - r, cx + r, cy + r), _COLOURS[colour])
    orientation = "wide picture" if w > h else "tall picture" if h > w else "square picture"
    caption = f"a {colour} {shape} on a {back} background, simple shapes, {orientation}"
    return image, caption


def make_demo_dataset(folder: Path, n: int = 12, seed: int = 0) -> list[Path]:
    """Add ``n`` generated pictures with captions to ``folder``; returns the pictures added.

    The same ``seed`` gives the same pictures, so calling it twice adds nothing new.
    """
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="train_tools_demo_") as tmp:
        staged: list[Path] = []
        for i, size in enumerate(_sizes(max(0, n), rng), start=1):
            image, caption = _picture(size, rng)
            path = Path(tmp) / f"demo_{i:02d}.png"
            image.save(path, format="PNG")
            path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
            staged += [path, path.with_suffix(".txt")]
        report = add_originals(staged, Path(folder))
    pictures = [p for p in report.added if p.suffix.lower() == ".png"]
    log.info("Added %d demo pictures to %s", len(pictures), folder)
    return pictures
