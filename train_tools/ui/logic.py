"""What the tab's buttons do: ``TabLogic``, one method per event, as plain Python (testable without a
browser). Each returns the values and ``gr.update``s of its outputs; ``layout`` wires them to components.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr

from .. import fileio
from ..demo_settings import DEMO_SETTINGS, model_switch_changes
from ..errors import UserError
from ..hosts.base import DEMO_CHOICE, DEMO_FILE_NAME, require_checkpoint_choice
from ..progress import TaskFn
from ..store import Version
from .core_calls import (
    core_add_originals,
    core_add_reg,
    core_demo_pictures,
    core_family,
    core_is_demo,
    core_items,
    core_prepare,
    core_tag_counts,
)
from .html import FAMILY_NAMES, message_html, progress_html, results_html, tags_html
from .jobs import training_work
from .results_logic import ResultsEvents
from .uploads import add_uploaded, uploaded_files
from .views import (
    MODEL_FIELDS,
    NETWORK_FIELDS,
    SETTING_FIELDS,
    dataset_view,
    grid_view,
    list_results,
    original_images,
    read_caption,
    saved_choice,
    settings_from_values,
)


class TabLogic(ResultsEvents):
    """The tab's behaviour, one method per event, returning plain values and ``gr.update``s."""

    def load_page(self) -> list[Any]:
        """On every page load: reopen the version that was open last, with its settings."""
        projects = self.store.projects()
        project, version = self.remembered()
        if project not in projects:
            project = projects[0] if projects else None
        versions = self.store.versions(project) if project else []
        if version not in versions:
            version = versions[-1] if versions else None
        return [
            self.project_update(project),
            self.version_update(project, version),
            *self.version_view(self.version_or_none(project, version)),
            gr.update(value=progress_html(self.jobs.status())),
        ]

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
        return [
            self.project_update(project),
            self.version_update(project, None),
            *self.version_view(None),
            message_html(f"Created project '{project}'; now create a version.", "ok"),
        ]

    def create_version(self, project: str | None, name: str) -> list[Any]:
        if not project:
            raise UserError("Create or choose a project first.")
        version = self.store.create_version(project, name or "v1")
        self.remember(project, version.name)
        return [
            self.version_update(project, version.name),
            *self.version_view(version),
            message_html(f"Created version '{version.name}' of '{project}'.", "ok"),
        ]

    def upload(self, files: Any, project: str | None, version: str | None) -> list[Any]:
        return self._upload(files, project, version, core_add_originals, "images (and .txt captions) on Upload Dataset")

    def upload_reg(self, files: Any, project: str | None, version: str | None) -> list[Any]:
        """Regularisation (class) pictures: kept apart from the dataset, prepared with it by Update Dataset."""
        return self._upload(
            files,
            project,
            version,
            core_add_reg,
            "class pictures (and .txt captions) on Regularisation images",
            then=" Press Update Dataset to prepare them.",
        )

    def _upload(
        self,
        files: Any,
        project: str | None,
        version: str | None,
        add: Callable[[list[Path], Version], str],
        where: str,
        then: str = "",
    ) -> list[Any]:
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

    def update_dataset(
        self, project: str | None, version: str | None, *values: Any, progress: TaskFn | None = None
    ) -> list[Any]:
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
        return [gallery, line, tags_html(core_tag_counts(v)), message_html(f"Dataset updated. {skipped}".strip(), "ok")]

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
        return [
            gallery,
            line,
            tags_html(core_tag_counts(v)),
            message_html(f"Removed '{tag.strip()}' from {n} captions.", "ok"),
        ]

    def rename_tag(self, project: str | None, version: str | None, tag: str, new: str) -> list[Any]:
        from ..data.captions import rename_tag

        v = self.require_version(project, version)
        n = rename_tag(v.prepared_dir, (tag or "").strip(), (new or "").strip())
        gallery, line = dataset_view(v, v.load_settings())
        return [
            gallery,
            line,
            tags_html(core_tag_counts(v)),
            message_html(f"Renamed '{tag.strip()}' to '{new.strip()}' in {n} captions.", "ok"),
        ]

    def choose_base_model(
        self, project: str | None, version: str | None, choice: str | None, *current: Any
    ) -> list[Any]:
        """A checkpoint was picked: show its family and set the settings it needs (``MODEL_FIELDS``; ``current``
        holds their values now): its family's, or for the demo model the demo settings with how long the run
        takes here. A real checkpoint picked after the demo model gets the defaults back for what the demo
        settings had set, so the demo's small run never carries over to a real model."""
        from ..config import TrainConfig
        from ..models.configs import family_defaults

        family = core_family(self.host, choice)
        demo = core_is_demo(self.host, choice)
        now = dict(zip(MODEL_FIELDS, current, strict=False))
        wanted = model_switch_changes(now, demo=demo)
        note = ""
        if demo:
            fitted = self.fit_demo(TrainConfig().updated(wanted), self.version_or_none(project, version))
            wanted.update(fitted)
            fewer = (
                f" {fitted['epochs']} epochs instead of {DEMO_SETTINGS['epochs']}, to fit 3 minutes on this machine."
                if fitted
                else ""
            )
            note = message_html(
                f"Demo model: settings for a quick run (how long it takes is shown under Base model).{fewer}", "info"
            )
        elif family:
            defaults = family_defaults(family)
            wanted.update(defaults)
            if family != "sd1":
                shown = ", ".join(f"{name} {value}" for name, value in defaults.items())
                note = message_html(f"{FAMILY_NAMES[family]} checkpoint: set {shown}.", "info")
        updates = [gr.update(value=wanted[name]) if name in wanted else gr.update() for name in MODEL_FIELDS]
        try:
            shown_config = TrainConfig().updated({**now, **wanted})
        except UserError:  # a control holds a value the settings refuse: Begin Train will say which
            shown_config = TrainConfig().updated(wanted)
        line = self.model_line(choice, demo, shown_config, self.version_or_none(project, version))
        return [line, *updates, note]

    def choose_network_type(self, kind: str | None) -> list[Any]:
        """A network type was picked: its suggested dims (``NETWORK_FIELDS``, ``config_values.NETWORK_DEFAULTS``)."""
        from ..config_values import NETWORK_DEFAULTS

        wanted = NETWORK_DEFAULTS.get(str(kind), {})
        shown = ", ".join(f"{name} {value:g}" for name, value in wanted.items())
        note = message_html(f"{kind}: set {shown}.", "info") if wanted else ""
        return [*(gr.update(value=wanted[n]) if n in wanted else gr.update() for n in NETWORK_FIELDS), note]

    def resume_train(self, project: str | None, version: str | None) -> list[Any]:
        from ..training.resume import find_run, run_is_finished
        from .jobs import resume_work

        v = self.require_version(project, version)
        if self.jobs.busy:
            raise UserError("A job is already running; wait for it to finish or press Interrupt.")
        run = find_run(v)
        if run_is_finished(run):
            raise UserError(
                f"The last run ({run.name}) finished; there is nothing to resume. Press Begin Train for a new run."
            )
        work = resume_work(v, run, None, self.host.device(), resolve=self.host.resolve_checkpoint, host=self.host)
        self.jobs.start(
            work,
            label=f"{v.project} / {v.name} (resumed)",
            wrap=self.host.run_on_gpu,
            before=self.host.before_training,
            after=self.host.after_training,
            extra_reporter=self.host.progress_sink,
        )
        return [message_html(f"Resuming run {run.name}.", "ok"), progress_html(self.jobs.status())]

    # -------------------------------------------------------------- previews
    def refresh_checkpoints(self, value: str | None) -> list[Any]:
        return [self.checkpoint_update(value, refresh=True)]

    def save_settings(self, project: str | None, version: str | None, *values: Any) -> list[Any]:
        v = self.require_version(project, version)
        v.save_settings(settings_from_values(values))
        return [message_html(f"Settings saved for {v.project} / {v.name}.", "ok")]

    def apply_preset(self, name: str | None, *values: Any) -> list[Any]:
        """Set the controls to preset ``name``'s settings (the version's own kept); Save settings or Begin Train
        keeps them. Returns updates for SETTING_FIELDS and the message."""
        from ..presets import apply_preset, load_preset

        if not name:
            raise UserError("Choose a preset first.")
        preset = load_preset(self.host.data_dir, name)
        config = apply_preset(settings_from_values(values), preset)
        updates = [gr.update(value=getattr(config, n)) for n in SETTING_FIELDS]
        about = f" ({preset.description})" if preset.description else ""
        note = f"Applied preset '{preset.name}'{about}; Save settings or Begin Train keeps it."
        return [*updates, message_html(note, "ok")]

    def save_preset(self, name: str | None, *values: Any) -> list[Any]:
        """Save the controls' settings as the user's preset ``name``; the preset list and the message."""
        from ..presets import preset_names, save_preset

        path = save_preset(self.host.data_dir, name or "", settings_from_values(values))
        return [
            gr.update(choices=preset_names(self.host.data_dir), value=path.stem),
            message_html(f"Saved preset '{path.stem}'.", "ok"),
        ]

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
        self.jobs.start(
            work,
            label=f"{v.project} / {v.name}",
            wrap=self.host.run_on_gpu,
            before=self.host.before_training,
            after=self.host.after_training,
            extra_reporter=self.host.progress_sink,
        )
        return [
            message_html(f"Training started on {checkpoint.name}.", "ok"),
            progress_html(self.jobs.status()),
            self.checkpoint_update(config.base_model),
        ]

    def interrupt(self) -> list[Any]:
        return [message_html(self.jobs.stop(), "warn")]

    def poll(self, project: str | None, version: str | None, choice: str | None, seen: Any) -> list[Any]:
        """Every second: the progress, and the results and previews when a file was saved or the job ended."""
        status = self.jobs.status()
        key = [status.job_id, status.state, status.step, len(status.files), len(status.losses) > 0]
        if seen == key:
            return [gr.update(), gr.update(), gr.update(), gr.update(), gr.update(), seen]
        # Each output unchanged (an update of nothing) unless the job moved on.
        results: str | dict[str, Any] = gr.update()
        choices = gr.update()
        grid: str | dict[str, Any] | None = gr.update()
        grid_path: str | dict[str, Any] | None = gr.update()
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
