"""The project store: projects, their versions, and where each file of a version lives.

Layout, as the original Train Tools tab had it::

    <data dir>/outputs/train_tools/projects/<project>/versions/<version>/
        dataset/        the user's original uploads, never modified
        prepared/       what training reads: one image + one .txt caption per item
        reg/            optional regularisation (class) pictures, as uploaded, never modified
        prepared_reg/   the class pictures prepared for training (no trigger word in their captions)
        settings.json   the version's TrainConfig
        trains/<run>/   one folder per training run: LoRA files, the run's settings and captions snapshot

Any name a person types works (Japanese, emoji, spaces); names that could leave the data dir or that Windows
cannot store are refused with a sentence saying why.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from . import fileio
from .config import TrainConfig
from .errors import UserError

log = logging.getLogger(__name__)

_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL"} | {f"COM{i}" for i in range(1, 10)} | {
    f"LPT{i}" for i in range(1, 10)}
_FORBIDDEN_CHARS = set('/\\<>:"|?*')
MAX_NAME_BYTES = 120  # leaves room under the 255-byte file-name limit for "<project>-<version>-000001.safetensors"


def check_name(name: str, what: str = "name") -> str:
    """Return the normalised ``name`` or raise a UserError that says what is wrong with it."""
    if not isinstance(name, str):
        raise UserError(f"The {what} must be text.")
    name = unicodedata.normalize("NFC", name).strip()
    if not name:
        raise UserError(f"The {what} is empty; type a name.")
    if "\x00" in name or any(unicodedata.category(c) == "Cc" for c in name):
        raise UserError(f"The {what} contains a control character; use letters, digits and spaces.")
    if name in (".", "..") or name.startswith(".."):
        raise UserError(f"The {what} '{name}' could point outside the project folder; choose another name.")
    bad = sorted(c for c in set(name) if c in _FORBIDDEN_CHARS)
    if bad:
        raise UserError(f"The {what} '{name}' contains {' '.join(bad)}, which cannot be used in a folder name.")
    if name.endswith("."):
        raise UserError(f"The {what} '{name}' ends with a dot, which Windows cannot store; remove it.")
    if name.split(".")[0].upper().rstrip() in _WINDOWS_RESERVED:
        raise UserError(f"The {what} '{name}' is reserved by Windows; choose another name.")
    if name.startswith("."):
        raise UserError(f"The {what} '{name}' starts with a dot, which hides it; remove the dot.")
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise UserError(f"The {what} is too long; use at most {MAX_NAME_BYTES // 3}-{MAX_NAME_BYTES} characters.")
    return name


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
            data = fileio.read_json(self.settings_path, "fix it (as UTF-8 JSON) or delete it to start from the "
                                    "defaults", what="The settings file")
        except FileNotFoundError:
            return TrainConfig()
        return TrainConfig.from_dict(data)

    def save_settings(self, config: TrainConfig) -> None:
        config.validate()
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
        candidate.mkdir(parents=True)
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
        (path / "versions").mkdir(parents=True)
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
        for sub in ("dataset", "prepared", "trains"):
            (path / sub).mkdir(parents=True)
        v = Version(project, name, path)
        v.save_settings(TrainConfig())
        log.info("Created version %s of project %s", name, project)
        return v

    def version(self, project: str, version: str) -> Version:
        project = check_name(project, "project name")
        name = check_name(version, "version name")
        project_dir = self._project_dir(project)
        if not project_dir.is_dir():
            raise UserError(f"There is no project named '{project}'; create it with "
                            f"'python -m train_tools project create \"{project}\"'.")
        path = project_dir / "versions" / name
        if not path.is_dir():
            raise UserError(f"Project '{project}' has no version '{name}'; create it with "
                            f"'python -m train_tools version create \"{project}\" \"{name}\"'.")
        return Version(project, name, path)
