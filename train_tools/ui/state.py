"""What the tab's events share (``TabState``, the base of ``TabLogic``): the host, the job manager and the
store; the open project and version, remembered across page loads; lookups of a version; and the values
that show a whole version (its settings, dataset, results, family, tags and preview grid).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import gradio as gr

from .. import fileio
from ..config import TrainConfig
from ..demo_settings import model_switch_changes
from ..errors import UserError
from ..hosts.base import Host
from ..store import Store, Version, projects_root
from .core_calls import (
    core_demo_estimate,
    core_family,
    core_fit_demo,
    core_is_demo,
    core_tag_counts,
    core_unsupported_family,
)
from .html import demo_line, family_line, results_html, tags_html
from .jobs import JOBS, JobManager
from .views import SETTING_FIELDS, dataset_view, grid_view, list_results, original_images

log = logging.getLogger(__name__)


class TabState:
    """The host, jobs and store behind the tab, and the lookups and views its events build on."""

    def __init__(self, host: Host, jobs: JobManager = JOBS) -> None:
        self.host = host
        self.jobs = jobs
        self.store = Store(host.data_dir)

    # -------------------------------------------------------------- state across page loads
    @property
    def ui_state_path(self) -> Path:
        return projects_root(self.store.data_dir).parent / "ui_state.json"

    def remember(self, project: str | None, version: str | None) -> None:
        try:
            fileio.write_json(self.ui_state_path, {"project": project, "version": version})
        except OSError as exc:
            log.debug("Cannot remember the open version: %s", exc)

    def remembered(self) -> tuple[str | None, str | None]:
        try:
            data = fileio.read_json(self.ui_state_path, "it is ignored")
        except (OSError, UserError):
            return None, None
        if not isinstance(data, dict):
            return None, None
        project, version = data.get("project"), data.get("version")
        return (project if isinstance(project, str) else None), (version if isinstance(version, str) else None)

    # -------------------------------------------------------------- lookups
    def version_or_none(self, project: str | None, version: str | None) -> Version | None:
        if not project or not version:
            return None
        try:
            return self.store.version(project, version)
        except UserError:
            return None

    def require_version(self, project: str | None, version: str | None) -> Version:
        if not project:
            raise UserError("Create or choose a project first.")
        if not version:
            raise UserError("Create or choose a version first.")
        return self.store.version(project, version)

    def checkpoint_update(self, value: str | None, refresh: bool = False) -> dict[str, Any]:
        choices = self.host.refresh_checkpoints() if refresh else self.host.list_checkpoints()
        if value and value not in choices:
            choices = [value, *choices]  # keep the saved choice visible even if the file went missing
        if not value and choices:
            value = choices[0]
        return gr.update(choices=choices, value=value or None)

    # -------------------------------------------------------------- the version's whole view
    def version_view(self, version: Version | None) -> list[Any]:
        """Values for VERSION_OUTPUTS: every setting, the gallery, the dataset line, the results."""
        config = version.load_settings() if version else TrainConfig()
        model = self.checkpoint_update(config.base_model)
        chosen = model.get("value")
        demo = core_is_demo(self.host, chosen)
        if demo and config == TrainConfig():
            # Untouched defaults, no model chosen, and the demo model is what the list shows: its settings are
            # what a run gets.
            config = config.updated(model_switch_changes({}, demo=True))
            config = config.updated(self.fit_demo(config, version))
        values: list[Any] = []
        for name in SETTING_FIELDS:
            values.append(model if name == "base_model" else gr.update(value=getattr(config, name)))
        gallery, line = dataset_view(version, config)
        files = list_results(version)
        choice = files[0].choice if files else None
        grid, grid_path = grid_view(version, choice)
        values += [
            gallery,
            line,
            results_html(files),
            gr.update(choices=[f.choice for f in files], value=choice),
            self.model_line(chosen, demo, config, version),
            tags_html(core_tag_counts(version) if version else []),
            grid,
            grid_path,
            config.preview_prompt or config.trigger_word or (version.project if version else ""),
            config.resolution,
            config.resolution,
        ]
        return values

    def demo_pictures(self, version: Version | None) -> tuple[int, int]:
        """The version's pictures and class pictures (none yet: the estimate counts the demo's)."""
        if version is None:
            return 0, 0
        return len(original_images(version)), len(original_images(version, version.reg_dir))

    def fit_demo(self, config: TrainConfig, version: Version | None) -> dict[str, int]:
        """The demo settings ``config`` fitted to this machine's speed (fewer epochs where it is slow)."""
        return core_fit_demo(config, *self.demo_pictures(version), self.host.device())

    def model_line(self, choice: str | None, demo: bool, config: TrainConfig, version: Version | None) -> str:
        """The line under the base model: its family, or for the demo model how long a run of ``config``
        takes on this machine (measured, see training/estimate.py)."""
        if demo:
            return demo_line(core_demo_estimate(config, *self.demo_pictures(version), self.host.device()))
        family = core_family(self.host, choice)
        newer = "" if family else core_unsupported_family(self.host, choice)
        if newer:
            return f"Detected: **{newer}**, which this version cannot train yet: choose an SD1, SD2 or SDXL checkpoint."
        return family_line(family)

    def project_update(self, value: str | None) -> dict[str, Any]:
        return gr.update(choices=self.store.projects(), value=value)

    def version_update(self, project: str | None, value: str | None) -> dict[str, Any]:
        choices = self.store.versions(project) if project else []
        return gr.update(choices=choices, value=value if value in choices else None)
