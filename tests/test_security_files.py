"""Safety (issue 13): the files the project writes are readable by other programs (the umask's permissions), a
folder that may not be written gives a sentence instead of a traceback everywhere, and the terminal's lines stay
readable (one summary, errors on a line of their own).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import fixtures_training
from train_tools import fileio
from train_tools.cli import main
from train_tools.config import TrainConfig
from train_tools.errors import UserError
from train_tools.store import Store

ROOT = Path(__file__).resolve().parent.parent

one_thread = fixtures_training.one_thread
demo_ckpt = fixtures_training.demo_ckpt
pictures = fixtures_training.pictures


@pytest.fixture()
def umask() -> Iterator[None]:
    """A known umask for the test (022: owner writes, everyone reads), the old one restored after."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------------- permissions


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_written_files_get_the_umasks_permissions(tmp_path: Path):
    old = os.umask(0o022)
    try:
        fileio.write_bytes(tmp_path / "a.bin", b"x")
        fileio.write_with(tmp_path / "b.bin", lambda tmp: shutil.copyfile(tmp_path / "a.bin", tmp))
        os.umask(0o077)  # a user who wants private files gets them
        fileio.write_text(tmp_path / "c.txt", "x")
        os.umask(0o002)
        fileio.write_json(tmp_path / "d.json", {})
    finally:
        os.umask(old)
    assert [mode(tmp_path / n) for n in ("a.bin", "b.bin", "c.txt", "d.json")] == [0o644, 0o644, 0o600, 0o664]
    assert fileio.current_umask() == old


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_every_file_of_a_run_and_an_install_is_readable_by_others(
    tmp_path: Path, umask: None, demo_ckpt: Path, pictures: Path
):
    """Dataset copies (even of a private 0600 picture), settings, prepared pictures, the LoRA files, the state,
    previews and what is installed into the Lora folder: all 0644 under umask 022."""
    private = tmp_path / "private"
    shutil.copytree(pictures, private)
    for path in private.iterdir():
        path.chmod(0o600)
    data, loras = tmp_path / "data", tmp_path / "Lora"
    args = ["--data-dir", str(data)]
    assert main([*args, "project", "create", "p"]) == 0
    assert main([*args, "version", "create", "p", "v1"]) == 0
    assert main([*args, "dataset", "add", "p", "v1", str(private)]) == 0
    assert (
        main(
            [
                *args,
                "train",
                "p",
                "v1",
                "--ckpt",
                str(demo_ckpt),
                "--device",
                "cpu",
                "--set",
                "epochs=1",
                "--set",
                "resolution=64",
                "--set",
                "min_bucket_reso=64",
                "--set",
                "max_bucket_reso=128",
                "--set",
                "network_dim=2",
                "--set",
                "repeats=1",
                "--set",
                "train_text_encoder=false",
            ]
        )
        == 0
    )
    lora = next((data / "outputs").rglob("p-v1.safetensors"))
    assert main([*args, "install", "p", "v1", str(lora), "--lora-dir", str(loras)]) == 0
    files = [p for p in [*data.rglob("*"), *loras.rglob("*")] if p.is_file() and not p.name.endswith(".lock")]
    kinds = {p.suffix for p in files}
    assert {".png", ".txt", ".json", ".safetensors", ".state"} <= kinds, kinds
    assert {p.relative_to(tmp_path).as_posix(): oct(mode(p)) for p in files if mode(p) != 0o644} == {}


# ---------------------------------------------------------------------- a folder that may not be written


def _as_another_user() -> dict[str, object]:
    """subprocess arguments that make the child unable to write a folder this process owns: as root (where
    permissions are not checked), the child runs as 'nobody'; otherwise the folder is made read-only."""
    if os.name == "posix" and os.geteuid() == 0:
        return {"user": "nobody"}
    return {}


@pytest.fixture()
def read_only_data(tmp_path_factory: pytest.TempPathFactory, demo_ckpt: Path, pictures: Path) -> Iterator[Path]:
    """A data dir with a project, a version with pictures and a checkpoint, that the child cannot write."""
    if os.name != "posix":
        pytest.skip("POSIX permissions")
    # Outside pytest's 0700 temp root, so another user can reach it.
    top = Path(tempfile.mkdtemp(prefix="train-tools-ro-"))
    top.chmod(0o755)
    data = top / "data"
    store = Store(data)
    store.create_project("p")
    version = store.create_version("p", "v1")
    from train_tools.data.uploads import add_originals

    add_originals([pictures], version.originals_dir)
    shutil.copy(demo_ckpt, top / "demo.safetensors")
    (top / "more").mkdir()
    from PIL import Image

    Image.new("RGB", (96, 96), (10, 200, 30)).save(top / "more" / "new.png")  # a picture the version lacks
    for path in [top, *top.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    if not _as_another_user():
        for path in [data, *data.rglob("*")]:
            if path.is_dir():
                path.chmod(0o555)
    yield data
    for path in [data, *data.rglob("*")]:
        if path.is_dir():
            path.chmod(0o755)
    shutil.rmtree(top, ignore_errors=True)


COMMANDS = [
    ["project", "create", "q"],
    ["version", "create", "p", "v2"],
    ["dataset", "add", "p", "v1", "{more}"],
    ["dataset", "update", "p", "v1"],
    ["settings", "p", "v1", "--set", "epochs=3"],
    ["train", "p", "v1", "--ckpt", "{ckpt}", "--device", "cpu"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c[:2]) for c in COMMANDS])
