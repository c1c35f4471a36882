"""Stand-in install helpers: is_installed by metadata, run_pip records instead of installing."""

from __future__ import annotations

import importlib.metadata

pip_calls: list[tuple[str, str]] = []


def is_installed(package: str) -> bool:
    try:
        importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def run_pip(command: str, desc: str | None = None, live: bool = False) -> str:
    pip_calls.append((command, desc or ""))
    return ""
