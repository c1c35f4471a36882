"""Presets (issue 18, item 8): a version's settings saved under a name and applied to another version, on the
command line and in the tab; the built-in ones are valid settings that say where they come from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_ui import update_value, values_of
from train_tools.cli import main
from train_tools.config import TrainConfig
from train_tools.errors import UserError
from train_tools.hosts.base import StandaloneHost
from train_tools.presets import BUILTIN, VERSION_OWN, apply_preset, load_preset, presets_dir, save_preset
from train_tools.store import Store
from train_tools.ui import logic as ui_logic
from train_tools.ui.jobs import JobManager
from train_tools.ui.views import SETTING_FIELDS

MINE = {"network_dim": 12, "network_alpha": 3.0, "optimizer": "Lion", "epochs": 7, "loss_type": "huber"}
OWN = {"base_model": "a.safetensors", "trigger_word": "zxq", "output_name": "first", "preview_prompt": "zxq, a cat"}


def test_a_preset_round_trip_on_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    for args in (["project", "create", "p"], ["version", "create", "p", "v1"], ["version", "create", "p", "v2"]):
        assert main(["--data-dir", str(data), *args]) == 0
    store = Store(data)
    first, second = store.version("p", "v1"), store.version("p", "v2")
    first.save_settings(TrainConfig().updated({**MINE, **OWN}))
    second.save_settings(TrainConfig().updated({"trigger_word": "other", "base_model": "b.safetensors"}))
    assert main(["--data-dir", str(data), "preset", "save", "my style", "p", "v1", "--description", "mine"]) == 0
    assert main(["--data-dir", str(data), "preset", "apply", "my style", "p", "v2"]) == 0
    got = store.version("p", "v2").load_settings()
    assert {k: getattr(got, k) for k in MINE} == MINE
    assert (got.trigger_word, got.base_model, got.output_name) == ("other", "b.safetensors", "")  # its own, kept
    saved = json.loads((presets_dir(data) / "my style.json").read_text(encoding="utf-8"))
    assert not set(saved["settings"]) & set(VERSION_OWN) and saved["description"] == "mine"
    capsys.readouterr()
    assert main(["--data-dir", str(data), "preset", "list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed == [f"{p.name}: {p.description}" for p in BUILTIN.values()] + ["my style: mine"]


@pytest.mark.parametrize("name", list(BUILTIN))
def test_the_built_in_presets_are_valid_and_say_their_source(name: str) -> None:
    preset = BUILTIN[name]
    config = apply_preset(TrainConfig().updated(OWN), preset)
    assert {k: getattr(config, k) for k in preset.settings} == preset.settings
    assert {k: getattr(config, k) for k in OWN} == OWN
    assert any(source in preset.description for source in ("kohya", "Hollowstrawberry"))


def test_bad_presets_are_refused_with_a_sentence(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="is a built-in preset"):
        save_preset(tmp_path, "SD1.5 character", TrainConfig())
    with pytest.raises(UserError, match="could point outside"):
        save_preset(tmp_path, "../up", TrainConfig())
    with pytest.raises(UserError, match="There is no preset 'gone'; the presets are: SD1.5 character"):
        load_preset(tmp_path, "gone")
    path = save_preset(tmp_path, "edited", TrainConfig())
    path.write_text(json.dumps({"settings": {"network_dimm": 4}}), encoding="utf-8")
    with pytest.raises(UserError, match="network_dimm"):
        load_preset(tmp_path, "edited")
    path.write_text(json.dumps({"settings": {"epochs": -3}}), encoding="utf-8")
    with pytest.raises(UserError, match="epochs"):
        load_preset(tmp_path, "edited")
    path.write_text(json.dumps({"settings": {"base_model": "../../x", "epochs": 3}}), encoding="utf-8")
    assert load_preset(tmp_path, "edited").settings == {"epochs": 3}  # a version's own setting never comes in


def test_presets_in_the_tab(tmp_path: Path) -> None:
    host = StandaloneHost(tmp_path / "data")
    logic = ui_logic.TabLogic(host, JobManager())
    config = TrainConfig().updated({**MINE, **OWN})
    choices, message = logic.save_preset("tab preset", *values_of(config))
    assert "tab preset" in choices["choices"] and update_value(choices) == "tab preset" and "Saved" in message
    other = TrainConfig().updated({"trigger_word": "kept", "epochs": 2})
    *updates, message = logic.apply_preset("tab preset", *values_of(other))
    shown = {name: update_value(u) for name, u in zip(SETTING_FIELDS, updates, strict=True)}
    assert {k: shown[k] for k in MINE} == MINE and shown["trigger_word"] == "kept"
    assert "Applied preset &#x27;tab preset&#x27;; Save settings" in message
    *updates, _ = logic.apply_preset("SDXL style, 8 GB", *values_of(other))
    shown = {name: update_value(u) for name, u in zip(SETTING_FIELDS, updates, strict=True)}
    assert (shown["resolution"], shown["train_text_encoder"], shown["mixed_precision"]) == (1024, False, "bf16")
    with pytest.raises(UserError, match="Choose a preset"):
        logic.apply_preset(None, *values_of(other))
