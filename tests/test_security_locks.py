"""Issue 13, part 4: one run per physical device, machine-wide, and one writer per version.

Every spelling of a device takes one lock; two data dirs (two WebUI installs, the app beside a WebUI) share
that lock; ``dataset update`` and a run of the same version refuse each other; the shared lock folder cannot
be turned against its users (links planted in it, another user's files, hostile holder lines).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from train_tools import devicelock, devices
from train_tools.errors import UserError
from train_tools.hosts.base import StandaloneHost

ROOT = Path(__file__).resolve().parent.parent

# A process of another program holding a device with its own data dir, as a second WebUI install would.
_HOLDER = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from train_tools import devicelock
with devicelock.hold(Path(sys.argv[2]), sys.argv[3], sys.argv[4]):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes it
"""


@pytest.fixture
def holder_script(tmp_path: Path) -> Path:
    script = tmp_path / "bin" / "webui.py"
    script.parent.mkdir()
    script.write_text(_HOLDER, encoding="utf-8")
    return script


class _Child:
    def __init__(self, args: list[str], **kwargs: Any) -> None:
        self.proc = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != "held":
            self.proc.kill()
            raise AssertionError(f"the holder did not start: {line} {self.proc.communicate()[1]}")

    def stop(self) -> str:
        """Let it end; its stderr."""
        return self.proc.communicate(timeout=20)[1]


@pytest.fixture
def child() -> Iterator[Any]:
    started: list[_Child] = []

    def start(args: list[str], **kwargs: Any) -> _Child:
        started.append(_Child(args, **kwargs))
        return started[-1]

    yield start
    for c in started:
        if c.proc.poll() is None:
            c.proc.kill()
            c.proc.wait(10)


