"""One training run at a time per device: a lock file in the data dir that every way of training takes.

Two runs on one GPU would fight over its memory (and, in one version, over one folder), so Begin Train in a
second browser tab, a second click, or the command line beside the app must be refused with a message that
says what is running. A thread-level check cannot see another process; a lock file can:

    <data dir>/outputs/train_tools/.gpu-<device>.lock      e.g. .gpu-cuda0.lock, .gpu-cpu.lock

It is held with the operating system's file lock (``fcntl.flock`` on Linux/macOS, ``msvcrt.locking`` on
Windows) and holds a line of JSON naming the holder (pid, start time, what it trains). The OS drops the lock
when its process dies, however it dies (crash, ``kill -9``, reboot), so a stale file never blocks: the next run
simply takes it and overwrites the line.

The lock is re-entrant within one thread (the job takes it, then the trainer inside the job takes it again)
but not across threads: two jobs of one process are refused just like two processes. In a data-parallel run
(several processes, one per GPU) the first process holds the locks for the run.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .errors import UserError

log = logging.getLogger(__name__)

#: Windows locks byte ranges and forbids reading a locked range: lock a byte far past the holder's line.
_WIN_LOCK_OFFSET = 1 << 20



class DeviceBusy(UserError):
    """Another training run holds the device."""


@dataclass
class _Held:
    handle: IO[str]
    count: int


_registry_lock = threading.Lock()
_held: dict[tuple[str, int], _Held] = {}  # (lock file, thread) -> the open locked file and its depth


def device_name(device: str | None) -> str:
    """The device a run will use, spelled out: ``cpu``, ``cuda:0``, ``cuda:1``, ``mps``...

    ``None`` means what the trainer would pick (the first CUDA GPU when there is one); a bare ``cuda`` is the
    GPU of this process (``LOCAL_RANK`` under ``accelerate launch``).
    """
    if not device:
        try:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        except ImportError:
            device = "cpu"
    text = str(device).strip().lower()
    if text == "cuda":
        text = f"cuda:{int(os.environ.get('LOCAL_RANK', '0') or 0)}"
    elif text == "cpu" and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        # The processes of one data-parallel run on the CPU (accelerate launch / torchrun) share it.
        text = f"cpu:{int(os.environ.get('LOCAL_RANK', '0') or 0)}"
    return text


def device_key(device: str | None) -> str:
    """``device_name`` made safe for a file name: ``cuda:1`` -> ``cuda1``."""
    return re.sub(r"[^a-z0-9]", "", device_name(device)) or "cpu"


def lock_dir_for(version_path: Path) -> Path:
    """``<data>/outputs/train_tools`` for a version folder ``.../projects/<project>/versions/<version>``."""
    path = Path(version_path)
    projects = path.parent.parent.parent
    return projects.parent if projects.name == "projects" else path


def lock_path(folder: Path, device: str | None) -> Path:
    return Path(folder) / f".gpu-{device_key(device)}.lock"


def _describe(path: Path) -> str:
    """What holds the lock, as the holder wrote it; a plain phrase when the line cannot be read."""
    try:
        info = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
        since = time.strftime("%H:%M:%S", time.localtime(float(info["started"])))
        return f"{info.get('label') or 'a training run'} (process {info['pid']}, started {since})"
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return "another training run"


def _try_lock(handle: IO[str]) -> bool:
    if os.name == "nt":
        import msvcrt

        handle.seek(_WIN_LOCK_OFFSET)
        try:
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined]
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _unlock(handle: IO[str]) -> None:
    try:
        if os.name == "nt":
            import msvcrt

            handle.seek(_WIN_LOCK_OFFSET)
            msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)  # type: ignore[attr-defined]
        else:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    finally:
        handle.close()


def _key(path: Path) -> tuple[str, int]:
    return str(path.resolve()), threading.get_ident()


def _open(path: Path) -> IO[str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    # "a+" creates the file without truncating the holder's line before we know the lock is ours.
    return open(path, "a+", encoding="utf-8")  # noqa: SIM115 - closed by _unlock


def _busy(path: Path, what: str) -> DeviceBusy:
    return DeviceBusy(f"{what[0].upper()}{what[1:]} is busy with {_describe(path)}; wait for it to finish or stop "
                      "it (Interrupt, or Ctrl-C in its terminal), then try again.")


def acquire_file(path: Path, label: str, what: str) -> Path:
    """Take the lock file ``path`` for this thread (again, if it already holds it); DeviceBusy naming the
    holder if another thread or process has it. ``what`` names the resource in that message."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = _key(path)
    with _registry_lock:
        held = _held.get(key)
        if held is not None:
            held.count += 1
            return path
        handle = _open(path)
        if not _try_lock(handle):
            handle.close()
            raise _busy(path, what)
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "started": time.time(), "label": label}) + "\n")
        handle.flush()
        _held[key] = _Held(handle, 1)
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
        _unlock(held.handle)