def test_a_read_only_data_dir_gives_a_sentence_not_a_traceback(read_only_data: Path, command: list[str]):
    top = read_only_data.parent
    argv = [a.format(more=top / "more", ckpt=top / "demo.safetensors") for a in command]
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(top),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
        "PYTHONDONTWRITEBYTECODE": "1",
        "TRAIN_TOOLS_LOCK_DIR": str(top / "locks"),
    }
    (top / "locks").mkdir(exist_ok=True)
    (top / "locks").chmod(0o777)
    before = {p: p.stat().st_mtime_ns for p in read_only_data.rglob("*")}
    result = subprocess.run(
        [sys.executable, "-m", "train_tools", "--data-dir", str(read_only_data), *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=str(top),
        **_as_another_user(),
    )  # type: ignore[call-overload]
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "Error: Cannot write" in result.stderr and "read-only or belongs to another user" in result.stderr, (
        result.stderr[-3000:]
    )
    assert {p: p.stat().st_mtime_ns for p in read_only_data.rglob("*")} == before  # nothing the user had changed


def test_the_tab_says_the_folder_is_read_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """In the tab (in-process: as root permissions cannot be taken away, so the file system's answer is
    stood in for), the message is the same sentence, and the page keeps working."""
    import errno

    import train_tools.ui.layout as ui_layout
    import train_tools.ui.logic as ui_logic
    import train_tools.ui.views as ui_views
    from train_tools.hosts.base import StandaloneHost
    from train_tools.ui.jobs import JobManager

    logic = ui_logic.TabLogic(StandaloneHost(tmp_path / "data"), JobManager())
    logic.create_project("p")
    logic.create_version("p", "v1")

    def refuse(*args: object, **kwargs: object) -> object:
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "data" / "x"))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    monkeypatch.setattr(Path, "mkdir", refuse)
    values = [getattr(TrainConfig(), n) for n in ui_views.SETTING_FIELDS]
    msg = object()
    for fn, args in [
        (logic.save_settings, ("p", "v1", *values)),
        (logic.create_project, ("q",)),
        (logic.create_version, ("p", "v2")),
    ]:
        out = ui_layout.guarded(fn, [msg], msg)(*args)
        assert "Cannot write" in str(out[0]) and "read-only" in str(out[0]), out
    from train_tools.ui.jobs import describe_failure

    assert describe_failure(PermissionError(errno.EROFS, "Read-only file system", "/x")).startswith(
        "Permission denied for /x: the folder is read-only"
    )


def test_os_errors_that_are_not_the_users_stay_errors():
    import errno

    from train_tools.errors import from_os_error

    assert from_os_error(OSError(errno.EIO, "Input/output error")) is None
    assert from_os_error(ValueError("x")) is None
    assert isinstance(from_os_error(OSError(errno.ENOSPC, "No space left on device", "/a/b.bin")), UserError)


# ---------------------------------------------------------------------- terminal lines


def test_dataset_add_prints_its_summary_once(tmp_path: Path, pictures: Path, capfd: pytest.CaptureFixture[str]):
    import logging

    data = tmp_path / "data"
    store = Store(data)
    store.create_project("p")
    store.create_version("p", "v1")
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)  # as the CLI's basicConfig does when it is the first to run
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.INFO)
    try:
        assert main(["--data-dir", str(data), "dataset", "add", "p", "v1", str(pictures)]) == 0
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    out, err = capfd.readouterr()
    assert (out + err).lower().count("added 2 pictures") == 1, out + err


def test_an_error_starts_on_its_own_line_after_a_progress_bar(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
):
    import logging

    from tqdm import tqdm

    import train_tools.cli as cli

    def fails(argv: object) -> int:
        bar = tqdm(total=10, desc="Preparing pictures", file=sys.stderr)
        bar.update(3)
        bar.refresh()
        raise UserError("The picture folder went away; add the pictures again.")

    monkeypatch.setattr(cli, "run", fails)
    handler = logging.StreamHandler(sys.stderr)
    logging.getLogger("train_tools").addHandler(handler)
    try:
        assert cli.main([]) == 2
    finally:
        logging.getLogger("train_tools").removeHandler(handler)
    err = capfd.readouterr().err
    lines = err.replace("\r", "\n").splitlines()
    assert any(line.startswith("Error: The picture folder went away") for line in lines), repr(err)
    assert not list(getattr(tqdm, "_instances", ()))
