"""The tab without a browser: it builds, every event handler runs and returns what its outputs expect, and
the behaviour behind each button (projects, versions, settings, uploads, training job, results, Lora copy).

Runs under every Gradio a host pins (3.41.2, 4.40.0) and the standalone's own; nothing here needs torch.
"""

from __future__ import annotations

import inspect
import json
import struct
import time
import types
from pathlib import Path
from typing import Any

import gradio as gr
import pytest

import train_tools.ui.gradio_compat as gradio_compat
import train_tools.ui.html as ui_html
import train_tools.ui.layout as ui_layout
import train_tools.ui.logic as ui_logic
import train_tools.ui.results_logic as ui_results_logic
import train_tools.ui.uploads as ui_uploads
import train_tools.ui.views as ui_views
from train_tools.config import TrainConfig, fields_info
from train_tools.errors import UserError
from train_tools.hosts.base import DEMO_CHOICE, DEMO_FILE_NAME, StandaloneHost
from train_tools.progress import StepInfo
from train_tools.ui.jobs import FAILED, FINISHED, INTERRUPTED, OOM_ADVICE, JobManager


@pytest.fixture()
def host(tmp_path: Path) -> StandaloneHost:
    return StandaloneHost(tmp_path / "data")


@pytest.fixture()
def logic(host: StandaloneHost) -> ui_logic.TabLogic:
    return ui_logic.TabLogic(host, JobManager())


def values_of(config: TrainConfig) -> list[Any]:
    return [getattr(config, name) for name in ui_views.SETTING_FIELDS]


def is_update(value: Any) -> bool:
    # gr.update() is a dict tagged "update" (Gradio 4+) or "generic_update" (Gradio 3).
    return isinstance(value, dict) and value.get("__type__") in ("update", "generic_update")


def update_value(update: Any) -> Any:
    return update["value"] if is_update(update) else update


