"""The one place that checks what a person (or a web request) types that ends up in a file or folder name.

Project, version, output and installed-LoRA names all pass through ``check_name`` before any work starts; the
longest paths a run will write are checked by ``check_run_paths`` when a version is created and whenever its
settings are saved, so a name that cannot be stored is refused up front instead of failing at the first save
an epoch later.

Any name a person types works (Japanese, emoji, spaces); refused, each with a sentence saying why:

- anything that could leave the folder it is meant for: ``/``, ``\\``, ``..``, a drive or an absolute path;
- NUL, control characters, and characters that are invisible or reorder the text (zero-width space, the
  bidi controls such as U+202E, the BOM, the line and paragraph separators): two names that look alike must be
  two names that are alike;
- what Windows cannot store: ``<>:"|?*``, a trailing dot, and its reserved device names (``CON``, ``NUL``,
  ``COM1``, ``COM¹``, ``CONIN$``, ... with or without an extension);
- a name longer than a file system takes once the suffixes a run adds are counted.

This module imports nothing of the package but its error type, so every layer may use it.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Iterable
from pathlib import Path

from .errors import UserError

#: Windows' reserved device names; the superscript digits are reserved too (``COM¹`` opens COM1).
_DIGITS = [str(i) for i in range(10)] + ["¹", "²", "³"]
WINDOWS_RESERVED = frozenset(
    {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$", "CLOCK$"}
    | {f"COM{d}" for d in _DIGITS}
    | {f"LPT{d}" for d in _DIGITS}
)
_FORBIDDEN_CHARS = frozenset('/\\<>:"|?*')
#: One name (project, version, output name) in bytes: with the suffixes a run adds (see ``run_file_names``)
#: it stays under the 255-byte file-name limit.
MAX_NAME_BYTES = 120
#: A file-name component, in bytes (ext4, XFS, APFS, Btrfs; NTFS counts 255 UTF-16 units, which is more).
MAX_COMPONENT_BYTES = 255
#: Windows' classic MAX_PATH, less the terminating NUL (a path longer than this fails without long paths on).
WINDOWS_MAX_PATH = 259
#: Linux's PATH_MAX, less the terminating NUL.
POSIX_MAX_PATH = 4095


def _temp_twin(name: str) -> str:
    """The longest name ``fileio.atomic_path`` gives the temporary file of ``name``: ``.<name>.<8 random>.tmp``."""
    return f".{name}.{'x' * 8}.tmp"


#: What ``fileio.atomic_path`` adds to a name for its temporary file.
TEMP_FILE_EXTRA = len(_temp_twin(""))
#: The longest epoch suffix a run writes (``TrainConfig.epochs`` is at most 10000, written as 6 digits).
LONGEST_LORA_SUFFIX = "-000000-interrupted.safetensors"
#: The longest other names a run writes in its folder and below it.
LONGEST_RUN_FOLDER = "20261231-235959-99"
LONGEST_STATE_PATH = ("state", "step-00000000-interrupt.state")
LONGEST_PREVIEW_PATH = ("previews", "grid-20261231-235959-99", "r000-e000000-w1.25.png")

_ZERO_WIDTH_JOINER = "\u200d"
_EMOJI_PRESENTATION = "\ufe0f"


def _invisible(name: str) -> list[str]:
    """The characters of ``name`` that show nothing or reorder the text around them (Unicode categories Cf,
    Zl, Zp, Co, Cs, Cn); the zero-width joiner is allowed between two emoji (it builds one picture of several,
    e.g. a family)."""
    bad = []
    for i, c in enumerate(name):
        category = unicodedata.category(c)
        if c == _ZERO_WIDTH_JOINER and 0 < i < len(name) - 1 and _emoji_like(name[i - 1]) and _emoji_like(name[i + 1]):
            continue
        if category in ("Cf", "Zl", "Zp", "Co", "Cs", "Cn"):
            bad.append(c)
    return bad


def _emoji_like(c: str) -> bool:
    return c == _EMOJI_PRESENTATION or unicodedata.category(c) in ("So", "Sk") or 0x1F3FB <= ord(c) <= 0x1F3FF


def _code_points(chars: Iterable[str]) -> str:
    return ", ".join(f"U+{ord(c):04X} ({unicodedata.name(c, 'unnamed')})" for c in dict.fromkeys(chars))


def is_windows_reserved(name: str) -> bool:
    """Whether Windows treats ``name`` as a device (``CON``, ``nul.txt``, ``COM¹ .png``, ``CONIN$``)."""
    return name.split(".")[0].rstrip(" ").upper() in WINDOWS_RESERVED


def check_name(name: object, what: str = "name", *, max_bytes: int = MAX_NAME_BYTES) -> str:
    """Return the normalised ``name`` (NFC, outer spaces removed) or raise a UserError that names ``what`` and
    says what is wrong with it."""
    if not isinstance(name, str):
        raise UserError(f"The {what} must be text.")
    name = unicodedata.normalize("NFC", name).strip()
    if not name:
        raise UserError(f"The {what} is empty; type a name.")
    if "\x00" in name or any(unicodedata.category(c) == "Cc" for c in name):
        raise UserError(f"The {what} contains a control character; use letters, digits and spaces.")
    invisible = _invisible(name)
    if invisible:
        raise UserError(
            f"The {what} contains an invisible or text-reordering character ({_code_points(invisible)})"
            "; retype the name without it."
        )
    if name in (".", "..") or name.startswith(".."):
        raise UserError(f"The {what} '{name}' could point outside the project folder; choose another name.")
    bad = sorted(c for c in set(name) if c in _FORBIDDEN_CHARS)
    if bad:
        raise UserError(f"The {what} '{name}' contains {' '.join(bad)}, which cannot be used in a file or folder name.")
    if name.endswith("."):
        raise UserError(f"The {what} '{name}' ends with a dot, which Windows cannot store; remove it.")
    if is_windows_reserved(name):
        raise UserError(f"The {what} '{name}' is reserved by Windows; choose another name.")
    if name.startswith("."):
        raise UserError(f"The {what} '{name}' starts with a dot, which hides it; remove the dot.")
    size = len(name.encode("utf-8"))
    if size > max_bytes:
        raise UserError(
            f"The {what} is too long ({size} bytes); use at most {max_bytes} bytes (about "
            f"{max_bytes // 3} Japanese or {max_bytes} Latin letters)."
        )
    return name


def name_key(name: str) -> str:
    """What two names must differ in to be two folders everywhere: Windows and macOS ignore case, and macOS
    and many sync tools ignore how an accented letter is composed."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).casefold())


