"""One training run at a time per physical device, machine-wide: a lock file that every way of training takes.

Two runs on one GPU would fight over its memory, so Begin Train in a second browser tab, a second click, the
command line beside the app, or a second WebUI install with its own data dir on the same computer must be
refused with a message that says what is running. A thread-level check cannot see another process, and a file
in the data dir cannot see another data dir; a lock file in one folder per machine sees them all:

    /tmp/train_tools-locks/.gpu-<device>.lock             Linux, macOS: one folder for every user
    %LOCALAPPDATA%\\train_tools\\locks\\.gpu-<device>.lock   Windows: one folder per user
    $TRAIN_TOOLS_LOCK_DIR/.gpu-<device>.lock              when that is set (the tests give each test its own)

``<device>`` names the device, not its spelling: ``cpu``, ``cpu:0`` and ``CPU`` are one CPU (``cpu``);
``cuda`` and ``cuda:0`` are one GPU. A GPU is named by its UUID when torch sees it
(``cuda-uuid-<uuid>``), since ``CUDA_VISIBLE_DEVICES`` gives one card different indices in different
processes; without CUDA in torch, by its index as ``CUDA_VISIBLE_DEVICES`` maps it (``cuda1``).

Why one folder for all users on Linux and macOS: people sharing a lab machine share its GPU, and a folder of
one user cannot see the runs of another. The folder is made like ``/tmp`` itself (mode 1777: anyone may add a
file, only its owner may remove it) and the lock files are mode 0666, so every user's runs lock each other
out. Other users may write in that folder, so nothing in it is trusted: a lock file is opened without
following a link and must be an ordinary file with one name, else it is refused, never written through (a
link planted there cannot make a run overwrite another file); its line is read at most 4 KiB and shown
without control characters. A lock file this user may not write (another user's, with a stricter mode) is
still locked, read-only, so exclusion holds; only this run's name cannot be written in it. If the folder
itself cannot be used (not a folder, or not writable), a folder of this user is used instead
(``~/.cache/train_tools/locks``) with a warning saying that other users' runs are not seen.
On Windows the temp and app-data folders are per user and a folder shared by all accounts would need access
rules this cannot check, so the lock is per user there: two accounts signed in at once are not seen.

The lock is the operating system's file lock (``fcntl.flock`` on Linux/macOS, ``msvcrt.locking`` on
Windows); the file holds a line of JSON naming the holder (pid, start time, what it trains, its data dir and
program, its user). The OS drops the lock when its process dies, however it dies (crash, ``kill -9``,
reboot), so a stale file never blocks: the next run takes it and overwrites the line.

The lock is re-entrant within one thread (the job takes it, then the trainer inside the job takes it again)
but not across threads: two jobs of one process are refused just like two processes. In a data-parallel run
(several processes, one per GPU) the first process holds the locks for the run.

Which device is which lives in ``devices.py``; opening, locking and reading a lock file in ``lockfile.py``.

One version, one writer: ``hold_version`` locks ``<version>/.train.lock`` (in the version folder, which one
data dir owns) for a run and for ``dataset update``, both of which write the version's ``prepared/``.
"""

from __future__ import annotations

import logging
import os
import stat
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .devices import device_key, device_name, env_int
from .errors import UserError
from .lockfile import LOCK_DIR_ENV, DeviceBusy, busy, open_lock_file, read_holder, try_lock, unlock, write_holder

log = logging.getLogger(__name__)

SHARED_DIR_NAME = "train_tools-locks"
__all__ = [
    "LOCK_DIR_ENV",
    "SHARED_DIR_NAME",
    "DeviceBusy",
    "acquire",
    "device_name",
    "ensure_free",
    "hold",
    "holder",
    "ensure_file_free",
    "hold_version",
    "lock_dir",
    "lock_path",
    "release",
    "version_lock_path",
]


@dataclass
class _Held:
    fd: int
    count: int


_registry_lock = threading.Lock()
_held: dict[tuple[str, int], _Held] = {}  # (lock file, thread) -> the open locked file and its depth
_warned: set[str] = set()


