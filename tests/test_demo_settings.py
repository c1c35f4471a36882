"""The demo model's quick-run settings (issue 16, item 1): chosen in the tab or on the command line, the demo
model gets settings that finish the demo flow in minutes on a CPU, with how long the run takes here shown
before Begin Train; a real checkpoint chosen afterwards gets the defaults back, and the user's own settings
are left alone."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from tests import fixtures_training
from tests.test_ui import is_update, update_value
from train_tools.cli import main
from train_tools.config import TrainConfig
from train_tools.demo_settings import DEMO_CLASS_PICTURES, DEMO_PICTURES, DEMO_SETTINGS, model_switch_changes
from train_tools.hosts.base import DEMO_CHOICE, StandaloneHost
from train_tools.store import Store
from train_tools.training import estimate
from train_tools.ui import logic as ui_logic
from train_tools.ui.jobs import JobManager
from train_tools.ui.views import MODEL_FIELDS, SETTING_FIELDS

demo_ckpt = fixtures_training.demo_ckpt
one_thread = fixtures_training.one_thread


def test_switching_models_sets_the_demo_settings_and_takes_them_back():
    defaults = TrainConfig()
    assert model_switch_changes(defaults.to_dict(), demo=True) == DEMO_SETTINGS
    demo = defaults.updated(DEMO_SETTINGS)
    back = model_switch_changes(demo.to_dict(), demo=False)
    assert back == {name: getattr(defaults, name) for name in DEMO_SETTINGS}
    assert defaults.updated(DEMO_SETTINGS).updated(back) == defaults
    # The user changed one of them: those are the user's settings now, left as they are.
    assert model_switch_changes(demo.updated({"repeats": 7}).to_dict(), demo=False) == {}
    # Fewer epochs, as a slow machine gets them, are still the demo's.
    fitted = demo.updated({"epochs": 12, "save_every_n_epochs": 12})
    assert model_switch_changes(fitted.to_dict(), demo=False) == back
    assert model_switch_changes(defaults.to_dict(), demo=False) == {}


def test_the_estimate_counts_the_steps_the_trainer_takes(tmp_path: Path, demo_ckpt: Path):
    """The step count behind "about N s" is the run's: the trainer's own plan for the demo pictures, at most
    one partial batch per epoch more."""
    from train_tools.data.demo_dataset import make_demo_class_pictures, make_demo_dataset
    from train_tools.training.trainer import Trainer

    store = Store(tmp_path)
    store.create_project("p")
    version = store.create_version("p", "v1")
    make_demo_dataset(version.originals_dir, n=DEMO_PICTURES)
    make_demo_class_pictures(version.reg_dir, n=DEMO_CLASS_PICTURES)
    config = TrainConfig().updated(DEMO_SETTINGS)
    trainer = Trainer(version, config, demo_ckpt, device="cpu")
    trainer.prepare()
    planned = estimate.training_steps(config, DEMO_PICTURES, DEMO_CLASS_PICTURES)
    assert planned - config.epochs <= trainer.total_steps <= planned
    assert estimate.grid_pictures(config) == 7  # one file at the end, at six weights, and the base model
    assert estimate.grid_pictures(config.updated({"preview_at_end": False})) == 0


def test_the_estimate_is_measured_and_grows_with_the_run(monkeypatch: pytest.MonkeyPatch):
    config = TrainConfig().updated(DEMO_SETTINGS)
    seen: list[tuple[Any, ...]] = []

    def measured(*args: Any) -> tuple[float, float]:
        seen.append(args)
        return 0.05, 0.01

    monkeypatch.setattr(estimate, "_measured_seconds", measured)
    short = estimate.estimate_demo_run(config, 12, "cpu")
    assert seen == [(64, 4, 16, 16, False, "cpu", "locon")]  # at the run's resolution, batch, rank and type, here
    steps = estimate.training_steps(config, 12)
    assert short.seconds == pytest.approx(estimate.FIXED_SECONDS + steps * 0.05 + 7 * 20 * 0.01)
    longer = estimate.estimate_demo_run(config.updated({"epochs": 40}), 12, "cpu")
    assert longer.steps == 2 * short.steps and longer.seconds > short.seconds
    with_classes = estimate.estimate_demo_run(config, 12, "cpu", 36)  # a class picture beside each one trained
    assert with_classes.steps == estimate.training_steps(config, 12, 36) > 1.9 * short.steps
    assert estimate.estimate_demo_run(config, 0, "cpu").steps == with_classes.steps  # the demo's, about to come
    assert short.sentence().startswith("about ") and "s on this machine" in short.sentence()


def slow_machine(step_s: float) -> Any:
    """A measurement as ``_measured_seconds`` gives it, of a machine taking ``step_s`` per training step."""
    return lambda *args: (step_s, step_s / 4)


@pytest.mark.parametrize("step_s", [0.05, 0.16, 0.3, 1.0])
def test_the_demo_run_is_fitted_to_a_slow_machine(monkeypatch: pytest.MonkeyPatch, step_s: float):
    """On a machine too slow for 20 epochs within the 3 minutes, the demo run takes the most epochs that fit
    (the file still saved at the end), never fewer than MIN_DEMO_EPOCHS; a fast machine keeps the demo's."""
    monkeypatch.setattr(estimate, "_measured_seconds", slow_machine(step_s))
    config = TrainConfig().updated(DEMO_SETTINGS)
    full = estimate.estimate_demo_run(config, 12, "cpu", 36)
    changes, found = estimate.fit_demo_epochs(config, 12, "cpu", 36)
    fitted = config.updated(changes)
    assert found == estimate.estimate_demo_run(fitted, 12, "cpu", 36)
    if full.seconds <= estimate.DEMO_BUDGET_S:
        assert changes == {} and found == full
        return
    assert changes == {"epochs": fitted.epochs, "save_every_n_epochs": fitted.epochs}
    assert estimate.MIN_DEMO_EPOCHS <= fitted.epochs < config.epochs
    if fitted.epochs > estimate.MIN_DEMO_EPOCHS:
        assert found.seconds <= estimate.DEMO_BUDGET_S  # fits, and one epoch more would not
        more = config.updated({"epochs": fitted.epochs + 1, "save_every_n_epochs": fitted.epochs + 1})
        assert estimate.estimate_demo_run(more, 12, "cpu", 36).seconds > estimate.DEMO_BUDGET_S
    else:
        assert found.seconds > estimate.DEMO_BUDGET_S  # too slow even for the fewest: the line says so
    assert estimate.grid_pictures(fitted) == 7  # one file at the end, as before


