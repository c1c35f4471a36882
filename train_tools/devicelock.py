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

One version, one writer: ``hold_version`` locks ``<version>/.train.lock`` (in the version folder, which one
data dir owns) for a run and for ``dataset update``, both of which write the version's ``prepared/``.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import re
import stat
import sys
import tempfile
import threading
import time
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError, from_os_error

log = logging.getLogger(__name__)

#: Set to a folder to keep the device locks there instead of the machine-wide folder.
LOCK_DIR_ENV = "TRAIN_TOOLS_LOCK_DIR"
SHARED_DIR_NAME = "train_tools-locks"

#: Windows locks byte ranges and forbids reading a locked range: lock a byte far past the holder's line.
_WIN_LOCK_OFFSET = 1 << 20
#: The most of a holder's line that is read (anyone may write the shared files).
_MAX_LINE = 4096
_MAX_FIELD = 200

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_OPEN_FLAGS = _NOFOLLOW | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)

#: torch's device types; a name outside them is a typo (torch itself is asked when it is loaded).
_DEVICE_TYPES = frozenset({"cpu", "cuda", "mps", "xpu", "hip", "npu", "hpu", "mtia", "xla", "ipu", "vulkan",
                           "privateuseone", "maia", "meta", "lazy", "ve", "fpga", "opengl", "opencl", "ideep",
                           "mkldnn"})
_SPELLING = re.compile(r"([a-z][a-z0-9_]*)(?::(\d{1,4}))?")


class DeviceBusy(UserError):
    """Another training run holds the device."""


@dataclass
class _Held:
    fd: int
    count: int


_registry_lock = threading.Lock()
_held: dict[tuple[str, int], _Held] = {}  # (lock file, thread) -> the open locked file and its depth
_warned: set[str] = set()


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, "") or default)
    except ValueError:
        return default


# ---------------------------------------------------------------------- which device

def _torch_knows(text: str) -> bool:
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    try:
        torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        return False
    return True


def _parse(device: str) -> tuple[str, int | None]:
    """(type, index) of a device string; a UserError with a sentence when it names no device."""
    text = str(device).strip().lower()
    match = _SPELLING.fullmatch(text)
    if match is None or (match.group(1) not in _DEVICE_TYPES and not _torch_knows(text)):
        shown = "".join(c for c in str(device).strip()[:40] if c.isprintable())
        raise UserError(f"'{shown}' is not a device to train on; write cpu, cuda (the first GPU), cuda:1 (the "
                        "second), mps (a Mac's GPU), or leave it empty to use the GPU when there is one.")
    return match.group(1), int(match.group(2)) if match.group(2) is not None else None


def _cuda_count() -> int | None:
    """How many GPUs torch sees; None when it sees none (no CUDA build, no driver) or is not installed."""
    try:
        import torch

        return int(torch.cuda.device_count()) if torch.cuda.is_available() else None
    except (ImportError, RuntimeError, AssertionError):
        return None


def device_name(device: str | None) -> str:
    """The device a run will use, spelled one way: ``cpu``, ``cuda:0``, ``cuda:1``, ``mps``...

    ``None`` (or empty) means what the trainer would pick (the first CUDA GPU when there is one); a bare
    ``cuda`` is the GPU of this process (``LOCAL_RANK`` under ``accelerate launch``). Every ``cpu:N`` is the
    one CPU. A name that is no device, or a GPU this computer does not have, is a UserError.
    """
    if device is None or not str(device).strip():
        try:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        except ImportError:
            device = "cpu"
    kind, index = _parse(str(device))
    if kind in ("cpu", "mps"):  # one of each per computer
        return kind
    if index is None:
        index = _env_int("LOCAL_RANK", 0)
    if kind == "cuda":
        count = _cuda_count()
        if count is not None and index >= count:
            raise UserError(f"There is no GPU cuda:{index}: this computer has {count} (cuda:0"
                            f"{f' to cuda:{count - 1}' if count > 1 else ''}); pick one of them.")
    return f"{kind}:{index}"


