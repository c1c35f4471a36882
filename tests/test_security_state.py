"""Hostile or damaged input (issue 13, item 3 and the small ones of item 7): settings and run JSON files that are
not UTF-8, carry a byte order mark, nest thousands deep or are no JSON; .safetensors headers that nest deep; and
resume states edited by hand or damaged. Each gives one sentence (a UserError), never a traceback; nothing is
written outside the data dir, and nothing the user had is lost.

The resume cases share one interrupted tiny run (2 epochs of 2 batches, stopped after step 3: epoch 2, batch 1);
each case copies it into the version's ``trains/`` and edits the copy's newest state.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from tests import fixtures_training
from tests.fixtures_training import StopsAtStep
from train_tools import fileio
from train_tools.errors import UserError
from train_tools.progress import RecordingReporter, StopFlag
from train_tools.store import Store, Version
from train_tools.training.resume import resume_point, run_started_at
from train_tools.training.state_files import load_state, state_dir, state_files
from train_tools.training.trainer import Trainer

one_thread = fixtures_training.one_thread
demo_ckpt = fixtures_training.demo_ckpt
pictures = fixtures_training.pictures

DEEP = 100_000  # far past Python's recursion limit: json.loads raises RecursionError on it


def snapshot_of(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (to show that nothing was changed or lost)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def files_outside(data: Path) -> dict[str, tuple[int, int]]:
    """Every file beside the data dir ``data`` (in the test's temporary root), with its size and time; not the
    machine-wide device locks (a run takes one wherever its data dir is)."""
    locks = Path(os.environ["TRAIN_TOOLS_LOCK_DIR"]).resolve()
    return {
        str(p): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(data.parent.rglob("*"))
        if p.is_file() and data not in p.parents and locks not in p.resolve().parents
    }


def hostile_json() -> dict[str, bytes]:
    return {
        "latin-1": '{"learning_rate": 0.001, "preview_prompt": "caf\xe9"}'.encode("latin-1"),
        "utf-16": '{"epochs": 3}'.encode("utf-16"),
        "deep": b"[" * DEEP + b"]" * DEEP,
        "deep object": b'{"a":' * DEEP + b"1" + b"}" * DEEP,
        "moderately deep": b'{"epochs": ' + b"[" * 200 + b"]" * 200 + b"}",
        "not json": b"epochs = 3\n",
        "nan": b'{"learning_rate": NaN}',
        "long number": b'{"epochs": ' + b"9" * 5000 + b"}",
        "empty": b"",
    }


# ---------------------------------------------------------------------- JSON files


@pytest.mark.parametrize("name", list(hostile_json()))
def test_a_hostile_settings_file_is_one_sentence_and_kept(tmp_path: Path, name: str):
    version = _version(tmp_path / "data")
    version.settings_path.write_bytes(hostile_json()[name])
    before = snapshot_of(tmp_path)
    with pytest.raises(UserError) as info:
        version.load_settings()
    message = str(info.value)
    assert str(version.settings_path) in message and "delete it to start from the defaults" in message
    assert "\n" not in message and len(message) < 400 and "sys." not in message
    if name in ("deep", "deep object", "moderately deep"):
        assert "nested more than" in message
    if name in ("latin-1", "utf-16"):
        assert "not UTF-8" in message
    assert snapshot_of(tmp_path) == before  # the user's file is as it was, nothing else appeared


def test_a_settings_file_with_a_byte_order_mark_is_read(tmp_path: Path):
    """Windows Notepad writes UTF-8 with a BOM: the values in it are used."""
    version = _version(tmp_path / "data")
    version.settings_path.write_bytes(
        b"\xef\xbb\xbf" + json.dumps({"epochs": 7, "preview_prompt": "caf\u00e9"}).encode("utf-8")
    )
    config = version.load_settings()
    assert config.epochs == 7 and config.preview_prompt == "caf\u00e9"


def test_read_json_says_what_else_can_be_wrong(tmp_path: Path):
    path = tmp_path / "x.json"
    path.write_bytes(b'{"a": [1, 2]}')
    assert fileio.read_json(path, "fix it") == {"a": [1, 2]}
    path.write_bytes(b" " * (2 << 20))
    with pytest.raises(UserError, match="x.json is larger than 1 MB, far more than it should be; fix it."):
        fileio.read_json(path, "fix it", max_bytes=1 << 20)
    folder = tmp_path / "folder.json"
    folder.mkdir()
    with pytest.raises(UserError, match="folder.json cannot be read"):
        fileio.read_json(folder, "fix it")
    with pytest.raises(FileNotFoundError):  # the callers decide what a missing file means
        fileio.read_json(tmp_path / "missing.json", "fix it")
    assert fileio.nesting_depth([[{"a": (1,)}]]) == 4 and fileio.nesting_depth(3) == 0


@pytest.mark.parametrize("name", ["latin-1", "deep", "not json", "list"])
def test_a_hostile_run_snapshot_is_one_sentence(tmp_path: Path, name: str):
    from train_tools.previews.runs import run_checkpoint, run_config
    from train_tools.training.resume import read_run_settings

    run = tmp_path / "data" / "trains" / "r1"
    run.mkdir(parents=True)
    (run / "settings.json").write_bytes(b"[1, 2]" if name == "list" else hostile_json()[name])
    before = snapshot_of(tmp_path)
    for read in (read_run_settings, resume_point, run_config):
        with pytest.raises(UserError) as info:
            read(run)
        assert "settings" in str(info.value) and "\n" not in str(info.value)
    assert run_checkpoint(run) is None
    assert snapshot_of(tmp_path) == before


def test_a_run_snapshot_with_a_byte_order_mark_is_read(tmp_path: Path):
    from train_tools.training.resume import read_run_settings

    run = tmp_path / "r1"
    run.mkdir()
    (run / "settings.json").write_bytes(
        b"\xef\xbb\xbf"
        + json.dumps(
            {"epochs": 4, "base_model_path": "/models/a.safetensors", "repeats_used": 2, "started_at": 12.5}
        ).encode()
    )
    config, base = read_run_settings(run)  # type: ignore[misc]
    assert (config.epochs, base) == (4, "/models/a.safetensors") and run_started_at(run) == 12.5


@pytest.mark.parametrize("case", ["deep", "outside", "missing keys"])
def test_a_hostile_preview_grid_description_is_one_sentence(tmp_path: Path, case: str):
    from train_tools.previews.grid_info import GridInfo

    path = tmp_path / "run" / "previews" / "grid-1" / "grid.json"
    path.parent.mkdir(parents=True)
    good = {
        "grid": "grid-1.png",
        "settings": {},
        "interrupted": False,
        "layout": {"columns": ["a"], "rows": ["b"], "left": 0, "top": 0, "cell_width": 8, "cell_height": 8},
        "cells": [{"row": 0, "col": 0, "epoch": 1, "file": "a.safetensors", "weight": 1.0, "path": "c.png"}],
    }
    if case == "deep":
        path.write_bytes(b"[" * DEEP + b"]" * DEEP)
    elif case == "outside":
        good["cells"][0]["path"] = "../../../../outside.png"  # type: ignore[index]
        path.write_text(json.dumps(good), encoding="utf-8")
    else:
        path.write_text(json.dumps({"cells": [{"row": 0}]}), encoding="utf-8")
    with pytest.raises(UserError, match="preview grid description .* make the previews again"):
        GridInfo.load(path)


@pytest.mark.parametrize("content", [b"\xff\xfe{}", b"[" * DEEP + b"]" * DEEP, b'{"project": ["p"]}', b"[1]"])
def test_a_hostile_remembered_version_is_forgotten(tmp_path: Path, content: bytes):
    from types import SimpleNamespace

    from train_tools.ui.logic import TabLogic

    path = tmp_path / "ui_state.json"
    path.write_bytes(content)
    assert TabLogic.remembered(SimpleNamespace(ui_state_path=path)) == (None, None)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- .safetensors headers


def _safetensors_with_header(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


@pytest.mark.parametrize("where", ["metadata", "tensor"])
def test_a_deeply_nested_safetensors_header_is_one_sentence(tmp_path: Path, where: str):
    from train_tools.models.detect import detect_checkpoint_family
    from train_tools.models.loader import load_model
    from train_tools.networks.lora_format import read_lora

    deep = b"[" * DEEP + b"]" * DEEP
    if where == "metadata":
        header = b'{"__metadata__": {"a": ' + deep + b'}, "x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    else:
        header = b'{"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "more": ' + deep + b"}}"
    path = _safetensors_with_header(tmp_path / "model.safetensors", header, b"\0" * 4)
    before = snapshot_of(tmp_path)
    for read in (load_model, detect_checkpoint_family, read_lora):
        with pytest.raises(UserError) as info:
            read(path)
        assert path.name in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(UserError, match="nested more than"):
        load_model(path)
    assert snapshot_of(tmp_path) == before


# ---------------------------------------------------------------------- resume states


def tiny_config(**changes: Any) -> Any:
    from tests.test_resume import tiny_config as config

    return config(**{"epochs": 2, **changes})


def _version(data: Path, pictures: Path | None = None) -> Version:
    from train_tools.data.uploads import add_originals

    store = Store(data)
    store.create_project("p")
    version = store.create_version("p", "v1")
    if pictures is not None:
        add_originals([pictures], version.originals_dir)
    return version


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory, demo_ckpt: Path, pictures: Path) -> tuple[Version, Path]:
    """A version and its run interrupted after step 3 of 4 (epoch 2, batch 1 of 2)."""
    torch.set_num_threads(1)
    version = _version(tmp_path_factory.mktemp("data"), pictures)
    version.save_settings(tiny_config())
    stop = StopFlag()
    result = Trainer(
        version, tiny_config(), demo_ckpt, device="cpu", stop=stop, run_name="stopped", reporter=StopsAtStep(stop, 3)
    ).run()
    assert result.interrupted and result.steps == 3
    assert [p.name for p in state_files(result.run_dir)] == [
        "step-00000003-interrupt.state",
        "step-00000002-save.state",
    ]
    return version, result.run_dir


_copies = iter(range(1_000_000))


def copy_run(stopped: tuple[Version, Path], only_newest: bool = False) -> Path:
    version, run = stopped
    copy = version.trains_dir / f"copy-{next(_copies)}"
    shutil.copytree(run, copy)
    if only_newest:
        for path in state_files(copy)[1:]:
            path.unlink()
    return copy


def edit_state(run: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    path = state_files(run)[0]
    obj = torch.load(path, weights_only=True)
    edit(obj)
    torch.save(obj, path)
    return path


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda obj: obj.__setitem__(key, value)


def _lora(edit: Callable[[dict[str, torch.Tensor], str], None]) -> Callable[[dict[str, Any]], None]:
    return lambda obj: edit(obj["lora"], sorted(obj["lora"])[0])


def _first_weight_state(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["optimizer"]["state"][sorted(obj["optimizer"]["state"])[0]]


# Edits that leave a state that loads but does not hold together or does not fit the run; each with what the
# message says. They are checked before anything resumes, with no fall-back to an older state.
DAMAGE: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "batch far past the end": (
        _set("batch", 10**9),
        "batch 1000000000 is past the end of epoch 2, which has 2 batches",
    ),
    "batch one past the end": (_set("batch", 3), "batch 3 is past the end of epoch 2, which has 2 batches"),
    "negative batch": (_set("batch", -1), "its batch is -1, below 0"),
    "epoch 0": (_set("epoch", 0), "its epoch is 0, below 1"),
    "epoch past the run": (_set("epoch", 9), "epoch 9 is past the end of the run, which has 2 epochs"),
    "losses cut short": (lambda o: o.update(losses=o["losses"][:1]), "it holds 1 losses for 3 steps"),
    "step not where the batch ends": (lambda o: o.update(batch=2), "step 3 is not where batch 2 of epoch 2 ends"),
    "finished interrupt": (_set("finished", True), "do not go together"),
    "file outside the run": (
        lambda o: o["files"].append("../../../../evil.safetensors"),
        "is not the name of a LoRA file in the run folder",
    ),
    "LoRA weight of another shape": (_lora(lambda lora, k: lora.__setitem__(k, torch.zeros(1))), "not of shape"),
    "LoRA weight of NaN": (_lora(lambda lora, k: lora[k].fill_(float("nan"))), "NaN"),
    "optimizer moment of another shape": (
        lambda o: _first_weight_state(o).__setitem__("exp_avg", torch.zeros(3)),
        "exp_avg",
    ),
    "optimizer learning rate text": (
        lambda o: o["optimizer"]["param_groups"][0].__setitem__("lr", "fast"),
        "optimizer's group 1, lr",
    ),
    "optimizer state of an unknown weight": (
        lambda o: o["optimizer"]["state"].__setitem__(999, {}),
        "weights the run does not have",
    ),
    "schedule past the run": (
        lambda o: o["scheduler"].__setitem__("last_epoch", 10**6),
        "learning-rate schedule stands at step 1000000",
    ),
    "schedule with a foreign key": (
        lambda o: o["scheduler"].__setitem__("optimizer", 1),
        "learning-rate schedule has unknown 'optimizer'",
    ),
    "generator of another size": (
        lambda o: o["rng"][0].__setitem__("trainer_torch", torch.zeros(3, dtype=torch.uint8)),
        "trainer_torch",
    ),
    "python generator out of range": (
        lambda o: o["rng"][0]["python"]["internal"].__setitem__(0, -5),
        "Mersenne Twister",
    ),
    "settings out of range": (lambda o: o["config"].__setitem__("epochs", -3), "epochs"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_resume_state_is_refused_before_anything_resumes(
    stopped: tuple[Version, Path], demo_ckpt: Path, case: str
):
    version, _run = stopped
    edit, says = DAMAGE[case]
    run = copy_run(stopped)
    edit_state(run, edit)
    data = Path(version.path).parents[5]  # <data>/outputs/train_tools/projects/p/versions/v1
    outside = files_outside(data)
    before = snapshot_of(run)
    reporter = RecordingReporter()
    with pytest.raises(UserError) as info:
        Trainer(version, version.load_settings(), demo_ckpt, device="cpu", reporter=reporter, resume_from=run).run()
    message = str(info.value)
    assert message.startswith(f"The saved training state of run {run.name} is damaged (")
    assert says in message and message.endswith("; start a new run.")
    assert not reporter.steps  # nothing trained, nothing "finished"
    assert snapshot_of(run) == before  # nothing in the run changed or went
    assert files_outside(data) == outside
    shutil.rmtree(run)


@pytest.mark.parametrize("content", [b"\xef\xbb\xbf{}", b"\xe9t\xe9", b"[" * DEEP + b"]" * DEEP, b'{"a.png": [1]}'])
def test_a_hostile_captions_snapshot_of_a_run_is_one_sentence(
    stopped: tuple[Version, Path], demo_ckpt: Path, content: bytes
):
    """The captions a run began with (``captions.json``): a BOM is read, anything else wrong is a sentence."""
    version, _run = stopped
    run = copy_run(stopped)
    (run / "captions.json").write_bytes(content)
    trainer = Trainer(version, version.load_settings(), demo_ckpt, device="cpu", resume_from=run)
    if content.startswith(b"\xef\xbb\xbf"):
        trainer.run()  # {} : the pictures' own captions
        return
    with pytest.raises(UserError, match=f"The captions of run {run.name}, .*start a new run"):
        trainer.run()
    shutil.rmtree(run)


def test_the_command_line_refuses_a_state_past_the_end_with_a_sentence(
    stopped: tuple[Version, Path], caplog: pytest.LogCaptureFixture
):
    """Before, batch=10**9 'finished' the run with exit status 0, skipping the rest of its epoch."""
    from train_tools.cli import main

    version, _run = stopped
    run = copy_run(stopped)
    edit_state(run, _set("batch", 10**9))
    before = snapshot_of(run)
    data = Path(version.path).parents[5]
    with caplog.at_level("INFO"):
        assert main(["--data-dir", str(data), "train", "p", "v1", "--resume", run.name, "--device", "cpu"]) == 2
    assert "batch 1000000000 is past the end of epoch 2, which has 2 batches" in caplog.text
    assert "Traceback" not in caplog.text and snapshot_of(run) == before
    shutil.rmtree(run)


# Edits that make the file no state at all: the newest state that loads is used instead (the run loses the steps
# after it, not its LoRA); with no other state left, a sentence.
BROKEN: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "missing key": (lambda o: o.pop("optimizer"), "lacks optimizer"),
    "epoch as text": (_set("epoch", "2"), "its epoch is '2', not a whole number"),
    "huge epoch": (_set("epoch", 10**30), "its epoch is a huge number"),
    "huger epoch": (_set("epoch", 10**5000), "it holds more than plain tensors, numbers and text"),
    "step far past": (_set("step", 10**9), "it says step 1000000000 (interrupt) but is named for step 3"),
    "losses as text": (_set("losses", "low"), "its losses is 'low', not a list of numbers"),
    "kind unknown": (_set("kind", "nap"), "its kind is 'nap'"),
    "kind a list": (_set("kind", ["final"]), "its kind is a list of 1"),
    "lora as a list": (_set("lora", [1, 2]), "its lora is a list of 2, not a table of tensors"),
    "renamed": (_set("step", 2), "it says step 2 (interrupt) but is named for step 3"),
    "nested deep": (lambda o: o["config"].__setitem__("preview_prompt", _nested(50)), "nested more than 16"),
}


def _nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("case", list(BROKEN))
def test_an_unreadable_newest_state_falls_back_or_says_so(stopped: tuple[Version, Path], case: str):
    version, _run = stopped
    edit, says = BROKEN[case]
    run = copy_run(stopped)
    path = edit_state(run, edit)
    with pytest.raises(UserError, match="damaged|lacks") as info:
        load_state(path)
    assert says in str(info.value)
    assert resume_point(run).state.step == 2  # type: ignore[union-attr]  # the epoch save before it
    for older in state_files(run)[1:]:
        older.unlink()
    with pytest.raises(UserError, match=f"No training state of {run.name} can be read .*start a new run"):
        resume_point(run)
    assert path.is_file()  # the user's file is kept
    shutil.rmtree(run)


def test_a_sound_copy_resumes_and_a_fall_back_ends_with_the_same_lora(stopped: tuple[Version, Path], demo_ckpt: Path):
    """The checks refuse nothing sound: the untouched copy, and a copy whose newest state is broken (it goes on
    from the epoch save before it), both end where the straight run ends."""
    from tests.test_resume import assert_same_lora

    version, _run = stopped
    straight = Trainer(version, tiny_config(), demo_ckpt, device="cpu", run_name=f"straight-{next(_copies)}").run()
    sound, broken = copy_run(stopped), copy_run(stopped)
    edit_state(broken, _set("lora", "gone"))
    for run in (sound, broken):
        result = Trainer(version, version.load_settings(), demo_ckpt, device="cpu", resume_from=run).run()
        assert result.steps == 4 and not result.interrupted
        assert_same_lora(straight.final_file, result.final_file)  # type: ignore[arg-type]


@pytest.mark.parametrize("optimizer", ["Lion", "SGDNesterov", "AdaFactor", "Prodigy"])
def test_states_of_every_optimizer_pass_the_checks(tmp_path: Path, demo_ckpt: Path, pictures: Path, optimizer: str):
    config = tiny_config(
        optimizer=optimizer,
        lr_scheduler="cosine",
        lr_warmup_steps=1,
        **({"learning_rate": 1.0} if optimizer == "Prodigy" else {}),
    )
    version = _version(tmp_path / "data", pictures)
    stop = StopFlag()
    first = Trainer(version, config, demo_ckpt, device="cpu", stop=stop, reporter=StopsAtStep(stop, 3)).run()
    resumed = Trainer(version, config, demo_ckpt, device="cpu", resume_from=first.run_dir).run()
    assert resumed.steps == 4 and not resumed.interrupted


# ---------------------------------------------------------------------- the small ones of item 7


def _started_at(path: Path) -> str:
    with safe_open(str(path), "pt") as fh:
        return fh.metadata()["ss_training_started_at"]


def test_a_resumed_run_keeps_its_start_time_with_or_without_a_state(stopped: tuple[Version, Path], demo_ckpt: Path):
    version, run = stopped
    began = _started_at(run / "p-v1-000001.safetensors")
    assert json.loads((run / "settings.json").read_text(encoding="utf-8"))["started_at"] == float(began)
    with_state, killed_early = copy_run(stopped), copy_run(stopped)
    shutil.rmtree(state_dir(killed_early))  # as if killed in epoch 1, before any state was written
    for path in killed_early.glob("*.safetensors"):
        path.unlink()
    time.sleep(0.05)
    for copy in (with_state, killed_early):
        result = Trainer(version, version.load_settings(), demo_ckpt, device="cpu", resume_from=copy).run()
        assert result.final_file is not None and _started_at(result.final_file) == began


def test_the_start_time_of_a_run_from_before_it_was_recorded_is_its_snapshots(tmp_path: Path):
    run = tmp_path / "r1"
    run.mkdir()
    assert run_started_at(run) is None
    (run / "settings.json").write_text('{"epochs": 2}', encoding="utf-8")
    assert run_started_at(run) == (run / "settings.json").stat().st_mtime


def test_a_base_model_of_the_same_name_with_changed_content_says_so(stopped: tuple[Version, Path], tmp_path: Path):
    from train_tools.models.demo_model import build_demo_checkpoint

    version, run = stopped
    copy = copy_run(stopped)
    same_name = build_demo_checkpoint(tmp_path / "elsewhere" / "demo.safetensors", seed=1)
    with pytest.raises(UserError, match="same name, but its content changed since .*put the original file back"):
        Trainer(version, version.load_settings(), same_name, device="cpu", resume_from=copy).run()
    other_name = build_demo_checkpoint(tmp_path / "other.safetensors", seed=1)
    with pytest.raises(UserError, match=r"not the base model run .* \(demo.safetensors\); choose that checkpoint"):
        Trainer(version, version.load_settings(), other_name, device="cpu", resume_from=copy).run()
    shutil.rmtree(copy)


def test_half_written_latent_cache_entries_are_cleaned_by_the_next_run(stopped: tuple[Version, Path], demo_ckpt: Path):
    from train_tools.data.latent_cache import CACHE_DIR_NAME

    version, _run = stopped
    cache = version.prepared_dir / CACHE_DIR_NAME
    entries = sorted(p.name for p in cache.glob("*.safetensors"))
    assert entries
    leftover = cache / f".{entries[0]}.k1ll3d.tmp"
    leftover.write_bytes(b"half")
    # prepare() alone (the benchmark, tests) does not hold the version: another run may be writing there.
    trainer = Trainer(version, tiny_config(), demo_ckpt, device="cpu")
    trainer.prepare()
    assert leftover.is_file()
    result = Trainer(version, tiny_config(epochs=1), demo_ckpt, device="cpu", run_name=f"clean-{next(_copies)}").run()
    assert not result.interrupted and not leftover.exists()
    assert sorted(p.name for p in cache.glob("*.safetensors")) == entries  # the whole entries stay
