"""Judge a picture of the shapes world: which shape, which colour, which background.

The renderer's own measures, no learned weights, so the verdict is deterministic and explainable:

* background: the median colour of the picture's border (the world keeps a margin of background round the
  shape), named by the nearest palette colour;
* foreground: the pixels far from that colour; its colour is the median of the farthest half of them, named
  by the nearest palette colour (other than the background's); the shape's mask is then every pixel nearer to
  the foreground colour than to the background one (projected on the line between them, so blur cuts edges
  in the middle), its largest 4-connected piece;
* shape, from the mask: a hole (pixels of background enclosed by it) makes a ring; empty corners and full
  middles of its bounding box's 3x3 grid a cross (the demo dataset's new shape); low solidity (area over
  convex hull area: a star's is about 0.6) a star; else the extent (area over the bounding box: square about
  1, circle about 0.79, triangle about 0.5) tells square, circle and triangle apart.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from .shapes_world import PALETTE, Scene

_NAMES = list(PALETTE)
_COLOURS = np.array([PALETTE[n] for n in _NAMES], dtype=np.float32)
BORDER = 2  # pixels of the frame measured as background
FAR = 48.0  # RGB distance from the background that counts as "something there"
MIN_AREA = 0.01  # the smallest shape worth judging, as a fraction of the picture
HOLE_RING = 0.06  # enclosed holes over the filled area above which the shape is a ring
TOP_HEAVY_TRIANGLE = 0.58  # upper half's area over the lower half's: a triangle pointing up has about 1/3
SOLIDITY_STAR = 0.9
EXTENT_SQUARE = 0.88
EXTENT_CIRCLE = 0.64
# A cross: every corner cell of the bounding box's 3x3 grid at most this full (a circle's are about 0.45, a
# triangle's or a star's lower ones more), and the middle row and column at least CROSS_ARMS full.
CROSS_CORNERS = 0.25
CROSS_ARMS = 0.6


@dataclass(frozen=True)
class Verdict:
    """What the checker saw; ``shape``/``colour`` are None when no shape stands out from the background."""

    shape: str | None
    colour: str | None
    background: str
    area: float = 0.0  # mask pixels over picture pixels
    extent: float = 0.0
    solidity: float = 0.0
    holes: float = 0.0
    top_heavy: float = 0.0
    corners: float = 0.0  # the fullest corner cell of the bounding box's 3x3 grid
    arms: float = 0.0  # the emptiest of the other five cells

    def matches(self, scene: Scene) -> dict[str, bool]:
        """Per attribute, and ``all``: does the picture show ``scene``'s shape, colour and background?"""
        out = {
            "shape": self.shape == scene.shape,
            "colour": self.colour == scene.colour,
            "background": self.background == scene.background,
        }
        out["all"] = all(out.values())
        return out


def nearest_colour(rgb: np.ndarray, exclude: str | None = None) -> str:
    dist = np.linalg.norm(_COLOURS - rgb[None, :], axis=1)
    if exclude is not None:
        dist[_NAMES.index(exclude)] = np.inf
    return _NAMES[int(np.argmin(dist))]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected piece of ``mask`` (a breadth-first fill from each unvisited pixel)."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    best, best_size, current = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if labels[y0, x0]:
            continue
        current += 1
        labels[y0, x0] = current
        queue, size = deque([(int(y0), int(x0))]), 0
        while queue:
            y, x = queue.popleft()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    queue.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return labels == best if best else np.zeros_like(mask)


def _outside(mask: np.ndarray) -> np.ndarray:
    """The pixels not in ``mask`` that connect to the picture's edge (the rest of ~mask is holes)."""
    padded = np.pad(~mask, 1, constant_values=True)
    reach = np.zeros_like(padded)
    reach[0, 0] = True
    queue = deque([(0, 0)])
    h, w = padded.shape
    while queue:
        y, x = queue.popleft()
        for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
            if 0 <= ny < h and 0 <= nx < w and padded[ny, nx] and not reach[ny, nx]:
                reach[ny, nx] = True
                queue.append((ny, nx))
    return reach[1:-1, 1:-1]


