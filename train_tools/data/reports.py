"""What preparing and adding pictures report back: the files refused (each with its reason), duplicates,
counts, and the one-line summary the command line prints and the tab shows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .layout import IMAGE_SUFFIXES


@dataclass(frozen=True)
class Refusal:
    """A file that was not used, and why."""

    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name}: {self.reason}"


@dataclass
class PrepareReport:
    """What ``prepare_dataset`` did. ``prepared`` counts the usable items now in ``prepared/``."""

    prepared: int = 0
    refused: list[Refusal] = field(default_factory=list)
    duplicates: list[tuple[str, str]] = field(default_factory=list)
    encoded: int = 0
    captions_written: int = 0
    removed: int = 0

    def summary(self) -> str:
        parts = [f"{self.prepared} pictures ready ({self.encoded} newly prepared)"]
        if self.duplicates:
            parts.append(
                f"{len(self.duplicates)} duplicates skipped: "
                + ", ".join(f"{dup} (same as {kept})" for dup, kept in self.duplicates[:3])
            )
        if self.refused:
            parts.append(f"{len(self.refused)} refused: " + "; ".join(str(r) for r in self.refused[:5]))
        return "; ".join(parts) + "."


@dataclass
class AddReport:
    """What ``add_originals`` did."""

    added: list[Path] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    renamed: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        images = sum(1 for p in self.added if p.suffix.lower() in IMAGE_SUFFIXES)
        parts = [f"Added {images} pictures and {len(self.added) - images} captions"]
        if self.renamed:
            parts.append(f"{len(self.renamed)} renamed to keep an existing file of the same name")
        if self.skipped:
            parts.append(f"{len(self.skipped)} exact duplicates skipped")
        if self.refused:
            parts.append(f"{len(self.refused)} refused: " + "; ".join(str(r) for r in self.refused[:5]))
        return "; ".join(parts) + "."
