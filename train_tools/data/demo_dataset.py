"""Demo pictures: a small generated dataset so a newcomer can run the whole flow without pictures of their own.

They teach the demo model something it cannot draw: a cross (a plus sign), a shape of the shapes world
(``shapes_world``) that the pretrained demo model never saw, in the world's colours on its flat backgrounds,
captioned as the world is ("a red cross on a blue background"; the trigger word goes first when the pictures
are prepared). Varied sizes and aspect ratios (some landscape, some portrait, the rest square), so the demo
also uses aspect buckets. They go in through ``add_originals`` like any upload, so existing files are never
overwritten and adding the demo twice adds nothing the second time.

Beside them go class pictures (``make_demo_class_pictures``: regularisation, "prior preservation"): pictures of
the world the model already draws, with their captions, so that the LoRA learns the cross without forgetting
the rest of its world (measured in BENCHMARKS.md: without them, the world's pictures at weight 1 went from 100%
right to 45%; with 12 of them to 63%, with 36 it stayed at 93%).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import tempfile
from pathlib import Path

from PIL import Image

from .shapes_world import NEW_SHAPES, PALETTE, Scene, render, sample_scene, world_pictures
from .uploads import add_originals

log = logging.getLogger(__name__)

#: The shape the demo pictures show, which the demo model learns from them.
DEMO_CONCEPT = NEW_SHAPES[0]
CLASS_SIDE = 256  # the class pictures' size: the world's 64 px drawn at 4x, like a user's larger pictures
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


def _picture(index: int, size: tuple[int, int], rng: random.Random) -> tuple[Image.Image, Scene]:
    """Picture ``index``: a world scene of the demo's shape drawn on a square the picture's short side, placed
    at random on a picture of ``size`` filled with the scene's background (flat, so no seam shows). The
    colours go round the palette (background ``index``, shape colour 3 further on), so even 7 pictures show
    every colour as a background and as a shape: a LoRA learns the shape, not a few colour pairs."""
    names = list(PALETTE)
    background = names[index % len(names)]
    colour = names[(index + 3 + index // len(names)) % len(names)]
    if colour == background:
        colour = names[(index + 4) % len(names)]
    scene = dataclasses.replace(sample_scene(rng, (DEMO_CONCEPT,)), colour=colour, background=background)
    w, h = size
    side = min(w, h)
    image = Image.new("RGB", size, PALETTE[scene.background])
    image.paste(render(scene, side), (rng.randrange(w - side + 1), rng.randrange(h - side + 1)))
    return image, scene


def make_demo_dataset(folder: Path, n: int = 12, seed: int = 0) -> list[Path]:
    """Add ``n`` generated pictures with captions to ``folder``; returns the pictures added.

    The same ``seed`` gives the same pictures, so calling it twice adds nothing new.
    """
    rng = random.Random(seed)
    pictures = [_picture(i, size, rng) for i, size in enumerate(_sizes(max(0, n), rng))]
    return _add(folder, "demo", [(image, scene.caption) for image, scene in pictures])


def _add(folder: Path, stem: str, pictures: list[tuple[Image.Image, str]]) -> list[Path]:
    """Add ``pictures`` (with their captions) to ``folder`` as ``<stem>_NN.png`` + ``.txt`` through
    ``add_originals``; the pictures added."""
    with tempfile.TemporaryDirectory(prefix=f"train_tools_{stem}_") as tmp:
        staged: list[Path] = []
        for i, (image, caption) in enumerate(pictures, start=1):
            path = Path(tmp) / f"{stem}_{i:02d}.png"
            image.save(path, format="PNG")
            path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
            staged += [path, path.with_suffix(".txt")]
        report = add_originals(staged, Path(folder))
    added = [p for p in report.added if p.suffix.lower() == ".png"]
    log.info("Added %d %s pictures to %s", len(added), stem.replace("_", " "), folder)
    return added


def make_demo_class_pictures(folder: Path, n: int = 12, seed: int = 0) -> list[Path]:
    """Add ``n`` pictures of the shapes world with their captions to ``folder`` (a version's class pictures);
    returns the pictures added. The same ``seed`` gives the same pictures, so a second call adds nothing."""
    pictures = world_pictures(1000 + seed, max(0, n), CLASS_SIDE)
    return _add(folder, "demo_class", [(p.image, p.caption) for p in pictures])
