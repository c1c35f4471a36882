"""The Train Tools tab: project and version, dataset, training settings, progress, results.

``build_tab(host)`` returns the tab as a ``gr.Blocks`` for the WebUI; ``build_contents(host, root)`` lays the
same controls into a Blocks the caller owns (the standalone app). Everything the buttons do lives in
``TabLogic`` as plain Python (testable without a browser); the builder only wires it to components.

The same code runs under Gradio 3.41 (A1111, reForge), 4.40 (Forge) and the standalone's current Gradio, so it
keeps to components every one of them has; the few differences sit in the ``_compat`` functions at the end.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gradio as gr

from .. import fileio
from ..config import TrainConfig, fields_info
from ..errors import UserError, from_os_error
from .gradio_compat import on_page_load, poll_every, with_progress
from ..hosts.base import DEMO_CHOICE, DEMO_FILE_NAME, Host, require_checkpoint_choice
from .jobs import JOBS, JobManager, training_work
from ..previews.previews import DEFAULT_NEGATIVE_PROMPT as DEFAULT_NEGATIVE
from ..previews.previews import SAMPLERS as PREVIEW_SAMPLERS
from ..progress import TaskFn
from ..store import Store, Version, projects_root
from .html import FAMILY_NAMES, ResultFile, family_line, message_html, progress_html, results_html, tags_html

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0
SETTING_FIELDS = [f.name for f in fields_info()]
# The settings a checkpoint's family changes when it is picked (model_configs.family_defaults gives values).
FAMILY_FIELDS = ("resolution", "min_bucket_reso", "max_bucket_reso", "clip_skip", "gradient_checkpointing")
COMMON_PER_ROW = 4


# ====================================================================== small calls into the core
# The tab reaches the dataset code only through these few functions, so a renamed core function is a
# one-line change here.

def ds_image_suffixes() -> tuple[str, ...]:
    from ..data.layout import IMAGE_SUFFIXES

    return IMAGE_SUFFIXES


def core_add_originals(paths: Sequence[Path], version: Version) -> str:
    from ..data.uploads import add_originals

    report = add_originals(list(paths), version.originals_dir)
    return str(report.summary())


def core_add_reg(paths: Sequence[Path], version: Version) -> str:
    """Class (regularisation) pictures go to the version's ``reg/``, beside, never into, its dataset."""
    from ..data.uploads import add_originals

    report = add_originals(list(paths), version.reg_dir)
    return f"Class pictures: {report.summary()}"


def core_reg_count(version: Version) -> int:
    """How many class pictures the version has: the prepared ones, or the uploaded ones before preparing."""
    prepared = version.prepared_reg_dir
    count = sum(1 for p in prepared.glob("*.png") if not p.name.startswith(".")) if prepared.is_dir() else 0
    if count:
        return count
    folder = version.reg_dir
    if not folder.is_dir():
        return 0
    return sum(1 for p in folder.iterdir() if p.suffix.lower() in ds_image_suffixes() and p.is_file())


def core_prepare(version: Version, config: TrainConfig, host: Any = None, task: TaskFn | None = None) -> str:
    """Prepare ``version``; ``task`` hears its progress (see ``prepare_version``)."""
    from ..data.preparation import prepare_version

    report = prepare_version(version, config, host=host, task=task)
    refused = list(getattr(report, "refused", []) or [])
    return f"Skipped {len(refused)}: " + "; ".join(str(r) for r in refused[:5]) if refused else ""


def core_tag_counts(version: Version) -> list[tuple[str, int]]:
    if not version.prepared_dir.is_dir():
        return []
    from ..data.captions import tag_counts

    return tag_counts(version.prepared_dir)


def core_family(host: Host, choice: str | None) -> str:
    """The family of the chosen checkpoint ("sd1", "sd2", "sd2v", "sdxl"), read from its header; "" if unknown."""
    if not choice:
        return ""
    if choice == DEMO_CHOICE:
        return "sd1"
    from ..models.checkpoint import detect_checkpoint_family

    try:
        return detect_checkpoint_family(host.resolve_checkpoint(choice))
    except (UserError, OSError, ValueError) as exc:
        log.debug("Cannot tell the family of %s: %s", choice, exc)
        return ""


def preview_work(version: Version, run_dir: Path, settings: Any, host: Host) -> Callable[..., list[Any]]:
    """The work of Generate previews: the run's checkpoint (or the chosen one), its files at each weight."""

    def work(reporter: Any, stop: Any) -> list[Any]:
        from ..previews.previews import generate_grid, make_previewer, run_checkpoint, run_config

        config = run_config(run_dir)
        checkpoint = run_checkpoint(run_dir) or host.resolve_checkpoint(config.base_model)
        previewer = make_previewer(host, checkpoint, clip_skip=config.clip_skip, device=host.device())
        try:
            return [generate_grid(run_dir, previewer, settings, reporter=reporter, stop=stop)]
        finally:
            previewer.close()

    return work


def core_items(version: Version) -> list[Any]:
    if not version.prepared_dir.is_dir() or not any(version.prepared_dir.iterdir()):
        return []  # nothing prepared yet: no need to load the dataset code
    from ..data.items import load_items

    return list(load_items(version.prepared_dir))


def core_auto_repeats(n: int) -> int:
    from ..data.items import auto_repeats

    return int(auto_repeats(n))


def core_demo_pictures(version: Version) -> int:
    from ..data.demo_dataset import make_demo_dataset

    return len(make_demo_dataset(version.originals_dir, n=12))


# ====================================================================== helpers without Gradio