# ---------------------------------------------------------------------- the tab


@pytest.fixture()
def logic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ui_logic.TabLogic:
    monkeypatch.setattr(estimate, "_measured_seconds", lambda *args: (0.05, 0.01))
    host = StandaloneHost(tmp_path / "data", offer_demo=True)
    logic = ui_logic.TabLogic(host, JobManager())
    logic.create_project("p")
    logic.create_version("p", "v1")
    return logic


def shown(answer: list[Any]) -> dict[str, Any]:
    return {name: update_value(u) for name, u in zip(MODEL_FIELDS, answer[1:-1], strict=True) if "value" in u}


def test_choosing_the_demo_model_in_the_tab_sets_quick_settings_and_says_how_long(logic: ui_logic.TabLogic):
    user = TrainConfig()
    answer = logic.choose_base_model("p", "v1", DEMO_CHOICE, *[getattr(user, n) for n in MODEL_FIELDS])
    assert shown(answer) == DEMO_SETTINGS
    assert "Demo model" in answer[0] and "s on this machine" in answer[0] and "steps" in answer[0]
    assert "quick run" in str(answer[-1])
    # Then a real checkpoint: the demo's settings give way to the defaults (and its family's).
    real = logic.host.ckpt_dirs[0] / "real.safetensors"
    real.parent.mkdir(parents=True, exist_ok=True)
    from tests.test_ui import fake_lora

    fake_lora(real, {})
    demo = user.updated(DEMO_SETTINGS)
    back = shown(logic.choose_base_model("p", "v1", "real.safetensors", *[getattr(demo, n) for n in MODEL_FIELDS]))
    assert {n: back[n] for n in DEMO_SETTINGS} == {n: getattr(user, n) for n in DEMO_SETTINGS}
    # Settings the user changed after the demo set them stay the user's.
    edited = demo.updated({"network_dim": 3})
    kept = shown(logic.choose_base_model("p", "v1", "real.safetensors", *[getattr(edited, n) for n in MODEL_FIELDS]))
    assert kept == {}  # (a file of no known family: no family settings either)