def secondary_process() -> bool:
    """A second, third... process of one data-parallel run (``accelerate launch``, ``torchrun``): it is part of
    the run whose first process (rank 0) holds the locks, so it takes none (it would be refused by its own run,
    and the others would wait for it forever)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and int(os.environ.get("RANK", "0") or 0) > 0
    except ValueError:
        return False


@contextmanager
def hold_file(path: Path, label: str, what: str) -> Iterator[Path]:
    """Hold the lock file ``path`` for the block (see ``acquire_file``)."""
    if secondary_process():
        yield Path(path)
        return
    path = acquire_file(path, label, what)
    try:
        yield path
    finally:
        release(path)


def acquire(folder: Path, device: str | None, label: str) -> Path:
    """Take the device lock in ``folder`` (``<data>/outputs/train_tools``) for this thread."""
    return acquire_file(lock_path(folder, device), label, f"the {device_name(device)} device")


@contextmanager
def hold(folder: Path, device: str | None, label: str) -> Iterator[Path]:
    """``with hold(dir, "cuda:0", "cat / v1"):`` the whole run; released however the block ends."""
    if secondary_process():
        yield lock_path(folder, device)
        return
    path = acquire(folder, device, label)
    try:
        yield path
    finally:
        release(path)


def ensure_file_free(path: Path, what: str) -> None:
    """Refuse early (before a job is queued) when another thread or process holds ``path``.

    The real guarantee is taking the lock in the run itself; this only lets the page answer at once.
    """
    path = Path(path)
    if not path.exists():
        return
    with _registry_lock:
        if _key(path) in _held:
            raise _busy(path, what)
        handle = _open(path)
        if not _try_lock(handle):
            handle.close()
            raise _busy(path, what)
        _unlock(handle)


def ensure_free(folder: Path, device: str | None) -> None:
    ensure_file_free(lock_path(folder, device), f"the {device_name(device)} device")


def holder(folder: Path, device: str | None) -> dict[str, Any] | None:
    """Who holds the device (the holder's line), or None when it is free."""
    try:
        ensure_free(folder, device)
    except DeviceBusy:
        try:
            return json.loads(lock_path(folder, device).read_text(encoding="utf-8").splitlines()[0])
        except (OSError, ValueError, IndexError):
            return {}
    return None


# ---------------------------------------------------------------------- one run per version folder

VERSION_LOCK_NAME = ".train.lock"


@contextmanager
def hold_version(version_path: Path, label: str) -> Iterator[Path]:
    """One run per version at a time, whatever the device: runs share the version's ``prepared/`` folder."""
    if int(os.environ.get("LOCAL_RANK", "0") or 0) > 0:
        # A further process of a data-parallel run (accelerate launch / torchrun): the first one holds the
        # version for the whole run.
        yield Path(version_path) / VERSION_LOCK_NAME
        return
    with hold_file(Path(version_path) / VERSION_LOCK_NAME, label, f"version {label}") as path:
        yield path
