"""The Train Tools tab's layout: project and version, dataset, training settings, progress, results, previews.

``build_tab(host)`` returns the tab as a ``gr.Blocks`` for the WebUI; ``build_contents(host, root)`` lays the
same controls into a Blocks the caller owns (the standalone app). Everything the buttons do lives in
``TabLogic`` (``logic``); the builder only wires it to components, each event ``guarded`` so an error
becomes a message on the page.

The same code runs under Gradio 3.41 (A1111, reForge), 4.40 (Forge) and the standalone's current Gradio, so it
keeps to components every one of them has; the few differences sit in ``gradio_compat``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from typing import Any

import gradio as gr

from ..config import TrainConfig, fields_info
from ..errors import UserError, from_os_error
from ..hosts.base import Host
from ..presets import preset_names
from ..previews.samplers import SAMPLERS as PREVIEW_SAMPLERS
from ..previews.settings import DEFAULT_NEGATIVE_PROMPT as DEFAULT_NEGATIVE
from .gradio_compat import on_page_load, poll_every, with_progress
from .html import message_html, progress_html, results_html, tags_html
from .jobs import JOBS, JobManager
from .logic import TabLogic
from .views import MODEL_FIELDS, NETWORK_FIELDS, SETTING_FIELDS

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0
COMMON_PER_ROW = 4


@dataclasses.dataclass
class TabHandles:
    """The built components, for tests and for hosts that want to reach one."""

    logic: TabLogic
    components: dict[str, Any]


def build_tab(host: Host, jobs: JobManager = JOBS) -> gr.Blocks:
    """The tab as its own Blocks: what the WebUI's ``on_ui_tabs`` wants."""
    with gr.Blocks(analytics_enabled=False) as tab:
        handles = build_contents(host, tab, jobs)
    tab.train_tools = handles
    return tab