def _gpu_uuid(index: int) -> str | None:
    """The UUID of the ``index``-th GPU this process sees, or None when torch cannot tell."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    except (ImportError, RuntimeError, AssertionError, AttributeError):
        return None
    return str(uuid) if uuid else None


def physical_gpu(index: int) -> str:
    """The card behind ``cuda:<index>`` of this process, the same in every process: ``uuid-<uuid>`` when
    torch knows it, else its index before ``CUDA_VISIBLE_DEVICES`` renumbered it (or its UUID from there)."""
    uuid = _gpu_uuid(index)
    if uuid is None and "CUDA_VISIBLE_DEVICES" in os.environ:
        visible = [entry.strip() for entry in os.environ["CUDA_VISIBLE_DEVICES"].split(",")]
        if index < len(visible) and visible[index]:
            entry = visible[index].lower()
            if entry.isdigit():
                return str(int(entry))
            uuid = entry[4:] if entry.startswith("gpu-") else entry
    if uuid is None:
        return str(index)
    return "uuid-" + re.sub(r"[^a-z0-9-]", "", uuid.lower())[:80]


def device_key(device: str | None) -> str:
    """The device as a file name: ``cpu``, ``mps``, ``cuda-uuid-<uuid>`` or ``cuda1``, ``xpu0``."""
    name = device_name(device)
    if name.startswith("cuda:"):
        card = physical_gpu(int(name.split(":")[1]))
        return f"cuda-{card}" if card.startswith("uuid-") else f"cuda{card}"
    return re.sub(r"[^a-z0-9_]", "", name) or "cpu"


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
        _warn_once(f"Train Tools cannot use the shared lock folder {shared}: {problem}. It uses {folder} "
                   "instead, so training runs of other users of this computer are not seen; delete or fix "
                   f"{shared}, or set {LOCK_DIR_ENV}.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"Train Tools cannot create its lock folder {folder} ({exc.strerror or exc}); set "
                        f"{LOCK_DIR_ENV} to a folder it may write, then try again.") from exc
    return folder


def lock_path(device: str | None) -> Path:
    """The lock file of ``device`` (any spelling of it) in ``lock_dir()``."""
    return lock_dir() / f".gpu-{device_key(device)}.lock"


# ---------------------------------------------------------------------- the lock file

def _clean(value: Any) -> str:
    """A field of a holder's line fit for a message: printable, one line, not too long."""
    if value is None:
        return ""
    text = "".join(c for c in str(value) if not unicodedata.category(c).startswith("C"))
    return text.strip()[:_MAX_FIELD]


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError, ImportError):
        return ""


def _program() -> str:
    """What this process runs, as a person would name it: ``launch.py``, ``train_tools``, ``standalone.py``."""
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("python")
    return argv0.parent.name if argv0.name == "__main__.py" else argv0.name


def _unusable(path: Path, reason: str) -> UserError:
    return UserError(f"Train Tools cannot use the lock file {path} ({reason}); delete it, or set {LOCK_DIR_ENV} "
                     "to a folder of your own, then try again.")


def _open(path: Path) -> tuple[int, bool]:
    """The lock file, created if missing (mode 0666, for the other users of the shared folder): (its file
    descriptor, whether this process may write it). Never through a link, never anything but an ordinary
    file with one name; it is not truncated here (the lock may be another's)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writable = True
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _OPEN_FLAGS, 0o666)
    except PermissionError as denied:
        writable = False  # another user's file: it can still be locked (flock needs no write access)
        try:
            fd = os.open(path, os.O_RDONLY | _OPEN_FLAGS)
        except FileNotFoundError:
            # No lock file, and its folder may not be written (a read-only data dir): say that.
            raise from_os_error(denied, path.parent) or _unusable(path, str(denied)) from denied
        except OSError as exc:
            raise _unusable(path, exc.strerror or str(exc)) from exc
    except OSError as exc:  # a link (ELOOP), a folder in its place...
        raise _unusable(path, exc.strerror or str(exc)) from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            raise _unusable(path, "it is not an ordinary file, or is a second name of another file")
        if writable and os.name != "nt" and info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) != 0o666:
            os.fchmod(fd, 0o666)  # the umask took some of it; other users must be able to take it too
    except BaseException:
        os.close(fd)
        raise
    return fd, writable


def _try_lock(fd: int) -> bool:
    if os.name == "nt":
        import msvcrt

        os.lseek(fd, _WIN_LOCK_OFFSET, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined]
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _unlock(fd: int) -> None:
    try:
        if os.name == "nt":
            import msvcrt

            os.lseek(fd, _WIN_LOCK_OFFSET, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)  # type: ignore[attr-defined]
        else:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _read_line(fd: int) -> dict[str, Any] | None:
    """The holder's line (at most 4 KiB of it), or None when it is not one."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, _MAX_LINE).decode("utf-8", errors="replace").splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None
    return info if isinstance(info, dict) else None


