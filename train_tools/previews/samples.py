"""The pictures a training makes of its own files: samples after every n-th epoch (``<run>/samples/``) and
the preview grid at the end."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .. import fileio
from ..config import TrainConfig
from ..progress import Reporter, StopFlag
from .grid import generate_grid, png_bytes
from .previewer import Previewer
from .settings import PreviewSettings, default_settings

SAMPLES_DIR = "samples"
SAMPLES_PER_EPOCH = 2


def should_sample(config: TrainConfig, epoch: int) -> bool:
    """Whether the trainer makes samples after ``epoch`` (``sample_every_n_epochs``; 0 = never)."""
    every = int(config.sample_every_n_epochs)
    return every > 0 and epoch > 0 and epoch % every == 0


def sample_epoch(
    run_dir: Path,
    lora_file: Path,
    epoch: int,
    previewer: Previewer,
    settings: PreviewSettings,
    *,
    count: int = SAMPLES_PER_EPOCH,
    weight: float = 1.0,
) -> list[Path]:
    """A few pictures of ``lora_file`` at ``weight`` (seeds seed, seed+1, ...) in ``<run>/samples/``."""
    settings = settings.validated().with_fixed_seed()
    out = []
    for i in range(count):
        image = previewer.generate(dataclasses.replace(settings, seed=settings.seed + i), lora_file, weight)
        path = Path(run_dir) / SAMPLES_DIR / f"epoch-{epoch:06d}-{i + 1}.png"
        fileio.write_bytes(path, png_bytes(image))
        out.append(path)
    return out


def previews_at_end(
    run_dir: Path,
    config: TrainConfig,
    project: str,
    previewer: Previewer,
    *,
    reporter: Reporter | None = None,
    stop: StopFlag | None = None,
) -> Path | None:
    """The grid a finished training makes when ``preview_at_end`` is on (None when it is off)."""
    if not config.preview_at_end:
        return None
    return generate_grid(
        run_dir, previewer, default_settings(config, project), reporter=reporter, stop=stop, report_steps=False
    )
