"""What a training state is: the ``TrainState`` a run saves with its LoRA files (see ``resume.py`` for how
resuming uses it), its kinds, and the random-number generators it captures and puts back.

A state holds the LoRA weights, the optimizer and learning-rate schedule, every random-number generator the
run draws from (the trainer's own ``random.Random`` and ``torch.Generator``, and Python's, torch's, CUDA's
and numpy's global ones, per process), where the run stood (the epoch, and how many batches of it were done),
the settings, the base model's sha256 and the picture list. Its files are ``state_files.py``'s, its checks
``state_checks.py``'s.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from ..config import TrainConfig

FORMAT = 1
SAVE, INTERRUPT, FINAL = "save", "interrupt", "final"
KIND_ORDER = {INTERRUPT: 0, SAVE: 1, FINAL: 2}  # at one step, the later kind is the newer state


@dataclass
class TrainState:
    """Where a run stood, and everything needed to go on from there exactly as if it had not stopped."""

    epoch: int  # the epoch to continue in, 1-based (epochs + 1 once the run is finished)
    batch: int  # batches of that epoch already trained
    step: int  # steps trained in all
    kind: str  # SAVE, INTERRUPT, or FINAL (the save at the end of the run)
    finished: bool
    config: dict[str, Any]
    base_model_path: str
    base_sha256: str | None
    started_at: float
    files: list[str] = field(default_factory=list)  # names of the LoRA files saved so far, in order
    losses: list[float] = field(default_factory=list)
    items: list[str] = field(default_factory=list)  # the prepared pictures trained on, in order
    lora: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: dict[str, Any] = field(default_factory=dict)
    scheduler: dict[str, Any] = field(default_factory=dict)
    scaler: dict[str, Any] | None = None
    rng: list[dict[str, Any]] = field(default_factory=list)  # one entry per training process
    format: int = FORMAT

    def train_config(self) -> TrainConfig:
        return TrainConfig.from_dict(dict(self.config))


# ---------------------------------------------------------------------- random-number generators


def capture_rng(rng: random.Random, gen: torch.Generator) -> dict[str, Any]:
    """Every generator a training step may draw from, as plain values."""
    out: dict[str, Any] = {
        "trainer_python": _python_state(rng.getstate()),
        "trainer_torch": gen.get_state(),
        "python": _python_state(random.getstate()),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
    }
    try:
        import numpy as np

        # The global generator is a legacy MT19937 RandomState: its legacy state is always this tuple (the
        # stubs also allow the dict form, which only other bit generators give).
        legacy = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state())
        kind, keys, pos, has_gauss, cached = legacy
        out["numpy"] = {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype("int64")),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        }
    except ImportError:
        pass
    return out


def restore_rng(saved: dict[str, Any], rng: random.Random, gen: torch.Generator) -> None:
    rng.setstate(_python_tuple(saved["trainer_python"]))
    gen.set_state(saved["trainer_torch"])
    random.setstate(_python_tuple(saved["python"]))
    torch.set_rng_state(saved["torch"])
    cuda = saved.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    numpy_state = saved.get("numpy")
    if numpy_state:
        import numpy as np

        np.random.set_state(
            (
                numpy_state["kind"],
                numpy_state["keys"].numpy().astype("uint32"),
                numpy_state["pos"],
                numpy_state["has_gauss"],
                numpy_state["cached"],
            )
        )


def _python_state(state: tuple) -> dict[str, Any]:
    version, internal, gauss = state
    return {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _python_tuple(saved: dict[str, Any]) -> tuple:
    return saved["version"], tuple(int(v) for v in saved["internal"].tolist()), saved["gauss"]