def check_unique(name: str, existing: Iterable[str], what: str) -> None:
    """Refuse ``name`` when it differs from an existing name only by case or Unicode normalisation."""
    key = name_key(name)
    for other in existing:
        if other != name and name_key(other) == key:
            raise UserError(
                f"The {what} '{name}' differs from the existing '{other}' only by upper/lower case or "
                "how its letters are composed; on Windows and macOS they would be one folder. Choose "
                f"another name or open '{other}'."
            )


def run_file_names(output_name: str) -> list[tuple[str, ...]]:
    """The longest relative paths (as components) a run writes below its version folder."""
    run = ("trains", LONGEST_RUN_FOLDER)
    return [run + (f"{output_name}{LONGEST_LORA_SUFFIX}",), run + LONGEST_STATE_PATH, run + LONGEST_PREVIEW_PATH]


def check_paths_fit(base: Path, relative: Iterable[tuple[str, ...]], what: str, *, windows: bool | None = None) -> None:
    """Refuse when a file ``base / *parts`` (with its temporary twin) cannot be stored: a component over 255
    bytes, or a whole path over the system's limit (259 characters on Windows, 4095 bytes elsewhere)."""
    windows = os.name == "nt" if windows is None else windows
    base = Path(base)
    for parts in relative:
        *folders, file_name = parts
        twin = _temp_twin(file_name)
        for shown, component in [*((f, f) for f in folders), (file_name, twin)]:
            size = len(component.encode("utf-8"))
            if size > MAX_COMPONENT_BYTES:
                raise UserError(
                    f"The {what} is too long: it would make the file name '{shown[:40]}...' "
                    f"{size} bytes long, and disks take at most {MAX_COMPONENT_BYTES}; "
                    "use a shorter name."
                )
        full = str(base.joinpath(*folders, twin))
        if windows and len(full.encode("utf-16-le")) // 2 > WINDOWS_MAX_PATH:
            raise UserError(
                f"The {what} is too long for Windows: a file of the run would have a path of "
                f"{len(full)} characters, over Windows' {WINDOWS_MAX_PATH}; use shorter names or a data "
                "folder nearer the drive's root (e.g. C:\\train)."
            )
        if not windows and len(os.fsencode(full)) > POSIX_MAX_PATH:
            raise UserError(
                f"The {what} is too long: a file of the run would have a path of {len(os.fsencode(full))}"
                f" bytes, over this system's {POSIX_MAX_PATH}; use shorter names or a shorter data folder."
            )


def check_run_paths(version_path: Path, output_name: str, what: str, *, windows: bool | None = None) -> None:
    """Refuse names with which a run of the version at ``version_path`` could not save its files."""
    check_paths_fit(version_path, run_file_names(output_name), what, windows=windows)