# ---------------------------------------------------------------------- where the locks live


def _warn_once(text: str) -> None:
    if text not in _warned:
        _warned.add(text)
        log.warning(text)


def _private_dir() -> Path:
    """This user's own lock folder, for when the shared one cannot be used."""
    try:
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    except RuntimeError:  # no home folder
        uid = os.getuid() if hasattr(os, "getuid") else 0
        return Path(tempfile.gettempdir()) / f"{SHARED_DIR_NAME}-{uid}"
    return cache / "train_tools" / "locks"


def _shared_root() -> Path:
    """``/tmp``, the one temp folder of every user and process (``$TMPDIR`` differs between users on macOS,
    and between launchers); the temp folder only where there is no ``/tmp``."""
    return Path("/tmp") if Path("/tmp").is_dir() else Path(tempfile.gettempdir())


def _shared_dir_problem(folder: Path) -> str | None:
    """Why the machine-wide folder cannot be used (it is created, like /tmp, when missing), or None."""
    try:
        os.mkdir(folder, 0o777)
    except FileExistsError:
        pass
    except OSError as exc:
        return f"it cannot be created ({exc.strerror or exc})"
    else:
        try:
            os.chmod(folder, 0o1777)  # the umask took some of 0o777; every user must be able to add a lock
        except OSError as exc:
            return f"its mode cannot be set ({exc.strerror or exc})"
    try:
        info = os.lstat(folder)
    except OSError as exc:
        return f"it cannot be read ({exc.strerror or exc})"
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        return "it is not a folder (a link or a file is in its place)"
    if not os.access(folder, os.W_OK | os.X_OK):
        return "this user may not write in it"
    return None


def lock_dir() -> Path:
    """The one folder of this machine that holds the device locks, created if missing (see the module
    docstring): ``$TRAIN_TOOLS_LOCK_DIR``, else the shared folder, else (with a warning) this user's own."""
    override = os.environ.get(LOCK_DIR_ENV, "").strip()
    if override:
        folder = Path(override).expanduser()
    elif os.name == "nt":
        folder = Path(os.environ.get("LOCALAPPDATA") or tempfile.gettempdir()) / "train_tools" / "locks"
    else:
        shared = _shared_root() / SHARED_DIR_NAME
        problem = _shared_dir_problem(shared)
        if problem is None:
            return shared
        folder = _private_dir()
        _warn_once(
            f"Train Tools cannot use the shared lock folder {shared}: {problem}. It uses {folder} "
            "instead, so training runs of other users of this computer are not seen; delete or fix "
            f"{shared}, or set {LOCK_DIR_ENV}."
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"Train Tools cannot create its lock folder {folder} ({exc.strerror or exc}); set "
            f"{LOCK_DIR_ENV} to a folder it may write, then try again."
        ) from exc
    return folder


def lock_path(device: str | None) -> Path:
    """The lock file of ``device`` (any spelling of it) in ``lock_dir()``."""
    return lock_dir() / f".gpu-{device_key(device)}.lock"


def _key(path: Path) -> tuple[str, int]:
    return str(path.resolve()), threading.get_ident()


