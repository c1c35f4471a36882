"""Atomic file writes: a crash or a kill at any moment leaves either the old file or the new one.

Every file the project writes (LoRA files, settings, captions, prepared images) goes through here.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import UserError, from_os_error


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it is fsynced and renamed over ``target``.

    On any error the temporary file is removed and ``target`` is left as it was. A full disk, a folder that may
    not be written and a file name the file system cannot hold become a UserError that says so
    (``errors.from_os_error``); other errors pass through unchanged. The file gets the permissions the
    user's umask gives.
    """
    target = Path(target)
    _check_file_name(target)
    tmp: Path | None = None
    try:
        make_dirs(target.parent)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        yield tmp
        # mkstemp makes the file 0600; the finished file gets what the user's umask gives (0644 usually), as
        # any program's new file would, so a WebUI or a file server running as another user can read it. Set
        # after the writer ran: some writers replace the file instead of writing into it.
        os.chmod(tmp, FILE_MODE & ~current_umask())
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        tmp = None
        _fsync_dir(target.parent)
    except BaseException as exc:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        friendly = from_os_error(exc, target)
        if friendly is not None:
            raise friendly from exc
        raise


def make_dirs(path: Path) -> None:
    """``mkdir -p``; a folder that may not be written becomes a sentence instead of a traceback."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        friendly = from_os_error(exc, path)
        if friendly is None:
            raise
        raise friendly from exc


def check_writable(folder: Path) -> None:
    """Refuse up front, with a sentence, a folder that cannot be written (made if missing), before a batch of
    work that would otherwise fail file by file. Tries a real file: permission bits do not tell the whole story
    (read-only mounts, ACLs, root)."""
    make_dirs(folder)
    try:
        fd, name = tempfile.mkstemp(prefix=".write-test.", suffix=TEMP_SUFFIX, dir=folder)
    except OSError as exc:
        friendly = from_os_error(exc, folder)
        if friendly is None:
            raise
        raise friendly from exc
    os.close(fd)
    os.unlink(name)


#: The mode of a new file before the umask is applied (what ``open(..., "w")`` uses).
FILE_MODE = 0o666


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows (Linux's /proc), since setting
    it to read it back would race with other threads creating files."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


_UMASK_LOCK = threading.Lock()


#: The suffix of the temporary files above; a kill between writing and renaming can leave one behind (hidden,
#: named ``.<target name>.<random>.tmp``), which ``remove_stale_temp_files`` clears.
TEMP_SUFFIX = ".tmp"


def _check_file_name(target: Path) -> None:
    """Refuse names that are no file name at all (``..``, empty, with a NUL) before touching the disk."""
    name = target.name
    if name in ("", ".", "..") or "\x00" in str(target):
        shown = name.replace("\x00", "\\0") or str(target)
        raise UserError(f"'{shown}' is not a usable file name; rename the file and try again.")


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a power cut then cannot bring back the old file."""
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a folder; the rename still happened
    finally:
        os.close(fd)


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete the temporary files a killed writer left in ``folder`` (not recursive); returns what went.

    Only call this when nothing is writing into ``folder``: a live writer's temporary file looks the same.
    """
    removed: list[Path] = []
    if not Path(folder).is_dir():
        return removed
    for path in Path(folder).iterdir():
        if path.name.startswith(".") and path.name.endswith(TEMP_SUFFIX) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def write_bytes(target: Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text(target: Path, text: str) -> None:
    write_bytes(target, text.encode("utf-8"))


def write_json(target: Path, obj: Any) -> None:
    write_text(target, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def write_with(target: Path, writer: Callable[[Path], None]) -> None:
    """Let ``writer`` write to a temporary path (e.g. ``safetensors.torch.save_file``), then rename it."""
    with atomic_path(target) as tmp:
        writer(tmp)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 (hex) of a whole file, read in chunks so multi-GB checkpoints need no RAM."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
