"""How well a demo model draws the shapes world: ``python -m train_tools.bench.shapes_score CHECKPOINT [--lora F]``.

It asks the model for N prompts of the world ("a red circle on a blue background", ...: a fixed, seeded draw
of the 210 combinations), through the standalone previewer with fixed settings, and the shapes checker judges
each picture: the fraction whose shape, colour and background match, each and all three. With a LoRA of the
demo's concept (``--lora``, ``--trigger``), also the concept's share: prompts of the concept shape with the
trigger word first ("demo, a red cross on a blue background"), judged at each LoRA weight, and the world's
score without the trigger word at those weights (what the LoRA keeps of the base model).
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
from typing import Any

from ..data.demo_dataset import DEMO_CONCEPT
from ..data.shapes_checker import Verdict, judge, score
from ..data.shapes_world import PALETTE, Scene, all_prompts, caption_for
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


#: How the score's pictures are made. cfg 3, no negative prompt: the tiny model is trained with empty captions
#: for the unconditional, and its colours and shapes are right most often at a low guidance (BENCHMARKS.md).
SCORE_STEPS, SCORE_CFG, SCORE_SAMPLER = 20, 3.0, "Euler a"


def prompts(n: int, seed: int = 1234) -> list[Scene]:
    """``n`` scenes of the world, a seeded draw of every combination (repeated past 210)."""
    combos = all_prompts()
    random.Random(seed).shuffle(combos)
    return [Scene(*combos[i % len(combos)], 0.5, 0.5, 0.3) for i in range(n)]


def concept_prompts(n: int, shape: str = DEMO_CONCEPT, seed: int = 4321) -> list[Scene]:
    """``n`` scenes of ``shape`` in the world's colour pairs (a seeded draw of the 42, repeated past them)."""
    pairs = [(c, b) for c in PALETTE for b in PALETTE if c != b]
    random.Random(seed).shuffle(pairs)
    return [Scene(shape, *pairs[i % len(pairs)], 0.5, 0.5, 0.3) for i in range(n)]


def prompt_for(scene: Scene, trigger: str = "") -> str:
    """The scene's caption, after the trigger word as the prepared captions have it."""
    caption = caption_for(scene.shape, scene.colour, scene.background)
    return f"{trigger}, {caption}" if trigger else caption


def score_scenes(
    previewer: DiffusersPreviewer,
    scenes: list[Scene],
    *,
    trigger: str = "",
    lora: Path | None = None,
    weight: float = 1.0,
    steps: int = SCORE_STEPS,
    cfg: float = SCORE_CFG,
    sampler: str = SCORE_SAMPLER,
    seed: int = 0,
) -> ShapesScore:
    """The checker's score of one picture per scene (picture i with seed ``seed + i``), ``lora`` at ``weight``."""
    start = time.perf_counter()
    verdicts = []
    for i, scene in enumerate(scenes):
        settings = PreviewSettings(
            prompt=prompt_for(scene, trigger),
            negative_prompt="",
            seed=seed + i,
            steps=steps,
            cfg_scale=cfg,
            sampler=sampler,
            width=64,
            height=64,
        )
        verdicts.append(judge(previewer.generate(settings, lora, weight)))
    elapsed = (time.perf_counter() - start) / max(1, len(scenes))
    return ShapesScore(score(verdicts, scenes), verdicts, scenes, elapsed)


def score_model(
    checkpoint: Path,
    n: int = 60,
    *,
    clip_skip: int = 1,
    previewer: DiffusersPreviewer | None = None,
    **options: Any,
) -> ShapesScore:
    """The checker's score of ``n`` world prompts drawn by ``checkpoint`` (``options``: see ``score_scenes``)."""
    pv = previewer or DiffusersPreviewer.from_checkpoint(checkpoint, clip_skip=clip_skip, device="cpu")
    try:
        return score_scenes(pv, prompts(n), **options)
    finally:
        if previewer is None:
            pv.close()


@dataclass
class ConceptScore:
    """At one LoRA weight: the concept's share with the trigger word, the world's score without it."""

    weight: float
    concept: float
    world: float
    concept_verdicts: list[Verdict]


def score_concept(
    previewer: DiffusersPreviewer,
    lora: Path | None,
    trigger: str,
    weights: Sequence[float] = (0.0, 1.0),
    *,
    n: int = 30,
    concept: str = DEMO_CONCEPT,
    **options: Any,
) -> list[ConceptScore]:
    """Per weight: the fraction of ``n`` concept prompts (trigger first) that show ``concept``, and the world
    score ("all three") of ``n`` world prompts without the trigger word."""
    out = []
    for weight in weights:
        taught = score_scenes(
            previewer, concept_prompts(n, concept), trigger=trigger, lora=lora, weight=weight, **options
        )
        kept = score_scenes(previewer, prompts(n), lora=lora, weight=weight, **options)
        out.append(ConceptScore(weight, taught.scores["shape"], kept.scores["all"], taught.verdicts))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train_tools.bench.shapes_score", description=__doc__)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("-n", type=int, default=60, help="pictures (default 60)")
    parser.add_argument("--steps", type=int, default=SCORE_STEPS)
    parser.add_argument("--cfg", type=float, default=SCORE_CFG)
    parser.add_argument("--sampler", default=SCORE_SAMPLER)
    parser.add_argument("--clip-skip", type=int, default=1)
    parser.add_argument("--lora", type=Path, help="a LoRA of the demo's concept: also score the concept")
    parser.add_argument("--trigger", default="demo", help="the LoRA's trigger word (default: demo)")
    parser.add_argument("--weights", default="0,0.5,1", help="LoRA weights for --lora (default: 0,0.5,1)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    options = {"steps": args.steps, "cfg": args.cfg, "sampler": args.sampler}
    with DiffusersPreviewer.from_checkpoint(args.checkpoint, clip_skip=args.clip_skip, device="cpu") as pv:
        result = score_model(args.checkpoint, args.n, previewer=pv, **options)
        figures = ", ".join(f"{key} {value:.0%}" for key, value in result.scores.items())
        sys.stdout.write(
            f"{args.checkpoint.name}: {args.n} prompts, {args.sampler}, {args.steps} steps, cfg {args.cfg:g}, "
            f"clip skip {args.clip_skip}: {figures} ({result.seconds_per_picture:.2f} s a picture)\n"
        )
        for attribute in ("shape", "colour", "background"):
            sys.stdout.write(f"  {attribute} confusions (asked, seen): {result.confusions(attribute)}\n")
        if args.lora is not None:
            weights = [float(w) for w in args.weights.split(",")]
            for row in score_concept(pv, args.lora, args.trigger, weights, n=args.n, **options):
                sys.stdout.write(
                    f"  {args.lora.name} at weight {row.weight:g}: {DEMO_CONCEPT} {row.concept:.0%} with "
                    f"'{args.trigger}', world {row.world:.0%} without\n"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