def acquire_file(path: Path, label: str, what: str, data_dir: Path | None = None) -> Path:
    """Take the lock file ``path`` for this thread (again, if it already holds it); DeviceBusy naming the
    holder if another thread or process has it. ``what`` names the resource in that message, ``data_dir`` the
    data dir of this run (written in the file, and compared with the holder's)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = _key(path)
    with _registry_lock:
        held = _held.get(key)
        if held is not None:
            held.count += 1
            return path
        fd, writable = open_lock_file(path)
        if not try_lock(fd):
            info = read_holder(fd)
            os.close(fd)
            raise busy(info, what, data_dir)
        if writable:
            write_holder(fd, label, data_dir)
        else:
            _warn_once(
                f"The lock file {path} belongs to another user and cannot be written, so other runs "
                "cannot be told what holds it; ask its owner or an administrator to delete it."
            )
        _held[key] = _Held(fd, 1)
    log.debug("Took %s for %s", path, label)
    return path


def release(path: Path) -> None:
    key = _key(Path(path))
    with _registry_lock:
        held = _held.get(key)
        if held is None:
            return
        held.count -= 1
        if held.count > 0:
            return
        del _held[key]
        unlock(held.fd)


def secondary_process() -> bool:
    """A second, third... process of one data-parallel run (``accelerate launch``, ``torchrun``): it is part of
    the run whose first process (rank 0) holds the locks, so it takes none (it would be refused by its own run,
    and the others would wait for it forever)."""
    if env_int("WORLD_SIZE", 1) <= 1:  # launchers always set it: a stray RANK alone must not skip the locks
        return False
    return env_int("RANK", 0) > 0 or env_int("LOCAL_RANK", 0) > 0


@contextmanager
def hold_file(path: Path, label: str, what: str, data_dir: Path | None = None) -> Iterator[Path]:
    """Hold the lock file ``path`` for the block (see ``acquire_file``)."""
    if secondary_process():
        yield Path(path)
        return
    path = acquire_file(path, label, what, data_dir)
    try:
        yield path
    finally:
        release(path)


def _what(device: str | None) -> str:
    return f"the {device_name(device)} device"


def acquire(data_dir: Path | None, device: str | None, label: str) -> Path:
    """Take the machine-wide lock of ``device`` for this thread; ``data_dir`` is the run's (for the message)."""
    return acquire_file(lock_path(device), label, _what(device), data_dir)


@contextmanager
def hold(data_dir: Path | None, device: str | None, label: str) -> Iterator[Path]:
    """``with hold(version.data_dir, "cuda:0", "cat / v1"):`` the whole run; released however it ends."""
    if secondary_process():
        yield lock_path(device)
        return
    path = acquire(data_dir, device, label)
    try:
        yield path
    finally:
        release(path)


def ensure_file_free(path: Path, what: str, data_dir: Path | None = None) -> None:
    """Refuse early (before a job is queued) when another thread or process holds ``path``.

    The real guarantee is taking the lock in the run itself; this only lets the page answer at once.
    """
    path = Path(path)
    if not path.exists():
        return
    with _registry_lock:
        held = _held.get(_key(path))
        if held is not None:
            raise busy(read_holder(held.fd), what, data_dir)
        fd, _writable = open_lock_file(path)
        if not try_lock(fd):
            info = read_holder(fd)
            os.close(fd)
            raise busy(info, what, data_dir)
        unlock(fd)


def ensure_free(data_dir: Path | None, device: str | None) -> None:
    """DeviceBusy now when another run (of any data dir) holds ``device``."""
    ensure_file_free(lock_path(device), _what(device), data_dir)


def holder(device: str | None) -> dict[str, Any] | None:
    """Who holds the device (the holder's line; {} when unreadable), or None when it is free."""
    path = lock_path(device)
    if not path.exists():
        return None
    with _registry_lock:
        held = next((h for (p, _t), h in _held.items() if p == str(path.resolve())), None)
        if held is not None:
            return read_holder(held.fd) or {}
        fd, _writable = open_lock_file(path)
        if try_lock(fd):
            unlock(fd)
            return None
        info = read_holder(fd)
        os.close(fd)
        return info or {}


# ---------------------------------------------------------------------- one writer per version folder

VERSION_LOCK_NAME = ".train.lock"


def version_lock_path(version_path: Path) -> Path:
    return Path(version_path) / VERSION_LOCK_NAME


@contextmanager
def hold_version(version_path: Path, label: str) -> Iterator[Path]:
    """One run or dataset update per version at a time, whatever the device: both write its ``prepared/``.
    ``label`` says what holds it (``"cat / v1 (dataset update)"``), for the message of whoever is refused."""
    name = f"{Path(version_path).parent.parent.name} / {Path(version_path).name}"
    with hold_file(version_lock_path(version_path), label, f"version {name}") as path:
        yield path
