"""Safety (issue 7): untrusted files never run code, names never write outside the data dir, one training run
per device, and the standalone app's network exposure (loopback by default, a login with --auth, only the
projects folder served).

The HTTP test needs a Gradio whose server starts in this environment (5+); the launch arguments are checked
under every Gradio.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import types
import urllib.error
import urllib.parse
import urllib.request
from http.cookiejar import CookieJar
from pathlib import Path
from typing import Any

import pytest

from tests.helpers_app import free_port, tab_with_picture
from tests.stand_ins import MakesAFile
from train_tools import devicelock
from train_tools.errors import UserError
from train_tools.hosts.base import StandaloneHost
from train_tools.store import Store, projects_root

ROOT = Path(__file__).resolve().parent.parent


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*")} if folder.exists() else set()


# ---------------------------------------------------------------------- untrusted files


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("suffix", [".ckpt", ".pt"])
def test_a_malicious_checkpoint_runs_nothing_and_says_why(tmp_path: Path, suffix: str):
    import torch

    from train_tools.models.loader import load_model

    marker = tmp_path / "pwned.txt"
    path = tmp_path / f"evil{suffix}"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(2)}, "evil": MakesAFile(marker)}, path)
    with pytest.raises(UserError) as info:
        load_model(path)
    assert not marker.exists()
    assert path.name in str(info.value) and "run code" in str(info.value)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("container", ["torch.save", "plain pickle"])
def test_a_malicious_training_state_runs_nothing(tmp_path: Path, container: str):
    import torch

    from train_tools.training.state_files import latest_state, load_state, state_dir

    marker = tmp_path / "pwned.txt"
    run = tmp_path / "run"
    path = state_dir(run) / "step-00000004-save.state"
    path.parent.mkdir(parents=True)
    payload = {"format": 1, "step": 4, "evil": MakesAFile(marker)}
    if container == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(UserError, match="damaged"):
        load_state(path)
    with pytest.raises(UserError, match="start a new run"):
        latest_state(run)
    assert not marker.exists()


# ---------------------------------------------------------------------- names that try to leave the data dir

BAD_NAMES = [
    "..",
    ".",
    "../evil",
    "a/../../evil",
    "/tmp/evil-abs",
    "C:\\evil",
    "evil\x00.png",
    "x" * 300,
    "",
    " ",
    ".hidden",
    "CON",
    "a/b",
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_project_and_version_names_are_refused_and_write_nothing_outside(tmp_path: Path, name: str):
    data = tmp_path / "data"
    store = Store(data)
    store.create_project("p")
    store.create_version("p", "v1")
    before = files_under(tmp_path)
    with pytest.raises(UserError):
        store.create_project(name)
    with pytest.raises(UserError):
        store.create_version("p", name)
    with pytest.raises(UserError):
        store.version(name, "v1")
    assert files_under(tmp_path) == before


def test_a_project_folder_linked_outside_is_refused(tmp_path: Path):
    data, outside = tmp_path / "data", tmp_path / "outside"
    outside.mkdir()
    store = Store(data)
    store.create_project("p")
    (store.root / "linked").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UserError, match="outside"):
        store.create_version("linked", "v1")
    with pytest.raises(UserError, match="outside"):
        store.version("linked", "v1")
    assert list(outside.iterdir()) == []


def test_a_run_name_cannot_leave_the_trains_folder(tmp_path: Path):
    from train_tools.training.resume import find_run

    store = Store(tmp_path / "data")
    store.create_project("p")
    version = store.create_version("p", "v1")
    (version.trains_dir / "20250101-000000").mkdir()
    (tmp_path / "elsewhere").mkdir()
    for name in ("../../..", "../dataset", "/tmp", str(tmp_path / "elsewhere"), "no-such-run"):
        with pytest.raises(UserError, match="not a run"):
            find_run(version, name)
    assert find_run(version, "20250101-000000") == (version.trains_dir / "20250101-000000").resolve()


def test_uploaded_file_names_cannot_write_outside_the_version(tmp_path: Path):
    """The browser sends the file's own name; a hostile one (``..``, absolute, NUL, too long, a link to a file
    elsewhere) must neither land outside the version's ``dataset/`` nor overwrite anything."""
    from PIL import Image

    import train_tools.ui.logic as ui_logic
    from train_tools.ui.jobs import JobManager

    host = StandaloneHost(tmp_path / "data")
    logic = ui_logic.TabLogic(host, JobManager())
    logic.create_project("p")
    logic.create_version("p", "v1")
    version = logic.store.version("p", "v1")
    uploads = tmp_path / "gradio-temp"
    uploads.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.png"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(secret)
    secret_bytes = secret.read_bytes()

    def upload_file(name: str, colour: tuple[int, int, int]) -> dict[str, str]:
        path = uploads / f"upload-{len(list(uploads.iterdir()))}.png"
        Image.new("RGB", (64, 64), colour).save(path)
        return {"path": str(path), "orig_name": name}

    link = uploads / "link.png"
    link.symlink_to(secret)
    hostile = [
        upload_file("../../../outside/secret.png", (1, 2, 3)),
        upload_file("/tmp/evil-abs.png", (4, 5, 6)),
        upload_file("..\\..\\evil-win.png", (7, 8, 9)),
        {"path": str(link), "orig_name": "link.png"},
    ]
    refused = [
        upload_file("..", (10, 11, 12)),
        upload_file("evil\x00.png", (13, 14, 15)),
        upload_file("y" * 300 + ".png", (16, 17, 18)),
    ]
    before_outside = files_under(outside) | files_under(tmp_path / "data" / "models")
    before_data = files_under(tmp_path / "data")

    logic.upload(hostile, "p", "v1")
    for value in refused:
        try:
            logic.upload([value], "p", "v1")
        except UserError as exc:  # a clear refusal is fine; a write outside is not
            assert str(exc)
    assert files_under(outside) | files_under(tmp_path / "data" / "models") == before_outside
    assert secret.read_bytes() == secret_bytes
    new = files_under(tmp_path / "data") - before_data
    originals = version.originals_dir.resolve()
    assert new and all(p.resolve().parent == originals for p in new), sorted(new)
    assert not (tmp_path / "evil-abs.png").exists() and not Path("/tmp/evil-abs.png").exists()
    # The link was read, not followed for writing: its copy is an ordinary file with the picture's bytes.
    copies = [p for p in version.originals_dir.iterdir() if p.read_bytes() == secret_bytes]
    assert copies and all(not p.is_symlink() for p in copies)


