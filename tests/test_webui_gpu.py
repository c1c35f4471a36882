"""The WebUI side of the GPU, without a GPU (issue 15): the real Trainer on the tiny demo model, started the way
the WebUI tab starts it (``TabLogic.begin_train``: ``training_work`` in the job manager, under the WebUI's GPU
queue, with the WebUI's checkpoint moved off before and brought back after, progress into ``shared.state``),
against the stand-in WebUI of tests/fake_webui. The stand-in's checkpoint is "on the GPU" when its ``device``
is "cuda"; it counts every unload and reload, and its txt2img records where the checkpoint was."""

from __future__ import annotations

import gc
import shutil
import types
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from tests import fixtures_training, stand_ins
from train_tools.config import TrainConfig
from train_tools.training.trainer import Trainer
from train_tools.ui.jobs import FAILED, FINISHED, INTERRUPTED, JobManager, JobStatus

one_thread = fixtures_training.one_thread
demo_ckpt = fixtures_training.demo_ckpt
pictures = fixtures_training.pictures
webui = stand_ins.webui

STEPS = 4  # 2 pictures, 2 repeats, batch size 1, 1 epoch


def tiny_config(**changes: Any) -> TrainConfig:
    base: dict[str, Any] = dict(
        resolution=64,
        min_bucket_reso=64,
        max_bucket_reso=128,
        network_dim=2,
        network_alpha=1.0,
        repeats=2,
        batch_size=1,
        epochs=1,
        save_every_n_epochs=1,
        optimizer="AdamW",
        save_precision="fp32",
        max_token_length=75,
        train_text_encoder=False,
        mixed_precision="no",
        gradient_checkpointing=False,
        preview_at_end=False,
    )
    base.update(changes)
    return TrainConfig(**base)


class Tab:
    """The Train Tools tab inside the stand-in WebUI, with the demo checkpoint in its checkpoint folder, the
    WebUI's checkpoint loaded on the GPU, and a version with the demo pictures."""

    def __init__(self, webui: types.SimpleNamespace, demo_ckpt: Path, pictures: Path) -> None:
        from train_tools.data.uploads import add_originals
        from train_tools.hosts.webui import WebuiHost
        from train_tools.ui.logic import TabLogic

        self.webui = webui
        shutil.copyfile(demo_ckpt, webui.sd_dir / "demo.safetensors")
        webui.sd_models.list_models()
        self.title = next(t for t in webui.sd_models.checkpoints_list if t.startswith("demo.safetensors"))
        webui.sd_models.model_data.sd_model = types.SimpleNamespace(device="cuda")
        webui.sd_models.calls.clear()
        self.logic = TabLogic(WebuiHost(), JobManager())
        self.logic.create_project("p")
        self.logic.create_version("p", "v1")
        self.version = self.logic.store.version("p", "v1")
        add_originals([pictures], self.version.originals_dir)

    def begin_train(self, config: TrainConfig) -> JobStatus:
        """Begin Train with ``config``'s settings in the controls, and wait for the job to end."""
        from train_tools.ui import views

        config = config.updated({"base_model": self.title})
        values = [getattr(config, name) for name in views.SETTING_FIELDS]
        message = self.logic.begin_train("p", "v1", *values)[0]
        assert "Training started on demo.safetensors" in message
        return self.logic.jobs.wait(120)

    @property
    def model_device(self) -> str:
        return str(self.webui.sd_models.model_data.sd_model.device)

    def assert_webui_usable(self) -> None:
        """The WebUI's checkpoint is back on the GPU, no job is left claiming the WebUI, and txt2img makes a
        picture with the checkpoint on the GPU."""
        shared, processing = self.webui.shared, self.webui.processing
        assert self.model_device == "cuda"
        assert shared.state.job == "" and not shared.state.interrupted
        assert shared.state.history[-1].startswith("end task(train_tools_")
        p = processing.StableDiffusionProcessingTxt2Img(prompt="a cat", seed=1, steps=2, width=64, height=64)
        processed = processing.process_images(p)
        assert len(processed.images) == 1
        assert processing.calls[-1]["model_device"] == "cuda"


def files_in(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


@pytest.fixture()
def tab(webui: types.SimpleNamespace, demo_ckpt: Path, pictures: Path) -> Tab:
    return Tab(webui, demo_ckpt, pictures)


def watch_webui(tab: Tab, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[str], str, bool]]:
    """What the WebUI looked like when the trainer began loading and at each step's loss: (what, the
    unload/reload calls so far, where its checkpoint was, whether the GPU queue was held)."""
    seen: list[tuple[str, list[str], str, bool]] = []
    real_prepare, real_loss = Trainer.prepare, Trainer.loss

    def look(what: str) -> None:
        seen.append((what, list(tab.webui.sd_models.calls), tab.model_device, tab.webui.call_queue.queue_lock.locked()))

    def prepare(self: Trainer) -> None:
        look("prepare")
        real_prepare(self)

    def loss(self: Trainer, *args: Any, **kwargs: Any) -> torch.Tensor:
        look("step")
        return real_loss(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "prepare", prepare)
    monkeypatch.setattr(Trainer, "loss", loss)
    return seen


