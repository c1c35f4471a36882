"""The demo model's settings: what a run on the built-in tiny demo model trains with, and the marker in the
demo file's metadata that tells it from other checkpoints. Light on purpose (no torch): the tab and the
command line read it before anything is loaded."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: The file's metadata key that marks the demo model (its value: the tiny family's name).
DEMO_MARKER = "train_tools_demo"

#: How many demo pictures "Add demo pictures" (and ``dataset demo``) adds.
DEMO_PICTURES = 12

#: The run settings the demo model gets when it is chosen (the tab's base model, or ``--ckpt`` on the command
#: line), laid over the version's: the whole demo (prepare the pictures, train, the preview grid) in about a
#: minute on a 2-core CPU instead of the hours the settings for real checkpoints would take. 64 px is the size
#: the tiny model's pictures are made at; one file at the end (save every = epochs) keeps the grid one row.
#: A real checkpoint chosen afterwards gets the defaults back for these (see ``ui.logic`` and the CLI).
DEMO_SETTINGS: dict[str, Any] = {
    "resolution": 64,
    "min_bucket_reso": 64,
    "max_bucket_reso": 128,
    "batch_size": 4,
    "repeats": 10,
    "epochs": 5,
    "save_every_n_epochs": 5,
    "network_dim": 16,
    "network_alpha": 8.0,
    "optimizer": "AdamW",
    "learning_rate": 1e-3,
    "lr_scheduler": "constant",
    "mixed_precision": "no",
    "clip_skip": 1,
    "gradient_checkpointing": False,
    "preview_at_end": True,
}


def model_switch_changes(current: Mapping[str, Any], *, demo: bool) -> dict[str, Any]:
    """The settings to change when a checkpoint is newly chosen, given the settings ``current``ly set: the
    demo settings for the demo model; for another model, the defaults back for what the demo settings had
    set, when they are all still as the demo set them (the demo's tiny run must not carry over to a real
    model); else nothing."""
    if demo:
        return dict(DEMO_SETTINGS)
    shared = [name for name in DEMO_SETTINGS if name in current]
    if not shared or any(current[name] != DEMO_SETTINGS[name] for name in shared):
        return {}
    from .config import TrainConfig

    defaults = TrainConfig()
    return {name: getattr(defaults, name) for name in shared}
