"""Latent caching: the VAE runs once per picture and mirror, and the disk cache survives runs and is renewed
exactly when a picture or the resolution changes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from train_tools.cli import main
from train_tools.config import TrainConfig
from train_tools.data.latent_cache import CACHE_DIR_NAME
from train_tools.store import Store, Version
from train_tools.training.trainer import Trainer


@pytest.fixture(scope="module")
def demo_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from train_tools.models.demo_model import build_demo_checkpoint

    return build_demo_checkpoint(tmp_path_factory.mktemp("models") / "demo.safetensors")


@pytest.fixture
def version(tmp_path: Path) -> Version:
    from train_tools.data.demo_dataset import make_demo_dataset

    pictures = tmp_path / "pictures"
    make_demo_dataset(pictures, n=3)
    data = tmp_path / "data"
    assert main(["--data-dir", str(data), "project", "create", "p"]) == 0
    assert main(["--data-dir", str(data), "version", "create", "p", "v1"]) == 0
    assert main(["--data-dir", str(data), "dataset", "add", "p", "v1", str(pictures)]) == 0
    return Store(data).version("p", "v1")


@pytest.fixture
def encodes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """Every VAE encode call, as the shape of its input."""
    calls: list[tuple[int, ...]] = []
    original = AutoencoderKL.encode

    def counting(self: AutoencoderKL, x: torch.Tensor, *args: object, **kwargs: object) -> object:
        calls.append(tuple(x.shape))
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", counting)
    return calls


def config(**changes: object) -> TrainConfig:
    base: dict[str, object] = {
        "resolution": 128,
        "min_bucket_reso": 64,
        "max_bucket_reso": 256,
        "network_dim": 4,
        "network_alpha": 2.0,
        "repeats": 2,
        "batch_size": 1,
        "epochs": 2,
        "save_every_n_epochs": 10,
        "optimizer": "AdamW",
        "train_text_encoder": False,
    }
    base.update(changes)
    return TrainConfig(**base)  # type: ignore[arg-type]


def prepared_trainer(version: Version, demo_ckpt: Path, **changes: object) -> Trainer:
    trainer = Trainer(version, config(**changes), demo_ckpt, device="cpu")
    trainer.prepare()
    return trainer


def entries(version: Version) -> set[str]:
    return {p.name for p in (version.prepared_dir / CACHE_DIR_NAME).glob("*.safetensors")}


def test_vae_runs_once_per_picture_and_mirror_across_epochs(
    version: Version, demo_ckpt: Path, encodes: list[tuple[int, ...]]
):
    trainer = Trainer(version, config(flip_aug=True), demo_ckpt, device="cpu")
    result = trainer.run()
    n = len(trainer.items)
    assert n == 3 and result.steps == 2 * 3 * 2  # 2 epochs x 3 pictures x 2 repeats, batch 1
    assert len(encodes) == n * 2  # each picture and its mirror, once for the whole run
    assert trainer.latent_encodes == len(encodes)
    assert len(entries(version)) == n * 2
    # The mirror is encoded from the mirrored picture, not a copy of the first latent.
    (mean, _), (mirrored, _) = trainer.latent_cache[0]
    assert mean.shape == mirrored.shape and not torch.equal(mean, mirrored)


def test_a_second_trainer_reads_the_disk_cache(version: Version, demo_ckpt: Path, encodes: list[tuple[int, ...]]):
    first = prepared_trainer(version, demo_ckpt)
    assert len(encodes) == 3 and len(entries(version)) == 3  # no flip: one entry per picture
    second = prepared_trainer(version, demo_ckpt)
    assert len(encodes) == 3 and second.latent_encodes == 0
    for a, b in zip(first.latent_cache, second.latent_cache, strict=False):
        for (mean_a, std_a), (mean_b, std_b) in zip(a, b, strict=False):
            assert torch.equal(mean_a, mean_b) and torch.equal(std_a, std_b)


def test_changed_picture_is_encoded_again_and_its_old_entry_removed(
    version: Version, demo_ckpt: Path, encodes: list[tuple[int, ...]]
):
    prepared_trainer(version, demo_ckpt)
    before = entries(version)
    assert len(encodes) == 3
    original = min(p for p in version.originals_dir.iterdir() if p.suffix == ".png")
    with Image.open(original) as im:
        changed = im.convert("RGB").rotate(180)
    changed.save(original)
    trainer = prepared_trainer(version, demo_ckpt)
    assert len(encodes) == 4 and trainer.latent_encodes == 1
    after = entries(version)
    assert len(after) == 3 and len(before & after) == 2  # one entry replaced, the other two kept


def test_resolution_change_encodes_everything_again(version: Version, demo_ckpt: Path, encodes: list[tuple[int, ...]]):
    prepared_trainer(version, demo_ckpt)
    trainer = prepared_trainer(version, demo_ckpt, resolution=192)
    assert len(encodes) == 6 and trainer.latent_encodes == 3
    assert len(entries(version)) == 3
    assert max(max(shape[-2:]) for shape in encodes[3:]) > max(max(shape[-2:]) for shape in encodes[:3])


def test_damaged_entry_is_encoded_again(version: Version, demo_ckpt: Path, encodes: list[tuple[int, ...]]):
    prepared_trainer(version, demo_ckpt)
    victim = min((version.prepared_dir / CACHE_DIR_NAME).glob("*.safetensors"))
    victim.write_bytes(b"not a safetensors file")
    trainer = prepared_trainer(version, demo_ckpt)
    assert trainer.latent_encodes == 1 and len(encodes) == 4


def test_cache_latents_off_writes_nothing(version: Version, demo_ckpt: Path, encodes: list[tuple[int, ...]]):
    trainer = prepared_trainer(version, demo_ckpt, cache_latents=False)
    assert trainer.latent_encodes == 3
    assert not (version.prepared_dir / CACHE_DIR_NAME).exists()
