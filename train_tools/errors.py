"""The one exception type for mistakes a user can make and fix, and the file-system errors that are such."""

from __future__ import annotations

import errno
from pathlib import Path


class UserError(Exception):
    """A problem the user caused and can fix; its message is one clear sentence that says what to do.

    The CLI prints it without a traceback and exits non-zero; the UI shows it as a message.
    """


#: Errors of a folder the program may not write to: no permission, a read-only disk or mount.
_NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def from_os_error(exc: BaseException, target: Path | str | None = None) -> UserError | None:
    """The sentence for a file-system error a user can fix (a read-only or foreign folder, a full disk, a name
    too long for the disk); None for any other error, which stays what it is.

    ``target`` is the file or folder being written; without it, the one the error names.
    """
    if isinstance(exc, UserError) or not isinstance(exc, OSError):
        return None
    where = target if target is not None else exc.filename
    shown = str(where) if where is not None else "a file"
    if exc.errno in _NOT_WRITABLE or isinstance(exc, PermissionError):
        # With a target the error came from writing it; without one it may have been a read (a checkpoint).
        doing = "Cannot write" if target is not None else "Permission denied for"
        return UserError(
            f"{doing} {shown}: the folder is read-only or belongs to another user. Choose a data "
            "folder you can write to (--data-dir, or the WebUI's data dir), or give yourself "
            "permission on it."
        )
    if exc.errno in _DISK_FULL or "No space left on device" in str(exc):
        name = Path(shown).name or shown
        return UserError(
            f"The disk is full while writing {name}; free some space and try again (earlier files are intact)."
        )
    if exc.errno == errno.ENAMETOOLONG:
        name = Path(shown).name or shown
        return UserError(f"The file name '{name[:60]}...' is too long for this disk; use a shorter name.")
    return None
