"""Finding a base model: by path (the command line), or by name in the checkpoint folders (the tab, which a web
request can reach, takes only those); and listing the folders' checkpoints for the tab's dropdown."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..errors import UserError

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")


def default_ckpt_dirs(data_dir: Path) -> list[Path]:
    return [data_dir / "models" / "Stable-diffusion"]


def resolve_checkpoint(base_model: str, ckpt_dirs: Sequence[Path], *, any_path: bool = True) -> Path:
    """A checkpoint path from a path, a file name or a bare name in the checkpoint folders.

    ``any_path=False`` (the tab, which a web request can reach) takes only files inside the checkpoint folders:
    a request must not make the server open any file on the disk.
    """
    if not base_model:
        raise UserError(
            "No base model chosen: pass --ckpt PATH, or --set base_model=NAME_OR_PATH "
            "(try 'python -m train_tools demo-checkpoint demo.safetensors' for a tiny demo model)."
        )
    direct = Path(base_model).expanduser()
    if any_path and direct.is_file():
        return direct.resolve()
    name = base_model.split(" [")[0]  # WebUI titles look like "name.safetensors [hash]"
    for folder in ckpt_dirs:
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() not in CHECKPOINT_SUFFIXES or not path.is_file():
                continue
            rel = path.relative_to(folder).as_posix()
            if name in (path.name, path.stem, rel, rel.rsplit(".", 1)[0]):
                return path.resolve()
    where = ", ".join(str(d) for d in ckpt_dirs) or "no checkpoint folder"
    raise UserError(
        f"Base model '{base_model}' was not found as a file or in {where}; give its full path with "
        "--ckpt or put it in the checkpoint folder (--ckpt-dir)."
    )


def scan_checkpoints(folders: Sequence[Path]) -> list[str]:
    """Checkpoint files under ``folders`` as paths relative to their folder (what ``resolve_checkpoint`` takes)."""
    names: list[str] = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() in CHECKPOINT_SUFFIXES and path.is_file() and not path.name.startswith("."):
                rel = path.relative_to(folder).as_posix()
                if rel not in names:
                    names.append(rel)
    return names
