"""The WebUI glue against a stand-in for the WebUI's ``modules`` (tests/fake_webui): tab, settings, paths,
checkpoints, GPU queue, model unloading, progress and interrupt."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from tests import stand_ins
from tests.stand_ins import FAKE_WEBUI
from train_tools.errors import UserError
from train_tools.progress import StepInfo, StopFlag
from train_tools.ui.jobs import FINISHED, INTERRUPTED, JobManager

ROOT = Path(__file__).resolve().parent.parent


webui = stand_ins.webui


def load_glue() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("train_tools_tab_under_test", ROOT / "scripts" / "train_tools_tab.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def test_importing_the_script_is_light_and_registers_tab_and_settings(tmp_path: Path):
    # A fresh interpreter, as at WebUI start: the script must not pull in torch, diffusers or gradio.
    code = (
        "import sys, importlib.util\n"
        f"sys.path.insert(0, {str(FAKE_WEBUI)!r})\n"
        f"spec = importlib.util.spec_from_file_location('glue', {str(ROOT / 'scripts' / 'train_tools_tab.py')!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "from modules import script_callbacks as sc\n"
        "heavy = [n for n in ('torch', 'diffusers', 'transformers', 'gradio') if n in sys.modules]\n"
        "print(len(sc.ui_tabs_callbacks), len(sc.ui_settings_callbacks), heavy)\n"
    )
    env = {**os.environ, "FAKE_WEBUI_DATA": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1 1 []"


def test_on_ui_tabs_builds_the_tab_with_the_webui_checkpoints(webui):
    import gradio as gr

    load_glue()
    (tabs_cb,) = webui.script_callbacks.ui_tabs_callbacks
    ((blocks, title, elem_id),) = tabs_cb()
    assert isinstance(blocks, gr.Blocks)
    assert (title, elem_id) == ("Train Tools", "train_tools")
    handles = blocks.train_tools
    assert handles.logic.host.name == "WebUI"
    base = handles.components["setting_base_model"]
    titles = set(webui.sd_models.checkpoints_list)
    assert {c if isinstance(c, str) else c[0] for c in base.choices} == titles
    # The WebUI is no demo: no demo button.
    assert "demo_pictures" not in handles.components


def test_on_ui_settings_adds_options_in_a_train_tools_section(webui):
    load_glue()
    (settings_cb,) = webui.script_callbacks.ui_settings_callbacks
    settings_cb()
    labels = webui.shared.opts.data_labels
    ours = {k: v for k, v in labels.items() if k.startswith("train_tools_")}
    assert len(ours) >= 1
    assert all(v.section[0] == "train_tools" for v in ours.values())
    assert webui.shared.opts.train_tools_unload_model is True


def test_paths_come_from_the_webui_and_its_flags(webui, tmp_path):
    from train_tools.hosts.webui import WebuiHost

    host = WebuiHost()
    assert host.data_dir == webui.data.resolve()
    assert host.ckpt_dirs == [webui.sd_dir.resolve()]
    assert host.lora_dir == (webui.data / "models" / "Lora").resolve()

    webui.shared.cmd_opts.ckpt_dir = str(tmp_path / "ckpts")
    webui.shared.cmd_opts.lora_dir = str(tmp_path / "loras")
    try:
        host = WebuiHost()
        assert host.ckpt_dirs[0] == (tmp_path / "ckpts").resolve()
        assert host.lora_dir == (tmp_path / "loras").resolve()
    finally:
        webui.shared.cmd_opts.ckpt_dir = None
        webui.shared.cmd_opts.lora_dir = None


def test_checkpoints_listed_refreshed_and_resolved(webui):
    from train_tools.hosts.webui import WebuiHost

    host = WebuiHost()
    titles = host.list_checkpoints()
    assert len(titles) == 2 and all(" [" in t for t in titles)
    toon = next(t for t in titles if "toon" in t)
    assert host.resolve_checkpoint(toon) == webui.sd_dir / "anime" / "toon.safetensors"
    # Forge lists names without the hash: resolved through get_closet_checkpoint_match.
    assert host.resolve_checkpoint("real.safetensors") == webui.sd_dir / "real.safetensors"
    (webui.sd_dir / "new.safetensors").write_bytes(b"z")
    assert len(host.list_checkpoints()) == 2
    assert any("new.safetensors" in t for t in host.refresh_checkpoints())
    with pytest.raises(UserError, match="refresh"):
        host.resolve_checkpoint("gone.safetensors [0123456789]")


def _fake_work(calls: list[str], webui, steps: int = 3, sleep: float = 0.0):
    def work(reporter, stop):
        calls.append(f"work locked={webui.call_queue.queue_lock.locked()} model={webui.sd_models.calls[-1:]}")
        reporter.start(steps, 1)
        for i in range(1, steps + 1):
            reporter.step(StepInfo(i, steps, 1, 1, 0.5, 0.5, 1e-4, 2.0, float(steps - i)))
            time.sleep(sleep)
            if stop.requested:
                return types.SimpleNamespace(interrupted=True)
        return types.SimpleNamespace(interrupted=False)

    return work


def test_training_runs_in_the_gpu_queue_with_the_model_moved_off_and_back(webui):
    from train_tools.hosts.webui import WebuiHost

    webui.sd_models.model_data.sd_model = types.SimpleNamespace(device="cuda")
    webui.sd_models.calls.clear()
    host = WebuiHost()
    jobs = JobManager()
    calls: list[str] = []
    jobs.start(
        _fake_work(calls, webui),
        label="t",
        wrap=host.run_on_gpu,
        before=host.before_training,
        after=host.after_training,
        extra_reporter=host.progress_sink,
    )
    status = jobs.wait(10)
    assert status.state == FINISHED, status.message
    assert calls == ["work locked=True model=['unload']"]
    assert webui.sd_models.calls == ["unload", "reload"]
    assert webui.sd_models.model_data.sd_model.device == "cuda"
    assert webui.call_queue.tasks[-1].startswith("task(train_tools_")
    state = webui.shared.state
    assert (state.sampling_step, state.sampling_steps) == (3, 3)
    assert "step 3/3" in state.textinfo
    assert host.device() == "cpu"  # the WebUI's device
    # Preparing before training moves the WebUI's bar too.
    sink = host.progress_sink(StopFlag())
    sink.task("Downloading the captioner (first use only)", 2_500_000, 10_000_000, "B")
    assert (state.sampling_step, state.sampling_steps) == (2_500_000, 10_000_000)
    assert state.textinfo == "Downloading the captioner (first use only) 2.5/10.0 MB"


def test_no_model_loaded_means_nothing_is_unloaded_or_loaded(webui):
    from train_tools.hosts.webui import WebuiHost

    webui.sd_models.model_data.sd_model = None
    webui.sd_models.calls.clear()
    host = WebuiHost()
    host.before_training()
    host.after_training()
    assert webui.sd_models.calls == []


def test_the_webui_interrupt_button_stops_training(webui):
    from train_tools.hosts.webui import WebuiHost

    host = WebuiHost()
    jobs = JobManager()
    calls: list[str] = []
    jobs.start(
        _fake_work(calls, webui, steps=200, sleep=0.01),
        label="t",
        wrap=host.run_on_gpu,
        extra_reporter=host.progress_sink,
    )
    deadline = time.time() + 5
    while jobs.status().step < 2 and time.time() < deadline:
        time.sleep(0.01)
    webui.shared.state.interrupt()
    status = jobs.wait(10)
    assert status.state == INTERRUPTED
    assert status.step < 200


def test_begin_train_from_the_tab_goes_through_the_webui(webui, monkeypatch):
    import train_tools.ui.logic as ui_logic
    import train_tools.ui.views as ui_views
    from train_tools.hosts.webui import WebuiHost

    seen = {}

    def fake_training_work(version, configs, checkpoint, device, host=None):
        seen.update(checkpoint=checkpoint, device=device, base=configs[0].base_model, host=type(host).__name__)
        return _fake_work([], webui)

    monkeypatch.setattr(ui_logic, "training_work", fake_training_work)
    logic = ui_logic.TabLogic(WebuiHost(), JobManager())
    logic.create_project("猫")
    logic.create_version("猫", "v1")
    version = logic.store.version("猫", "v1")
    (version.originals_dir / "a.png").write_bytes(b"not really a png")
    title = next(t for t in logic.host.list_checkpoints() if "real" in t)
    values = [getattr(version.load_settings(), n) for n in ui_views.SETTING_FIELDS]
    values[ui_views.SETTING_FIELDS.index("base_model")] = title
    message, _progress, _models = logic.begin_train("猫", "v1", *values)
    assert "started" in message
    assert logic.jobs.wait(10).state == FINISHED
    # The host goes with the work: the trainer captions with the WebUI's own interrogators through it.
    assert seen == {
        "checkpoint": webui.sd_dir / "real.safetensors",
        "device": "cpu",
        "base": title,
        "host": "WebuiHost",
    }
    assert version.load_settings().base_model == title
    assert str(version.path).startswith(str(webui.data.resolve() / "outputs" / "train_tools"))


@pytest.mark.parametrize(
    "kind, expected", [("deepbooru", "1girl, red_background, solo"), ("blip", "a picture of size 64x64")]
)  # the prepared one
def test_the_webuis_own_captioners_caption_the_dataset(webui, kind, expected):
    """Update Dataset with the WebUI's DeepBooru / BLIP: the captions come from the host's models, which are
    loaded once for the dataset and released afterwards."""
    from PIL import Image

    from train_tools.config import TrainConfig
    from train_tools.data.items import load_items
    from train_tools.data.preparation import prepare_version
    from train_tools.hosts.webui import WebuiHost
    from train_tools.store import Store

    host = WebuiHost()
    store = Store(host.data_dir)
    store.create_project("p")
    version = store.create_version("p", "v1")
    version.originals_dir.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        Image.new("RGB", (96, 64), (220, 10 * i, 10)).save(version.originals_dir / f"pic{i}.png")
    config = TrainConfig(captioner=kind, trigger_word="tt", resolution=64, min_bucket_reso=64, max_bucket_reso=128)
    report = prepare_version(version, config, host=host)
    assert not report.refused
    assert [item.caption for item in load_items(version.prepared_dir)] == [f"tt, {expected}"] * 2
    if kind == "deepbooru":
        from modules import deepbooru

        assert deepbooru.model.calls == ["start", "tag_multi", "tag_multi", "stop"]
    else:
        assert webui.shared.interrogator.calls == ["load", "generate_caption", "generate_caption", "send_blip_to_ram"]