def _hull_area(mask: np.ndarray) -> float:
    """Area of the convex hull of the mask's pixel squares (their corners; Andrew's monotone chain)."""
    ys, xs = np.nonzero(mask)
    corners = {(int(x) + dx, int(y) + dy) for x, y in zip(xs, ys, strict=True) for dx in (0, 1) for dy in (0, 1)}
    points = sorted(corners)
    if len(points) < 3:
        return 0.0

    def cross(o: tuple[int, int], a: tuple[int, int], b: tuple[int, int]) -> int:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    def half(pts: list[tuple[int, int]]) -> list[tuple[int, int]]:
        chain: list[tuple[int, int]] = []
        for p in pts:
            while len(chain) >= 2 and cross(chain[-2], chain[-1], p) <= 0:
                chain.pop()
            chain.append(p)
        return chain

    hull = half(points)[:-1] + half(points[::-1])[:-1]
    area2 = sum(a[0] * b[1] - b[0] * a[1] for a, b in zip(hull, hull[1:] + hull[:1], strict=True))
    return abs(area2) / 2.0


def _grid_cells(filled: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> tuple[float, float]:
    """(fullest corner cell, emptiest middle-row-or-column cell) of the 3x3 grid over the mask's bounding box."""
    box = filled[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(np.float32)
    rows = np.array_split(np.arange(box.shape[0]), 3)
    cols = np.array_split(np.arange(box.shape[1]), 3)
    cells = np.array([[box[np.ix_(r, c)].mean() if r.size and c.size else 0.0 for c in cols] for r in rows])
    corners = float(max(cells[0, 0], cells[0, 2], cells[2, 0], cells[2, 2]))
    arms = float(min(cells[0, 1], cells[1, 0], cells[1, 1], cells[1, 2], cells[2, 1]))
    return corners, arms


def judge(image: Image.Image) -> Verdict:
    """The checker's verdict on one picture of the world (any size; the world's pictures are 64x64)."""
    pixels = np.asarray(image.convert("RGB").filter(ImageFilter.MedianFilter(3)), dtype=np.float32)
    h, w, _ = pixels.shape
    frame = np.concatenate(
        [
            pixels[:BORDER].reshape(-1, 3),
            pixels[-BORDER:].reshape(-1, 3),
            pixels[:, :BORDER].reshape(-1, 3),
            pixels[:, -BORDER:].reshape(-1, 3),
        ]
    )
    back_rgb = np.median(frame, axis=0)
    background = nearest_colour(back_rgb)
    dist = np.linalg.norm(pixels - back_rgb, axis=2)
    far = dist > FAR
    if far.sum() < MIN_AREA * h * w:
        return Verdict(None, None, background)
    far_dist = dist[far]
    core = pixels[far][far_dist >= np.median(far_dist)]
    fore_rgb = np.median(core, axis=0)
    colour = nearest_colour(fore_rgb, exclude=background)
    direction = fore_rgb - back_rgb
    t = ((pixels - back_rgb) @ direction) / max(float(direction @ direction), 1e-6)
    mask = _largest_component(t > 0.5)
    area = int(mask.sum())
    if area < MIN_AREA * h * w:
        return Verdict(None, colour, background)
    filled = ~_outside(mask)
    holes = float((filled & ~mask).sum()) / float(filled.sum())
    ys, xs = np.nonzero(mask)
    extent = area / float((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    solidity = float(filled.sum()) / max(_hull_area(mask), 1.0)
    top, bottom = ys.min(), ys.max() + 1
    middle = (top + bottom) / 2.0
    rows = np.arange(h, dtype=np.float32)[:, None] + 0.5
    upper = float((filled & (rows < middle)).sum())
    top_heavy = upper / max(float(filled.sum()) - upper, 1.0)
    corners, arms = _grid_cells(filled, ys, xs)
    if holes > HOLE_RING:
        shape = "ring"
    elif corners <= CROSS_CORNERS and arms >= CROSS_ARMS:
        shape = "cross"
    elif top_heavy < TOP_HEAVY_TRIANGLE:
        shape = "triangle"
    elif solidity < SOLIDITY_STAR:
        shape = "star"
    elif extent > EXTENT_SQUARE:
        shape = "square"
    elif extent > EXTENT_CIRCLE:
        shape = "circle"
    else:
        shape = "triangle"
    return Verdict(shape, colour, background, area / float(h * w), extent, solidity, holes, top_heavy, corners, arms)


def score(verdicts: list[Verdict], scenes: list[Scene]) -> dict[str, float]:
    """The fraction of pictures whose shape, colour, background, and all three, match their scenes."""
    if not scenes:
        return {"shape": 0.0, "colour": 0.0, "background": 0.0, "all": 0.0}
    totals = {"shape": 0, "colour": 0, "background": 0, "all": 0}
    for verdict, scene in zip(verdicts, scenes, strict=True):
        for key, ok in verdict.matches(scene).items():
            totals[key] += int(ok)
    return {key: value / len(scenes) for key, value in totals.items()}