def test_a_run_moves_the_webui_model_off_once_and_back_once(tab: Tab, monkeypatch: pytest.MonkeyPatch):
    seen = watch_webui(tab, monkeypatch)
    status = tab.begin_train(tiny_config())
    assert status.state == FINISHED, status.message
    assert status.step == STEPS
    # Off (once) before the trainer loads anything, and still off at every step, in the WebUI's GPU queue...
    assert seen == [("prepare", ["unload"], "cpu", True)] + [("step", ["unload"], "cpu", True)] * STEPS
    # ...and back (once) after the last.
    assert tab.webui.sd_models.calls == ["unload", "reload"]
    assert tab.webui.devices.gc_calls == 1
    assert [f.name for f in status.files] == ["p-v1.safetensors"] and status.files[0].is_file()
    state = tab.webui.shared.state
    assert (state.sampling_step, state.sampling_steps) == (STEPS, STEPS)
    assert state.history == [f"begin {tab.webui.call_queue.tasks[-1]}", f"end {tab.webui.call_queue.tasks[-1]}"]
    tab.assert_webui_usable()


def test_out_of_memory_in_a_step_stops_frees_and_gives_the_webui_its_model_back(
    tab: Tab, monkeypatch: pytest.MonkeyPatch
):
    unets: list[weakref.ref] = []
    real_loss = Trainer.loss

    def loss(self: Trainer, *args: Any, **kwargs: Any) -> torch.Tensor:
        value = real_loss(self, *args, **kwargs)
        unets.append(weakref.ref(self.model.unet))
        if len(unets) == 2:  # the second step, its forward pass done: its tensors are alive in the traceback
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return value

    monkeypatch.setattr(Trainer, "loss", loss)
    config = tiny_config()
    status = tab.begin_train(config)
    assert status.state == FAILED
    assert status.message.startswith("Out of memory: training stopped and its memory was freed.")
    assert f"the network dim (now {config.network_dim})" in status.message
    assert status.step == 1 and status.files == []
    gc.collect()
    assert unets[-1]() is None  # the failed run let go of its model (the job keeps the trainer in its error)
    assert tab.webui.sd_models.calls == ["unload", "reload"]
    tab.assert_webui_usable()

    # The device, the version and the GPU queue are free again: the next run in this process finishes.
    monkeypatch.setattr(Trainer, "loss", real_loss)
    again = tab.begin_train(config)
    assert again.state == FINISHED, again.message
    assert again.step == STEPS
    assert tab.webui.sd_models.calls == ["unload", "reload", "unload", "reload"]
    tab.assert_webui_usable()


def test_the_webui_interrupt_button_stops_a_real_run_which_saves(tab: Tab, monkeypatch: pytest.MonkeyPatch):
    real_loss = Trainer.loss
    pressed_at: list[int] = []

    def loss(self: Trainer, *args: Any, **kwargs: Any) -> torch.Tensor:
        if tab.webui.shared.state.sampling_step == 1 and not pressed_at:  # during the second step
            pressed_at.append(tab.webui.shared.state.sampling_step + 1)
            tab.webui.shared.state.interrupt()  # what the WebUI's Interrupt button does
        return real_loss(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "loss", loss)
    status = tab.begin_train(tiny_config())
    assert pressed_at == [2]
    assert status.state == INTERRUPTED, status.message
    assert status.step == 2  # the step it was pressed in ends, no other begins
    (saved,) = status.files
    assert saved.name == "p-v1-000001-interrupted.safetensors"
    assert status.message == f"Interrupted; 1 file(s) saved, the last is {saved.name}."
    with safe_open(str(saved), "pt") as fh:
        assert any("lora_up" in key for key in fh.keys())  # noqa: SIM118 - safe_open is not iterable
    assert tab.webui.sd_models.calls == ["unload", "reload"]
    tab.assert_webui_usable()  # the WebUI cleared its interrupt: the next picture is made


@pytest.mark.skipif(torch.cuda.is_available(), reason="shows what a machine without CUDA says")
@pytest.mark.parametrize("chosen_by", ["the WebUI's device", "the Train Tools device setting"])
def test_a_cuda_device_without_cuda_fails_with_a_sentence_before_anything_loads(
    tab: Tab, monkeypatch: pytest.MonkeyPatch, chosen_by: str
):
    import train_tools.models.loader as loader
    from train_tools.hosts.webui import OPT_DEVICE

    if chosen_by == "the WebUI's device":
        monkeypatch.setattr(tab.webui.devices, "device", torch.device("cuda"))  # the WebUI's own: a torch.device
        device = "cuda"
    else:
        tab.webui.shared.opts.data[OPT_DEVICE] = device = "cuda:1"
    assert tab.logic.host.device() == device
    loads: list[Path] = []
    real_load = loader.load_model
    monkeypatch.setattr(loader, "load_model", lambda path, **kwargs: loads.append(path) or real_load(path, **kwargs))
    status = tab.begin_train(tiny_config())
    assert status.state == FAILED
    assert status.message.startswith(f"Training on {device} needs a CUDA GPU, and ")
    assert "choose the device cpu, or install torch for your GPU" in status.message
    # Nothing was loaded, prepared or begun (the folders are the version's own, empty).
    assert loads == [] and files_in(tab.version.prepared_dir) == [] and files_in(tab.version.trains_dir) == []
    assert status.step == 0
    assert tab.webui.sd_models.calls == ["unload", "reload"]
    tab.assert_webui_usable()
