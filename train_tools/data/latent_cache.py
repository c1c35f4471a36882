"""The on-disk latent cache of a version: ``prepared/.latents/<key>.safetensors``.

Encoding the pictures with the VAE is the slowest part of starting a run on a small dataset (and the VAE
needs memory the UNet would rather have), while its result only depends on the picture, its bucket, the
training resolution, the VAE's weights and whether the picture is mirrored. So each encoded picture is kept
beside the prepared dataset under a key made of exactly those, and a later run, a restart or a second
process reads it back instead of encoding again. A changed picture or resolution gives a new key (the old
entry is pruned); a different checkpoint's VAE gives its own entries, so switching models back and forth
does not re-encode.

An entry holds the mean and the standard deviation of the VAE's latent distribution (float32, C x h x w),
so every step can still draw a fresh latent sample, exactly as with latents cached in memory.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..fileio import remove_stale_temp_files, write_with

log = logging.getLogger(__name__)

CACHE_DIR_NAME = ".latents"
FORMAT = "1"


def vae_identity(vae: nn.Module) -> str:
    """A hash of the VAE's weights: the same VAE in two checkpoints shares the cache, a different one does not.

    Hashing ~330 MB of weights takes a fraction of a second; hashing the whole checkpoint file (2-7 GB) would
    take many, and would separate checkpoints that share their VAE.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)};".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


class LatentDiskCache:
    """The latent entries of one prepared folder, for one VAE and one training resolution."""

    def __init__(self, prepared_dir: Path, vae_id: str, resolution: int) -> None:
        self.folder = Path(prepared_dir) / CACHE_DIR_NAME
        self.vae_id = vae_id
        self.resolution = int(resolution)

    def _meta(self, image_sha: str, size: tuple[int, int], flip: bool) -> dict[str, str]:
        return {
            "format": FORMAT,
            "image_sha256": image_sha,
            "size": f"{size[0]}x{size[1]}",
            "resolution": str(self.resolution),
            "flip": "1" if flip else "0",
            "vae": self.vae_id,
        }

    def path_for(self, image_sha: str, size: tuple[int, int], flip: bool) -> Path:
        """``<picture hash>-<variant hash>.safetensors``: the picture's part first, so stale entries are found
        by name alone."""
        variant = hashlib.sha256(repr(sorted(self._meta(image_sha, size, flip).items())).encode()).hexdigest()
        return self.folder / f"{image_sha[:24]}-{variant[:24]}.safetensors"

    def load(self, image_sha: str, size: tuple[int, int], flip: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The cached (mean, std), or None when there is no entry or it is unreadable or not this variant's."""
        path = self.path_for(image_sha, size, flip)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), "pt") as fh:
                meta = fh.metadata() or {}
                tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118 - not a dict
        except Exception as exc:  # noqa: BLE001 - a damaged entry (any reader error) is just encoded again
            log.warning("Ignoring the unreadable latent cache entry %s: %s", path.name, exc)
            return None
        if meta != self._meta(image_sha, size, flip) or set(tensors) != {"mean", "std"}:
            return None
        return tensors["mean"], tensors["std"]

    def store(self, image_sha: str, size: tuple[int, int], flip: bool, mean: torch.Tensor, std: torch.Tensor) -> None:
        tensors = {"mean": mean.detach().float().cpu().contiguous(), "std": std.detach().float().cpu().contiguous()}
        meta = self._meta(image_sha, size, flip)
        write_with(self.path_for(image_sha, size, flip), lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    def remove_leftovers(self) -> list[Path]:
        """Delete the half-written entries a killed run left (``.<name>.<random>.tmp``); returns what went.

        Only while nothing writes here: the caller holds the version, so no other run encodes into it.
        """
        return remove_stale_temp_files(self.folder)

    def prune(self, image_shas: set[str]) -> int:
        """Delete the entries of pictures that are no longer in the prepared folder; returns how many."""
        if not self.folder.is_dir():
            return 0
        keep = {sha[:24] for sha in image_shas}
        removed = 0
        for path in self.folder.glob("*.safetensors"):
            if path.name.split("-", 1)[0] not in keep:
                path.unlink(missing_ok=True)
                removed += 1
        return removed
