"""The preview grid of a run's LoRA files: epochs x weights, to pick the best epoch without guessing.

The grid has one row per saved LoRA file (epoch) and one column per LoRA weight, plus a "no LoRA" column;
every cell uses the same seed, so only the LoRA differs between cells. It is written beside the run::

    <run>/previews/grid-<timestamp>.png          the labelled grid
    <run>/previews/grid-<timestamp>/grid.json    what each cell is (epoch, file, weight, picture) and where
    <run>/previews/grid-<timestamp>/*.png        each cell on its own (the Lora card's picture on install)

Reading a written grid back is ``grid_info``'s.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from .. import fileio
from ..errors import UserError
from ..progress import Reporter, StepInfo, StopFlag, TerminalReporter
from .grid_info import GRID_JSON, PREVIEWS_DIR, GridCell
from .previewer import Previewer
from .runs import RunFile, run_lora_files
from .settings import PreviewSettings

log = logging.getLogger(__name__)

BASE_LABEL = "no LoRA"


def generate_grid(
    run_dir: Path,
    previewer: Previewer,
    settings: PreviewSettings,
    *,
    files: Sequence[RunFile] | None = None,
    include_base: bool = True,
    reporter: Reporter | None = None,
    stop: StopFlag | None = None,
    report_steps: bool = True,
) -> Path:
    """Make the epochs x weights grid of ``run_dir`` and return the grid picture's path.

    Progress goes to ``reporter`` (a message per picture and, with ``report_steps``, a StepInfo whose step
    counts pictures; pass False where the reporter's steps are a training's); ``stop`` ends it after the
    current picture, and what was made is still written (``grid.json`` says ``interrupted``).
    """
    run_dir = Path(run_dir)
    settings = settings.validated().with_fixed_seed()
    rows = list(files) if files is not None else run_lora_files(run_dir)
    if not rows:
        raise UserError("There are no LoRA files to preview.")
    reporter = reporter or Reporter()
    stop = stop or StopFlag()
    columns = ([BASE_LABEL] if include_base else []) + [_weight_label(w) for w in settings.weights]
    weights: list[float | None] = ([None] if include_base else []) + list(settings.weights)
    folder, grid_path = _new_grid_paths(run_dir)
    total = len(rows) * len(settings.weights) + (1 if include_base else 0)
    reporter.start(total, len(rows))
    done, t0 = 0, time.perf_counter()
    pictures: dict[tuple[int, int], Image.Image] = {}
    cells: list[GridCell] = []
    base: tuple[Image.Image, Path] | None = None
    interrupted = False
    for r, run_file in enumerate(rows):
        for c, weight in enumerate(weights):
            if weight is None and base is not None:
                image, path = base  # the base model's picture is the same in every row: made once
            else:
                if stop.requested:
                    interrupted = True
                    break
                what = BASE_LABEL if weight is None else f"{run_file.label}, weight {_weight_label(weight)}"
                reporter.message(f"Preview {done + 1}/{total}: {what}")
                image = previewer.generate(
                    settings, None if weight is None else run_file.path, 0.0 if weight is None else weight
                )
                name = "base.png" if weight is None else f"r{r:03d}-e{run_file.epoch:06d}-w{_weight_label(weight)}.png"
                path = folder / name
                fileio.write_bytes(path, png_bytes(image))
                if weight is None:
                    base = (image, path)
                done += 1
                if report_steps:
                    reporter.step(_picture_step(done, total, r + 1, len(rows), t0))
            pictures[(r, c)] = image
            cells.append(GridCell(r, c, run_file.epoch, None if weight is None else run_file.path, weight, path))
        if interrupted:
            break
    grid, layout = draw_grid(pictures, [f.label for f in rows], columns, settings.width, settings.height)
    fileio.write_bytes(grid_path, png_bytes(grid))
    fileio.write_json(
        folder / GRID_JSON,
        {
            "grid": grid_path.name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "settings": settings.to_dict(),
            "interrupted": interrupted,
            "layout": layout,
            "cells": [
                {
                    "row": cell.row,
                    "col": cell.col,
                    "epoch": cell.epoch,
                    "file": cell.file.relative_to(run_dir).as_posix() if cell.file else None,
                    "weight": cell.weight,
                    "path": cell.image.name,
                }
                for cell in cells
            ],
        },
    )
    reporter.message(
        ("Previews stopped; " if interrupted else "Previews done: ") + f"{done} picture(s) in {grid_path.name}"
    )
    reporter.finish()
    log.info("Preview grid: %s", grid_path)
    return grid_path


class PictureBarReporter(TerminalReporter):
    """The terminal bar of ``generate_grid``, counting pictures (the command line's ``preview``)."""

    def start(self, total_steps: int, total_epochs: int) -> None:
        from tqdm.auto import tqdm

        log.info("Making %d preview picture(s) for %d LoRA file(s)", total_steps, total_epochs)
        self._bar = tqdm(total=total_steps, unit="picture", dynamic_ncols=True)

    def step(self, info: StepInfo) -> None:
        if self._bar is not None:
            self._bar.n = info.step
            self._bar.refresh()

    def message(self, text: str) -> None:
        if self._bar is None:
            super().message(text)
        elif not text.startswith("Preview "):  # the bar already counts the pictures
            self._bar.write(text)


def _picture_step(done: int, total: int, row: int, rows: int, t0: float) -> StepInfo:
    elapsed = time.perf_counter() - t0
    speed = done / elapsed if elapsed > 0 else 0.0
    return StepInfo(
        step=done,
        total_steps=total,
        epoch=row,
        total_epochs=rows,
        loss=0.0,
        avg_loss=0.0,
        lr=0.0,
        steps_per_s=speed,
        eta_s=(total - done) / speed if speed else 0.0,
    )


def _weight_label(weight: float) -> str:
    return f"{weight:g}"


def _new_grid_paths(run_dir: Path) -> tuple[Path, Path]:
    """``(cells folder, grid picture)`` named by the time, suffixed when a grid of that second exists."""
    previews = run_dir / PREVIEWS_DIR
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name, n = f"grid-{stamp}", 1
    while (previews / name).exists() or (previews / f"{name}.png").exists():
        name, n = f"grid-{stamp}-{n}", n + 1
    folder = previews / name
    folder.mkdir(parents=True)
    return folder, previews / f"{name}.png"


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def draw_grid(
    pictures: dict[tuple[int, int], Image.Image],
    row_labels: Sequence[str],
    column_labels: Sequence[str],
    cell_width: int,
    cell_height: int,
) -> tuple[Image.Image, dict[str, Any]]:
    """The labelled grid (Pillow's default font) and its layout; cells not made are left grey."""
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def size(text: str) -> tuple[int, int]:
        box = probe.textbbox((0, 0), text, font=font)  # whole pixels at (0, 0); the stubs allow floats
        return int(box[2] - box[0]), int(box[3] - box[1])

    pad = 6
    left = max((size(t)[0] for t in row_labels), default=0) + 2 * pad
    top = max((size(t)[1] for t in column_labels), default=0) + 2 * pad
    grid = Image.new("RGB", (left + cell_width * len(column_labels), top + cell_height * len(row_labels)), "white")
    draw = ImageDraw.Draw(grid)
    for c, text in enumerate(column_labels):
        w, _ = size(text)
        draw.text((left + c * cell_width + (cell_width - w) // 2, pad), text, fill="black", font=font)
    for r, text in enumerate(row_labels):
        _, h = size(text)
        draw.text((pad, top + r * cell_height + (cell_height - h) // 2), text, fill="black", font=font)
        for c in range(len(column_labels)):
            box = (left + c * cell_width, top + r * cell_height)
            picture = pictures.get((r, c))
            if picture is None:
                draw.rectangle([box, (box[0] + cell_width - 1, box[1] + cell_height - 1)], fill=(200, 200, 200))
            else:
                if picture.size != (cell_width, cell_height):
                    picture = picture.resize((cell_width, cell_height))
                grid.paste(picture.convert("RGB"), box)
    layout = {
        "left": left,
        "top": top,
        "cell_width": cell_width,
        "cell_height": cell_height,
        "columns": list(column_labels),
        "rows": list(row_labels),
    }
    return grid, layout