def settings_from_values(values: Sequence[Any]) -> TrainConfig:
    """A validated TrainConfig from the settings controls' values, in ``SETTING_FIELDS`` order."""
    if len(values) != len(SETTING_FIELDS):
        raise ValueError(f"expected {len(SETTING_FIELDS)} settings values, got {len(values)}")
    data: dict[str, Any] = {}
    kinds = {f.name: f.type for f in fields_info()}
    for name, value in zip(SETTING_FIELDS, values):
        if value is None and kinds[name] in (str, "str"):
            value = ""
        data[name] = value
    return TrainConfig.from_dict(data)


def original_images(version: Version) -> list[Path]:
    folder = version.originals_dir
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in ds_image_suffixes() and p.is_file())


def read_caption(image: Path) -> str:
    txt = image.with_suffix(".txt")
    try:
        return txt.read_text(encoding="utf-8").strip() if txt.is_file() else ""
    except (OSError, UnicodeDecodeError):
        return ""


def _newest_mtime(paths: Sequence[Path]) -> float:
    return max((p.stat().st_mtime for p in paths if p.exists()), default=0.0)


def dataset_view(version: Version | None, config: TrainConfig) -> tuple[list[tuple[str, str]], str]:
    """The gallery (image, caption) and the one-line summary of what will be trained."""
    if version is None:
        return [], "Create or choose a project and a version first."
    originals = original_images(version)
    items = core_items(version)
    if items:
        gallery = [(str(item.image), str(item.caption)) for item in items]
        n = len(items)
        n_reg = core_reg_count(version)
        repeats = config.repeats or core_auto_repeats(n)
        # Class pictures add as many items per epoch as the training pictures x repeats.
        per_epoch = math.ceil(n * repeats * (2 if n_reg else 1) / config.batch_size)
        classes = f" and {n_reg} class images" if n_reg else ""
        line = (f"{n} images{classes}, {repeats} repeats, {per_epoch} steps per epoch "
                f"({per_epoch * config.epochs} steps for {config.epochs} epochs).")
        if _newest_mtime(originals) > _newest_mtime([i.image for i in items]):
            line += " New pictures were added since: press Update Dataset."
        return gallery, line
    if originals:
        gallery = [(str(p), read_caption(p) or p.name) for p in originals]
        return gallery, f"{len(originals)} pictures uploaded; press Update Dataset to prepare them."
    return [], "No pictures yet: drop 10-20 images (with their .txt captions, if any) on Upload Dataset."


