"""Regularisation (class) pictures: kept in ``reg/``, prepared into ``prepared_reg/`` without the trigger word,
drawn beside the training pictures (as many per epoch as training pictures x repeats), weighted by
``prior_loss_weight`` in the loss, cached like the training pictures, recorded with kohya's metadata keys, and
resumed exactly."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from tests import fixtures_training
from tests.fixtures_training import StopsAtStep
from train_tools.cli import main
from train_tools.config import TrainConfig
from train_tools.data.items import DatasetItem, load_items
from train_tools.data.preparation import prepare_version
from train_tools.data.sampler import RegularisedBatchSampler
from train_tools.data.uploads import add_originals
from train_tools.models.text_encoding import Conditioning
from train_tools.progress import StopFlag
from train_tools.store import Store, Version
from train_tools.training.trainer import Trainer

TRIGGER = "sks"
CLASS_CAPTION = "a photo of a shape"


# The shared fixtures, found by pytest under these names.
one_thread = fixtures_training.one_thread
demo_ckpt = fixtures_training.demo_ckpt
pictures = fixtures_training.pictures


def tiny_config(**changes: Any) -> TrainConfig:
    base: dict[str, Any] = dict(
        resolution=64,
        min_bucket_reso=64,
        max_bucket_reso=128,
        network_dim=2,
        network_alpha=1.0,
        repeats=1,
        batch_size=1,
        epochs=2,
        save_every_n_epochs=1,
        optimizer="AdamW",
        save_precision="fp32",
        train_text_encoder=False,
        mixed_precision="no",
        trigger_word=TRIGGER,
        reg_caption=CLASS_CAPTION,
    )
    base.update(changes)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def class_pictures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three class pictures (other shapes than the training ones); the first keeps its own caption."""
    from train_tools.data.demo_dataset import make_demo_dataset

    folder = tmp_path_factory.mktemp("class_pictures")
    make_demo_dataset(folder, n=3, seed=7)
    for caption in sorted(folder.glob("*.txt"))[1:]:
        caption.unlink()
    return folder


def make_version(data_dir: Path, pictures: Path, class_pictures: Path | None, config: TrainConfig) -> Version:
    store = Store(data_dir)
    store.create_project("p")
    version = store.create_version("p", "v1")
    add_originals([pictures], version.originals_dir)
    if class_pictures is not None:
        add_originals([class_pictures], version.reg_dir)
    version.save_settings(config)
    return version


