"""How well a demo model draws the shapes world: ``python -m train_tools.bench.shapes_score CHECKPOINT``.

It asks the model for N prompts of the world ("a red circle on a blue background", ...: a fixed, seeded draw
of the 210 combinations), through the standalone previewer with fixed settings, and the shapes checker judges
each picture: the fraction whose shape, colour and background match, each and all three.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..data.shapes_checker import Verdict, judge, score
from ..data.shapes_world import Scene, all_prompts, caption_for
from ..previews.diffusers_previewer import DiffusersPreviewer
from ..previews.settings import PreviewSettings

log = logging.getLogger(__name__)


@dataclass
class ShapesScore:
    scores: dict[str, float]
    verdicts: list[Verdict]
    scenes: list[Scene]
    seconds_per_picture: float

    def confusions(self, attribute: str) -> list[tuple[tuple[str, str | None], int]]:
        pairs = Counter(
            (getattr(s, attribute), getattr(v, attribute))
            for v, s in zip(self.verdicts, self.scenes, strict=True)
            if getattr(v, attribute) != getattr(s, attribute)
        )
        return pairs.most_common(5)


def prompts(n: int, seed: int = 1234) -> list[Scene]:
    """``n`` scenes of the world, a seeded draw of every combination (repeated past 210)."""
    combos = all_prompts()
    random.Random(seed).shuffle(combos)
    return [Scene(*combos[i % len(combos)], 0.5, 0.5, 0.3) for i in range(n)]


def score_model(
    checkpoint: Path,
    n: int = 60,
    *,
    steps: int = 20,
    cfg: float = 6.0,
    sampler: str = "Euler a",
    clip_skip: int = 1,
    seed: int = 0,
    previewer: DiffusersPreviewer | None = None,
) -> ShapesScore:
    """The checker's score of ``n`` pictures of ``checkpoint``; picture i uses seed ``seed + i``."""
    own = previewer is None
    pv = previewer or DiffusersPreviewer.from_checkpoint(checkpoint, clip_skip=clip_skip, device="cpu")
    scenes = prompts(n)
    start = time.perf_counter()
    verdicts = []
    try:
        for i, scene in enumerate(scenes):
            settings = PreviewSettings(
                prompt=caption_for(scene.shape, scene.colour, scene.background),
                negative_prompt="",
                seed=seed + i,
                steps=steps,
                cfg_scale=cfg,
                sampler=sampler,
                width=64,
                height=64,
            )
            verdicts.append(judge(pv.generate(settings, None, 1.0)))
    finally:
        if own:
            pv.close()
    elapsed = (time.perf_counter() - start) / max(1, n)
    return ShapesScore(score(verdicts, scenes), verdicts, scenes, elapsed)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train_tools.bench.shapes_score", description=__doc__)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("-n", type=int, default=60, help="pictures (default 60)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=6.0)
    parser.add_argument("--sampler", default="Euler a")
    parser.add_argument("--clip-skip", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    result = score_model(
        args.checkpoint, args.n, steps=args.steps, cfg=args.cfg, sampler=args.sampler, clip_skip=args.clip_skip
    )
    figures = ", ".join(f"{key} {value:.0%}" for key, value in result.scores.items())
    sys.stdout.write(
        f"{args.checkpoint.name}: {args.n} prompts, {args.sampler}, {args.steps} steps, cfg {args.cfg:g}, "
        f"clip skip {args.clip_skip}: {figures} ({result.seconds_per_picture:.2f} s a picture)\n"
    )
    for attribute in ("shape", "colour", "background"):
        sys.stdout.write(f"  {attribute} confusions (asked, seen): {result.confusions(attribute)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
