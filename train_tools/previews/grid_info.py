"""A written grid, as ``grid.json`` describes it: its cells (epoch, file, weight, picture), the cell under a
click, a run's newest grid, and installing a cell's LoRA file with its picture and weight."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..fileio import read_json
from .settings import PreviewSettings

PREVIEWS_DIR = "previews"
GRID_JSON = "grid.json"


@dataclass
class GridCell:
    """One picture of a grid. ``file``/``weight`` are None in the "no LoRA" column."""

    row: int
    col: int
    epoch: int
    file: Path | None
    weight: float | None
    image: Path

    @property
    def has_lora(self) -> bool:
        return self.file is not None and self.weight is not None


@dataclass
class GridInfo:
    """A written grid, as ``grid.json`` describes it; the UI maps clicks on the picture to cells with it."""

    json_path: Path
    image: Path
    settings: PreviewSettings
    columns: list[str]
    rows: list[str]
    left: int
    top: int
    cell_width: int
    cell_height: int
    cells: list[GridCell] = field(default_factory=list)
    interrupted: bool = False

    @classmethod
    def load(cls, json_path: Path) -> GridInfo:
        json_path = Path(json_path)
        data = read_json(json_path, "make the previews again", what="The preview grid description")
        folder = json_path.parent
        run_dir = folder.parent.parent
        try:  # a hand-edited or damaged description: a sentence, and no path that leads out of the run
            cells = [
                GridCell(
                    row=int(c["row"]),
                    col=int(c["col"]),
                    epoch=int(c["epoch"]),
                    file=run_dir / _plain_name(c["file"]) if c.get("file") else None,
                    weight=c.get("weight"),
                    image=folder / _plain_name(c["path"]),
                )
                for c in data["cells"]
            ]
            layout = data["layout"]
            return cls(
                json_path=json_path,
                image=folder.parent / _plain_name(data["grid"]),
                settings=PreviewSettings.from_dict(data["settings"]),
                columns=list(layout["columns"]),
                rows=list(layout["rows"]),
                left=int(layout["left"]),
                top=int(layout["top"]),
                cell_width=max(1, int(layout["cell_width"])),
                cell_height=max(1, int(layout["cell_height"])),
                cells=cells,
                interrupted=bool(data.get("interrupted", False)),
            )
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise UserError(
                f"The preview grid description {json_path} is damaged ({type(exc).__name__}); make the previews again."
            ) from None

    def cell(self, row: int, col: int) -> GridCell | None:
        return next((c for c in self.cells if c.row == row and c.col == col), None)

    def cell_at(self, x: float, y: float) -> GridCell | None:
        """The cell under pixel (x, y) of the grid picture (a click), or None on a label or a gap."""
        col = math.floor((x - self.left) / self.cell_width)
        row = math.floor((y - self.top) / self.cell_height)
        if x < self.left or y < self.top or col >= len(self.columns) or row >= len(self.rows):
            return None
        return self.cell(row, col)


def _plain_name(name: Any) -> str:
    """A file name inside the folder it is read from (what grid.json holds); ValueError for anything else."""
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
        raise ValueError(f"{name!r} is not a plain file name")
    return name


def grid_info_for(grid_png: Path) -> GridInfo:
    """The description of the grid picture ``grid_png`` (as ``generate_grid`` returned it)."""
    grid_png = Path(grid_png)
    return GridInfo.load(grid_png.with_suffix("") / GRID_JSON)


def latest_grid(run_dir: Path) -> GridInfo | None:
    """The newest grid of a run, or None."""
    folder = Path(run_dir) / PREVIEWS_DIR
    found = sorted(folder.glob(f"grid-*/{GRID_JSON}"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    return GridInfo.load(found[-1]) if found else None


def install_cell(
    cell: GridCell, lora_dir: Path, *, activation_text: str, overwrite: bool = False, name: str | None = None
) -> Path:
    """Install the LoRA file of a clicked cell with the cell's picture and weight (``lora_install``)."""
    from ..networks.install import install_lora

    if not cell.has_lora or cell.file is None or cell.weight is None:
        raise UserError("That picture is the model without a LoRA; click a picture in one of the weight columns.")
    return install_lora(
        cell.file,
        lora_dir,
        weight=cell.weight,
        activation_text=activation_text,
        preview=cell.image,
        overwrite=overwrite,
        name=name,
    )


def find_cell(run_dir: Path, lora_file: Path, weight: float | None = None) -> GridCell | None:
    """In the run's newest grid, the cell of ``lora_file`` at ``weight`` (else its closest weight)."""
    info = latest_grid(run_dir)
    if info is None:
        return None
    cells = [
        c
        for c in info.cells
        if c.file is not None and c.file.resolve() == Path(lora_file).resolve() and c.weight is not None
    ]
    if not cells:
        return None
    target = 1.0 if weight is None else float(weight)
    return min(cells, key=lambda c: (abs(float(c.weight or 0.0) - target), -float(c.weight or 0.0)))