def build_contents(host: Host, root: gr.Blocks, jobs: JobManager = JOBS) -> TabHandles:
    """Lay the tab's controls into the current Blocks context and wire them; ``root`` gets the page events."""
    logic = TabLogic(host, jobs)
    c: dict[str, Any] = {}
    defaults = TrainConfig()

    with gr.Row(elem_classes=["tt-row"]):
        with gr.Column(scale=1):
            with gr.Row():
                c["project"] = gr.Dropdown(
                    label="Project", choices=logic.store.projects(), value=None, elem_id="train_tools_project"
                )
                c["refresh_projects"] = gr.Button(
                    "\U0001f504", elem_id="train_tools_refresh_projects", elem_classes=["tt-tool"]
                )
            with gr.Row():
                c["new_project"] = gr.Textbox(
                    label="New project name", placeholder="any name, e.g. my cat", elem_id="train_tools_new_project"
                )
                c["create_project"] = gr.Button("Create Project", elem_id="train_tools_create_project")
        with gr.Column(scale=1):
            c["version"] = gr.Dropdown(label="Version", choices=[], value=None, elem_id="train_tools_version")
            with gr.Row():
                c["new_version"] = gr.Textbox(label="New version name", value="v1", elem_id="train_tools_new_version")
                c["create_version"] = gr.Button("Create Version", elem_id="train_tools_create_version")
    c["message"] = gr.HTML(elem_id="train_tools_message")

    with gr.Accordion("Dataset", open=True, elem_id="train_tools_dataset_section"), gr.Row():
        with gr.Column(scale=1):
            c["upload"] = gr.File(
                label="Upload Dataset (images and .txt captions)",
                file_count="multiple",
                file_types=["image", ".txt"],
                elem_id="train_tools_upload",
            )
            c["upload_reg"] = gr.File(
                label="Regularisation images (optional)",
                file_count="multiple",
                file_types=["image", ".txt"],
                height=120,
                elem_id="train_tools_upload_reg",
            )
            with gr.Row():
                c["update_dataset"] = gr.Button(
                    "Update Dataset", variant="primary", elem_id="train_tools_update_dataset"
                )
                if host.offer_demo:
                    c["demo_pictures"] = gr.Button("Add demo pictures", elem_id="train_tools_demo_pictures")
            c["dataset_info"] = gr.Markdown(elem_id="train_tools_dataset_info")
        with gr.Column(scale=2):
            c["gallery"] = gr.Gallery(
                label="What will be trained", columns=6, height=360, elem_id="train_tools_gallery"
            )
            with gr.Row():
                c["caption"] = gr.Textbox(
                    label="Caption of the selected picture (click one to edit)",
                    lines=2,
                    elem_id="train_tools_caption",
                    scale=4,
                )
                c["save_caption"] = gr.Button("Save caption", elem_id="train_tools_save_caption")
            c["tags"] = gr.HTML(tags_html([]), elem_id="train_tools_tags")
            with gr.Row():
                c["tag"] = gr.Textbox(label="Tag", placeholder="a tag from the list above", elem_id="train_tools_tag")
                c["tag_new"] = gr.Textbox(label="Rename to", elem_id="train_tools_tag_new")
                c["remove_tag"] = gr.Button("Remove tag everywhere", elem_id="train_tools_remove_tag")
                c["rename_tag"] = gr.Button("Rename tag", elem_id="train_tools_rename_tag")

    with gr.Accordion("Train", open=True, elem_id="train_tools_train_section"):
        settings: dict[str, Any] = {}
        common = [f for f in fields_info() if not f.metadata["advanced"]]
        advanced = [f for f in fields_info() if f.metadata["advanced"]]
        with gr.Row():
            settings["base_model"] = gr.Dropdown(
                label=_label("base_model"),
                choices=host.list_checkpoints(),
                value=None,
                info=_help("base_model"),
                elem_id="train_tools_base_model",
                scale=4,
            )
            c["refresh_models"] = gr.Button(
                "\U0001f504", elem_id="train_tools_refresh_models", elem_classes=["tt-tool"]
            )
        c["family"] = gr.Markdown(elem_id="train_tools_family")
        rest = [f for f in common if f.name != "base_model"]
        for start in range(0, len(rest), COMMON_PER_ROW):
            with gr.Row():
                for f in rest[start : start + COMMON_PER_ROW]:
                    settings[f.name] = _setting_component(f, getattr(defaults, f.name))
        with gr.Accordion("Advanced", open=False, elem_id="train_tools_advanced"):
            for start in range(0, len(advanced), COMMON_PER_ROW):
                with gr.Row():
                    for f in advanced[start : start + COMMON_PER_ROW]:
                        settings[f.name] = _setting_component(f, getattr(defaults, f.name))
        with gr.Row():
            c["preset"] = gr.Dropdown(
                label="Preset", choices=preset_names(host.data_dir), value=None, elem_id="train_tools_preset", scale=3
            )
            c["apply_preset"] = gr.Button("Apply preset", elem_id="train_tools_apply_preset")
            c["preset_name"] = gr.Textbox(label="Save settings as preset", elem_id="train_tools_preset_name", scale=3)
            c["save_preset"] = gr.Button("Save preset", elem_id="train_tools_save_preset")
        with gr.Row():
            c["begin"] = gr.Button("Begin Train", variant="primary", elem_id="train_tools_begin")
            c["interrupt"] = gr.Button("Interrupt", variant="stop", elem_id="train_tools_interrupt")
            c["resume"] = gr.Button("Resume", elem_id="train_tools_resume")
            c["save_settings"] = gr.Button("Save settings", elem_id="train_tools_save_settings")
        c["progress"] = gr.HTML(progress_html(jobs.status()), elem_id="train_tools_progress")

    with gr.Accordion("Results", open=True, elem_id="train_tools_results_section"):
        c["results"] = gr.HTML(results_html([]), elem_id="train_tools_results")
        with gr.Row():
            c["result_file"] = gr.Dropdown(
                label="File", choices=[], value=None, elem_id="train_tools_result_file", scale=4
            )
            c["refresh_results"] = gr.Button(
                "\U0001f504", elem_id="train_tools_refresh_results", elem_classes=["tt-tool"]
            )
            c["copy_lora"] = gr.Button("Copy to Lora folder", variant="primary", elem_id="train_tools_copy_lora")
        c["download"] = gr.File(label="Download", interactive=False, elem_id="train_tools_download")

    with gr.Accordion("Previews", open=True, elem_id="train_tools_previews_section"):
        with gr.Row():
            c["preview_prompt"] = gr.Textbox(label="Prompt", lines=2, elem_id="train_tools_grid_prompt", scale=2)
            c["preview_negative"] = gr.Textbox(
                label="Negative prompt",
                lines=2,
                value=DEFAULT_NEGATIVE,
                elem_id="train_tools_preview_negative",
                scale=2,
            )
        with gr.Row():
            c["preview_seed"] = gr.Number(label="Seed", value=42, precision=0, elem_id="train_tools_preview_seed")
            c["preview_steps"] = gr.Number(label="Steps", value=20, precision=0, elem_id="train_tools_preview_steps")
            c["preview_cfg"] = gr.Number(label="CFG scale", value=7.0, elem_id="train_tools_preview_cfg")
            c["preview_sampler"] = gr.Dropdown(
                label="Sampler", choices=list(PREVIEW_SAMPLERS), value="Euler a", elem_id="train_tools_preview_sampler"
            )
            c["preview_width"] = gr.Number(label="Width", value=512, precision=0, elem_id="train_tools_preview_width")
            c["preview_height"] = gr.Number(
                label="Height", value=512, precision=0, elem_id="train_tools_preview_height"
            )
        with gr.Row():
            c["preview_weights"] = gr.Textbox(
                label="LoRA weights",
                value="0.2, 0.4, 0.6, 0.8, 1.0, 1.2",
                elem_id="train_tools_preview_weights",
                scale=3,
            )
            c["generate_previews"] = gr.Button(
                "Generate previews", variant="primary", elem_id="train_tools_generate_previews"
            )
        c["preview_grid"] = gr.Image(
            label="One row per saved epoch, one column per weight: click a picture",
            type="filepath",
            interactive=False,
            elem_id="train_tools_preview_grid",
        )
        with gr.Row():
            c["preview_selected"] = gr.Markdown(elem_id="train_tools_preview_selected")
            c["install_lora"] = gr.Button(
                "Install to Lora folder", variant="primary", elem_id="train_tools_install_lora"
            )
    c["grid_path"] = gr.State(None)
    c["preview_cell"] = gr.State(None)
    c["seen"] = gr.State(None)
    c["caption_target"] = gr.State(None)
    c.update({f"setting_{k}": v for k, v in settings.items()})

    setting_inputs = [settings[name] for name in SETTING_FIELDS]
    version_outputs = [
        *setting_inputs,
        c["gallery"],
        c["dataset_info"],
        c["results"],
        c["result_file"],
        c["family"],
        c["tags"],
        c["preview_grid"],
        c["grid_path"],
        c["preview_prompt"],
        c["preview_width"],
        c["preview_height"],
    ]
    dataset_outputs = [c["gallery"], c["dataset_info"], c["tags"]]
    pv = [c["project"], c["version"]]
    msg = c["message"]

    def wire(
        event: Callable[..., Any], fn: Callable[..., list[Any]], inputs: list[Any], outputs: list[Any], **kwargs: Any
    ) -> None:
        event(guarded(fn, outputs, msg), inputs=inputs, outputs=_with_message(outputs, msg), **kwargs)

    wire(c["refresh_projects"].click, logic.refresh_projects, [c["project"]], [c["project"]])
    wire(
        c["create_project"].click,
        logic.create_project,
        [c["new_project"]],
        [c["project"], c["version"], *version_outputs, msg],
    )
    wire(c["project"].input, logic.choose_project, [c["project"]], [c["version"], *version_outputs])
    wire(
        c["create_version"].click,
        logic.create_version,
        [c["project"], c["new_version"]],
        [c["version"], *version_outputs, msg],
    )
    wire(c["version"].input, logic.open_version, pv, version_outputs)
    wire(c["upload"].upload, logic.upload, [c["upload"], *pv], [c["upload"], c["gallery"], c["dataset_info"], msg])
    wire(
        c["upload_reg"].upload,
        logic.upload_reg,
        [c["upload_reg"], *pv],
        [c["upload_reg"], c["gallery"], c["dataset_info"], msg],
    )
    if "demo_pictures" in c:
        wire(c["demo_pictures"].click, logic.add_demo_pictures, pv, [c["gallery"], c["dataset_info"], msg])
    wire(
        c["update_dataset"].click, with_progress(logic.update_dataset), [*pv, *setting_inputs], [*dataset_outputs, msg]
    )

    def select_picture(project: str | None, version: str | None, evt: gr.SelectData) -> list[Any]:
        # Gradio fills ``evt`` from the type hint; it carries the clicked picture's index.
        return logic.select_picture(project, version, getattr(evt, "index", None))

    wire(c["gallery"].select, select_picture, pv, [c["caption_target"], c["caption"]])
    wire(c["save_caption"].click, logic.save_caption, [*pv, c["caption_target"], c["caption"]], [*dataset_outputs, msg])
    wire(c["remove_tag"].click, logic.remove_tag, [*pv, c["tag"]], [*dataset_outputs, msg])
    wire(c["rename_tag"].click, logic.rename_tag, [*pv, c["tag"], c["tag_new"]], [*dataset_outputs, msg])
    model_settings = [settings[name] for name in MODEL_FIELDS]
    wire(
        settings["base_model"].input,
        logic.choose_base_model,
        [*pv, settings["base_model"], *model_settings],
        [c["family"], *model_settings, msg],
    )
    network_settings = [settings[name] for name in NETWORK_FIELDS]
    wire(
        settings["network_type"].input, logic.choose_network_type, [settings["network_type"]], [*network_settings, msg]
    )
    wire(c["resume"].click, logic.resume_train, pv, [msg, c["progress"]])
    preview_inputs = [
        c[f"preview_{k}"]
        for k in ("prompt", "negative", "seed", "steps", "cfg", "sampler", "width", "height", "weights")
    ]
    wire(
        c["generate_previews"].click,
        logic.generate_previews,
        [*pv, c["result_file"], *preview_inputs],
        [msg, c["progress"]],
    )

    def select_cell(grid_path: str | None, evt: gr.SelectData) -> list[Any]:
        return logic.select_cell(grid_path, getattr(evt, "index", None))

    wire(c["preview_grid"].select, select_cell, [c["grid_path"]], [c["preview_cell"], c["preview_selected"]])
    wire(c["install_lora"].click, logic.install_cell, [*pv, c["preview_cell"]], [msg])
    wire(c["result_file"].change, logic.show_grid, [*pv, c["result_file"]], [c["preview_grid"], c["grid_path"]])
    wire(c["refresh_models"].click, logic.refresh_checkpoints, [settings["base_model"]], [settings["base_model"]])
    wire(c["save_settings"].click, logic.save_settings, [*pv, *setting_inputs], [msg])
    wire(c["apply_preset"].click, logic.apply_preset, [c["preset"], *setting_inputs], [*setting_inputs, msg])
    wire(c["save_preset"].click, logic.save_preset, [c["preset_name"], *setting_inputs], [c["preset"], msg])
    wire(c["begin"].click, logic.begin_train, [*pv, *setting_inputs], [msg, c["progress"], settings["base_model"]])
    wire(c["interrupt"].click, logic.interrupt, [], [msg])
    wire(c["refresh_results"].click, logic.refresh_results, pv, [c["results"], c["result_file"]])
    wire(c["result_file"].change, logic.choose_result, [*pv, c["result_file"]], [c["download"]])
    wire(c["copy_lora"].click, logic.copy_to_lora, [*pv, c["result_file"]], [msg])

    on_page_load(
        root,
        guarded(logic.load_page, [*pv, *version_outputs, c["progress"]], msg),
        _with_message([*pv, *version_outputs, c["progress"]], msg),
    )
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