def lora_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as fh:
        return {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118 - not a dict


# ---------------------------------------------------------------------- the sampler


def fake_items(sizes: list[tuple[int, int]], prefix: str) -> list[DatasetItem]:
    return [DatasetItem(image=Path(f"{prefix}{i}.png"), caption="", size=size) for i, size in enumerate(sizes)]


def test_each_epoch_holds_the_training_items_x_repeats_and_as_many_class_items_one_bucket_per_batch():
    train = fake_items([(64, 64)] * 3 + [(64, 128)] * 2, "t")
    reg = fake_items([(64, 64)] * 3 + [(128, 64)] * 2 + [(64, 128)] * 2, "r")
    items = train + reg
    n, repeats = len(train), 2
    sampler = RegularisedBatchSampler(items, n, 3, seed=5, repeats=repeats)
    seen_reg: Counter[int] = Counter()
    epochs = len(reg)  # 7 epochs of 10 class draws: every class picture exactly 10 times
    for epoch in range(1, epochs + 1):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == sampler.batch_count(epoch)
        for batch in batches:
            assert 1 <= len(batch) <= 3
            assert len({items[i].size for i in batch}) == 1  # never two buckets in one batch
        flat = [i for batch in batches for i in batch]
        train_counts = Counter(i for i in flat if i < n)
        reg_counts = Counter(i for i in flat if i >= n)
        assert train_counts == {i: repeats for i in range(n)}
        assert sum(reg_counts.values()) == n * repeats
        # Drawn in turn: within an epoch no class picture is seen twice more often than another.
        assert max(reg_counts.values()) - min(reg_counts[i] for i in range(n, len(items))) <= 1
        seen_reg.update(reg_counts)
    assert seen_reg == {i: epochs * n * repeats // len(reg) for i in range(n, len(items))}
    # The order depends only on (seed, epoch).
    again = RegularisedBatchSampler(items, n, 3, seed=5, repeats=repeats)
    again.set_epoch(3)
    sampler.set_epoch(3)
    assert list(again) == list(sampler)
    sampler.set_epoch(4)
    assert list(again) != list(sampler)


def test_a_large_class_set_is_used_evenly_over_the_epochs():
    train = fake_items([(64, 64)] * 2, "t")
    reg = fake_items([(64, 64)] * 10, "r")
    sampler = RegularisedBatchSampler(train + reg, 2, 2, seed=0, repeats=1)
    drawn = [i for epoch in range(1, 6) for i in sampler.reg_draws(epoch)]
    assert sorted(drawn) == list(range(2, 12))  # 5 epochs x 2 draws: each of the 10 once


# ---------------------------------------------------------------------- preparing and the command line


def test_cli_add_reg_and_prepare_captions_without_trigger_word(
    tmp_path: Path, pictures: Path, class_pictures: Path, capsys: Any
):
    base = ["--data-dir", str(tmp_path)]
    assert main([*base, "project", "create", "p"]) == 0
    assert main([*base, "version", "create", "p", "v1"]) == 0
    assert main([*base, "dataset", "add", "p", "v1", str(pictures)]) == 0
    assert (
        main(
            [
                *base,
                "settings",
                "p",
                "v1",
                "--set",
                f"trigger_word={TRIGGER}",
                "--set",
                f"reg_caption={CLASS_CAPTION}",
                "--set",
                "resolution=64",
                "--set",
                "min_bucket_reso=64",
                "--set",
                "max_bucket_reso=128",
            ]
        )
        == 0
    )
    version = Store(tmp_path).version("p", "v1")
    before = sorted(p.name for p in version.originals_dir.iterdir())
    capsys.readouterr()
    assert main([*base, "dataset", "add-reg", "p", "v1", str(class_pictures)]) == 0
    assert "Added 3 pictures and 1 captions" in capsys.readouterr().out
    assert sorted(p.name for p in version.originals_dir.iterdir()) == before  # the dataset is untouched
    originals = {p.name: p.read_bytes() for p in version.reg_dir.iterdir()}
    assert len(originals) == 4
    assert main([*base, "dataset", "add-reg", "p", "v1", str(tmp_path / "missing")]) == 2

    assert main([*base, "dataset", "update", "p", "v1"]) == 0
    printed = capsys.readouterr()
    assert "2 images and 3 class images" in printed.out
    assert "Preparing pictures" in printed.err and "Preparing class pictures" in printed.err  # terminal bars
    assert {p.name: p.read_bytes() for p in version.reg_dir.iterdir()} == originals  # originals untouched
    train = load_items(version.prepared_dir)
    reg = load_items(version.prepared_reg_dir)
    assert len(train) == 2 and len(reg) == 3
    assert all(item.caption.startswith(TRIGGER) for item in train)
    own = (class_pictures / "demo_01.txt").read_text(encoding="utf-8").strip()
    assert [item.caption for item in reg] == [own, CLASS_CAPTION, CLASS_CAPTION]
    assert not any(TRIGGER in item.caption for item in reg)

    # A changed class caption rewrites the captions of the class pictures without a .txt of their own.
    config = version.load_settings().updated({"reg_caption": "a shape"})
    prepare_version(version, config)
    assert [item.caption for item in load_items(version.prepared_reg_dir)] == [own, "a shape", "a shape"]
    # Removed class pictures leave prepared_reg/ too.
    for path in version.reg_dir.iterdir():
        path.unlink()
    prepare_version(version, config)
    assert load_items(version.prepared_reg_dir) == []


def test_the_tab_takes_class_pictures_and_counts_them(tmp_path: Path, pictures: Path, class_pictures: Path):
    import train_tools.ui.logic as ui_logic
    import train_tools.ui.views as ui_views
    from train_tools.hosts.base import StandaloneHost
    from train_tools.ui.jobs import JobManager

    logic = ui_logic.TabLogic(StandaloneHost(tmp_path / "data"), JobManager())
    logic.create_project("p")
    logic.create_version("p", "v1")
    version = logic.store.version("p", "v1")
    add_originals([pictures], version.originals_dir)
    out = logic.upload_reg([str(p) for p in sorted(class_pictures.iterdir())], "p", "v1")
    assert out[0] is None and "tt-ok" in out[-1]
    assert len(list(version.reg_dir.glob("*.png"))) == 3
    values = [getattr(tiny_config(), name) for name in ui_views.SETTING_FIELDS]
    gallery, line = logic.update_dataset("p", "v1", *values)[:2]
    assert len(gallery) == 2  # the gallery shows what is trained on: the training pictures
    assert line.startswith("2 images and 3 class images, 1 repeats, 4 steps per epoch")
    assert len(load_items(version.prepared_reg_dir)) == 3  # Update Dataset prepared both


# ---------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trained(
    tmp_path_factory: pytest.TempPathFactory, demo_ckpt: Path, pictures: Path, class_pictures: Path
) -> tuple[Trainer, Any]:
    config = tiny_config(batch_size=2, flip_aug=True)
    version = make_version(tmp_path_factory.mktemp("data"), pictures, class_pictures, config)
    trainer = Trainer(version, config, demo_ckpt, device="cpu")
    return trainer, trainer.run()


def test_training_with_class_pictures_writes_kohyas_keys(trained: tuple[Trainer, Any]):
    trainer, result = trained
    version = trainer.version
    assert len(trainer.items) == 2 and len(trainer.reg_items) == 3
    # Both caches hold the class pictures too: latents (with their mirrors) and the frozen encoder's text.
    assert len(trainer.latent_cache) == 5 and all(len(entry) == 2 for entry in trainer.latent_cache)
    assert trainer.cached_text is not None and len(trainer.cached_text) == 5
    assert len(list((version.prepared_reg_dir / ".latents").glob("*.safetensors"))) == 3 * 2
    assert len(list((version.prepared_dir / ".latents").glob("*.safetensors"))) == 2 * 2
    expected = sum(trainer.sampler.batch_count(epoch) for epoch in (1, 2))
    assert result.steps == trainer.total_steps == expected

    with safe_open(str(result.final_file), "pt") as fh:
        meta = fh.metadata()
    assert meta["ss_num_reg_images"] == "3"
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {f"1_{CLASS_CAPTION}": {"n_repeats": 1, "img_count": 3}}
    assert meta["ss_prior_loss_weight"] == "1.0"
    assert meta["ss_num_train_images"] == "2"
    (tags,) = json.loads(meta["ss_tag_frequency"]).values()
    assert tags[TRIGGER] == 2 and CLASS_CAPTION not in tags  # the training pictures' tags only
    (dirs,) = json.loads(meta["ss_dataset_dirs"]).values()
    assert dirs["img_count"] == 2
    snapshot = json.loads((result.run_dir / "reg_captions.json").read_text(encoding="utf-8"))
    assert sorted(snapshot.values()) == sorted(item.caption for item in trainer.reg_items)


def test_prior_loss_weight_scales_the_class_pictures_loss(trained: tuple[Trainer, Any]):
    trainer, _result = trained
    n = len(trainer.items)
    trainer.config.prior_loss_weight = 0.25
    weights = trainer.loss_weights([0, n, 1, n + 2])
    assert weights is not None and weights.tolist() == [1.0, 0.25, 1.0, 0.25]

    gen = torch.Generator().manual_seed(3)
    rng = random.Random(3)
    latents = trainer.latents_for([0], rng, gen)
    text = trainer.text_for([0], rng)
    noise = trainer.sample_noise(latents, gen)
    timesteps = trainer.sample_timesteps(1, gen)
    with torch.no_grad():
        single = float(trainer.loss(latents, text, noise, timesteps))
        pair = float(
            trainer.loss(
                torch.cat([latents, latents]),
                Conditioning.cat([text, text]),
                torch.cat([noise, noise]),
                torch.cat([timesteps, timesteps]),
                torch.tensor([1.0, 0.25]),
            )
        )
    assert pair == pytest.approx(single * 1.25 / 2, rel=1e-5)

    # Through the trainer's own weights: with a weight of 0 a class picture teaches nothing.
    def grads(index: int) -> list[torch.Tensor]:
        trainer.optimizer.zero_grad(set_to_none=True)
        g = torch.Generator().manual_seed(0)
        r = random.Random(0)
        lat = trainer.latents_for([index], r, g)
        loss = trainer.loss(
            lat,
            trainer.text_for([index], r),
            trainer.sample_noise(lat, g),
            trainer.sample_timesteps(1, g),
            trainer.loss_weights([index]),
        )
        loss.backward()
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in trainer.trainable]

    trainer.config.prior_loss_weight = 0.0
    assert all(float(g.abs().sum()) == 0.0 for g in grads(n))
    assert any(float(g.abs().sum()) > 0.0 for g in grads(0))
    trainer.config.prior_loss_weight = 1.0
    assert any(float(g.abs().sum()) > 0.0 for g in grads(n))
    trainer.optimizer.zero_grad(set_to_none=True)


