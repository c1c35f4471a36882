"""The project store: any name a person types works; nothing escapes the data dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from train_tools.config import TrainConfig
from train_tools.errors import UserError
from train_tools.store import Store, check_name


@pytest.mark.parametrize("name", ["my lora", "キャラクター", "猫の絵 v2", "🐱 cat", "Ünïcödé", "a.b"])
def test_any_name_a_person_types_works(tmp_path: Path, name: str):
    store = Store(tmp_path)
    store.create_project(name)
    v = store.create_version(name, name)
    assert v.path.is_dir()
    assert v.path.is_relative_to(tmp_path / "outputs" / "train_tools" / "projects")
    assert store.projects() == [name]
    assert store.versions(name) == [name]
    assert store.version(name, name).settings_path.exists()


@pytest.mark.parametrize(
    "name",
    [
        "..",
        "../evil",
        "a/b",
        "/etc",
        "a\\b",
        "bad\x00name",
        "CON",
        "nul.txt",
        "com1",
        "",
        "   ",
        ".hidden",
        "trailing.",
        "x" * 200,
        "tab\there",
    ],
)
def test_dangerous_names_are_refused(tmp_path: Path, name: str):
    with pytest.raises(UserError):
        check_name(name)
    with pytest.raises(UserError):
        Store(tmp_path).create_project(name)
    # Nothing was created anywhere.
    assert list(tmp_path.iterdir()) == []
    assert not (tmp_path.parent / "evil").exists()


def test_layout_and_settings_round_trip(tmp_path: Path):
    store = Store(tmp_path)
    store.create_project("p")
    v = store.create_version("p")
    assert v.name == "v1"
    assert v.path == tmp_path.resolve() / "outputs/train_tools/projects/p/versions/v1"
    for sub in ("dataset", "prepared", "trains"):
        assert (v.path / sub).is_dir()
    config = TrainConfig(epochs=7, learning_rate=2e-4)
    v.save_settings(config)
    assert store.version("p", "v1").load_settings() == config


def test_missing_project_and_version_say_what_to_do(tmp_path: Path):
    store = Store(tmp_path)
    with pytest.raises(UserError, match="project create"):
        store.version("nope", "v1")
    store.create_project("p")
    with pytest.raises(UserError, match="version create"):
        store.version("p", "v9")
    with pytest.raises(UserError, match="already exists"):
        store.create_project("p")


def test_damaged_settings_file_is_a_clear_message(tmp_path: Path):
    store = Store(tmp_path)
    store.create_project("p")
    v = store.create_version("p")
    v.settings_path.write_text("{not json")
    with pytest.raises(UserError, match="damaged"):
        v.load_settings()


def test_run_dirs_never_collide(tmp_path: Path):
    store = Store(tmp_path)
    store.create_project("p")
    v = store.create_version("p")
    a = v.new_run_dir("20260101-000000")
    b = v.new_run_dir("20260101-000000")
    assert a != b and a.is_dir() and b.is_dir()
    assert v.runs() == [a, b]
