"""The demo teaches something (issue 16, item 3): the shipped shapes demo model draws its world, and the demo run
(the demo pictures, the demo settings) teaches it the cross, a shape it never saw, bound to the trigger word,
while prompts without the trigger word keep the base model's pictures. Scores from the shapes checker, with a
margin below the figures in BENCHMARKS.md (another CPU or torch draws slightly different pictures)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures_training import one_thread  # noqa: F401 - a fixture
from train_tools.bench.quality import RECIPES, measure, report

pytestmark = pytest.mark.usefixtures("one_thread")

N = 20  # pictures per score


def test_the_shipped_demo_model_draws_its_world():
    from train_tools.bench.shapes_score import score_model
    from train_tools.models.demo_model import SHAPES_DEMO

    scores = score_model(SHAPES_DEMO, N).scores
    assert scores["all"] >= 0.8, scores


def test_the_demo_run_teaches_the_cross_and_keeps_the_world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TRAIN_TOOLS_LOCK_DIR", str(tmp_path / "locks"))
    world_base, rows = measure(RECIPES[:1], n=N)
    final = rows[-1]
    text = report(world_base, rows)
    assert final.concept_base <= 0.15, text  # the base model does not draw crosses
    assert final.concept >= 0.7, text  # the LoRA at weight 1 does
    assert world_base - final.world <= 0.2, text  # and the world's pictures stay as they were
