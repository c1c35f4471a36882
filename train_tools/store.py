"""The project store: projects, their versions, and where each file of a version lives.

Layout, as the original Train Tools tab had it::

    <data dir>/outputs/train_tools/projects/<project>/versions/<version>/
        dataset/        the user's original uploads, never modified
        prepared/       what training reads: one image + one .txt caption per item
        reg/            optional regularisation (class) pictures, as uploaded, never modified
        prepared_reg/   the class pictures prepared for training (no trigger word in their captions)
        settings.json   the version's TrainConfig
        trains/<run>/   one folder per training run: LoRA files, the run's settings and captions snapshot

Any name a person types works (Japanese, emoji, spaces); names that could leave the data dir, that a disk
or Windows cannot store, or that would clash with an existing one are refused with a sentence saying why
(``names.py``).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from . import fileio
from .config import TrainConfig
from .errors import UserError
from .names import MAX_NAME_BYTES, check_name, check_run_paths, check_unique

__all__ = ["MAX_NAME_BYTES", "Store", "Version", "check_name", "projects_root"]

log = logging.getLogger(__name__)


def projects_root(data_dir: Path) -> Path:
    return Path(data_dir) / "outputs" / "train_tools" / "projects"


@dataclass(frozen=True)
class Version:
    project: str
    name: str
    path: Path

    @property
    def originals_dir(self) -> Path:
        return self.path / "dataset"

    @property
    def data_dir(self) -> Path:
        """The data dir this version lives in (see ``projects_root``: <data>/outputs/train_tools/projects/
        <project>/versions/<version>)."""
        return self.path.parents[5]

    @property
    def prepared_dir(self) -> Path:
        return self.path / "prepared"

    @property
    def reg_dir(self) -> Path:
        """The regularisation (class) pictures as uploaded, never modified; optional."""
        return self.path / "reg"

    @property
    def prepared_reg_dir(self) -> Path:
        """The class pictures prepared like ``prepared/``, but captioned without the trigger word."""
        return self.path / "prepared_reg"

    @property
    def settings_path(self) -> Path:
        return self.path / "settings.json"

    @property
    def trains_dir(self) -> Path:
        return self.path / "trains"

    @property
    def default_output_name(self) -> str:
        return f"{self.project}-{self.name}"

    def load_settings(self) -> TrainConfig:
        if not self.settings_path.exists():
            return TrainConfig()
        try:
            data = fileio.read_json(
                self.settings_path,
                "fix it (as UTF-8 JSON) or delete it to start from the defaults",
                what="The settings file",
            )
        except FileNotFoundError:
            return TrainConfig()
        return TrainConfig.from_dict(data)

    def output_name(self, config: TrainConfig) -> str:
        """The LoRA files' name: the ``output_name`` setting, else ``<project>-<version>``."""
        return config.output_name or self.default_output_name

    def check_settings(self, config: TrainConfig) -> None:
        """Validate ``config`` and refuse an output name with which this version's runs could not save."""
        config.validate()
        what = (
            "output name (setting 'output_name')"
            if config.output_name
            else "version name (with the project name it names the LoRA files)"
        )
        check_run_paths(self.path, self.output_name(config), what)

    def save_settings(self, config: TrainConfig) -> None:
        self.check_settings(config)
        fileio.write_json(self.settings_path, config.to_dict())

    def runs(self) -> list[Path]:
        if not self.trains_dir.is_dir():
            return []
        return sorted(p for p in self.trains_dir.iterdir() if p.is_dir() and not p.name.startswith("."))

    def new_run_dir(self, stamp: str) -> Path:
        """A fresh run folder named by ``stamp`` (a time stamp), suffixed if it exists."""
        base = re.sub(r"[^0-9A-Za-z_.-]", "_", stamp)
        candidate = self.trains_dir / base
        n = 1
        while candidate.exists():
            candidate = self.trains_dir / f"{base}-{n}"
            n += 1
        fileio.make_dirs(candidate.parent)
        candidate.mkdir()
        return candidate


class Store:
    """All projects under one data dir."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.root = projects_root(self.data_dir)

    def _project_dir(self, project: str) -> Path:
        path = self.root / check_name(project, "project name")
        # Belt and braces: the checks above should make this impossible.
        if self.root.resolve() not in path.resolve().parents:
            raise UserError(f"The project name '{project}' points outside the projects folder.")
        return path

    def projects(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def create_project(self, project: str) -> str:
        name = check_name(project, "project name")
        path = self._project_dir(name)
        if path.exists():
            raise UserError(f"A project named '{name}' already exists.")
        check_unique(name, self.projects(), "project name")
        # The shortest version name must fit beside it (a version's files are checked when it is created).
        check_run_paths(path / "versions" / "v1", f"{name}-v1", "project name")
        fileio.make_dirs(path / "versions")
        log.info("Created project %s", name)
        return name

    def versions(self, project: str) -> list[str]:
        path = self._project_dir(project) / "versions"
        if not path.is_dir():
            return []
        return sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))

    def create_version(self, project: str, version: str = "v1") -> Version:
        project = check_name(project, "project name")
        name = check_name(version, "version name")
        project_dir = self._project_dir(project)
        if not project_dir.is_dir():
            raise UserError(f"There is no project named '{project}'; create it first.")
        path = project_dir / "versions" / name
        if path.exists():
            raise UserError(f"Project '{project}' already has a version named '{name}'.")
        check_unique(name, self.versions(project), "version name")
        v = Version(project, name, path)
        v.check_settings(TrainConfig())  # before any folder: names too long to save a LoRA are refused here
        for sub in ("dataset", "prepared", "trains"):
            fileio.make_dirs(path / sub)
        v.save_settings(TrainConfig())
        log.info("Created version %s of project %s", name, project)
        return v

    def version(self, project: str, version: str) -> Version:
        project = check_name(project, "project name")
        name = check_name(version, "version name")
        project_dir = self._project_dir(project)
        if not project_dir.is_dir():
            raise UserError(
                f"There is no project named '{project}'; create it with "
                f"'python -m train_tools project create \"{project}\"'."
            )
        path = project_dir / "versions" / name
        if not path.is_dir():
            raise UserError(
                f"Project '{project}' has no version '{name}'; create it with "
                f'\'python -m train_tools version create "{project}" "{name}"\'.'
            )
        return Version(project, name, path)
