"""The tab's events about a version's results: the results list and its file choice, Copy to Lora folder,
the preview grid (generating it, clicking a cell, installing that cell's file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from ..errors import UserError
from .core_calls import preview_work
from .html import message_html, progress_html, results_html
from .state import TabState
from .views import copy_to_lora_dir, grid_view, list_results, result_path, run_of_choice


class ResultsEvents(TabState):
    """The results and previews part of ``TabLogic``: one method per event."""

    def generate_previews(
        self,
        project: str | None,
        version: str | None,
        choice: str | None,
        prompt: str,
        negative: str,
        seed: Any,
        steps: Any,
        cfg_scale: Any,
        sampler: str,
        width: Any,
        height: Any,
        weights: str,
    ) -> list[Any]:
        from ..previews.settings import PreviewSettings, parse_weights

        v = self.require_version(project, version)
        if not v.runs():
            raise UserError("Train first: previews show the files of a run.")
        if self.jobs.busy:
            raise UserError("A job is already running; wait for it to finish or press Interrupt.")
        run_dir = run_of_choice(v, choice)
        settings = PreviewSettings(
            prompt=prompt or "",
            negative_prompt=negative or "",
            seed=int(seed or 0),
            steps=int(steps or 20),
            cfg_scale=float(cfg_scale or 7.0),
            sampler=sampler or "Euler a",
            width=int(width or 512),
            height=int(height or 512),
            weights=parse_weights(weights or ""),
        ).validated()
        # Previews need the host's model where it is (the WebUI's txt2img uses it): no before/after.
        self.jobs.start(
            preview_work(v, run_dir, settings, self.host),
            label=f"previews of {run_dir.name}",
            wrap=self.host.run_on_gpu,
            extra_reporter=self.host.progress_sink,
        )
        return [message_html(f"Generating previews of run {run_dir.name}.", "ok"), progress_html(self.jobs.status())]

    def select_cell(self, grid_path: str | None, index: Any) -> list[Any]:
        """A click on the grid: the cell under the pointer becomes the one to install."""
        from ..previews.grid_info import grid_info_for

        if not grid_path or not isinstance(index, (list, tuple)) or len(index) != 2:
            return [None, ""]
        cell = grid_info_for(Path(grid_path)).cell_at(float(index[0]), float(index[1]))
        if cell is None:
            return [None, ""]
        if not cell.has_lora or cell.file is None:
            return [None, "That is the picture without LoRA; click one of the weight columns."]
        chosen = {"grid": grid_path, "row": cell.row, "col": cell.col}
        return [chosen, f"Selected **{cell.file.name}** at weight **{cell.weight:g}**."]

    def install_cell(self, project: str | None, version: str | None, chosen: Any) -> list[Any]:
        from ..previews.grid_info import grid_info_for, install_cell
        from ..previews.settings import trigger_word

        v = self.require_version(project, version)
        if not isinstance(chosen, dict) or not chosen.get("grid"):
            raise UserError("Click a picture of the preview grid first: its file and weight are installed.")
        grid = Path(str(chosen["grid"])).resolve()
        if v.trains_dir.resolve() not in grid.parents:  # the page's state, but a request may bring any path
            raise UserError("That grid is not one of this version's runs; generate the previews again.")
        cell = grid_info_for(grid).cell(int(chosen["row"]), int(chosen["col"]))
        if cell is None:
            raise UserError("That grid is gone; generate the previews again.")
        target = install_cell(cell, self.host.lora_dir, activation_text=trigger_word(v.load_settings(), v.project))
        return [
            message_html(
                f"Installed {target.name} with its preview in {target.parent}: press Refresh in the "
                f"Lora tab; its card inserts <lora:{target.stem}:{cell.weight:g}>.",
                "ok",
            )
        ]

    def show_grid(self, project: str | None, version: str | None, choice: str | None) -> list[Any]:
        grid, grid_path = grid_view(self.version_or_none(project, version), choice)
        return [grid, grid_path]

    def refresh_results(self, project: str | None, version: str | None) -> list[Any]:
        files = list_results(self.version_or_none(project, version))
        return [
            results_html(files),
            gr.update(choices=[f.choice for f in files], value=files[0].choice if files else None),
        ]

    def choose_result(self, project: str | None, version: str | None, choice: str | None) -> list[Any]:
        v = self.version_or_none(project, version)
        if v is None or not choice:
            return [None]
        try:
            return [str(result_path(v, choice))]
        except UserError:
            return [None]

    def copy_to_lora(self, project: str | None, version: str | None, choice: str | None) -> list[Any]:
        v = self.require_version(project, version)
        src = result_path(v, choice or "")
        target = copy_to_lora_dir(src, self.host.lora_dir)
        return [
            message_html(
                f"Copied {target.name} to {target.parent}: press Refresh in the Lora tab, then use "
                f"<lora:{target.stem}:0.8> in a prompt.",
                "ok",
            )
        ]