def read_lora_info(path: Path) -> dict[str, str]:
    """The LoRA file's metadata, or {} when it cannot be read (a file being written, a foreign file)."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="np") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types; the table shows blanks
        log.debug("Cannot read metadata of %s: %s", path, exc)
        return {}


def list_results(version: Version | None) -> list[ResultFile]:
    """Every LoRA file of every run, newest run first and, within a run, the last-saved file first (the final
    file, then the epochs before it), so the first entry is always the newest LoRA."""
    if version is None:
        return []
    out: list[ResultFile] = []
    for run in reversed(version.runs()):
        for path in sorted(run.glob("*.safetensors"), key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True):
            meta = read_lora_info(path)
            out.append(ResultFile(run.name, path, path.stat().st_size, meta.get("ss_epoch", ""),
                                  meta.get("ss_steps", "")))
    return out


def saved_choice(files: list[ResultFile], saved: Sequence[Path]) -> str | None:
    """The results choice of the last of ``saved`` (a job's saved files) that ``files`` lists, else None."""
    by_path = {f.path.resolve(): f.choice for f in files}
    for path in reversed(saved):
        choice = by_path.get(Path(path).resolve())
        if choice is not None:
            return choice
    return None


def result_path(version: Version, choice: str) -> Path:
    """The file behind a results choice, refusing anything outside the version's runs."""
    if not choice:
        raise UserError("Choose a file in the results list first.")
    trains = version.trains_dir.resolve()
    path = (trains / choice).resolve()
    if trains not in path.parents or not path.is_file():
        raise UserError(f"'{choice}' is not a file of this version's runs; press the results refresh button.")
    return path


def copy_to_lora_dir(src: Path, lora_dir: Path) -> Path:
    """Put a LoRA file (and a preview picture beside it, if any) into the host's Lora folder."""
    target = lora_dir / src.name
    fileio.write_with(target, lambda tmp: shutil.copyfile(src, tmp))
    for suffix in (".preview.png", ".png"):
        preview = src.with_name(src.stem + suffix)
        if preview.is_file():
            fileio.write_with(lora_dir / preview.name, lambda tmp, p=preview: shutil.copyfile(p, tmp))
    return target


def run_of_choice(version: Version, choice: str | None) -> Path:
    """The run folder of a results choice ("run/file"), else the newest run."""
    from ..previews.previews import choose_run

    run = choice.split("/", 1)[0] if choice and "/" in choice else None
    return choose_run(version, run)


def grid_view(version: Version | None, choice: str | None) -> tuple[str | None, str | None]:
    """(grid picture, its path for the click handler) of the chosen run's newest grid, or (None, None)."""
    if version is None or not version.runs():
        return None, None
    from ..previews.previews import latest_grid

    try:
        info = latest_grid(run_of_choice(version, choice))
    except UserError:
        return None, None
    return (str(info.image), str(info.image)) if info is not None else (None, None)


# ====================================================================== what the buttons do

class TabLogic:
    """The tab's behaviour, one method per event, returning plain values and ``gr.update``s."""

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
        values: list[Any] = []
        for name in SETTING_FIELDS:
            if name == "base_model":
                values.append(self.checkpoint_update(config.base_model))
            else:
                values.append(gr.update(value=getattr(config, name)))
        gallery, line = dataset_view(version, config)
        files = list_results(version)
        choice = files[0].choice if files else None
        grid, grid_path = grid_view(version, choice)
        values += [gallery, line, results_html(files), gr.update(choices=[f.choice for f in files], value=choice),
                   family_line(core_family(self.host, config.base_model)),
                   tags_html(core_tag_counts(version) if version else []), grid, grid_path,
                   config.preview_prompt or config.trigger_word or (version.project if version else ""),
                   config.resolution, config.resolution]
        return values

    def project_update(self, value: str | None) -> dict[str, Any]:
        return gr.update(choices=self.store.projects(), value=value)

    def version_update(self, project: str | None, value: str | None) -> dict[str, Any]:
        choices = self.store.versions(project) if project else []
        return gr.update(choices=choices, value=value if value in choices else None)

    # -------------------------------------------------------------- events
    def load_page(self) -> list[Any]:
        """On every page load: reopen the version that was open last, with its settings."""
        projects = self.store.projects()
        project, version = self.remembered()
        if project not in projects:
            project = projects[0] if projects else None
        versions = self.store.versions(project) if project else []
        if version not in versions:
            version = versions[-1] if versions else None
        return [self.project_update(project), self.version_update(project, version),
                *self.version_view(self.version_or_none(project, version)), gr.update(value=progress_html(
                    self.jobs.status()))]

    def refresh_projects(self, project: str | None) -> list[Any]:
        projects = self.store.projects()
        return [gr.update(choices=projects, value=project if project in projects else None)]

    def choose_project(self, project: str | None) -> list[Any]:
        versions = self.store.versions(project) if project else []
        version = versions[-1] if versions else None
        self.remember(project, version)
        return [self.version_update(project, version), *self.version_view(self.version_or_none(project, version))]

    def open_version(self, project: str | None, version: str | None) -> list[Any]:
        self.remember(project, version)
        return self.version_view(self.version_or_none(project, version))

    def create_project(self, name: str) -> list[Any]:
        project = self.store.create_project(name or "")
        self.remember(project, None)
        return [self.project_update(project), self.version_update(project, None), *self.version_view(None),
                message_html(f"Created project '{project}'; now create a version.", "ok")]

    def create_version(self, project: str | None, name: str) -> list[Any]:
        if not project:
            raise UserError("Create or choose a project first.")
        version = self.store.create_version(project, name or "v1")
        self.remember(project, version.name)
        return [self.version_update(project, version.name), *self.version_view(version),
                message_html(f"Created version '{version.name}' of '{project}'.", "ok")]

    def upload(self, files: Any, project: str | None, version: str | None) -> list[Any]:
        return self._upload(files, project, version, core_add_originals, "images (and .txt captions) on Upload "
                            "Dataset")

    def upload_reg(self, files: Any, project: str | None, version: str | None) -> list[Any]:
        """Regularisation (class) pictures: kept apart from the dataset, prepared with it by Update Dataset."""
        return self._upload(files, project, version, core_add_reg, "class pictures (and .txt captions) on "
                            "Regularisation images", then=" Press Update Dataset to prepare them.")

    def _upload(self, files: Any, project: str | None, version: str | None,
                add: Callable[[list[Path], Version], str], where: str, then: str = "") -> list[Any]:
        v = self.require_version(project, version)
        named = uploaded_files(files)
        if not named:
            raise UserError(f"No files arrived; drop {where}.")
        summary, kind = add_uploaded(named, lambda paths: add(paths, v))
        gallery, line = dataset_view(v, v.load_settings())
        return [None, gallery, line, message_html(summary + then, kind)]

    def add_demo_pictures(self, project: str | None, version: str | None) -> list[Any]:
        v = self.require_version(project, version)
        n = core_demo_pictures(v)
        gallery, line = dataset_view(v, v.load_settings())
        return [gallery, line, message_html(f"Added {n} demo pictures; press Update Dataset.", "ok")]

    def update_dataset(self, project: str | None, version: str | None, *values: Any,
                       progress: TaskFn | None = None) -> list[Any]:
        """Prepare the version's pictures with the settings shown; ``progress`` hears how far it is."""
        v = self.require_version(project, version)
        config = settings_from_values(values)
        from ..devicelock import hold_version

        # Refused (the busy sentence) while a run trains this version: it reads prepared/, this rewrites it.
        with hold_version(v.path, f"{v.project} / {v.name} (Update Dataset, Train Tools tab)"):
            v.save_settings(config)
            if not original_images(v):
                raise UserError("There are no pictures to prepare: drop 10-20 images on Upload Dataset first.")
            skipped = core_prepare(v, config, self.host, progress)
        gallery, line = dataset_view(v, config)
        return [gallery, line, tags_html(core_tag_counts(v)), message_html(f"Dataset updated. {skipped}".strip(),
                                                                           "ok")]

    def select_picture(self, project: str | None, version: str | None, index: Any) -> list[Any]:
        """A click on a gallery picture: its caption goes into the caption box for editing."""
        v = self.version_or_none(project, version)
        gallery, _line = dataset_view(v, v.load_settings()) if v else ([], "")
        i = index[0] if isinstance(index, (list, tuple)) else index
        if not isinstance(i, int) or not 0 <= i < len(gallery):
            return [None, ""]
        path, caption = gallery[i]
        return [path, read_caption(Path(path)) or ("" if caption == Path(path).name else caption)]

    def save_caption(self, project: str | None, version: str | None, target: str | None, text: str) -> list[Any]:
        """Write the edited caption beside the picture, and beside its original so Update Dataset keeps it."""
        v = self.require_version(project, version)
        if not target:
            raise UserError("Click a picture in the gallery first, then edit its caption.")
        image = Path(target).resolve()
        folders = (v.originals_dir.resolve(), v.prepared_dir.resolve())
        if image.parent not in folders or not image.is_file():
            raise UserError("That picture is not in this version any more; click one in the gallery again.")
        caption = " ".join((text or "").split())
        if image.parent == folders[1]:
            # A prepared picture: the edit is kept by the caption store, so Update Dataset keeps it too.
            from ..data.captions import write_caption

            write_caption(v.prepared_dir, image.name, caption)
        else:
            fileio.write_text(image.with_suffix(".txt"), caption + "\n")  # an uploaded picture's own caption
        gallery, line = dataset_view(v, v.load_settings())
        return [gallery, line, tags_html(core_tag_counts(v)), message_html(f"Caption of {image.name} saved.", "ok")]

    def remove_tag(self, project: str | None, version: str | None, tag: str) -> list[Any]:
        from ..data.captions import remove_tag

        v = self.require_version(project, version)
        n = remove_tag(v.prepared_dir, (tag or "").strip())
        gallery, line = dataset_view(v, v.load_settings())
        return [gallery, line, tags_html(core_tag_counts(v)),
                message_html(f"Removed '{tag.strip()}' from {n} captions.", "ok")]

    def rename_tag(self, project: str | None, version: str | None, tag: str, new: str) -> list[Any]:
        from ..data.captions import rename_tag

        v = self.require_version(project, version)
        n = rename_tag(v.prepared_dir, (tag or "").strip(), (new or "").strip())
        gallery, line = dataset_view(v, v.load_settings())
        return [gallery, line, tags_html(core_tag_counts(v)),
                message_html(f"Renamed '{tag.strip()}' to '{new.strip()}' in {n} captions.", "ok")]

    def choose_base_model(self, choice: str | None) -> list[Any]:
        """A checkpoint was picked: show its family and set the settings that family needs."""
        from ..models.configs import family_defaults

        family = core_family(self.host, choice)
        defaults = family_defaults(family) if family else {}
        updates = [gr.update(value=defaults[name]) if name in defaults else gr.update() for name in FAMILY_FIELDS]
        note = ""
        if family and family != "sd1":
            shown = ", ".join(f"{name} {value}" for name, value in defaults.items())
            note = message_html(f"{FAMILY_NAMES[family]} checkpoint: set {shown}.", "info")
        return [family_line(family), *updates, note]

    def resume_train(self, project: str | None, version: str | None) -> list[Any]:
        from .jobs import resume_work
        from ..training.resume import find_run, run_is_finished

        v = self.require_version(project, version)
        if self.jobs.busy:
            raise UserError("A job is already running; wait for it to finish or press Interrupt.")
        run = find_run(v)
        if run_is_finished(run):
            raise UserError(f"The last run ({run.name}) finished; there is nothing to resume. Press Begin Train "
                            "for a new run.")
        work = resume_work(v, run, None, self.host.device(), resolve=self.host.resolve_checkpoint,
                           host=self.host)
        self.jobs.start(work, label=f"{v.project} / {v.name} (resumed)", wrap=self.host.run_on_gpu,
                        before=self.host.before_training, after=self.host.after_training,
                        extra_reporter=self.host.progress_sink)
        return [message_html(f"Resuming run {run.name}.", "ok"), progress_html(self.jobs.status())]

    # -------------------------------------------------------------- previews
    def generate_previews(self, project: str | None, version: str | None, choice: str | None, prompt: str,
                          negative: str, seed: Any, steps: Any, cfg_scale: Any, sampler: str, width: Any,
                          height: Any, weights: str) -> list[Any]:
        from ..previews.previews import PreviewSettings, parse_weights

        v = self.require_version(project, version)
        if not v.runs():
            raise UserError("Train first: previews show the files of a run.")
        if self.jobs.busy:
            raise UserError("A job is already running; wait for it to finish or press Interrupt.")
        run_dir = run_of_choice(v, choice)
        settings = PreviewSettings(prompt=prompt or "", negative_prompt=negative or "", seed=int(seed or 0),
                                   steps=int(steps or 20), cfg_scale=float(cfg_scale or 7.0),
                                   sampler=sampler or "Euler a", width=int(width or 512),
                                   height=int(height or 512), weights=parse_weights(weights or "")).validated()
        # Previews need the host's model where it is (the WebUI's txt2img uses it): no before/after.
        self.jobs.start(preview_work(v, run_dir, settings, self.host), label=f"previews of {run_dir.name}",
                        wrap=self.host.run_on_gpu, extra_reporter=self.host.progress_sink)
        return [message_html(f"Generating previews of run {run_dir.name}.", "ok"), progress_html(self.jobs.status())]

    def select_cell(self, grid_path: str | None, index: Any) -> list[Any]:
        """A click on the grid: the cell under the pointer becomes the one to install."""
        from ..previews.previews import grid_info_for

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
        from ..previews.previews import grid_info_for, install_cell, trigger_word

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
        return [message_html(f"Installed {target.name} with its preview in {target.parent}: press Refresh in the "
                             f"Lora tab; its card inserts <lora:{target.stem}:{cell.weight:g}>.", "ok")]

    def refresh_checkpoints(self, value: str | None) -> list[Any]:
        return [self.checkpoint_update(value, refresh=True)]

    def save_settings(self, project: str | None, version: str | None, *values: Any) -> list[Any]:
        v = self.require_version(project, version)
        v.save_settings(settings_from_values(values))
        return [message_html(f"Settings saved for {v.project} / {v.name}.", "ok")]

    def begin_train(self, project: str | None, version: str | None, *values: Any) -> list[Any]:
        v = self.require_version(project, version)
        if self.jobs.busy:
            raise UserError("A training job is already running; wait for it to finish or press Interrupt.")
        config = settings_from_values(values)
        choice = require_checkpoint_choice(config.base_model)
        if not original_images(v) and not core_items(v):
            raise UserError("This version has no pictures: drop 10-20 images on Upload Dataset first.")
        checkpoint = self.host.resolve_checkpoint(choice)
        if choice == DEMO_CHOICE:
            # From now on the demo model is an ordinary file in the checkpoint list; save that name.
            config = config.updated({"base_model": DEMO_FILE_NAME})
        v.save_settings(config)
        work = training_work(v, [config], checkpoint, self.host.device(), self.host)
        self.jobs.start(work, label=f"{v.project} / {v.name}", wrap=self.host.run_on_gpu,
                        before=self.host.before_training, after=self.host.after_training,
                        extra_reporter=self.host.progress_sink)
        return [message_html(f"Training started on {checkpoint.name}.", "ok"),
                progress_html(self.jobs.status()), self.checkpoint_update(config.base_model)]

    def show_grid(self, project: str | None, version: str | None, choice: str | None) -> list[Any]:
        grid, grid_path = grid_view(self.version_or_none(project, version), choice)
        return [grid, grid_path]

    def interrupt(self) -> list[Any]:
        return [message_html(self.jobs.stop(), "warn")]

    def poll(self, project: str | None, version: str | None, choice: str | None, seen: Any) -> list[Any]:
        """Every second: the progress, and the results and previews when a file was saved or the job ended."""
        status = self.jobs.status()
        key = [status.job_id, status.state, status.step, len(status.files), len(status.losses) > 0]
        if seen == key:
            return [gr.update(), gr.update(), gr.update(), gr.update(), gr.update(), seen]
        results, choices, grid, grid_path = gr.update(), gr.update(), gr.update(), gr.update()
        old = seen if isinstance(seen, list) and len(seen) == len(key) else None
        if old is None or old[0] != key[0] or old[1] != key[1] or old[3] != key[3]:
            v = self.version_or_none(project, version)
            files = list_results(v)
            results = results_html(files)
            # A file saved or a job ended: the File choice moves to the job's last-saved LoRA (what Copy to Lora
            # folder should copy); a job that saved nothing of this version's (previews) leaves it alone.
            newest = saved_choice(files, status.files)
            if newest is not None:
                choice = newest
            elif choice not in [f.choice for f in files]:
                choice = files[0].choice if files else None
            choices = gr.update(choices=[f.choice for f in files], value=choice)
            grid, grid_path = grid_view(v, choice)
        return [progress_html(status), results, choices, grid, grid_path, key]

    def refresh_results(self, project: str | None, version: str | None) -> list[Any]:
        files = list_results(self.version_or_none(project, version))
        return [results_html(files), gr.update(choices=[f.choice for f in files],
                                               value=files[0].choice if files else None)]

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
        return [message_html(f"Copied {target.name} to {target.parent}: press Refresh in the Lora tab, then use "
                             f"<lora:{target.stem}:0.8> in a prompt.", "ok")]


def uploaded_files(value: Any) -> list[tuple[Path, str]]:
    """(path on disk, the name the user's file had) for what a File component hands over in any Gradio.

    Gradio 3 gives temp-file objects (``.name``, ``.orig_name``), Gradio 4+ gives paths (or dicts in some
    paths through the API).
    """
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    out: list[tuple[Path, str]] = []
    for item in items:
        if isinstance(item, (str, Path)):
            path, orig = Path(item), Path(item).name
        elif isinstance(item, dict):
            raw = item.get("path") or item.get("name")
            if not raw:
                continue
            path, orig = Path(raw), item.get("orig_name") or Path(raw).name
        else:
            raw = getattr(item, "name", None) or getattr(item, "path", None)
            if not raw:
                continue
            path, orig = Path(raw), getattr(item, "orig_name", None) or Path(raw).name
        out.append((path, Path(str(orig)).name))
    return out


def add_uploaded(named: list[tuple[Path, str]], add: Callable[[list[Path]], str]) -> tuple[str, str]:
    """Stage uploaded files under their own names and ``add`` them; (summary, message kind)."""
    refused: list[str] = []
    with tempfile.TemporaryDirectory(prefix="train_tools_upload_") as tmp:
        paths = stage_with_original_names(named, Path(tmp), refused)
        summary = add(paths) if paths else "Nothing added."
    if refused:
        summary += f" Refused {len(refused)} file name(s): " + "; ".join(refused)
    return summary, "warn" if refused else "ok"


def stage_with_original_names(files: list[tuple[Path, str]], folder: Path,
                              refused: list[str] | None = None) -> list[Path]:
    """Paths whose names are the user's own (images and .txt captions pair by name); copies only if needed.

    A name that cannot be stored (too long for the disk, a NUL, ``..``) is left out, with its reason added to
    ``refused``: one bad name never refuses the other pictures of an upload.
    """
    out = []
    for path, orig in files:
        if path.name == orig:
            out.append(path)
            continue
        try:
            target = folder / orig
            fileio.write_with(target, lambda tmp, p=path: shutil.copyfile(p, tmp))
        except (UserError, ValueError) as exc:
            shown = orig if len(orig) <= 40 else orig[:37] + "..."
            (refused if refused is not None else []).append(f"{shown!r}: {exc}")
            continue
        out.append(target)
    return out


# ====================================================================== the layout

@dataclasses.dataclass
class TabHandles:
    """The built components, for tests and for hosts that want to reach one."""

    logic: TabLogic
    components: dict[str, Any]


def build_tab(host: Host, jobs: JobManager = JOBS) -> gr.Blocks:
    """The tab as its own Blocks: what the WebUI's ``on_ui_tabs`` wants."""
    with gr.Blocks(analytics_enabled=False) as tab:
        handles = build_contents(host, tab, jobs)
    tab.train_tools = handles  # type: ignore[attr-defined]
    return tab


def build_contents(host: Host, root: gr.Blocks, jobs: JobManager = JOBS) -> TabHandles:
    """Lay the tab's controls into the current Blocks context and wire them; ``root`` gets the page events."""
    logic = TabLogic(host, jobs)
    c: dict[str, Any] = {}
    defaults = TrainConfig()

    with gr.Row(elem_classes=["tt-row"]):
        with gr.Column(scale=1):
            with gr.Row():
                c["project"] = gr.Dropdown(label="Project", choices=logic.store.projects(), value=None,
                                           elem_id="train_tools_project")
                c["refresh_projects"] = gr.Button("\U0001F504", elem_id="train_tools_refresh_projects",
                                                  elem_classes=["tt-tool"])
            with gr.Row():
                c["new_project"] = gr.Textbox(label="New project name", placeholder="any name, e.g. my cat",
                                              elem_id="train_tools_new_project")
                c["create_project"] = gr.Button("Create Project", elem_id="train_tools_create_project")
        with gr.Column(scale=1):
            c["version"] = gr.Dropdown(label="Version", choices=[], value=None, elem_id="train_tools_version")
            with gr.Row():
                c["new_version"] = gr.Textbox(label="New version name", value="v1",
                                              elem_id="train_tools_new_version")
                c["create_version"] = gr.Button("Create Version", elem_id="train_tools_create_version")
    c["message"] = gr.HTML(elem_id="train_tools_message")

    with gr.Accordion("Dataset", open=True, elem_id="train_tools_dataset_section"):
        with gr.Row():
            with gr.Column(scale=1):
                c["upload"] = gr.File(label="Upload Dataset (images and .txt captions)", file_count="multiple",
                                      file_types=["image", ".txt"], elem_id="train_tools_upload")
                c["upload_reg"] = gr.File(label="Regularisation images (optional)", file_count="multiple",
                                          file_types=["image", ".txt"], height=120, elem_id="train_tools_upload_reg")
                with gr.Row():
                    c["update_dataset"] = gr.Button("Update Dataset", variant="primary",
                                                    elem_id="train_tools_update_dataset")
                    if host.offer_demo:
                        c["demo_pictures"] = gr.Button("Add demo pictures", elem_id="train_tools_demo_pictures")
                c["dataset_info"] = gr.Markdown(elem_id="train_tools_dataset_info")
            with gr.Column(scale=2):
                c["gallery"] = gr.Gallery(label="What will be trained", columns=6, height=360,
                                          elem_id="train_tools_gallery")
                with gr.Row():
                    c["caption"] = gr.Textbox(label="Caption of the selected picture (click one to edit)",
                                              lines=2, elem_id="train_tools_caption", scale=4)
                    c["save_caption"] = gr.Button("Save caption", elem_id="train_tools_save_caption")
                c["tags"] = gr.HTML(tags_html([]), elem_id="train_tools_tags")
                with gr.Row():
                    c["tag"] = gr.Textbox(label="Tag", placeholder="a tag from the list above",
                                          elem_id="train_tools_tag")
                    c["tag_new"] = gr.Textbox(label="Rename to", elem_id="train_tools_tag_new")
                    c["remove_tag"] = gr.Button("Remove tag everywhere", elem_id="train_tools_remove_tag")
                    c["rename_tag"] = gr.Button("Rename tag", elem_id="train_tools_rename_tag")

    with gr.Accordion("Train", open=True, elem_id="train_tools_train_section"):
        settings: dict[str, Any] = {}
        common = [f for f in fields_info() if not f.metadata["advanced"]]
        advanced = [f for f in fields_info() if f.metadata["advanced"]]
        with gr.Row():
            settings["base_model"] = gr.Dropdown(label=_label("base_model"), choices=host.list_checkpoints(),
                                                 value=None, info=_help("base_model"),
                                                 elem_id="train_tools_base_model", scale=4)
            c["refresh_models"] = gr.Button("\U0001F504", elem_id="train_tools_refresh_models",
                                            elem_classes=["tt-tool"])
        c["family"] = gr.Markdown(elem_id="train_tools_family")
        rest = [f for f in common if f.name != "base_model"]
        for start in range(0, len(rest), COMMON_PER_ROW):
            with gr.Row():
                for f in rest[start:start + COMMON_PER_ROW]:
                    settings[f.name] = _setting_component(f, getattr(defaults, f.name))
        with gr.Accordion("Advanced", open=False, elem_id="train_tools_advanced"):
            for start in range(0, len(advanced), COMMON_PER_ROW):
                with gr.Row():
                    for f in advanced[start:start + COMMON_PER_ROW]:
                        settings[f.name] = _setting_component(f, getattr(defaults, f.name))
        with gr.Row():
            c["begin"] = gr.Button("Begin Train", variant="primary", elem_id="train_tools_begin")
            c["interrupt"] = gr.Button("Interrupt", variant="stop", elem_id="train_tools_interrupt")
            c["resume"] = gr.Button("Resume", elem_id="train_tools_resume")
            c["save_settings"] = gr.Button("Save settings", elem_id="train_tools_save_settings")
        c["progress"] = gr.HTML(progress_html(jobs.status()), elem_id="train_tools_progress")

    with gr.Accordion("Results", open=True, elem_id="train_tools_results_section"):
        c["results"] = gr.HTML(results_html([]), elem_id="train_tools_results")
        with gr.Row():
            c["result_file"] = gr.Dropdown(label="File", choices=[], value=None, elem_id="train_tools_result_file",
                                           scale=4)
            c["refresh_results"] = gr.Button("\U0001F504", elem_id="train_tools_refresh_results",
                                             elem_classes=["tt-tool"])
            c["copy_lora"] = gr.Button("Copy to Lora folder", variant="primary", elem_id="train_tools_copy_lora")
        c["download"] = gr.File(label="Download", interactive=False, elem_id="train_tools_download")

    with gr.Accordion("Previews", open=True, elem_id="train_tools_previews_section"):
        with gr.Row():
            c["preview_prompt"] = gr.Textbox(label="Prompt", lines=2, elem_id="train_tools_grid_prompt", scale=2)
            c["preview_negative"] = gr.Textbox(label="Negative prompt", lines=2, value=DEFAULT_NEGATIVE,
                                               elem_id="train_tools_preview_negative", scale=2)
        with gr.Row():
            c["preview_seed"] = gr.Number(label="Seed", value=42, precision=0, elem_id="train_tools_preview_seed")
            c["preview_steps"] = gr.Number(label="Steps", value=20, precision=0, elem_id="train_tools_preview_steps")
            c["preview_cfg"] = gr.Number(label="CFG scale", value=7.0, elem_id="train_tools_preview_cfg")
            c["preview_sampler"] = gr.Dropdown(label="Sampler", choices=list(PREVIEW_SAMPLERS), value="Euler a",
                                               elem_id="train_tools_preview_sampler")
            c["preview_width"] = gr.Number(label="Width", value=512, precision=0, elem_id="train_tools_preview_width")
            c["preview_height"] = gr.Number(label="Height", value=512, precision=0,
                                            elem_id="train_tools_preview_height")
        with gr.Row():
            c["preview_weights"] = gr.Textbox(label="LoRA weights", value="0.2, 0.4, 0.6, 0.8, 1.0, 1.2",
                                              elem_id="train_tools_preview_weights", scale=3)
            c["generate_previews"] = gr.Button("Generate previews", variant="primary",
                                               elem_id="train_tools_generate_previews")
        c["preview_grid"] = gr.Image(label="One row per saved epoch, one column per weight: click a picture",
                                     type="filepath", interactive=False, elem_id="train_tools_preview_grid")
        with gr.Row():
            c["preview_selected"] = gr.Markdown(elem_id="train_tools_preview_selected")
            c["install_lora"] = gr.Button("Install to Lora folder", variant="primary",
                                          elem_id="train_tools_install_lora")
    c["grid_path"] = gr.State(None)
    c["preview_cell"] = gr.State(None)
    c["seen"] = gr.State(None)
    c["caption_target"] = gr.State(None)
    c.update({f"setting_{k}": v for k, v in settings.items()})

    setting_inputs = [settings[name] for name in SETTING_FIELDS]
    version_outputs = [*setting_inputs, c["gallery"], c["dataset_info"], c["results"], c["result_file"], c["family"],
                       c["tags"], c["preview_grid"], c["grid_path"], c["preview_prompt"], c["preview_width"],
                       c["preview_height"]]
    dataset_outputs = [c["gallery"], c["dataset_info"], c["tags"]]
    pv = [c["project"], c["version"]]
    msg = c["message"]

    def wire(event: Callable[..., Any], fn: Callable[..., list[Any]], inputs: list[Any], outputs: list[Any],
             **kwargs: Any) -> None:
        event(guarded(fn, outputs, msg), inputs=inputs, outputs=_with_message(outputs, msg), **kwargs)

    wire(c["refresh_projects"].click, logic.refresh_projects, [c["project"]], [c["project"]])
    wire(c["create_project"].click, logic.create_project, [c["new_project"]],
         [c["project"], c["version"], *version_outputs, msg])
    wire(c["project"].input, logic.choose_project, [c["project"]], [c["version"], *version_outputs])
    wire(c["create_version"].click, logic.create_version, [c["project"], c["new_version"]],
         [c["version"], *version_outputs, msg])
    wire(c["version"].input, logic.open_version, pv, version_outputs)
    wire(c["upload"].upload, logic.upload, [c["upload"], *pv],
         [c["upload"], c["gallery"], c["dataset_info"], msg])
    wire(c["upload_reg"].upload, logic.upload_reg, [c["upload_reg"], *pv],
         [c["upload_reg"], c["gallery"], c["dataset_info"], msg])
    if "demo_pictures" in c:
        wire(c["demo_pictures"].click, logic.add_demo_pictures, pv, [c["gallery"], c["dataset_info"], msg])
    wire(c["update_dataset"].click, with_progress(logic.update_dataset), [*pv, *setting_inputs],
         [*dataset_outputs, msg])
    def select_picture(project: str | None, version: str | None, evt: gr.SelectData) -> list[Any]:
        # Gradio fills ``evt`` from the type hint; it carries the clicked picture's index.
        return logic.select_picture(project, version, getattr(evt, "index", None))

    wire(c["gallery"].select, select_picture, pv, [c["caption_target"], c["caption"]])
    wire(c["save_caption"].click, logic.save_caption, [*pv, c["caption_target"], c["caption"]],
         [*dataset_outputs, msg])
    wire(c["remove_tag"].click, logic.remove_tag, [*pv, c["tag"]], [*dataset_outputs, msg])
    wire(c["rename_tag"].click, logic.rename_tag, [*pv, c["tag"], c["tag_new"]], [*dataset_outputs, msg])
    wire(settings["base_model"].input, logic.choose_base_model, [settings["base_model"]],
         [c["family"], *[settings[name] for name in FAMILY_FIELDS], msg])
    wire(c["resume"].click, logic.resume_train, pv, [msg, c["progress"]])
    preview_inputs = [c[f"preview_{k}"] for k in ("prompt", "negative", "seed", "steps", "cfg", "sampler", "width",
                                                  "height", "weights")]
    wire(c["generate_previews"].click, logic.generate_previews, [*pv, c["result_file"], *preview_inputs],
         [msg, c["progress"]])

    def select_cell(grid_path: str | None, evt: gr.SelectData) -> list[Any]:
        return logic.select_cell(grid_path, getattr(evt, "index", None))

    wire(c["preview_grid"].select, select_cell, [c["grid_path"]], [c["preview_cell"], c["preview_selected"]])
    wire(c["install_lora"].click, logic.install_cell, [*pv, c["preview_cell"]], [msg])
    wire(c["result_file"].change, logic.show_grid, [*pv, c["result_file"]], [c["preview_grid"], c["grid_path"]])
    wire(c["refresh_models"].click, logic.refresh_checkpoints, [settings["base_model"]], [settings["base_model"]])
    wire(c["save_settings"].click, logic.save_settings, [*pv, *setting_inputs], [msg])
    wire(c["begin"].click, logic.begin_train, [*pv, *setting_inputs], [msg, c["progress"], settings["base_model"]])
    wire(c["interrupt"].click, logic.interrupt, [], [msg])
    wire(c["refresh_results"].click, logic.refresh_results, pv, [c["results"], c["result_file"]])
    wire(c["result_file"].change, logic.choose_result, [*pv, c["result_file"]], [c["download"]])
    wire(c["copy_lora"].click, logic.copy_to_lora, [*pv, c["result_file"]], [msg])

    on_page_load(root, guarded(logic.load_page, [*pv, *version_outputs, c["progress"]], msg),
                 _with_message([*pv, *version_outputs, c["progress"]], msg))
    polled = [c["progress"], c["results"], c["result_file"], c["preview_grid"], c["grid_path"], c["seen"]]
    poll_every(root, POLL_SECONDS, guarded(logic.poll, polled, None), [*pv, c["result_file"], c["seen"]], polled)
    return TabHandles(logic, c)


def _label(name: str) -> str:
    return next(f.metadata["label"] for f in fields_info() if f.name == name)


def _help(name: str) -> str:
    return next(f.metadata["help"] for f in fields_info() if f.name == name)


def _setting_component(f: dataclasses.Field, default: Any) -> Any:
    """The control for one settings field, chosen from its type and metadata."""
    meta = f.metadata
    common = {"label": meta["label"], "info": meta["help"], "elem_id": f"train_tools_{f.name}"}
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if meta["choices"]:
        return gr.Dropdown(choices=list(meta["choices"]), value=default, **common)
    if kind == "bool":
        return gr.Checkbox(value=bool(default), **common)
    if kind == "int":
        return gr.Number(value=default, precision=0, **common)
    if kind == "float":
        return gr.Number(value=default, **common)
    return gr.Textbox(value=default, **common)


def _with_message(outputs: list[Any], msg: Any) -> list[Any]:
    return outputs if msg is None or any(o is msg for o in outputs) else [*outputs, msg]


def guarded(fn: Callable[..., list[Any]], outputs: list[Any], msg: Any) -> Callable[..., list[Any]]:
    """Run an event's function; a UserError (or a bug) becomes a message instead of a stack trace.

    The message component is appended to the outputs unless it is one already.
    """
    all_outputs = _with_message(outputs, msg)
    msg_index = next((i for i, o in enumerate(all_outputs) if o is msg), None) if msg is not None else None
    adds_message = msg is not None and not any(o is msg for o in outputs)

    @functools.wraps(fn)  # Gradio reads the signature and type hints (gr.SelectData) through this
    def run(*args: Any) -> list[Any]:
        try:
            result = list(fn(*args))
            if adds_message:
                result.append(gr.update())
            return result
        except UserError as exc:
            text, kind = str(exc), "error"
        except Exception as exc:  # noqa: BLE001 - a bug must not leave the page without an answer
            friendly = from_os_error(exc)  # a read-only folder, a full disk: a sentence, not a bug report
            if friendly is not None:
                text = str(friendly)
            else:
                log.exception("Train Tools: %s failed", getattr(fn, "__name__", "event"))
                text = f"Something went wrong: {type(exc).__name__}: {exc} (the console has the details)."
            kind = "error"
        out: list[Any] = [gr.update() for _ in all_outputs]
        if msg_index is not None:
            out[msg_index] = message_html(text, kind)
        return out

    return run