def _fake_trainer(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A Trainer stand-in that holds the locks a real run holds and runs until ``go`` is set."""
    import train_tools.training.trainer as trainer_module

    seen: dict[str, Any] = {"runs": 0, "go": threading.Event(), "running": threading.Event()}

    class FakeTrainer:
        def __init__(self, version: Any, config: Any, checkpoint: Any, **kwargs: Any) -> None:
            self.version, self.device = version, kwargs.get("device")

        def run(self) -> Any:
            label = f"{self.version.project} / {self.version.name}"
            with (
                devicelock.hold(self.version.data_dir, self.device, label),
                devicelock.hold_version(self.version.path, label),
            ):
                seen["runs"] += 1
                seen["running"].set()
                seen["go"].wait(20)
            return types.SimpleNamespace(interrupted=False, files=[], run_dir=self.version.trains_dir, steps=1)

    monkeypatch.setattr(trainer_module, "Trainer", FakeTrainer)
    return seen


def _data_dir_with_version(data: Path) -> tuple[Any, Any, Path]:
    """A data dir with project p, version v1 holding four real pictures, and a checkpoint file."""
    from PIL import Image

    import train_tools.ui.logic as ui_logic
    from train_tools.ui.jobs import JobManager

    host = StandaloneHost(data)
    logic = ui_logic.TabLogic(host, JobManager())
    logic.create_project("p")
    logic.create_version("p", "v1")
    version = logic.store.version("p", "v1")
    for i in range(4):
        Image.new("RGB", (96, 80), (60 * i, 20, 200 - 40 * i)).save(version.originals_dir / f"pic{i}.png")
    version.save_settings(_config())
    ckpt = host.ckpt_dirs[0] / "mine.safetensors"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    ckpt.write_bytes(b"x")
    return logic, version, ckpt


def _config() -> Any:
    from train_tools.config import TrainConfig

    return TrainConfig(base_model="mine.safetensors", resolution=64, min_bucket_reso=64, max_bucket_reso=128)


def _setting_values() -> list[Any]:
    import train_tools.ui.views as ui_views

    return [getattr(_config(), n) for n in ui_views.SETTING_FIELDS]


def _lock_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".gpu-*.lock")]


# ---------------------------------------------------------------------- one name per device


@pytest.mark.parametrize("spelling", ["cpu", "cpu:0", "CPU", " cpu:0 ", "Cpu:3"])
def test_every_spelling_of_the_cpu_is_one_device_and_one_lock(spelling: str, monkeypatch: pytest.MonkeyPatch):
    assert devicelock.device_name(spelling) == "cpu"
    assert devicelock.lock_path(spelling) == devicelock.lock_path("cpu")
    # A data-parallel run on the CPU is still the one CPU (its later processes take no lock at all).
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert devicelock.lock_path(spelling) == devicelock.lock_path("cpu")


@pytest.mark.parametrize("spelling", ["cuda", "cuda:0", "CUDA:0 ", " Cuda"])
def test_cuda_and_cuda_0_are_one_gpu(spelling: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(devices, "_cuda_count", lambda: 2)
    monkeypatch.setattr(devices, "_gpu_uuid", lambda index: None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert devicelock.device_name(spelling) == "cuda:0"
    assert devicelock.lock_path(spelling) == devicelock.lock_path("cuda:0") != devicelock.lock_path("cuda:1")
    # Under accelerate launch a bare "cuda" is the process's own GPU.
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert devicelock.device_name("cuda") == "cuda:1"


def test_a_gpu_is_named_by_the_card_not_by_its_index_in_this_process(monkeypatch: pytest.MonkeyPatch):
    """CUDA_VISIBLE_DEVICES=1 makes the second card cuda:0 in that process: it must take the same lock as
    cuda:1 of a process that sees both cards, and not the lock of the first card."""
    cards = ["11111111-aaaa-bbbb-cccc-000000000000", "22222222-aaaa-bbbb-cccc-000000000000"]

    def uuid(index: int) -> str:  # what torch reports, through the process's CUDA_VISIBLE_DEVICES
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return cards[int(visible.split(",")[index])] if visible else cards[index]

    monkeypatch.setattr(devices, "_cuda_count", lambda: 2)
    monkeypatch.setattr(devices, "_gpu_uuid", uuid)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    second_card, first_card = devicelock.lock_path("cuda:1"), devicelock.lock_path("cuda:0")
    assert cards[1] in second_card.name and second_card != first_card
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert devicelock.lock_path("cuda:0") == devicelock.lock_path("cuda") == second_card

    # Without torch's UUIDs (no CUDA in this torch): the index before CUDA_VISIBLE_DEVICES renumbered it.
    monkeypatch.setattr(devices, "_gpu_uuid", lambda index: None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    renumbered = devicelock.lock_path("cuda:0")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert renumbered == devicelock.lock_path("cuda:1") != devicelock.lock_path("cuda:0")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"GPU-{cards[1]}")
    assert devicelock.lock_path("cuda:0") == second_card  # the same name torch's UUID gives


@pytest.mark.parametrize(
    "nonsense", ["gpu", "cuda:x", "cuda:-1", "../../etc/passwd", "cuda:0; rm -rf ~", "cuda\x00", "cpu:0:1", "  :0"]
)
def test_a_nonsense_device_is_refused_with_a_sentence(nonsense: str):
    with pytest.raises(UserError, match=r"is not a device to train on; write cpu, cuda \(the first GPU\)") as info:
        devicelock.lock_path(nonsense)
    assert "\x00" not in str(info.value)


def test_a_gpu_this_computer_lacks_is_refused_with_a_sentence(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(devices, "_cuda_count", lambda: 1)
    with pytest.raises(UserError, match=r"There is no GPU cuda:3: this computer has 1 \(cuda:0\); pick one"):
        devicelock.device_name("cuda:3")
    assert devicelock.device_name("cuda:0") == "cuda:0"
    monkeypatch.setattr(devices, "_cuda_count", lambda: 4)
    with pytest.raises(UserError, match=r"this computer has 4 \(cuda:0 to cuda:3\)"):
        devicelock.device_name("cuda:4")


# ---------------------------------------------------------------------- one place per machine


def test_the_lock_lives_in_the_machine_folder_not_in_the_data_dir(tmp_path: Path, _own_lock_dir: Path):
    folder = tmp_path / "data"
    with devicelock.hold(folder, "cpu", "me") as path:
        assert path.parent == _own_lock_dir
        assert json.loads(path.read_text())["data_dir"] == str(folder)
    assert not folder.exists() or not _lock_files(folder)


def test_without_an_override_every_user_shares_one_sticky_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    if os.name == "nt":
        pytest.skip("Windows keeps the locks per user (see devicelock.py)")
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.delenv(devicelock.LOCK_DIR_ENV)
    monkeypatch.setattr(devicelock, "_shared_root", lambda: root)
    old_umask = os.umask(0o077)  # a user's strict umask must not lock the other users out
    try:
        with devicelock.hold(tmp_path / "data", "cpu", "me") as path:
            assert path.parent == root / devicelock.SHARED_DIR_NAME
            assert stat.S_IMODE(path.parent.stat().st_mode) == 0o1777
            assert stat.S_IMODE(path.stat().st_mode) == 0o666
    finally:
        os.umask(old_umask)


def test_an_unusable_shared_folder_falls_back_to_the_users_own_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    if os.name == "nt":
        pytest.skip("Windows keeps the locks per user (see devicelock.py)")
    root = tmp_path / "tmp"
    root.mkdir()
    elsewhere = tmp_path / "someone-elses-folder"
    elsewhere.mkdir()
    (root / devicelock.SHARED_DIR_NAME).symlink_to(elsewhere)  # planted by another user
    monkeypatch.delenv(devicelock.LOCK_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(devicelock, "_shared_root", lambda: root)
    monkeypatch.setattr(devicelock, "_warned", set())
    with (
        caplog.at_level(logging.WARNING, logger="train_tools.devicelock"),
        devicelock.hold(tmp_path / "data", "cpu", "me") as path,
    ):
        assert path.parent == tmp_path / "cache" / "train_tools" / "locks"
    assert "cannot use the shared lock folder" in caplog.text and "other users of this computer" in caplog.text
    assert list(elsewhere.iterdir()) == []


# ---------------------------------------------------------------------- two data dirs, one device


def test_a_second_data_dir_cannot_train_on_a_device_the_first_holds(
    tmp_path: Path, holder_script: Path, child: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    """Another program (a WebUI install) trains with data dir A on "cpu:0"; this app, with data dir B, asks
    for "cpu": the same device, so Begin Train and the command line of B are refused, naming A."""
    from train_tools.cli import main

    seen = _fake_trainer(monkeypatch)
    data_a, data_b = tmp_path / "webui-a" / "data", tmp_path / "app-b" / "data"
    _data_dir_with_version(data_a)
    logic_b, _version_b, ckpt_b = _data_dir_with_version(data_b)
    other = child([sys.executable, str(holder_script), str(ROOT), str(data_a), "cpu:0", "cat / v3 (Train Tools tab)"])
    pid = other.proc.pid
    busy = (
        rf"The cpu device is busy with cat / v3 \(Train Tools tab\) \(process {pid}, webui\.py with data dir "
        rf"{data_a}, started \d\d:\d\d:\d\d\); wait for it to finish"
    )

    with pytest.raises(devicelock.DeviceBusy, match=busy):
        logic_b.begin_train("p", "v1", *_setting_values())
    with caplog.at_level(logging.ERROR):
        rc = main(["--data-dir", str(data_b), "train", "p", "v1", "--ckpt", str(ckpt_b), "--device", "cpu"])
    assert rc == 2 and "busy with cat / v3 (Train Tools tab)" in caplog.text and str(data_a) in caplog.text
    assert seen["runs"] == 0
    assert devicelock.holder("cpu:0")["pid"] == pid  # type: ignore[index]
    assert not _lock_files(data_a) and not _lock_files(data_b)  # the lock is in neither data dir

    other.stop()  # A finished: B trains
    seen["go"].set()
    assert main(["--data-dir", str(data_b), "train", "p", "v1", "--ckpt", str(ckpt_b), "--device", "cpu:0"]) == 0
    assert seen["runs"] == 1


def test_a_run_of_this_data_dir_is_not_named_by_its_data_dir(tmp_path: Path, holder_script: Path, child: Any):
    """The data dir is named when it is another one; a run of one's own data dir is named as before."""
    data = tmp_path / "data"
    other = child([sys.executable, str(holder_script), str(ROOT), str(data), "cpu", "p / v1 (command line)"])
    with pytest.raises(devicelock.DeviceBusy) as info:
        devicelock.acquire(data, "cpu", "me")
    assert f"busy with p / v1 (command line) (process {other.proc.pid}, started " in str(info.value)
    assert "data dir" not in str(info.value)


# ---------------------------------------------------------------------- dataset update vs a run


def test_dataset_update_is_refused_while_a_run_trains_the_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    from train_tools.cli import main
    from train_tools.ui.jobs import FINISHED

    seen = _fake_trainer(monkeypatch)
    data = tmp_path / "data"
    logic, version, _ckpt = _data_dir_with_version(data)
    values = _setting_values()
    logic.begin_train("p", "v1", *values)
    assert seen["running"].wait(20)

    busy = r"Version p / v1 is busy with p / v1 \(Train Tools tab\) \(process \d+, started"
    with caplog.at_level(logging.ERROR):
        assert main(["--data-dir", str(data), "dataset", "update", "p", "v1"]) == 2
    assert "Version p / v1 is busy with p / v1 (Train Tools tab)" in caplog.text
    with pytest.raises(devicelock.DeviceBusy, match=busy):
        logic.update_dataset("p", "v1", *values)
    assert not version.prepared_dir.exists() or not any(version.prepared_dir.iterdir())  # nothing rewritten

    seen["go"].set()
    assert logic.jobs.wait(20).state == FINISHED
    assert main(["--data-dir", str(data), "dataset", "update", "p", "v1"]) == 0  # free again: it prepares
    assert len(list(version.prepared_dir.glob("*.png"))) == 4


def test_training_is_refused_while_the_dataset_is_updated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    import train_tools.data.preparation as preparation
    from train_tools.cli import main

    seen = _fake_trainer(monkeypatch)
    data = tmp_path / "data"
    logic, version, ckpt = _data_dir_with_version(data)
    values = _setting_values()
    preparing, finish = threading.Event(), threading.Event()
    real_prepare = preparation.prepare_dataset

    def slow_prepare(*args: Any, **kwargs: Any) -> Any:
        preparing.set()
        finish.wait(20)
        return real_prepare(*args, **kwargs)

    monkeypatch.setattr(preparation, "prepare_dataset", slow_prepare)
    outcome: list[Any] = []
    update = threading.Thread(target=lambda: outcome.append(logic.update_dataset("p", "v1", *values)))
    update.start()
    try:
        assert preparing.wait(20)
        busy = r"Version p / v1 is busy with p / v1 \(Update Dataset, Train Tools tab\) \(process \d+, started"
        with pytest.raises(devicelock.DeviceBusy, match=busy):
            logic.begin_train("p", "v1", *values)
        with caplog.at_level(logging.ERROR):
            assert main(["--data-dir", str(data), "train", "p", "v1", "--ckpt", str(ckpt), "--device", "cpu"]) == 2
        assert "busy with p / v1 (Update Dataset, Train Tools tab)" in caplog.text
        with caplog.at_level(logging.ERROR):  # nor a second update beside it
            assert main(["--data-dir", str(data), "dataset", "update", "p", "v1"]) == 2
        assert seen["runs"] == 0
    finally:
        finish.set()
        update.join(30)
    assert outcome and "Dataset updated" in outcome[0][-1]
    seen["go"].set()
    assert main(["--data-dir", str(data), "train", "p", "v1", "--ckpt", str(ckpt), "--device", "cpu"]) == 0
    assert seen["runs"] == 1


@pytest.mark.parametrize("way", ["Train Tools tab", "command line"])
def test_no_update_slips_in_between_the_runs_of_a_learning_rate_list(
    way: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Two learning rates run two Trainers; between them (the Trainer's own locks released) the version
    stays held by the job or the command, so an update cannot rewrite prepared/ under the second run."""
    import train_tools.training.trainer as trainer_module
    from train_tools.cli import main
    from train_tools.ui.jobs import JobManager, training_work

    data = tmp_path / "data"
    _logic, version, ckpt = _data_dir_with_version(data)
    refusals: list[str] = []

    class Between:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def run(self) -> Any:
            def update() -> None:
                try:
                    with devicelock.hold_version(version.path, "p / v1 (dataset update)"):
                        refusals.append("")
                except devicelock.DeviceBusy as exc:
                    refusals.append(str(exc))

            t = threading.Thread(target=update)
            t.start()
            t.join(10)
            return types.SimpleNamespace(interrupted=False, files=[], run_dir=version.trains_dir, steps=1)

    monkeypatch.setattr(trainer_module, "Trainer", Between)
    if way == "command line":
        assert (
            main(
                [
                    "--data-dir",
                    str(data),
                    "train",
                    "p",
                    "v1",
                    "--ckpt",
                    str(ckpt),
                    "--device",
                    "cpu",
                    "--set",
                    "learning_rate=1e-4,2e-4",
                ]
            )
            == 0
        )
    else:
        jobs = JobManager()
        jobs.start(training_work(version, [object(), object()], ckpt, "cpu"))
        jobs.wait(20)
    assert len(refusals) == 2 and all(f"Version p / v1 is busy with p / v1 ({way})" in r for r in refusals), refusals


# ---------------------------------------------------------------------- a shared folder others can write


def test_a_link_planted_as_a_lock_file_is_refused_not_written_through(tmp_path: Path, _own_lock_dir: Path):
    victim = tmp_path / "victims-notes.txt"
    victim.write_text("precious\n")
    lock = devicelock.lock_path("cpu")
    lock.symlink_to(victim)
    with pytest.raises(UserError, match=r"cannot use the lock file .*; delete it, or set TRAIN_TOOLS_LOCK_DIR"):
        devicelock.acquire(tmp_path / "data", "cpu", "me")
    lock.unlink()
    os.link(victim, lock)  # a second name of the victim's file
    with pytest.raises(UserError, match=r"a second name of another file"):
        devicelock.acquire(tmp_path / "data", "cpu", "me")
    with pytest.raises(UserError, match=r"a second name of another file"):
        devicelock.ensure_free(tmp_path / "data", "cpu")
    assert victim.read_text() == "precious\n"


_SCRIBBLER = """
import fcntl, json, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o666)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, json.dumps({"pid": 7, "started": 0, "label": "evil\\x1b[2J\\r\\nrm -rf ~ " + "x" * int(sys.argv[2]),
                         "user": "\\x07mallory", "data_dir": "<b>/x</b>\\n"}).encode())
print("held", flush=True)
sys.stdin.read()
"""


@pytest.mark.skipif(os.name == "nt", reason="the holder uses fcntl")
def test_a_hostile_holder_line_makes_a_short_printable_message(tmp_path: Path, child: Any):
    """Anyone may write the shared lock files: control characters go, long fields are cut, and a line too
    long to read (over 4 KiB) is "another training run"."""
    holder = child([sys.executable, "-c", _SCRIBBLER, str(devicelock.lock_path("cpu")), "1000"])
    with pytest.raises(devicelock.DeviceBusy) as info:
        devicelock.acquire(tmp_path / "data", "cpu", "me")
    text = str(info.value)
    assert all(c.isprintable() for c in text), repr(text)
    assert text.startswith("The cpu device is busy with evil[2Jrm -rf ~ xxx") and len(text) < 600, text
    assert "user mallory" in text and "data dir <b>/x</b>" in text
    holder.stop()
    child([sys.executable, "-c", _SCRIBBLER, str(devicelock.lock_path("cpu")), "100000"])
    with pytest.raises(devicelock.DeviceBusy, match="The cpu device is busy with another training run; wait"):
        devicelock.acquire(tmp_path / "data", "cpu", "me")


_OTHER_USER = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from train_tools import devicelock
try:
    with devicelock.hold(Path("/nonexistent/data"), "cpu", "nobody's run"):
        print("held", flush=True)
        sys.stdin.read()
except devicelock.DeviceBusy as exc:
    print("busy:", exc, flush=True)
"""


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to run as another user")
def test_two_users_lock_each_other_out_and_an_unwritable_file_is_no_crash(child: Any, monkeypatch: pytest.MonkeyPatch):
    """Root and nobody share one lock folder (sticky, like /tmp): each one's run refuses the other's, even
    with a strict umask; a lock file nobody may not write (root's, 0644) is still locked, not a crash."""
    shared = Path(tempfile.mkdtemp(prefix="train_tools-locks-test-", dir="/tmp"))
    try:
        os.chmod(shared, 0o1777)
        monkeypatch.setenv(devicelock.LOCK_DIR_ENV, str(shared))
        env = {**os.environ, "HOME": "/nonexistent"}
        as_nobody = [sys.executable, "-c", _OTHER_USER, str(ROOT)]
        old_umask = os.umask(0o077)
        try:
            with devicelock.hold(Path("/root/data"), "cpu", "root's run"):
                refused = subprocess.run(
                    as_nobody,
                    user=65534,
                    group=65534,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=60,
                    stdin=subprocess.DEVNULL,
                )
        finally:
            os.umask(old_umask)
        assert refused.stdout.startswith("busy: The cpu device is busy with root's run (process "), refused
        assert "user root" in refused.stdout and "data dir /root/data" in refused.stdout

        nobody = child(as_nobody, user=65534, group=65534, env=env)  # free now: nobody takes it
        with pytest.raises(
            devicelock.DeviceBusy,
            match=rf"busy with nobody's run \(process {nobody.proc.pid}, "
            r"user nobody, .*data dir /nonexistent/data",
        ):
            devicelock.acquire(Path("/root/data"), "cpu", "root's run")
        nobody.stop()

        lock = devicelock.lock_path("cpu")
        os.chmod(lock, 0o644)  # a file nobody may read but not write
        nobody = child(as_nobody, user=65534, group=65534, env=env)
        with pytest.raises(devicelock.DeviceBusy):  # still exclusive, though its line could not be written
            devicelock.acquire(Path("/root/data"), "cpu", "root's run")
        assert "belongs to another user and cannot be written" in nobody.stop()
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_a_lock_file_this_user_cannot_write_is_still_locked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    """Another user's lock file, readable but not writable: taken read-only (a warning says why its line is
    not ours), and still exclusive. Root may write any file, so there the refusal is played by os.open."""
    lock = devicelock.lock_path("cpu")
    lock.write_text(json.dumps({"pid": 1, "started": 0, "label": "an old run of someone else"}) + "\n")
    lock.chmod(0o444)
    if os.name != "nt" and os.geteuid() == 0:
        real_open = os.open

        def refusing_open(path: Any, flags: int, *args: Any) -> int:
            if Path(path) == lock and flags & os.O_RDWR:
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, flags, *args)

        monkeypatch.setattr(devicelock.os, "open", refusing_open)
    monkeypatch.setattr(devicelock, "_warned", set())
    errors: list[str] = []
    with (
        caplog.at_level(logging.WARNING, logger="train_tools.devicelock"),
        devicelock.hold(tmp_path / "data", "cpu", "me"),
    ):
        t = threading.Thread(target=lambda: errors.append(_refusal(tmp_path)))
        t.start()
        t.join(10)
    assert "belongs to another user and cannot be written" in caplog.text
    assert errors and errors[0].startswith("The cpu device is busy with an old run of someone else")
    assert "an old run of someone else" in lock.read_text()  # not truncated