# ---------------------------------------------------------------------- one run per device


def _start_fake_trainer(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A Trainer stand-in that runs until told to stop: the locks and jobs around it are the real ones."""
    import train_tools.training.trainer as trainer_module

    seen: dict[str, Any] = {"running": 0, "most": 0, "runs": 0, "go": threading.Event()}
    lock = threading.Lock()

    class FakeTrainer:
        def __init__(self, version, config, checkpoint, **kwargs):  # type: ignore[no-untyped-def]
            self.version, self.stop = version, kwargs["stop"]

        def run(self):  # type: ignore[no-untyped-def]
            with devicelock.hold(self.version.data_dir, None, "fake run"):
                with lock:
                    seen["running"] += 1
                    seen["runs"] += 1
                    seen["most"] = max(seen["most"], seen["running"])
                seen["go"].wait(10)
                with lock:
                    seen["running"] -= 1
            return types.SimpleNamespace(interrupted=False, files=[], run_dir=self.version.trains_dir, steps=1)

    monkeypatch.setattr(trainer_module, "Trainer", FakeTrainer)
    return seen


def test_two_begin_trains_at_once_run_exactly_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    import train_tools.ui.logic as ui_logic
    import train_tools.ui.views as ui_views
    from train_tools.cli import main
    from train_tools.config import TrainConfig
    from train_tools.ui.jobs import FINISHED, JobManager

    seen = _start_fake_trainer(monkeypatch)
    logic, version, ckpt = tab_with_picture(tmp_path / "data")
    values = [getattr(TrainConfig(base_model="mine.safetensors"), n) for n in ui_views.SETTING_FIELDS]
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def click() -> None:
        barrier.wait()
        try:
            logic.begin_train("p", "v1", *values)
            outcomes.append("started")
        except UserError as exc:
            outcomes.append(f"refused: {exc}")

    threads = [threading.Thread(target=click) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(o.split(":")[0] for o in outcomes) == ["refused", "started"], outcomes
    deadline = time.time() + 10
    while seen["running"] == 0 and time.time() < deadline:
        time.sleep(0.01)
    assert seen["running"] == 1

    # A second tab of another app process on the same data dir: its own job manager, refused by the lock.
    other = ui_logic.TabLogic(StandaloneHost(tmp_path / "data"), JobManager())
    with pytest.raises(devicelock.DeviceBusy, match="busy with p / v1 .Train Tools tab."):
        other.begin_train("p", "v1", *values)
    # The command line beside the app: one line naming what runs, exit status 2, nothing started.
    with caplog.at_level("ERROR"):
        assert main(["--data-dir", str(tmp_path / "data"), "train", "p", "v1", "--ckpt", str(ckpt)]) == 2
    assert "busy with p / v1 (Train Tools tab" in caplog.text and str(os.getpid()) in caplog.text

    seen["go"].set()
    assert logic.jobs.wait(10).state == FINISHED
    assert (seen["runs"], seen["most"]) == (1, 1)
    # Free again: the next Begin Train runs.
    seen["go"].clear()
    logic.begin_train("p", "v1", *values)
    seen["go"].set()
    assert logic.jobs.wait(10).state == FINISHED and seen["runs"] == 2


_HOLDER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from train_tools import devicelock
with devicelock.hold(sys.argv[2], "cpu", "the other process"):
    print("held", flush=True)
    time.sleep(60)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_the_lock_sees_other_processes_and_a_killed_holder_frees_it(tmp_path: Path):
    folder = tmp_path / "data"  # the data dir of the runs; the lock itself is machine-wide
    stale = devicelock.lock_path("cpu")
    stale.write_text(json.dumps({"pid": 2**22 + 12345, "started": 0, "label": "long gone"}) + "\n")
    # A lock file left by a dead run blocks nothing.
    with devicelock.hold(folder, "cpu", "me"):
        assert devicelock.holder("cuda:0") is None
    child = subprocess.Popen([sys.executable, "-c", _HOLDER, str(ROOT), str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        with pytest.raises(
            devicelock.DeviceBusy,
            match=rf"cpu device is busy with the other process \(process "
            rf"{child.pid}",
        ):
            devicelock.acquire(folder, "cpu", "me")
        assert devicelock.holder("cpu")["pid"] == child.pid  # type: ignore[index]
        assert devicelock.holder("cuda:1") is None  # another device is free
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    with devicelock.hold(folder, "cpu", "me"):  # the kernel dropped the dead holder's lock
        assert json.loads(stale.read_text())["pid"] == os.getpid()


def test_the_lock_is_reentrant_in_a_thread_but_not_across_threads(tmp_path: Path):
    errors: list[BaseException] = []
    with devicelock.hold(tmp_path, "cpu", "outer"):
        with devicelock.hold(tmp_path, "cpu", "inner"):
            pass

        def other() -> None:
            try:
                devicelock.acquire(tmp_path, "cpu", "other thread")
            except devicelock.DeviceBusy as exc:
                errors.append(exc)

        t = threading.Thread(target=other)
        t.start()
        t.join(5)
        assert len(errors) == 1 and "outer" in str(errors[0])
    devicelock.release(devicelock.acquire(tmp_path, "cpu", "after"))


def test_the_later_processes_of_one_data_parallel_run_take_no_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Rank 0 holds the locks for the run; rank 1 (same data dir, same device or version) must not be
    refused by its own run."""
    errors: list[BaseException] = []

    def rank(n: int) -> None:
        try:
            with devicelock.hold(tmp_path, "cpu", f"rank {n}"), devicelock.hold_version(tmp_path / "v", "p / v1"):
                pass
        except devicelock.DeviceBusy as exc:
            errors.append(exc)

    monkeypatch.setenv("WORLD_SIZE", "2")
    with devicelock.hold(tmp_path, "cpu", "rank 0"), devicelock.hold_version(tmp_path / "v", "p / v1"):
        monkeypatch.setenv("RANK", "1")
        t = threading.Thread(target=rank, args=(1,))
        t.start()
        t.join(5)
        assert errors == []
        monkeypatch.setenv("RANK", "0")  # another run's first process is refused
        t = threading.Thread(target=rank, args=(0,))
        t.start()
        t.join(5)
        assert len(errors) == 1 and "rank 0" in str(errors[0])


# ---------------------------------------------------------------------- the standalone app on the network


def test_app_flags_default_to_this_computer_and_read_logins(tmp_path: Path):
    from train_tools.ui.app import build_parser
    from train_tools.ui.login import parse_auth

    assert build_parser().parse_args([]).listen == "127.0.0.1"
    assert build_parser().parse_args(["--listen"]).listen == "0.0.0.0"
    assert build_parser().parse_args(["--listen", "192.168.1.5"]).listen == "192.168.1.5"
    logins = tmp_path / "logins.txt"
    logins.write_text("# who may use it\nann:pa:ss:word\n\n  bob:x  \n", encoding="utf-8")
    args = build_parser().parse_args(["--auth", "me:secret", "--auth-file", str(logins)])
    assert parse_auth(args.auth, args.auth_file) == [("me", "secret"), ("ann", "pa:ss:word"), ("bob", "x")]
    for bad in (["nopassword"], [":x"], ["me:"]):
        with pytest.raises(UserError, match="user:password"):
            parse_auth(bad)
    with pytest.raises(UserError, match="Cannot read"):
        parse_auth([], tmp_path / "missing.txt")


def test_serve_binds_loopback_serves_only_the_projects_and_passes_the_login(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import gradio as gr

    from train_tools.ui.app import serve

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: calls.append(kw))
    host = StandaloneHost(tmp_path / "data", [tmp_path / "ckpts"], tmp_path / "loras")
    serve(host, port=7001, open_browser=False, block=False)
    serve(host, port=7002, listen="0.0.0.0", open_browser=False, block=False, auth=[("u", "p")])
    local, network = calls
    assert local["server_name"] == "127.0.0.1" and "auth" not in local
    assert local["allowed_paths"] == [str(projects_root(host.data_dir))]
    if "blocked_paths" in local:
        assert set(local["blocked_paths"]) == {str(tmp_path / "ckpts"), str(tmp_path / "loras")}
    assert network["server_name"] == "0.0.0.0" and network["auth"]("u", "p") and not network["auth"]("u", "x")


def _get(url: str, opener: urllib.request.OpenerDirector | None = None) -> int:
    try:
        with (opener or urllib.request.build_opener()).open(url, timeout=20) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_the_app_refuses_requests_without_the_login_and_serves_only_project_files(tmp_path: Path):
    import gradio as gr

    if int(gr.__version__.split(".")[0]) < 5:
        pytest.skip("Gradio < 5 cannot start its server in this test environment (its own template error)")
    from train_tools.ui.app import serve

    host = StandaloneHost(tmp_path / "data")
    port = free_port()
    demo = serve(host, port=port, open_browser=False, block=False, auth=[("ann", "s3cret")])
    try:
        assert demo.server_name == "127.0.0.1"
        base = f"http://127.0.0.1:{port}"
        project_file = projects_root(host.data_dir) / "p" / "note.txt"
        project_file.parent.mkdir(parents=True)
        project_file.write_text("hello", encoding="utf-8")
        checkpoint = host.ckpt_dirs[0] / "model.safetensors"
        checkpoint.parent.mkdir(parents=True)
        checkpoint.write_bytes(b"weights")
        lock = devicelock.lock_path("cpu")
        lock.write_text("{}\n")
        file_route = f"{base}/gradio_api/file="

        assert _get(f"{base}/config") == 401
        assert _get(f"{file_route}{project_file}") == 401
        jar = CookieJar()
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        wrong = urllib.parse.urlencode({"username": "ann", "password": "nope"}).encode()
        with pytest.raises(urllib.error.HTTPError):
            opener.open(f"{base}/login", data=wrong, timeout=20)
        assert _get(f"{base}/config", opener) == 401
        right = urllib.parse.urlencode({"username": "ann", "password": "s3cret"}).encode()
        with opener.open(f"{base}/login", data=right, timeout=20) as response:
            assert response.status == 200
        assert _get(f"{base}/config", opener) == 200
        assert _get(f"{file_route}{project_file}", opener) == 200
        assert _get(f"{file_route}{checkpoint}", opener) == 403
        assert _get(f"{file_route}{lock}", opener) == 403
    finally:
        demo.close()


def test_one_unusable_upload_name_does_not_refuse_the_others(tmp_path: Path):
    """A 300-character (or NUL-bearing) name among good pictures: that file is named as refused, the rest land."""
    from PIL import Image

    import train_tools.ui.logic as ui_logic
    import train_tools.ui.views as ui_views
    from train_tools.ui.jobs import JobManager

    logic = ui_logic.TabLogic(StandaloneHost(tmp_path / "data"), JobManager())
    logic.create_project("p")
    logic.create_version("p", "v1")
    version = logic.store.version("p", "v1")
    files = []
    for i, name in enumerate(["good.png", "y" * 300 + ".png", "evil\x00.png", "also good.png"]):
        path = tmp_path / f"upload-{i}.png"
        Image.new("RGB", (64, 64), (40 * i, 10, 10)).save(path)
        files.append({"path": str(path), "orig_name": name})
    _cleared, _gallery, _line, message = logic.upload(files, "p", "v1")
    assert sorted(p.name for p in ui_views.original_images(version)) == ["also good.png", "good.png"]
    assert "2" in message and "tt-error" not in message