def _write_line(fd: int, label: str, data_dir: Path | None) -> None:
    line = {"pid": os.getpid(), "started": time.time(), "label": _clean(label),
            "data_dir": str(data_dir) if data_dir is not None else None, "program": _program(), "user": _user()}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(line) + "\n").encode("utf-8"))


def _same_dir(a: str, b: Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, ValueError, RuntimeError):
        return a == str(b)


def _describe(info: dict[str, Any] | None, data_dir: Path | None = None) -> str:
    """What holds the lock, as the holder wrote it; a plain phrase when the line cannot be read. Its data dir
    and program are named when they are not ``data_dir`` (the asker's), its user when not this one."""
    if not isinstance(info, dict):
        return "another training run"
    try:
        pid = int(info["pid"])
        started = float(info["started"])
        fmt = "%H:%M:%S" if time.time() - started < 20 * 3600 else "%Y-%m-%d %H:%M"
        since = time.strftime(fmt, time.localtime(started))
    except (KeyError, TypeError, ValueError, OverflowError, OSError):
        return "another training run"
    parts = [f"process {pid}"]
    user = _clean(info.get("user"))
    if user and user != _user():
        parts.append(f"user {user}")
    other_dir = _clean(info.get("data_dir"))
    if other_dir and (data_dir is None or not _same_dir(other_dir, data_dir)):
        program = _clean(info.get("program"))
        parts.append(f"{program} with data dir {other_dir}" if program else f"data dir {other_dir}")
    parts.append(f"started {since}")
    return f"{_clean(info.get('label')) or 'a training run'} ({', '.join(parts)})"


def _busy(info: dict[str, Any] | None, what: str, data_dir: Path | None) -> DeviceBusy:
    return DeviceBusy(f"{what[0].upper()}{what[1:]} is busy with {_describe(info, data_dir)}; wait for it to "
                      "finish or stop it (Interrupt, or Ctrl-C in its terminal), then try again.")


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
        fd, writable = _open(path)
        if not _try_lock(fd):
            info = _read_line(fd)
            os.close(fd)
            raise _busy(info, what, data_dir)
        if writable:
            _write_line(fd, label, data_dir)
        else:
            _warn_once(f"The lock file {path} belongs to another user and cannot be written, so other runs "
                       "cannot be told what holds it; ask its owner or an administrator to delete it.")
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
        _unlock(held.fd)


def secondary_process() -> bool:
    """A second, third... process of one data-parallel run (``accelerate launch``, ``torchrun``): it is part of
    the run whose first process (rank 0) holds the locks, so it takes none (it would be refused by its own run,
    and the others would wait for it forever)."""
    if _env_int("WORLD_SIZE", 1) <= 1:  # launchers always set it: a stray RANK alone must not skip the locks
        return False
    return _env_int("RANK", 0) > 0 or _env_int("LOCAL_RANK", 0) > 0


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
            raise _busy(_read_line(held.fd), what, data_dir)
        fd, _writable = _open(path)
        if not _try_lock(fd):
            info = _read_line(fd)
            os.close(fd)
            raise _busy(info, what, data_dir)
        _unlock(fd)


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
            return _read_line(held.fd) or {}
        fd, _writable = _open(path)
        if _try_lock(fd):
            _unlock(fd)
            return None
        info = _read_line(fd)
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
