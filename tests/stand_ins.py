"""Small stand-ins shared by several test files: the fake WebUI's module purge and a booby-trapped pickle."""

from __future__ import annotations

import sys
from pathlib import Path

FAKE_WEBUI = Path(__file__).resolve().parent / "fake_webui"


def purge_fake_webui() -> None:
    """Forget the stand-in ``modules`` (and ``launch``) so the next test imports them fresh."""
    for name in list(sys.modules):
        if name == "modules" or name.startswith("modules.") or name == "launch":
            del sys.modules[name]


class MakesAFile:
    """Unpickling this calls open(marker, "w"): it would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (self.marker, "w"))
