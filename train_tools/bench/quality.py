"""How fast each recipe teaches the demo's concept, and what it breaks: ``python -m train_tools.bench_quality``.

Each recipe is the demo's settings (``demo_settings.DEMO_SETTINGS``) with a few changed: it trains a LoRA on the
demo pictures (12 crosses, a shape the shapes demo model never saw) from the shipped shapes demo model, saving a
file every few epochs; the shapes checker then judges, for every file, pictures of the concept asked with the
trigger word (its share of crosses) and pictures of the world asked without it (the share still right in shape,
colour and background, against the base model's). Printed per file: steps, training seconds, both scores.

What it measures is learning in a toy world, on this machine: which settings learn the concept in the fewest
steps and seconds, and which damage the rest of the model. It says nothing about art.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from ..data.demo_dataset import make_demo_class_pictures, make_demo_dataset
from ..demo_settings import DEMO_CLASS_PICTURES, DEMO_PICTURES, DEMO_SETTINGS, DEMO_TRIGGER
from ..models.demo_model import SHAPES_DEMO
from ..previews.diffusers_previewer import DiffusersPreviewer
from ..progress import Reporter
from ..store import Store
from ..training.trainer import Trainer
from .shapes_score import score_concept, score_model

log = logging.getLogger(__name__)

TRIGGER = DEMO_TRIGGER


@dataclass(frozen=True)
class Recipe:
    name: str
    changes: dict[str, Any] = field(default_factory=dict)


#: The recipes compared by default: the demo's own settings, then one change each.
RECIPES: tuple[Recipe, ...] = (
    Recipe("demo settings"),
    Recipe("lr / 3", {"learning_rate": DEMO_SETTINGS["learning_rate"] / 3}),
    Recipe("lr x 3", {"learning_rate": DEMO_SETTINGS["learning_rate"] * 3}),
    Recipe("dim 4", {"network_dim": 4, "network_alpha": 2.0}),
    Recipe("min-SNR off", {"min_snr_gamma": 0.0}),
    Recipe("no class pictures", {"class_pictures": False}),
    Recipe("prior loss x 2", {"prior_loss_weight": 2.0}),
    Recipe("no LoCon", {"conv_dim": 0}),
    Recipe("cosine", {"lr_scheduler": "cosine"}),
    Recipe("text encoder too", {"train_text_encoder": True}),
    Recipe("Prodigy", {"optimizer": "Prodigy", "learning_rate": 1.0}),
)


@dataclass
class QualityRow:
    recipe: str
    epoch: int
    steps: int
    seconds: float
    concept_base: float  # the concept's share at weight 0 (the base model)
    concept: float  # at weight 1
    world: float  # the world's "all three" score at weight 1, without the trigger word


class _SaveTimes(Reporter):
    """When each file was saved, in seconds from the first step."""

    def __init__(self) -> None:
        self.t0: float | None = None
        self.saved_at: dict[int, float] = {}
        self.steps_at: dict[int, int] = {}
        self.last_step = 0

    def step(self, info: Any) -> None:
        if self.t0 is None:
            self.t0 = time.perf_counter()
        self.last_step = info.step

    def saved(self, path: Path, epoch: int) -> None:
        self.saved_at[epoch] = time.perf_counter() - (self.t0 or time.perf_counter())
        self.steps_at[epoch] = self.last_step


def train_recipe(
    recipe: Recipe, work: Path, *, base: Path = SHAPES_DEMO, save_every: int = 0, device: str = "cpu"
) -> tuple[list[tuple[int, Path]], _SaveTimes]:
    """Train ``recipe`` on the demo pictures in a fresh project under ``work``: the (epoch, file) pairs saved."""
    changes = {**DEMO_SETTINGS, "preview_at_end": False, **recipe.changes}
    classes = changes.pop("class_pictures", True)  # not a setting: whether the demo's class pictures are added
    if save_every:
        changes["save_every_n_epochs"] = save_every
    config = TrainConfig().updated(changes)
    store = Store(work)
    store.create_project("demo project")
    version = store.create_version("demo project", "v1")
    make_demo_dataset(version.originals_dir, n=DEMO_PICTURES)
    if classes:
        make_demo_class_pictures(version.reg_dir, n=DEMO_CLASS_PICTURES)
    times = _SaveTimes()
    result = Trainer(version, config, base, reporter=times, device=device).run()
    epochs = sorted(times.saved_at)
    return list(zip(epochs, result.files, strict=True)), times


def measure(
    recipes: Sequence[Recipe], *, base: Path = SHAPES_DEMO, n: int = 30, save_every: int = 0, device: str = "cpu"
) -> tuple[float, list[QualityRow]]:
    """The base model's world score, and a row per saved file of every recipe."""
    rows: list[QualityRow] = []
    with DiffusersPreviewer.from_checkpoint(base, device=device) as previewer:
        world_base = score_model(base, n, previewer=previewer).scores["all"]
        for recipe in recipes:
            with tempfile.TemporaryDirectory(prefix="train_tools_quality_") as tmp:
                files, times = train_recipe(recipe, Path(tmp), base=base, save_every=save_every, device=device)
                for epoch, path in files:
                    at_zero, at_one = score_concept(previewer, path, TRIGGER, (0.0, 1.0), n=n)
                    rows.append(
                        QualityRow(
                            recipe.name,
                            epoch,
                            times.steps_at[epoch],
                            times.saved_at[epoch],
                            at_zero.concept,
                            at_one.concept,
                            at_one.world,
                        )
                    )
                    log.info("%s", rows[-1])
    return world_base, rows


def report(world_base: float, rows: Sequence[QualityRow]) -> str:
    lines = [
        f"world score of the base model (no LoRA): {world_base:.0%}",
        "| recipe | epoch | steps | seconds | concept at 0 | concept at 1 | world at 1 |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.recipe} | {r.epoch} | {r.steps} | {r.seconds:.0f} | {r.concept_base:.0%} | {r.concept:.0%} "
        f"| {r.world:.0%} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train_tools.bench_quality", description=__doc__)
    parser.add_argument(
        "--recipes", help="comma-separated recipe names (default: all): " + ", ".join(r.name for r in RECIPES)
    )
    parser.add_argument("-n", type=int, default=30, help="pictures per score (default 30)")
    parser.add_argument("--save-every", type=int, default=2, help="save (and score) every n epochs (default 2)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    by_name = {r.name: r for r in RECIPES}
    names = [n.strip() for n in args.recipes.split(",")] if args.recipes else list(by_name)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        parser.error(f"unknown recipe {unknown[0]!r}; choose from: {', '.join(by_name)}")
    world_base, rows = measure([by_name[n] for n in names], n=args.n, save_every=args.save_every)
    sys.stdout.write(report(world_base, rows))
    return 0