def fake_lora(path: Path, metadata: dict[str, str], payload: bytes = b"\0" * 8) -> Path:
    """A minimal valid .safetensors file (one tensor), written without torch."""
    header = {"__metadata__": metadata, "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, len(payload)]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + payload)
    return path


def make_version(logic: ui_logic.TabLogic, project: str = "猫 cat", version: str = "v1"):
    logic.create_project(project)
    logic.create_version(project, version)
    return logic.store.version(project, version)


# ---------------------------------------------------------------------- building and wiring


def _functions(blocks: gr.Blocks) -> list[Any]:
    fns = blocks.fns
    return list(fns.values()) if isinstance(fns, dict) else list(fns)


def test_tab_builds_with_every_setting_common_first_and_unique_ids(host):
    tab = ui_layout.build_tab(host, JobManager())
    comps = tab.train_tools.components
    for f in fields_info():
        assert f"setting_{f.name}" in comps, f.name
        assert comps[f"setting_{f.name}"].elem_id == f"train_tools_{f.name}"
    ids = [b.elem_id for b in tab.blocks.values() if getattr(b, "elem_id", None)]
    assert len(ids) == len(set(ids)) and all(i.startswith("train_tools_") for i in ids)
    # Every advanced setting sits inside the "Advanced" accordion, every common one outside it.
    advanced = next(b for b in tab.blocks.values() if getattr(b, "elem_id", None) == "train_tools_advanced")

    def inside(block: Any, parent: Any) -> bool:
        while block is not None:
            if block is parent:
                return True
            block = getattr(block, "parent", None)
        return False

    for f in fields_info():
        assert inside(comps[f"setting_{f.name}"], advanced) == f.metadata["advanced"], f.name
    assert comps["setting_epochs"].value == 20 and comps["setting_optimizer"].value == "Lion"
    assert "demo_pictures" in comps  # the standalone offers the demo


@pytest.mark.filterwarnings("ignore:The value passed into gr.Dropdown")  # updates carry their new choices
def test_every_event_handler_runs_and_answers_each_output(host, logic, monkeypatch, tmp_path):
    """Call each wired function with its inputs' current values, as Gradio would, and post-process the answer
    with the output components: catches arity and value-type mistakes under each Gradio version.

    The dataset and training code is replaced by stand-ins here: this test is about the wiring."""
    version = make_version(logic, "p", "v1")
    logic.remember("p", "v1")
    fake_lora(version.trains_dir / "run1" / "p-v1.safetensors", {"ss_epoch": "1"})
    (version.originals_dir / "a.png").write_bytes(b"x")
    (host.ckpt_dirs[0]).mkdir(parents=True)
    (host.ckpt_dirs[0] / "mine.safetensors").write_bytes(b"x")
    upload = tmp_path / "up.png"
    upload.write_bytes(b"x")
    monkeypatch.setattr(ui_logic, "core_add_originals", lambda paths, v: f"added {len(paths)}")
    monkeypatch.setattr(ui_logic, "core_add_reg", lambda paths, v: f"added {len(paths)} class pictures")
    monkeypatch.setattr(ui_logic, "core_prepare", lambda v, config, host=None, task=None: "")
    monkeypatch.setattr(ui_logic, "core_demo_pictures", lambda v: 12)
    monkeypatch.setattr(ui_logic, "training_work", lambda *a: fake_work())
    monkeypatch.setattr(ui_results_logic, "preview_work", lambda *a: fake_work())
    import train_tools.previews.grid_info
    import train_tools.training.resume
    import train_tools.ui.jobs

    monkeypatch.setattr(train_tools.training.resume, "run_is_finished", lambda run: False)
    monkeypatch.setattr(train_tools.ui.jobs, "resume_work", lambda *a, **k: fake_work())
    cell = types.SimpleNamespace(has_lora=True, file=version.trains_dir / "run1" / "p-v1.safetensors", weight=0.8)
    grid = types.SimpleNamespace(cell=lambda row, col: cell, cell_at=lambda x, y: cell)
    monkeypatch.setattr(train_tools.previews.grid_info, "grid_info_for", lambda path: grid)
    monkeypatch.setattr(train_tools.previews.grid_info, "install_cell", lambda c, lora_dir, **k: lora_dir / c.file.name)
    tab = ui_layout.build_tab(host, logic.jobs)
    comps = tab.train_tools.components
    grid_png = str(version.trains_dir / "run1" / "previews" / "grid-1.png")  # a grid of the version's run
    # Values a user would have on the page.
    current = {
        id(comps["project"]): "p",
        id(comps["version"]): "v1",
        id(comps["new_project"]): "q",
        id(comps["new_version"]): "v2",
        id(comps["result_file"]): "run1/p-v1.safetensors",
        id(comps["upload"]): [str(upload)],
        id(comps["upload_reg"]): [str(upload)],
        id(comps["setting_base_model"]): "mine.safetensors",
        id(comps["caption_target"]): str(version.originals_dir / "a.png"),
        id(comps["caption"]): "a  red\nball",
        id(comps["tag"]): "red",
        id(comps["tag_new"]): "blue",
        id(comps["grid_path"]): grid_png,
        id(comps["preview_cell"]): {"grid": grid_png, "row": 0, "col": 1},
        id(comps["preset"]): "SD1.5 character",
        id(comps["preset_name"]): "my preset",
    }
    functions = _functions(tab)
    assert len(functions) >= 15
    for fn in functions:
        args = [current.get(id(c), getattr(c, "value", None)) for c in fn.inputs]
        if "evt" in inspect.signature(fn.fn).parameters:  # a select event: Gradio adds the event data
            args.append(types.SimpleNamespace(index=0))
        for i, param in enumerate(inspect.signature(fn.fn).parameters.values()):
            if isinstance(param.default, gr.Progress):  # Gradio puts its progress bar at that place
                args.insert(i, lambda *a, **k: None)
        out = fn.fn(*args)
        if inspect.isgenerator(out):  # Gradio 3 wraps an ``every=`` event in an endless generator
            out = next(out)
        out = list(out) if isinstance(out, (list, tuple)) else [out]
        assert len(out) == len(fn.outputs), fn.name
        for comp, value in zip(fn.outputs, out, strict=False):
            if isinstance(comp, gr.State):
                continue
            if is_update(value):
                if "value" not in value:
                    continue
                value = value["value"]
            comp.postprocess(value)
        # No event may answer with an error for ordinary input.
        assert not any(isinstance(v, str) and "tt-error" in v for v in out), (fn.name, out)
        logic.jobs.wait(10)
    assert (version.originals_dir / "a.txt").read_text(encoding="utf-8") == "a red ball\n"


def test_polling_uses_the_gradio_version_mechanism(host):
    tab = ui_layout.build_tab(host, JobManager())
    has_timer = any(type(b).__name__ == "Timer" for b in tab.blocks.values())
    assert has_timer == hasattr(gr, "Timer")
    names = [fn.name for fn in _functions(tab)]
    assert "load_page" in names
    if hasattr(gr, "Timer"):
        assert "poll" in names
    else:  # Gradio 3: a page-load event repeated every second
        assert [d.get("every") for d in tab.dependencies if d["trigger"] == "load"] == [None, ui_layout.POLL_SECONDS]


# ---------------------------------------------------------------------- projects, versions, settings


def test_create_project_and_version_and_reopen_after_reload(logic):
    out = logic.create_project("猫 cat")
    assert out[0]["value"] == "猫 cat" and "猫 cat" in out[0]["choices"]
    assert "tt-ok" in out[-1]
    out = logic.create_version("猫 cat", "v1")
    assert out[0]["value"] == "v1"
    values = [f"x{i}" for i in range(len(ui_views.SETTING_FIELDS))]
    # version, every setting, gallery/line/results/file, family/tags/grid/grid path/prompt/width/height, message
    assert len(out) == 1 + len(values) + 4 + 7 + 1

    changed = TrainConfig(epochs=3, resolution=256, network_dim=8, optimizer="AdamW", flip_aug=True)
    assert "saved" in logic.save_settings("猫 cat", "v1", *values_of(changed))[0]
    # A new TabLogic is what a page reload (or a restart) sees: it reopens the last version with its settings.
    again = ui_logic.TabLogic(logic.host, logic.jobs).load_page()
    assert again[0]["value"] == "猫 cat" and again[1]["value"] == "v1"
    settings = {name: update_value(v) for name, v in zip(ui_views.SETTING_FIELDS, again[2:], strict=False)}
    assert (settings["epochs"], settings["resolution"], settings["network_dim"]) == (3, 256, 8)
    assert settings["optimizer"] == "AdamW" and settings["flip_aug"] is True


def test_bad_names_and_bad_settings_become_messages(host, logic):
    tab = ui_layout.build_tab(host, logic.jobs)
    fn = next(f for f in _functions(tab) if f.name == "create_project")
    out = fn.fn("a/b")
    assert "tt-error" in out[-1] and "cannot be used" in out[-1]
    assert all(is_update(o) for o in out[:-1])
    make_version(logic, "p")
    values = values_of(TrainConfig())
    values[ui_views.SETTING_FIELDS.index("epochs")] = 0
    save = next(f for f in _functions(tab) if f.name == "save_settings")
    assert "at least 1" in save.fn("p", "v1", *values)[-1]
    begin = next(f for f in _functions(tab) if f.name == "begin_train")
    assert "Create or choose a project" in begin.fn(None, None, *values_of(TrainConfig()))[0]


def test_settings_values_round_trip_through_the_controls():
    config = TrainConfig(epochs=7, learning_rate=5e-5, output_name="", base_model="a.safetensors")
    values = values_of(config)
    values[ui_views.SETTING_FIELDS.index("output_name")] = None  # an emptied textbox
    values[ui_views.SETTING_FIELDS.index("epochs")] = 7.0  # Number components may hand floats back
    assert ui_views.settings_from_values(values) == config


# ---------------------------------------------------------------------- dataset


def test_uploaded_files_from_each_gradio_and_staged_under_their_own_names(tmp_path):
    a = tmp_path / "tmpab12cat.png"
    a.write_bytes(b"png")
    b = tmp_path / "dog.txt"
    b.write_text("a dog")
    gradio3 = types.SimpleNamespace(name=str(a), orig_name="cat.png")
    got = ui_uploads.uploaded_files([gradio3, str(b), {"path": str(b), "orig_name": "other.txt"}, None])
    assert got == [(a, "cat.png"), (b, "dog.txt"), (b, "other.txt")]
    staged = ui_uploads.stage_with_original_names(got, tmp_path / "stage")
    assert [p.name for p in staged] == ["cat.png", "dog.txt", "other.txt"]
    assert staged[0].read_bytes() == b"png" and staged[1] == b  # only renamed files are copied
    assert ui_uploads.uploaded_files(None) == []


def test_dataset_view_before_preparing_shows_originals_with_their_captions(logic):
    version = make_version(logic)
    gallery, line = ui_views.dataset_view(version, TrainConfig())
    assert gallery == [] and "No pictures" in line
    (version.originals_dir / "b.png").write_bytes(b"x")
    (version.originals_dir / "a.jpg").write_bytes(b"x")
    (version.originals_dir / "a.txt").write_text("a cat, sitting")
    gallery, line = ui_views.dataset_view(version, TrainConfig())
    assert [Path(p).name for p, _ in gallery] == ["a.jpg", "b.png"]
    assert gallery[0][1] == "a cat, sitting"
    assert line.startswith("2 pictures uploaded")


def test_dataset_view_after_preparing_counts_repeats_and_steps(logic, monkeypatch):
    version = make_version(logic)
    items = [
        types.SimpleNamespace(image=version.prepared_dir / f"{i}.png", caption=f"c{i}", mask=None) for i in range(10)
    ]
    for item in items:
        item.image.write_bytes(b"x")
    monkeypatch.setattr(ui_views, "core_items", lambda v: items)
    monkeypatch.setattr(ui_views, "core_auto_repeats", lambda n: 512 // n)
    gallery, line = ui_views.dataset_view(version, TrainConfig(batch_size=2, epochs=3))
    assert len(gallery) == 10 and gallery[3][1] == "c3"
    assert line.startswith("10 images, 51 repeats, 255 steps per epoch (765 steps for 3 epochs)")
    gallery, line = ui_views.dataset_view(version, TrainConfig(repeats=4, batch_size=3, epochs=1))
    assert "4 repeats, 14 steps per epoch" in line


def test_upload_and_update_dataset_with_the_real_dataset_code(logic, tmp_path):
    from PIL import Image

    version = make_version(logic)
    files = []
    for i in range(3):
        path = tmp_path / "in" / f"pic{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", (96, 64), (40 * i, 100, 200)).save(path)
        files.append(str(path))
    (tmp_path / "in" / "pic1.txt").write_text("my caption")
    files.append(str(tmp_path / "in" / "pic1.txt"))
    cleared, gallery, line, message = logic.upload(files, "猫 cat", "v1")
    assert cleared is None and "tt-ok" in message
    assert len(ui_views.original_images(version)) == 3
    config = TrainConfig(resolution=64, min_bucket_reso=64, max_bucket_reso=128)
    heard: list[tuple[str, int, int]] = []
    gallery, line, tags, message = logic.update_dataset(
        "猫 cat", "v1", *values_of(config), progress=lambda *a: heard.append(a)
    )
    assert line.startswith("3 images"), line
    # The uploaded caption is used, after the trigger word (the project's name when none is set).
    assert any(caption == "猫 cat, my caption" for _, caption in gallery), gallery
    # The progress bar heard each picture (no captioner: nothing to download).
    assert heard == [("Preparing pictures", i, 3, "") for i in (1, 2, 3)]


def test_progress_bar_only_where_the_page_still_launches_without_a_queue(host):
    """Update Dataset draws a progress bar in Gradio 4+ (always queued); in Gradio 3 a bar would stop the WebUI
    from starting with --no-gradio-queue, so there is none."""
    tab = ui_layout.build_tab(host, JobManager())
    tracking = [fn for fn in _functions(tab) if getattr(fn, "tracks_progress", False)]
    if gradio_compat.gradio_major() >= 4:
        assert [getattr(fn, "name", "") for fn in tracking] == ["update_dataset"]
    else:
        assert tracking == []
        tab.enable_queue = False  # what A1111 does with --no-gradio-queue
        tab.validate_queue_settings()


# ---------------------------------------------------------------------- training job, progress, results


def fake_work(steps: int = 4, sleep: float = 0.0, fail: Exception | None = None, save_to: Path | None = None):
    def work(reporter, stop):
        reporter.start(steps, 2)
        for i in range(1, steps + 1):
            reporter.step(StepInfo(i, steps, 1 + (i > steps // 2), 2, 1.0 / i, 1.0 / i, 1e-4, 4.0, (steps - i) / 4))
            if fail is not None and i == 2:
                raise fail
            time.sleep(sleep)
            if stop.requested:
                return [types.SimpleNamespace(interrupted=True)]
        if save_to is not None:
            reporter.saved(fake_lora(save_to, {"ss_epoch": "2", "ss_steps": str(steps)}), 2)
        return [types.SimpleNamespace(interrupted=False)]

    return work


def test_begin_train_with_the_demo_model_saves_settings_and_runs_the_job(logic, monkeypatch):
    version = make_version(logic)
    (version.originals_dir / "a.png").write_bytes(b"x")
    assert logic.host.list_checkpoints() == [DEMO_CHOICE]

    def build_demo(self=logic.host):
        self.demo_checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        self.demo_checkpoint_path.write_bytes(b"demo")
        return self.demo_checkpoint_path

    monkeypatch.setattr(logic.host, "build_demo_checkpoint", build_demo)
    started = {}

    def fake_training_work(v, configs, checkpoint, device, host=None):
        started.update(version=v, checkpoint=checkpoint, configs=configs)
        return fake_work(save_to=v.trains_dir / "run1" / "猫 cat-v1.safetensors")

    monkeypatch.setattr(ui_logic, "training_work", fake_training_work)
    config = TrainConfig(base_model=DEMO_CHOICE, epochs=2, resolution=128, network_dim=4)
    message, progress, models = logic.begin_train("猫 cat", "v1", *values_of(config))
    assert "started" in message and "tt-progress" in progress
    assert logic.jobs.wait(10).state == FINISHED
    assert started["checkpoint"] == logic.host.demo_checkpoint_path
    saved = version.load_settings()
    assert (saved.base_model, saved.epochs, saved.network_dim) == (DEMO_FILE_NAME, 2, 4)
    # Now the demo model is an ordinary checkpoint in the list, and it is the chosen one.
    assert models["value"] == DEMO_FILE_NAME and logic.host.list_checkpoints() == [DEMO_FILE_NAME]

    progress, results, choices, grid, grid_path, seen = logic.poll("猫 cat", "v1", None, None)
    assert 'data-state="finished"' in progress and "step 4/4" in progress and "<svg" in progress
    assert "猫 cat-v1.safetensors" in results and choices["choices"] == ["run1/猫 cat-v1.safetensors"]
    # Nothing changed: the next poll leaves the page alone.
    again = logic.poll("猫 cat", "v1", choices["value"], seen)
    assert all(is_update(o) and len(o) == 1 for o in again[:5]) and again[5] == seen


def test_second_start_is_refused_and_interrupt_stops_after_the_step(logic, monkeypatch):
    version = make_version(logic)
    (version.originals_dir / "a.png").write_bytes(b"x")
    ckpt = logic.host.ckpt_dirs[0] / "mine.safetensors"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x")
    monkeypatch.setattr(ui_logic, "training_work", lambda *a: fake_work(steps=500, sleep=0.01))
    values = values_of(TrainConfig(base_model="mine.safetensors"))
    logic.begin_train("猫 cat", "v1", *values)
    with pytest.raises(Exception, match="already running"):
        logic.begin_train("猫 cat", "v1", *values)
    deadline = time.time() + 5
    while logic.jobs.status().step < 2 and time.time() < deadline:
        time.sleep(0.01)
    assert "Stopping" in logic.interrupt()[0]
    status = logic.jobs.wait(10)
    assert status.state == INTERRUPTED and status.step < 500
    assert 'data-state="interrupted"' in ui_html.progress_html(status)
    assert "Nothing is training" in logic.interrupt()[0]


def test_failures_reach_the_page_with_advice(tmp_path):
    jobs = JobManager()
    jobs.start(fake_work(fail=RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")))
    status = jobs.wait(10)
    assert status.state == FAILED and status.message == OOM_ADVICE
    jobs.start(fake_work(fail=ValueError("boom")))
    status = jobs.wait(10)
    assert status.state == FAILED and "ValueError: boom" in status.message
    html = ui_html.progress_html(status)
    assert "tt-error" in html and "boom" in html


def test_begin_train_without_pictures_or_model_says_what_to_do(logic):
    make_version(logic)
    values = values_of(TrainConfig(base_model=""))
    with pytest.raises(Exception, match="Train base model"):
        logic.begin_train("猫 cat", "v1", *values)
    values = values_of(TrainConfig(base_model=DEMO_CHOICE))
    with pytest.raises(Exception, match="no pictures"):
        logic.begin_train("猫 cat", "v1", *values)


def test_results_list_and_copy_to_lora_folder(logic):
    version = make_version(logic)
    old = fake_lora(version.trains_dir / "20240101-000000" / "猫 cat-v1.safetensors", {"ss_epoch": "2"})
    new = fake_lora(
        version.trains_dir / "20240102-000000" / "猫 cat-v1-000002.safetensors",
        {"ss_epoch": "2", "ss_steps": "96"},
        payload=b"\1" * 8,
    )
    (new.parent / "猫 cat-v1-000002.png").write_bytes(b"preview")
    files = ui_views.list_results(version)
    assert [f.path for f in files] == [new, old]  # newest run first
    assert (files[0].epoch, files[0].steps, files[0].size) == ("2", "96", new.stat().st_size)
    html = ui_html.results_html(files)
    assert "&lt;lora:猫 cat-v1-000002:0.8&gt;" in html and "20240101-000000" in html

    (message,) = logic.copy_to_lora("猫 cat", "v1", files[0].choice)
    copied = logic.host.lora_dir / new.name
    assert copied.read_bytes() == new.read_bytes() and "tt-ok" in message
    assert (logic.host.lora_dir / "猫 cat-v1-000002.png").read_bytes() == b"preview"
    assert logic.choose_result("猫 cat", "v1", files[1].choice) == [str(old.resolve())]
    for bad in ("../settings.json", "../../../../../../etc/passwd", ""):
        with pytest.raises(UserError):
            logic.copy_to_lora("猫 cat", "v1", bad)
        assert logic.choose_result("猫 cat", "v1", bad) == [None]


def test_progress_html_and_chart_follow_the_numbers():
    jobs = JobManager()
    jobs.start(fake_work(steps=1000))
    status = jobs.wait(10)
    html = ui_html.progress_html(status)
    assert 'data-step="1000"' in html and 'data-total="1000"' in html and "epoch 2/2" in html
    svg = ui_html.loss_chart_svg(status.losses)
    raw = svg.split('class="tt-raw"')[1].split('points="')[1].split('"')[0]
    assert len(raw.split()) <= ui_html.MAX_CHART_POINTS
    assert ui_html.loss_chart_svg([0.5]) == ""
    idle = ui_html.progress_html(JobManager().status())
    assert 'data-state="idle"' in idle


def test_the_bar_shows_preparing_before_the_first_step():
    """Begin Train on pictures not prepared yet: the bar follows the preparing, then the steps."""
    import threading

    preparing, training, go_on, finish = (threading.Event() for _ in range(4))

    def work(reporter, stop):
        reporter.task("Downloading the captioner (first use only)", 150_000_000, 300_000_000, "B")
        reporter.task("Preparing pictures", 3, 12)
        preparing.set()
        go_on.wait(10)
        reporter.start(4, 1)
        reporter.step(StepInfo(1, 4, 1, 1, 0.5, 0.5, 1e-4, 2.0, 3.0))
        training.set()
        finish.wait(10)
        return types.SimpleNamespace(interrupted=False)

    jobs = JobManager()
    jobs.start(work)
    assert preparing.wait(10)
    assert "before training begins" in jobs.stop()  # Interrupt now: the run would end at the next picture
    jobs.current.stop.clear()
    status = jobs.status()
    assert (status.task, status.task_done, status.task_total) == ("Preparing pictures", 3, 12)
    assert status.fraction == pytest.approx(0.25)
    html = ui_html.progress_html(status)
    assert "Preparing pictures 3/12" in html and "width:25.0%" in html
    go_on.set()
    assert training.wait(10)
    status = jobs.status()
    html = ui_html.progress_html(status)
    assert status.fraction == pytest.approx(0.25) and "step 1/4" in html and "Preparing" not in html
    finish.set()
    jobs.wait(10)
    rec = jobs.current.reporter
    assert rec.tasks == [
        ("Downloading the captioner (first use only)", 150_000_000, 300_000_000, "B"),
        ("Preparing pictures", 3, 12, ""),
    ]


# ---------------------------------------------------------------------- the standalone app and its command line


def test_bare_command_and_app_command_open_the_app_with_their_flags(tmp_path, monkeypatch):
    import train_tools.ui.app as app
    from train_tools.cli import main

    served: list[dict[str, Any]] = []

    def fake_serve(host, **kwargs):
        served.append({"host": host, **kwargs})

    monkeypatch.setattr(app, "serve", fake_serve)
    assert main(["--data-dir", str(tmp_path), "--port", "7999", "--lora-dir", str(tmp_path / "L"), "--no-browser"]) == 0
    assert main(["--data-dir", str(tmp_path), "--ckpt-dir", str(tmp_path / "c"), "app", "--listen", "0.0.0.0"]) == 0
    first, second = served
    assert (first["port"], first["listen"], first["open_browser"]) == (7999, "127.0.0.1", False)
    assert first["host"].lora_dir == (tmp_path / "L").resolve()
    assert first["host"].ckpt_dirs == [(tmp_path / "models" / "Stable-diffusion").resolve()]
    assert (second["port"], second["listen"], second["open_browser"]) == (7860, "0.0.0.0", True)
    assert second["host"].ckpt_dirs == [(tmp_path / "c").resolve()]
    assert second["host"].lora_dir == (tmp_path / "models" / "Lora").resolve()
    # Commands still go to the command line.
    assert main(["--data-dir", str(tmp_path), "project", "create", "x"]) == 0 and served == [first, second]


def test_create_app_brings_the_tab_css_and_js(tmp_path):
    from train_tools.ui.app import create_app

    demo, launch_kw = create_app(StandaloneHost(tmp_path))
    assert isinstance(demo, gr.Blocks) and demo.train_tools.logic.host.offer_demo
    css = launch_kw.get("css") or getattr(demo, "css", "") or ""
    assert "#tab_train_tools" in css
    head = launch_kw.get("head") or getattr(demo, "head", "") or ""
    if head:  # Gradio 3 has no head: the standalone needs only the current Gradio
        assert "function trainToolsCopyText" in head
    assert any(getattr(b, "elem_id", None) == "tab_train_tools" for b in demo.blocks.values())


def test_select_a_picture_and_edit_its_caption(logic, monkeypatch):
    version = make_version(logic)
    monkeypatch.setattr(ui_views, "core_items", lambda v: [])  # the gallery shows the originals here
    (version.originals_dir / "a.png").write_bytes(b"x")
    (version.originals_dir / "b.png").write_bytes(b"x")
    (version.originals_dir / "b.txt").write_text("old words", encoding="utf-8")
    target, caption = logic.select_picture("猫 cat", "v1", 1)
    assert Path(target).name == "b.png" and caption == "old words"
    assert logic.select_picture("猫 cat", "v1", 0)[1] == ""  # no caption yet: an empty box, not the file name
    assert logic.select_picture("猫 cat", "v1", 7) == [None, ""]
    gallery, _line, _tags, message = logic.save_caption("猫 cat", "v1", target, " new,  words ")
    assert (version.originals_dir / "b.txt").read_text(encoding="utf-8") == "new, words\n"
    assert gallery[1][1] == "new, words" and "saved" in message
    with pytest.raises(Exception, match="not in this version"):
        logic.save_caption("猫 cat", "v1", str(logic.host.data_dir / "x.png"), "no")
    with pytest.raises(Exception, match="Click a picture"):
        logic.save_caption("猫 cat", "v1", None, "no")


def test_caption_and_tag_edits_of_prepared_pictures_reach_training_and_survive_update(logic, tmp_path):
    """With the real dataset code: edit one caption, remove and rename tags from the tab; what the trainer
    reads (load_items) follows, the tag list follows, and Update Dataset keeps the edits."""
    from PIL import Image

    from train_tools.data.items import load_items

    version = make_version(logic)
    for i, caption in enumerate(["red, ball", "red, cube", "blue, ball"]):
        Image.new("RGB", (96, 64), (60 * i, 100, 200)).save(version.originals_dir / f"p{i}.png")
        (version.originals_dir / f"p{i}.txt").write_text(caption, encoding="utf-8")
    config = TrainConfig(resolution=64, min_bucket_reso=64, max_bucket_reso=128, trigger_word="tt")
    _gallery, _line, tags, _msg = logic.update_dataset("猫 cat", "v1", *values_of(config))
    assert 'data-tag="red"' in tags and ("red", "2") in tag_chips(tags)

    logic.save_caption("猫 cat", "v1", str(version.prepared_dir / "p1.png"), "tt,  red, shiny cube")
    _gallery, _line, tags, msg = logic.remove_tag("猫 cat", "v1", "ball")
    assert "from 2 captions" in msg and 'data-tag="ball"' not in tags
    logic.rename_tag("猫 cat", "v1", "red", "crimson")
    expected = ["tt, crimson", "tt, crimson, shiny cube", "tt, blue"]
    assert [item.caption for item in load_items(version.prepared_dir)] == expected
    logic.update_dataset("猫 cat", "v1", *values_of(config))  # prepare again: the edits stay
    assert [item.caption for item in load_items(version.prepared_dir)] == expected
    target, caption = logic.select_picture("猫 cat", "v1", 1)
    assert Path(target).name == "p1.png" and caption == "tt, crimson, shiny cube"
    # The originals' own captions are never changed by edits of the training set.
    assert (version.originals_dir / "p0.txt").read_text(encoding="utf-8") == "red, ball"


def test_after_a_second_training_the_file_choice_and_copy_to_lora_follow_the_new_run(logic, monkeypatch):
    """As the page does it: poll every second, feeding back the File choice and what was seen. The second
    run's first poll comes before it saved anything (its folder holds nothing yet); when it has saved, the
    File choice is its last-saved file, and Copy to Lora folder copies that one."""
    import threading

    version = make_version(logic)
    (version.originals_dir / "a.png").write_bytes(b"x")
    ckpt = logic.host.ckpt_dirs[0] / "mine.safetensors"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x")
    name = "猫 cat-v1"

    def saving_work(run: str, payload: bytes, gate: threading.Event | None = None):
        def work(reporter, stop):
            reporter.start(2, 2)
            if gate is not None:
                assert gate.wait(10)
            for epoch in (1, 2):  # the trainer's names: an epoch file, then the final file
                reporter.step(StepInfo(epoch, 2, epoch, 2, 0.5, 0.5, 1e-4, 4.0, 0.0))
                file = (
                    version.trains_dir
                    / run
                    / (f"{name}-{epoch:06d}.safetensors" if epoch == 1 else f"{name}.safetensors")
                )
                reporter.saved(
                    fake_lora(file, {"ss_epoch": str(epoch), "ss_steps": str(epoch)}, payload=payload * 8), epoch
                )
            return [types.SimpleNamespace(interrupted=False)]

        return work

    gate = threading.Event()
    works = [saving_work("20240101-000000", b"\1"), saving_work("20240102-000000", b"\2", gate)]
    monkeypatch.setattr(ui_logic, "training_work", lambda *a: works.pop(0))
    values = values_of(TrainConfig(base_model="mine.safetensors"))
    page = {"choice": None, "seen": None}

    def poll() -> str:
        _progress, results, choices, _grid, _grid_path, page["seen"] = logic.poll(
            "猫 cat", "v1", page["choice"], page["seen"]
        )
        if is_update(choices) and "value" in choices:
            assert choices["value"] in choices["choices"]
            page["choice"] = choices["value"]
        return results if isinstance(results, str) else ""

    logic.begin_train("猫 cat", "v1", *values)
    assert logic.jobs.wait(10).state == FINISHED
    poll()
    assert page["choice"] == f"20240101-000000/{name}.safetensors"  # the final file, not epoch 1

    logic.begin_train("猫 cat", "v1", *values)
    poll()  # running, nothing saved yet
    assert page["choice"] == f"20240101-000000/{name}.safetensors"
    gate.set()
    assert logic.jobs.wait(10).state == FINISHED
    results = poll()
    assert results.index("20240102-000000") < results.index("20240101-000000")  # the table: new run first
    assert page["choice"] == f"20240102-000000/{name}.safetensors"
    poll()
    assert page["choice"] == f"20240102-000000/{name}.safetensors"

    logic.copy_to_lora("猫 cat", "v1", page["choice"])
    assert (logic.host.lora_dir / f"{name}.safetensors").read_bytes() == (
        version.trains_dir / "20240102-000000" / f"{name}.safetensors"
    ).read_bytes()
    # Opening the version again, or the results refresh button, offers the same newest file first.
    assert update_value(logic.refresh_results("猫 cat", "v1")[1]) == page["choice"]
    view = logic.open_version("猫 cat", "v1")
    assert any(is_update(o) and o.get("value") == page["choice"] for o in view)


def tag_chips(markup: str) -> list[tuple[str, str]]:
    """(tag, count) of each chip of ``tags_html``, read from their own elements."""
    from html.parser import HTMLParser

    chips: list[tuple[str, str]] = []

    class Reader(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.field: str | None = None
            self.name = ""

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            cls = dict(attrs).get("class") or ""
            self.field = "name" if "tt-tag-name" in cls else "count" if "tt-count" in cls else None

        def handle_data(self, data: str) -> None:
            if self.field == "name":
                self.name = data
            elif self.field == "count":
                chips.append((self.name, data))
            self.field = None

    Reader().feed(markup)
    return chips


def test_the_tag_list_shows_each_tag_and_its_count_apart_with_or_without_the_stylesheet():
    """Seen in A1111 1.10 and the standalone app: 'simple shapes 12my cat 12square picture 6'. Each tag is
    a list item of its own with its count in a separate badge, laid out by inline styles (which reach the
    chips in every host) and by style.css."""
    import re

    counts = [("simple shapes", 12), ("my cat", 12), ("square picture", 6), ("<b>bold</b> & co", 1)]
    markup = ui_html.tags_html(counts)
    assert tag_chips(markup) == [
        ("simple shapes", "12"),
        ("my cat", "12"),
        ("square picture", "6"),
        ("<b>bold</b> & co", "1"),
    ]  # shown as text, not as markup
    assert "<b>bold</b>" not in markup and "4 tags" in markup
    items = re.findall(r"<li class=\"tt-tag\"[^>]*>", markup)
    assert len(items) == 4
    for item in items:  # a chip apart from the next one even where no stylesheet applies
        style = re.search(r'style="([^"]*)"', item).group(1)
        assert "display:inline-flex" in style and "border:" in style and "padding:" in style
    list_style = re.search(r'<ul class="tt-tag-list" style="([^"]*)"', markup).group(1)
    assert "display:flex" in list_style and "gap:" in list_style and "list-style:none" in list_style
    css = (Path(__file__).resolve().parent.parent / "style.css").read_text(encoding="utf-8")
    assert "#tab_train_tools ul.tt-tag-list" in css and "li.tt-tag" in css
    long = ui_html.tags_html([(f"tag{i}", 1) for i in range(85)], limit=80)
    assert len(tag_chips(long)) == 80 and "and 5 more" in long
    assert "No tags yet" in ui_html.tags_html([])


def test_picking_a_network_type_sets_its_suggested_dims(logic):
    """The tab's Network type sets the dims LyCORIS' guidelines suggest for it; LoRA brings the tab's back."""
    from train_tools.ui.views import NETWORK_FIELDS

    def values(kind: str) -> dict[str, object]:
        *updates, note = logic.choose_network_type(kind)
        assert kind in note
        return {name: u["value"] for name, u in zip(NETWORK_FIELDS, updates, strict=True)}

    loha = values("loha")
    assert loha["network_dim"] == 16 and loha["conv_dim"] == 8
    assert values("lokr")["lokr_factor"] == 8
    lora = values("lora")
    assert lora["network_dim"] == TrainConfig().network_dim and lora["conv_dim"] == 0
    TrainConfig().updated({**loha, "network_type": "loha"})  # the values are valid settings
