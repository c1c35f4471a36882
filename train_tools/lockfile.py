"""The lock file itself: opened safely in a folder others may write, locked with the operating system's file
lock, and the line of JSON naming its holder (read at most 4 KiB, shown without control characters).
``devicelock.py`` decides which file to lock and when; see its docstring for why the files are shared.
"""

from __future__ import annotations

import getpass
import json
import os
import stat
import sys
import time
import unicodedata
from pathlib import Path
from typing import Any

from .errors import UserError, from_os_error

#: Set to a folder to keep the device locks there instead of the machine-wide folder.
LOCK_DIR_ENV = "TRAIN_TOOLS_LOCK_DIR"

#: Windows locks byte ranges and forbids reading a locked range: lock a byte far past the holder's line.
_WIN_LOCK_OFFSET = 1 << 20
#: The most of a holder's line that is read (anyone may write the shared files).
_MAX_LINE = 4096
_MAX_FIELD = 200

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_OPEN_FLAGS = _NOFOLLOW | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


class DeviceBusy(UserError):
    """Another training run holds the device."""


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


def unusable(path: Path, reason: str) -> UserError:
    return UserError(
        f"Train Tools cannot use the lock file {path} ({reason}); delete it, or set {LOCK_DIR_ENV} "
        "to a folder of your own, then try again."
    )


def open_lock_file(path: Path) -> tuple[int, bool]:
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
            raise from_os_error(denied, path.parent) or unusable(path, str(denied)) from denied
        except OSError as exc:
            raise unusable(path, exc.strerror or str(exc)) from exc
    except OSError as exc:  # a link (ELOOP), a folder in its place...
        raise unusable(path, exc.strerror or str(exc)) from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            raise unusable(path, "it is not an ordinary file, or is a second name of another file")
        if writable and os.name != "nt" and info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) != 0o666:
            os.fchmod(fd, 0o666)  # the umask took some of it; other users must be able to take it too
    except BaseException:
        os.close(fd)
        raise
    return fd, writable


def try_lock(fd: int) -> bool:
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


def unlock(fd: int) -> None:
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


def read_holder(fd: int) -> dict[str, Any] | None:
    """The holder's line (at most 4 KiB of it), or None when it is not one."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, _MAX_LINE).decode("utf-8", errors="replace").splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None
    return info if isinstance(info, dict) else None


def write_holder(fd: int, label: str, data_dir: Path | None) -> None:
    line = {
        "pid": os.getpid(),
        "started": time.time(),
        "label": _clean(label),
        "data_dir": str(data_dir) if data_dir is not None else None,
        "program": _program(),
        "user": _user(),
    }
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(line) + "\n").encode("utf-8"))


def _same_dir(a: str, b: Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, ValueError, RuntimeError):
        return a == str(b)


def describe_holder(info: dict[str, Any] | None, data_dir: Path | None = None) -> str:
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


def busy(info: dict[str, Any] | None, what: str, data_dir: Path | None) -> DeviceBusy:
    return DeviceBusy(
        f"{what[0].upper()}{what[1:]} is busy with {describe_holder(info, data_dir)}; wait for it to "
        "finish or stop it (Interrupt, or Ctrl-C in its terminal), then try again."
    )
