"""Safety (issue 13): every name a person or a web request types that reaches a file path (project, version,
output, run and installed names; the base model of the tab) is checked in one place (``names.py``) before any
work starts, in the command line, the tab and the HTTP API alike: nothing is written outside the data dir, and a
name that cannot be saved is refused up front instead of failing an epoch later.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests import fixtures_training
from tests.helpers_app import free_port, tab_with_picture
from train_tools import names
from train_tools.cli import main
from train_tools.config import TrainConfig
from train_tools.errors import UserError
from train_tools.store import Store

one_thread = fixtures_training.one_thread
demo_ckpt = fixtures_training.demo_ckpt
pictures = fixtures_training.pictures


def files_under(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} if folder.exists() else {}


def outside_target(tmp_path: Path) -> Path:
    return tmp_path / "outside" / "victim"


def hostile_output_names(tmp_path: Path) -> list[str]:
    return [
        str(outside_target(tmp_path)),
        "../../../../outside/victim",
        "a/b",
        "..\\..\\evil",
        "C:\\evil",
        "evil\x00name",
        "evil\u202etxt.exe",
        "zero\u200bwidth",
        "\ufeffbom",
        "line\u2028break",
        "CON",
        "nul.txt",
        "COM¹",
        "CONIN$",
        "..",
        ".hidden",
        "x" * 300,
    ]


# ---------------------------------------------------------------------- what names.py refuses and keeps


@pytest.mark.parametrize(
    "name",
    [
        "zero\u200bwidth",
        "evil\u202etxt.exe",
        "\ufeffbom",
        "line\u2028sep",
        "para\u2029sep",
        "left\u200emark",
        "iso\u2066late",
        "soft\u00adhyphen",
        "private\ue000use",
    ],
)
def test_invisible_and_text_reordering_characters_are_refused(name: str):
    with pytest.raises(UserError, match=r"invisible or text-reordering character \(U\+"):
        names.check_name(name, "project name")


@pytest.mark.parametrize(
    "name",
    [
        "CON",
        "con",
        "Con.txt",
        "PRN",
        "AUX",
        "NUL",
        "nul.tar.gz",
        "COM1",
        "com9",
        "COM0",
        "LPT1",
        "COM¹",
        "COM²",
        "LPT³",
        "CONIN$",
        "conout$",
        "CONOUT$.log",
        "AUX .png",
        "CLOCK$",
    ],
)
def test_every_windows_device_name_is_refused(name: str):
    with pytest.raises(UserError, match="reserved by Windows"):
        names.check_name(name, "version name")


@pytest.mark.parametrize(
    "name",
    [
        "my cat",
        "日本語のキャラ",
        "👨‍👩‍👧 family",
        "👍🏽 ok",
        "CONSOLE",
        "COM10",
        "console",
        "nullify",
        "a.b",
        "café",
        "Ünïcødé",
    ],
)
def test_ordinary_names_are_kept(name: str):
    import unicodedata

    assert names.check_name(name, "project name") == unicodedata.normalize("NFC", name)


def test_a_zero_width_joiner_outside_an_emoji_is_refused():
    with pytest.raises(UserError, match="U\\+200D"):
        names.check_name("ab\u200dcd", "project name")


def test_names_that_differ_only_by_case_or_composition_are_refused(tmp_path: Path):
    store = Store(tmp_path / "data")
    store.create_project("Cat")
    store.create_project("café")
    for clash, existing in [("cat", "Cat"), ("CAT", "Cat"), ("ｃａｔ", "Cat"), ("CAFÉ", "café")]:
        with pytest.raises(UserError, match=f"differs from the existing '{existing}' only"):
            store.create_project(clash)
    with pytest.raises(UserError, match="already exists"):
        store.create_project("cafe\u0301")  # the same name, only composed differently: NFC makes it 'café'
    store.create_version("Cat", "v1")
    with pytest.raises(UserError, match="differs from the existing 'v1' only"):
        store.create_version("Cat", "V1")
    assert store.projects() == ["Cat", "café"] and store.versions("Cat") == ["v1"]


def test_names_too_long_to_save_a_lora_are_refused_when_the_version_is_made(tmp_path: Path):
    """120 + 120 bytes fit each name's limit, but not together in ``<project>-<version>-000002.safetensors``:
    refused when the version is created, with no folder left behind."""
    store = Store(tmp_path / "data")
    long_project = "p" * 120
    store.create_project(long_project)
    with pytest.raises(
        UserError,
        match=r"too long: it would make the file name .* bytes long, and disks take at "
        r"most 255",
    ):
        store.create_version(long_project, "v" * 120)
    assert store.versions(long_project) == []
    # What fits, fits: 120 + 80 bytes leave room for the longest suffix and the temporary file.
    version = store.create_version(long_project, "v" * 80)
    names.check_run_paths(version.path, version.default_output_name, "x")


def test_a_too_long_path_is_refused_on_windows_before_anything(tmp_path: Path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    names.check_run_paths(deep, "my lora", "output name", windows=False)
    with pytest.raises(UserError, match="too long for Windows: .* over Windows' 259"):
        names.check_run_paths(deep / ("f" * 60), "my lora", "output name", windows=True)


# ---------------------------------------------------------------------- the command line


@pytest.mark.parametrize("index", range(17))
def test_the_cli_refuses_a_hostile_output_name_before_any_work(
    tmp_path: Path, index: int, demo_ckpt: Path, caplog: pytest.LogCaptureFixture
):
    value = hostile_output_names(tmp_path)[index]
    data = tmp_path / "data"
    (tmp_path / "outside").mkdir()
    store = Store(data)
    store.create_project("p")
    version = store.create_version("p", "v1")
    (version.originals_dir / "a.png").write_bytes(b"not read: refused before")
    before = files_under(tmp_path)
    with caplog.at_level("ERROR"):
        assert main(["--data-dir", str(data), "settings", "p", "v1", "--set", f"output_name={value}"]) == 2
        assert (
            main(
                [
                    "--data-dir",
                    str(data),
                    "train",
                    "p",
                    "v1",
                    "--ckpt",
                    str(demo_ckpt),
                    "--device",
                    "cpu",
                    "--set",
                    f"output_name={value}",
                ]
            )
            == 2
        )
    assert caplog.text.count("setting 'output_name'") == 2, caplog.text
    assert "Traceback" not in caplog.text
    assert files_under(tmp_path) == before  # nothing written anywhere, the settings left as they were
    assert not list(version.trains_dir.iterdir()) and not list(version.prepared_dir.iterdir())


def test_a_hand_edited_settings_file_with_a_path_as_output_name_trains_nothing(
    tmp_path: Path, demo_ckpt: Path, caplog: pytest.LogCaptureFixture
):
    data = tmp_path / "data"
    store = Store(data)
    store.create_project("p")
    version = store.create_version("p", "v1")
    (version.originals_dir / "a.png").write_bytes(b"x")
    settings = json.loads(version.settings_path.read_text(encoding="utf-8"))
    settings["output_name"] = str(outside_target(tmp_path))
    version.settings_path.write_text(json.dumps(settings), encoding="utf-8")
    with caplog.at_level("ERROR"):
        assert main(["--data-dir", str(data), "train", "p", "v1", "--ckpt", str(demo_ckpt), "--device", "cpu"]) == 2
    assert "setting 'output_name'" in caplog.text
    assert not (tmp_path / "outside").exists() and not list(version.trains_dir.iterdir())


def test_a_long_output_name_is_refused_before_preparing_not_at_the_first_save(
    tmp_path: Path, demo_ckpt: Path, pictures: Path
):
    """Before: 120 + 120-byte names trained a whole epoch, then failed at the first save, and resume failed the
    same way. Now the trainer refuses before preparing a picture, whatever path the settings took."""
    from train_tools.data.uploads import add_originals
    from train_tools.training.trainer import Trainer

    store = Store(tmp_path / "data")
    store.create_project("p" * 110)
    version = store.create_version("p" * 110, "v1")
    add_originals([pictures], version.originals_dir)
    config = TrainConfig(output_name="o" * 220, resolution=64, min_bucket_reso=64, max_bucket_reso=128)
    with pytest.raises(UserError, match="output name .setting 'output_name'. is too long"):
        version.save_settings(config)
    with pytest.raises(UserError, match="output name .setting 'output_name'. is too long"):
        Trainer(version, config, demo_ckpt, device="cpu")
    assert not list(version.prepared_dir.iterdir()) and not list(version.trains_dir.iterdir())
    with pytest.raises(UserError, match="run name"):
        Trainer(version, TrainConfig(), demo_ckpt, device="cpu", run_name="../escape")


def test_the_command_line_still_takes_a_checkpoint_path(tmp_path: Path, demo_ckpt: Path):
    from train_tools.models.resolve import resolve_checkpoint

    assert resolve_checkpoint(str(demo_ckpt), []) == demo_ckpt.resolve()
    with pytest.raises(UserError, match="was not found"):
        resolve_checkpoint(str(demo_ckpt), [tmp_path], any_path=False)


# ---------------------------------------------------------------------- the tab and its HTTP API


def _values(**changes: Any) -> list[Any]:
    import train_tools.ui.views as ui_views

    config = TrainConfig(base_model="mine.safetensors")
    for key, value in changes.items():
        object.__setattr__(config, key, value)  # as a request sends it: not validated on the way in
    return [getattr(config, n) for n in ui_views.SETTING_FIELDS]


@pytest.mark.parametrize("index", range(17))
def test_the_tab_refuses_a_hostile_output_name_and_starts_nothing(tmp_path: Path, index: int):
    value = hostile_output_names(tmp_path)[index]
    logic, version, _ckpt = tab_with_picture(tmp_path / "data")
    before = files_under(tmp_path)
    with pytest.raises(UserError, match="setting 'output_name'"):
        logic.begin_train("p", "v1", *_values(output_name=value))
    with pytest.raises(UserError, match="setting 'output_name'"):
        logic.save_settings("p", "v1", *_values(output_name=value))
    assert not logic.jobs.busy and files_under(tmp_path) == before


def test_the_tab_opens_no_checkpoint_outside_the_checkpoint_folders(tmp_path: Path):
    logic, _version, _ckpt = tab_with_picture(tmp_path / "data")
    elsewhere = tmp_path / "elsewhere.safetensors"
    elsewhere.write_bytes(b"x")
    for choice in (str(elsewhere), "../../elsewhere.safetensors", "/etc/passwd"):
        with pytest.raises(UserError, match="not found"):
            logic.begin_train("p", "v1", *_values(base_model=choice))
    assert not logic.jobs.busy


def test_the_tab_installs_no_grid_from_outside_the_version(tmp_path: Path):
    logic, _version, _ckpt = tab_with_picture(tmp_path / "data")
    fake = tmp_path / "outside" / "grid-1"
    fake.mkdir(parents=True)
    (fake / "grid.json").write_text("{}", encoding="utf-8")
    with pytest.raises(UserError, match="not one of this version's runs"):
        logic.install_cell("p", "v1", {"grid": str(fake.with_suffix(".png")), "row": 0, "col": 0})
    assert not logic.host.lora_dir.exists() or not any(logic.host.lora_dir.iterdir())


def _call(base: str, deps: list[dict[str, Any]], api_name: str, data: list[Any], session: str) -> str:
    """One event of the page, sent as the browser sends it (queue/join in a session), and its answer stream."""
    index, dep = next((i, d) for i, d in enumerate(deps) if d.get("api_name") == api_name)
    body = json.dumps(
        {
            "data": data,
            "fn_index": index,
            "session_hash": session,
            "event_data": None,
            "trigger_id": dep["targets"][0][0],
        }
    ).encode()
    request = urllib.request.Request(
        f"{base}/gradio_api/queue/join", data=body, headers={"Content-Type": "application/json"}
    )
    urllib.request.urlopen(request, timeout=30).read()
    lines = []
    with urllib.request.urlopen(f"{base}/gradio_api/queue/data?session_hash={session}", timeout=60) as response:
        for raw in response:
            lines.append(raw.decode("utf-8"))
            if "process_completed" in lines[-1]:
                break
    return "".join(lines)


def test_the_http_api_refuses_a_hostile_output_name_without_a_login(tmp_path: Path):
    """The tab's Begin Train called over HTTP, as anyone who reaches an app started without --auth can: the
    answer is the refusal, and no file appears outside the data dir."""
    import gradio as gr

    if int(gr.__version__.split(".")[0]) < 5:
        pytest.skip("Gradio < 5 cannot start its server in this test environment (its own template error)")
    from train_tools.ui.app import serve

    logic, _version, _ckpt = tab_with_picture(tmp_path / "data")
    (tmp_path / "outside").mkdir()
    target = outside_target(tmp_path)
    port = free_port()
    demo = serve(logic.host, port=port, open_browser=False, block=False)
    try:
        base = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(f"{base}/config", timeout=30) as response:
            deps = json.loads(response.read())["dependencies"]
        assert "process_completed" in _call(base, deps, "choose_project", ["p"], "hostile")  # fills the versions
        answer = _call(base, deps, "begin_train", ["p", "v1", *_values(output_name=str(target))], "hostile")
    finally:
        demo.close()
    assert "tt-error" in answer and "setting &#x27;output_name&#x27;" in answer, answer[-2000:]
    assert not target.exists() and not list(target.parent.iterdir())
    assert not logic.jobs.busy and not list((tmp_path / "data").rglob("victim*"))