def test_a_slow_machine_gets_fewer_demo_epochs_in_the_tab(logic: ui_logic.TabLogic, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(estimate, "_measured_seconds", slow_machine(0.2))
    user = TrainConfig()
    answer = logic.choose_base_model("p", "v1", DEMO_CHOICE, *[getattr(user, n) for n in MODEL_FIELDS])
    values = shown(answer)
    fitted, found = estimate.fit_demo_epochs(TrainConfig().updated(DEMO_SETTINGS), 0, "cpu")
    assert values["epochs"] == values["save_every_n_epochs"] == fitted["epochs"] < DEMO_SETTINGS["epochs"]
    assert {n: values[n] for n in DEMO_SETTINGS if n not in fitted} == {
        n: v for n, v in DEMO_SETTINGS.items() if n not in fitted
    }
    assert found.sentence() in answer[0] and f"{fitted['epochs']} epochs instead of 20" in str(answer[-1])
    view = logic.version_view(logic.store.version("p", "v1"))  # a new version on the demo model: the same
    assert update_value(view[SETTING_FIELDS.index("epochs")]) == fitted["epochs"]


def test_a_new_version_on_the_demo_model_shows_the_demo_settings(logic: ui_logic.TabLogic):
    """With no checkpoint of the user's, the list shows the demo model: a new version's settings are the
    demo's, and the line under the model says how long the run takes."""
    view = logic.version_view(logic.store.version("p", "v1"))
    values = {name: update_value(u) for name, u in zip(SETTING_FIELDS, view, strict=False) if is_update(u)}
    assert values["base_model"] == DEMO_CHOICE
    assert {name: values[name] for name in DEMO_SETTINGS} == DEMO_SETTINGS
    line = view[len(SETTING_FIELDS) + 4]
    assert "Demo model" in line and "s on this machine" in line
    # A version whose settings name a model keeps them.
    version = logic.store.version("p", "v1")
    version.save_settings(TrainConfig(base_model="mine.safetensors", epochs=9))
    again = logic.version_view(version)
    assert update_value(again[SETTING_FIELDS.index("epochs")]) == 9


# ---------------------------------------------------------------------- the command line


def test_the_command_line_sets_the_demo_settings_when_the_demo_model_is_chosen(
    tmp_path: Path, demo_ckpt: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(estimate, "_measured_seconds", lambda *args: (0.05, 0.01))
    data = tmp_path / "data"
    for args in (["project", "create", "p"], ["version", "create", "p", "v1"], ["dataset", "demo", "p", "v1"]):
        assert main(["--data-dir", str(data), *args]) == 0
    with caplog.at_level(logging.INFO):
        # --set wins over the demo settings: a short run for the test.
        code = main(
            ["--data-dir", str(data), "train", "p", "v1", "--ckpt", str(demo_ckpt), "--device", "cpu"]
            + ["--set", "epochs=1", "--set", "repeats=1", "--set", "preview_at_end=false"]
        )
    assert code == 0
    assert "Demo model: settings for a quick run, about" in caplog.text
    saved = Store(data).version("p", "v1").load_settings()
    assert (saved.epochs, saved.repeats, saved.preview_at_end) == (1, 1, False)
    assert {n: getattr(saved, n) for n in DEMO_SETTINGS if n not in ("epochs", "repeats", "preview_at_end")} == {
        n: v for n, v in DEMO_SETTINGS.items() if n not in ("epochs", "repeats", "preview_at_end")
    }


def test_the_demo_choice_installs_the_shipped_shapes_model(tmp_path: Path):
    """ "Use demo model" puts the pretrained shapes model (shipped in the package) in the checkpoint folder; an
    older random demo model there is replaced, anything else in the way is refused with a sentence."""
    from safetensors import safe_open

    from train_tools.errors import UserError
    from train_tools.models.demo_model import SHAPES_DEMO, build_demo_checkpoint, is_demo_checkpoint

    assert SHAPES_DEMO.is_file() and SHAPES_DEMO.stat().st_size < 10_000_000
    with safe_open(str(SHAPES_DEMO), "pt") as fh:
        assert fh.metadata()["train_tools_demo"] == "sd1-tiny-shapes"
    host = StandaloneHost(tmp_path / "data", offer_demo=True)
    path = host.resolve_checkpoint(DEMO_CHOICE)
    assert path.read_bytes() == SHAPES_DEMO.read_bytes() and is_demo_checkpoint(path)
    before = path.stat().st_mtime_ns
    assert host.resolve_checkpoint(DEMO_CHOICE) == path and path.stat().st_mtime_ns == before  # found, not copied
    build_demo_checkpoint(path)  # the random demo model earlier versions installed
    assert host.resolve_checkpoint(DEMO_CHOICE).read_bytes() == SHAPES_DEMO.read_bytes()
    path.write_bytes(b"someone's file")
    with pytest.raises(UserError, match="in the way of the demo model"):
        host.resolve_checkpoint(DEMO_CHOICE)
    assert path.read_bytes() == b"someone's file"
