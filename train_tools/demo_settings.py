"""The demo model's settings: what a run on the built-in tiny demo model trains with, and the marker in the
demo file's metadata that tells it from other checkpoints. Light on purpose (no torch): the tab and the
command line read it before anything is loaded."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: The file's metadata key that marks the demo model (its value: the tiny family's name).
DEMO_MARKER = "train_tools_demo"

#: How many demo pictures "Add demo pictures" (and ``dataset demo``) adds, and how many class pictures of the
#: world beside them (``data/demo_dataset.py``).
DEMO_PICTURES = 12
DEMO_CLASS_PICTURES = 36

#: The demo's trigger word: first in the demo pictures' captions, and in the preview grid's prompt.
DEMO_TRIGGER = "demo"

#: The run settings the demo model gets when it is chosen (the tab's base model, or ``--ckpt`` on the command
#: line), laid over the version's: the whole demo (prepare the pictures, train, the preview grid) in a minute or
#: two on a 2-core CPU instead of the hours the settings for real checkpoints would take, and a LoRA that
#: teaches the shapes demo model the cross (chosen with ``python -m train_tools.bench_quality``, BENCHMARKS.md):
#: LoCon (the tiny model's attention layers alone barely learn a new shape), min-SNR, the text encoder frozen.
#: 64 px is the size the tiny model's pictures are made at; one file at the end (save every = epochs) keeps the
#: grid one row. A real checkpoint chosen afterwards gets the defaults back for these (see ``ui.logic`` and the
#: CLI).
DEMO_SETTINGS: dict[str, Any] = {
    "resolution": 64,
    "min_bucket_reso": 64,
    "max_bucket_reso": 128,
    "batch_size": 4,
    "repeats": 10,
    "epochs": 20,
    "save_every_n_epochs": 20,
    "network_dim": 16,
    "network_alpha": 8.0,
    "network_type": "locon",
    "conv_dim": 16,
    "conv_alpha": 8.0,
    "optimizer": "AdamW",
    "learning_rate": 2e-3,
    "lr_scheduler": "constant",
    "min_snr_gamma": 5.0,
    "train_text_encoder": False,
    "mixed_precision": "no",
    "clip_skip": 1,
    "gradient_checkpointing": False,
    "trigger_word": DEMO_TRIGGER,
    "preview_prompt": f"{DEMO_TRIGGER}, a white cross on a blue background",
    "preview_at_end": True,
}

#: The demo settings a slow machine gets fewer of, so that the run fits its time (``training.estimate``'s
#: ``fit_demo_epochs``): whatever they hold, they still count as the demo's when a real model follows.
FITTED_TO_MACHINE = ("epochs", "save_every_n_epochs")


def model_switch_changes(current: Mapping[str, Any], *, demo: bool) -> dict[str, Any]:
    """The settings to change when a checkpoint is newly chosen, given the settings ``current``ly set: the
    demo settings for the demo model; for another model, the defaults back for what the demo settings had
    set, when they are all still as the demo set them (the demo's tiny run must not carry over to a real
    model; the epochs may have been fitted to the machine); else nothing. The demo's epochs are fitted to the
    machine afterwards, where its speed is known (``fit_demo_epochs``)."""
    if demo:
        return dict(DEMO_SETTINGS)
    shared = [name for name in DEMO_SETTINGS if name in current]
    kept = [name for name in shared if name not in FITTED_TO_MACHINE]
    if not shared or any(current[name] != DEMO_SETTINGS[name] for name in kept):
        return {}
    from .config import TrainConfig

    defaults = TrainConfig()
    return {name: getattr(defaults, name) for name in shared}