def test_a_run_with_class_pictures_resumes_to_the_same_lora(
    tmp_path: Path, demo_ckpt: Path, pictures: Path, class_pictures: Path
):
    config = tiny_config(shuffle_caption=True, prior_loss_weight=0.5)
    version = make_version(tmp_path, pictures, class_pictures, config)
    straight = Trainer(version, config, demo_ckpt, device="cpu", run_name="straight").run()
    assert straight.steps == 2 * (2 + 2)  # 2 epochs x (2 pictures + 2 class pictures), batch 1

    stop = StopFlag()

    first = Trainer(
        version, config, demo_ckpt, device="cpu", run_name="stopped", stop=stop, reporter=StopsAtStep(stop, 3)
    ).run()
    assert first.interrupted and first.steps == 3
    resumed = Trainer(version, config, demo_ckpt, device="cpu", resume_from=first.run_dir).run()
    assert resumed.steps == straight.steps and resumed.losses == pytest.approx(straight.losses, rel=1e-5)
    a, b = lora_tensors(straight.final_file), lora_tensors(resumed.final_file)  # type: ignore[arg-type]
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key])

    # A changed set of class pictures cannot go on as it was.
    stop2 = StopFlag()

    halted = Trainer(
        version, config, demo_ckpt, device="cpu", run_name="halted", stop=stop2, reporter=StopsAtStep(stop2, 1)
    ).run()
    assert halted.interrupted and halted.steps == 1
    (version.reg_dir / "demo_01.png").unlink()
    from train_tools.errors import UserError

    with pytest.raises(UserError, match="changed since run"):
        Trainer(version, config, demo_ckpt, device="cpu", resume_from=halted.run_dir).run()
