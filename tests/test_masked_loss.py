"""Masked loss (issue 18, item 4): a picture's alpha channel, or a mask picture beside it (``name.mask.png``),
limits the loss to the masked area; the masks are prepared with the pictures (same crop and size), cached at
latent size with their mirrored variant, and the gallery says which pictures have one."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests import fixtures_training
from train_tools.config import TrainConfig
from train_tools.data.layout import MASKS_FOLDER
from train_tools.data.uploads import add_originals
from train_tools.store import Store
from train_tools.training.losses import latent_mask, per_item_loss
from train_tools.training.trainer import Trainer
from train_tools.ui.views import dataset_view, original_images

demo_ckpt = fixtures_training.demo_ckpt
one_thread = fixtures_training.one_thread


@pytest.mark.parametrize("loss_type", ["l2", "l1", "huber", "smooth_l1"])
def test_the_masked_loss_is_the_loss_on_the_masked_pixels_only(loss_type: str) -> None:
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    mask = torch.zeros(2, 1, 8, 8)
    mask[0, :, :4] = 1.0  # the top half of the first item
    mask[1, :, :, 6:] = 1.0  # the two right columns of the second
    c = torch.full((2,), 0.1)
    got = per_item_loss(pred, target, loss_type, c, mask)
    for i in range(2):
        keep = mask[i, 0].bool()
        alone = per_item_loss(pred[i : i + 1][..., keep], target[i : i + 1][..., keep], loss_type, c[i : i + 1])
        assert got[i] == pytest.approx(float(alone[0]), rel=1e-5)
    assert torch.allclose(
        per_item_loss(pred, target, loss_type, c, torch.ones(2, 1, 8, 8)), per_item_loss(pred, target, loss_type, c)
    )


def pictures(folder: Path) -> list[Path]:
    """Three 96x64 pictures: one with its left half transparent, one with a mask picture beside it (its top
    rows white), one plain."""
    folder.mkdir(parents=True, exist_ok=True)
    rgba = np.zeros((64, 96, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    rgba[:, :48, 3] = 0
    Image.fromarray(rgba, "RGBA").save(folder / "alpha.png")
    Image.new("RGB", (96, 64), (0, 90, 200)).save(folder / "masked.png")
    mask = np.zeros((64, 96), dtype=np.uint8)
    mask[:16] = 255
    Image.fromarray(mask, "L").save(folder / "masked.mask.png")
    Image.new("RGB", (96, 64), (20, 200, 20)).save(folder / "plain.png")
    return sorted(folder.iterdir())


def settings(**changes: object) -> TrainConfig:
    base = dict(resolution=64, min_bucket_reso=64, max_bucket_reso=128, network_dim=4, network_alpha=4.0)
    base.update(epochs=1, repeats=1, batch_size=3, preview_at_end=False, max_token_length=75, masked_loss=True)
    return TrainConfig().updated({**base, **changes})


def test_masks_are_prepared_cached_and_used(tmp_path: Path, demo_ckpt: Path, one_thread: None) -> None:
    store = Store(tmp_path / "data")
    store.create_project("p")
    version = store.create_version("p", "v1")
    add_originals(pictures(tmp_path / "in"), version.originals_dir)
    assert [p.name for p in original_images(version)] == ["alpha.png", "masked.png", "plain.png"]
    trainer = Trainer(version, settings(flip_aug=True), demo_ckpt, device="cpu")
    trainer.prepare()
    by_name = {item.image.stem: item for item in trainer.items}
    assert set(by_name) == {"alpha", "masked", "plain"} and by_name["plain"].mask is None
    for name in ("alpha", "masked"):
        mask = by_name[name].mask
        assert mask is not None and mask.parent.name == MASKS_FOLDER
        with Image.open(mask) as im, Image.open(by_name[name].image) as picture:
            assert im.size == picture.size  # cropped and scaled with the picture
    with Image.open(by_name["alpha"].mask) as im:
        values = np.asarray(im)
    assert values[:, : values.shape[1] // 2 - 2].max() < 10 and values[:, values.shape[1] // 2 + 2 :].min() > 245

    index = {item.image.stem: i for i, item in enumerate(trainer.all_items)}
    straight, mirrored = trainer.mask_cache[index["alpha"]]
    latent = trainer.latent_cache[index["alpha"]][0][0]
    assert straight is not None and mirrored is not None and straight.shape == (1, *latent.shape[-2:])
    assert torch.equal(mirrored, straight.flip(-1)) and float(straight[0, :, 0].max()) == 0.0
    assert trainer.mask_cache[index["plain"]] == [None, None]
    batch = [index["alpha"], index["plain"]]
    mask = trainer.loss_mask(batch, [1, 0])
    assert mask is not None and torch.equal(mask[0], mirrored) and torch.equal(mask[1], torch.ones_like(mirrored))
    assert trainer.loss_mask([index["plain"]], [0]) is None

    # The mask is what the loss sees: the same batch, noise and timesteps give another loss with it than without.
    gen = torch.Generator().manual_seed(3)
    latents = trainer.latents_for(batch, random.Random(0), gen)
    text = trainer.text_for(batch, random.Random(0))
    noise, t = torch.randn(latents.shape, generator=gen), torch.tensor([500, 500])
    with torch.no_grad():
        masked, whole = trainer.loss(latents, text, noise, t, mask=mask), trainer.loss(latents, text, noise, t)
    assert float(masked) != pytest.approx(float(whole))

    gallery, _ = dataset_view(version, trainer.config)
    labels = {Path(path).stem: label for path, label in gallery}
    assert labels["alpha"].startswith("[masked]") and not labels["plain"].startswith("[masked]")
    shown = {Path(path).stem: Path(path) for path, _ in gallery}
    assert shown["alpha"].parent == version.prepared_dir / "masked" and shown["plain"] == by_name["plain"].image
    with Image.open(shown["alpha"]) as im, Image.open(by_name["alpha"].image) as picture:
        seen, real = np.asarray(im.convert("L"), dtype=float), np.asarray(picture.convert("L"), dtype=float)
    half = seen.shape[1] // 2
    assert seen[:, : half - 2].mean() < 0.5 * real[:, : half - 2].mean()  # left out: dimmed
    assert np.allclose(seen[:, half + 2 :], real[:, half + 2 :], atol=2)  # learned: as it is
    result = trainer.run()
    assert result.final_file is not None and len(result.losses) == result.steps

    # The mask picture removed: the next preparation drops its prepared mask.
    (version.originals_dir / "masked.mask.png").unlink()
    again = Trainer(version, settings(), demo_ckpt, device="cpu")
    again.prepare()
    assert {item.image.stem: item.mask is not None for item in again.items} == {
        "alpha": True,
        "masked": False,
        "plain": False,
    }
    assert sorted(p.stem for p in (version.prepared_dir / MASKS_FOLDER).glob("*.png")) == ["alpha"]
    assert sorted(p.stem for p in (version.prepared_dir / "masked").glob("*.png")) == ["alpha"]


def test_a_latent_mask_averages_the_pixels_it_covers(tmp_path: Path) -> None:
    values = np.zeros((16, 16), dtype=np.uint8)
    values[:, :4] = 255  # a quarter of the width
    Image.fromarray(values, "L").save(tmp_path / "m.png")
    small = latent_mask(tmp_path / "m.png", (2, 2), flip=False)
    assert small.shape == (1, 2, 2) and torch.allclose(small[0, :, 0], torch.tensor([0.5, 0.5]))
    assert torch.equal(latent_mask(tmp_path / "m.png", (2, 2), flip=True), small.flip(-1))


def test_a_mask_is_decoded_under_the_pictures_pixel_limit(tmp_path: Path) -> None:
    """A mask is an upload like the pictures: one over the pixel limit is refused with its picture, by name,
    and Pillow's own limit is left as it was."""
    from train_tools.data.prepare_folder import prepare_dataset
    from train_tools.data.prepare_options import PrepareOptions

    folder = tmp_path / "orig"
    folder.mkdir()
    Image.new("RGB", (96, 64), (0, 90, 200)).save(folder / "masked.png")
    Image.new("L", (600, 400), 255).save(folder / "masked.mask.png")  # 240,000 pixels
    Image.new("RGB", (96, 64), (20, 200, 20)).save(folder / "plain.png")
    before = Image.MAX_IMAGE_PIXELS
    report = prepare_dataset(folder, tmp_path / "prep", PrepareOptions(resolution=64, max_pixels=100_000))
    assert [(r.name, "its mask masked.mask.png is too large" in r.reason) for r in report.refused] == [
        ("masked.png", True)
    ]
    assert before == Image.MAX_IMAGE_PIXELS and (tmp_path / "prep" / "plain.png").is_file()