def _refusal(tmp_path: Path) -> str:
    try:
        devicelock.acquire(tmp_path / "data", "cpu", "other thread")
    except devicelock.DeviceBusy as exc:
        return str(exc)
    return "taken"


def test_holder_of_a_free_device_is_none_and_of_a_held_one_its_line(tmp_path: Path):
    assert devicelock.holder("cpu") is None
    with devicelock.hold(tmp_path / "data", "cpu:0", "me"):
        line = devicelock.holder("cpu")
        assert line is not None and line["pid"] == os.getpid() and line["label"] == "me"
        assert line["data_dir"] == str(tmp_path / "data") and time.time() - line["started"] < 60
    assert devicelock.holder("cpu") is None


def test_a_stray_rank_without_a_data_parallel_launcher_still_takes_the_locks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Only a launcher's later processes (WORLD_SIZE > 1) skip the locks; a leftover LOCAL_RANK must not."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "1")
    errors: list[str] = []
    with devicelock.hold(tmp_path / "data", "cpu", "first"), devicelock.hold_version(tmp_path / "v", "p / v1"):

        def second() -> None:
            for take in (
                lambda: devicelock.hold(tmp_path / "data", "cpu", "second"),
                lambda: devicelock.hold_version(tmp_path / "v", "p / v1 (second)"),
            ):
                try:
                    with take():
                        pass
                except devicelock.DeviceBusy as exc:
                    errors.append(str(exc))

        t = threading.Thread(target=second)
        t.start()
        t.join(10)
    assert len(errors) == 2 and "busy with first" in errors[0] and "busy with p / v1" in errors[1]
