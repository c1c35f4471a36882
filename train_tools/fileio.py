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


@contextmanager
def _as_sentence(target: Path) -> Iterator[None]:
    """A file-system error a user can fix, writing ``target``, becomes its sentence (``errors.from_os_error``);
    any other error passes through unchanged."""
    try:
        yield
    except OSError as exc:
        friendly = from_os_error(exc, target)
        if friendly is None:
            raise
        raise friendly from exc


def make_dirs(path: Path) -> None:
    """``mkdir -p``; a folder that may not be written becomes a sentence instead of a traceback."""
    with _as_sentence(path):
        Path(path).mkdir(parents=True, exist_ok=True)


def check_writable(folder: Path) -> None:
    """Refuse up front, with a sentence, a folder that cannot be written (made if missing), before a batch of
    work that would otherwise fail file by file. Tries a real file: permission bits do not tell the whole story
    (read-only mounts, ACLs, root)."""
    make_dirs(folder)
    with _as_sentence(folder):
        fd, name = tempfile.mkstemp(prefix=".write-test.", suffix=TEMP_SUFFIX, dir=folder)
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


def write_with(target: Path, writer: Callable[[Path], object]) -> None:
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


# ---------------------------------------------------------------------- reading JSON a person may have edited

#: Deeper than any JSON this project writes (settings are flat, a safetensors header two levels deep): a
#: deeper file is damaged or hostile, and code that walks it (copying, comparing, saving) would recurse.
MAX_JSON_DEPTH = 32
#: Larger than any settings, run or preview file this project writes.
MAX_JSON_BYTES = 64 << 20
_BOMS = ((b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16"))


class JSONProblem(ValueError):
    """What is wrong with some JSON bytes, said in a few words (``parse_json`` raises it)."""


def parse_json(data: bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Decode UTF-8 JSON ``data`` (a leading UTF-8 byte order mark, as Windows Notepad writes, is accepted).

    Raises JSONProblem when the bytes are not UTF-8, not JSON (NaN and Infinity included: JSON has no such
    numbers), or nested deeper than ``max_depth``; never RecursionError.
    """
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            raise JSONProblem(f"is not UTF-8 text (it is saved as {encoding})")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise JSONProblem(f"is not UTF-8 text (byte {exc.start} is not UTF-8)") from None
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_int=_parse_int)
    except RecursionError:
        raise JSONProblem(f"is nested more than {max_depth} levels deep") from None
    except JSONProblem:
        raise
    except ValueError as exc:  # json.JSONDecodeError
        raise JSONProblem(f"is not valid JSON ({exc})") from None
    if nesting_depth(value) > max_depth:
        raise JSONProblem(f"is nested more than {max_depth} levels deep")
    return value


def _parse_int(text: str) -> int:
    if len(text) > 64:  # Python refuses 4300 digits with a message about its own settings; say it plainly
        raise JSONProblem(f"is not valid JSON (it has a number {len(text)} digits long)")
    return int(text)


def _refuse_constant(name: str) -> Any:
    raise JSONProblem(f"is not valid JSON ({name} is not a number JSON has)")


def nesting_depth(value: Any) -> int:
    """How deep dicts, lists and tuples nest in ``value`` (a number or string: 0), without recursing."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        depth += 1
        deepest = max(deepest, depth)
        stack.extend((child, depth) for child in children)
    return deepest


def read_json(path: Path, fix: str, *, what: str = "The file", max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The JSON in ``path``, a file a person may have edited, moved or damaged.

    Anything wrong with it (unreadable, too large, not UTF-8, not JSON, nested too deep) is a UserError
    "<what> <path> <problem>; <fix>." A missing file raises FileNotFoundError, so callers decide what that
    means (often: the defaults).
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except FileNotFoundError:
        raise
    except OSError as exc:
        reason = exc.strerror or exc.__class__.__name__
        raise UserError(f"{what} {path} cannot be read ({reason}); {fix}.") from exc
    if len(data) > max_bytes:
        raise UserError(f"{what} {path} is larger than {max_bytes >> 20} MB, far more than it should be; {fix}.")
    try:
        return parse_json(data)
    except JSONProblem as exc:
        raise UserError(f"{what} {path} {exc}; {fix}.") from None
