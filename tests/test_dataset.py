"""The dataset module: every picture people have prepared right, bad files refused with a reason, the originals
never touched, buckets, captions, incremental preparing, the sampler, uploads and the demo pictures."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from tests.image_zoo import GREEN, ORANGE, bomb_png, noisy_rgb, write_zoo
from train_tools.config import TrainConfig
from train_tools.data import buckets, prepare_folder
from train_tools.data.caption_text import compose_caption
from train_tools.data.demo_dataset import DEMO_CONCEPT, make_demo_dataset
from train_tools.data.items import DatasetItem, auto_repeats, image_to_tensor, load_items, open_prepared, tag_frequency
from train_tools.data.layout import MANIFEST_NAME
from train_tools.data.prepare_folder import prepare_dataset
from train_tools.data.prepare_options import PrepareOptions
from train_tools.data.reports import PrepareReport, Refusal
from train_tools.data.sampler import BucketBatchSampler
from train_tools.data.shapes_checker import judge
from train_tools.data.uploads import add_originals
from train_tools.errors import UserError


def tree_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def close(a: tuple[int, ...], b: tuple[int, ...], tol: int = 8) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=False))


def by_source(items: list[DatasetItem]) -> dict[str, DatasetItem]:
    return {item.source: item for item in items}


def prepare(tmp_path: Path, options: PrepareOptions | None = None, **kwargs) -> PrepareReport:
    return prepare_dataset(tmp_path / "orig", tmp_path / "prep", options or PrepareOptions(), **kwargs)


@pytest.fixture(scope="module")
def zoo_run(tmp_path_factory):
    """The zoo prepared once with the default options (the slowest part, shared by several tests)."""
    root = tmp_path_factory.mktemp("zoo")
    expected = write_zoo(root / "orig")
    before = tree_hashes(root / "orig")
    report = prepare_dataset(root / "orig", root / "prep", PrepareOptions())
    return root, expected, before, report, load_items(root / "prep")


# ---------------------------------------------------------------------- formats, modes, bad files


def test_every_usable_zoo_picture_is_prepared_upright_in_its_bucket(zoo_run):
    root, expected, _before, report, items = zoo_run
    found = by_source(items)
    usable = {name: e for name, e in expected.items() if e.refused is None}
    assert set(found) == set(usable), report.summary()
    assert report.prepared == len(usable) and not report.duplicates
    options = PrepareOptions()
    for name, expect in usable.items():
        item = found[name]
        with Image.open(item.image) as im:
            assert im.format == "PNG" and im.mode == "RGB" and im.size == item.size, name
            picture = im.convert("RGB")
        assert item.source_size == expect.size, name
        assert item.size == buckets.choose_bucket(*expect.size, options), name
        w, h = item.size
        assert w % 64 == 0 and h % 64 == 0 and w <= expect.size[0] and h <= expect.size[1], name  # no upscale
        sw, sh = expect.size
        scale = max(w / sw, h / sh)
        assert sw * scale - w + sh * scale - h < 64, name  # aspect ratio kept to within one step
        if max(sw, sh) >= 1.3 * min(sw, sh):
            assert (w > h) == (sw > sh), name  # landscape stays landscape, portrait stays portrait
        r, g, b = picture.getpixel((w // 2, h // 2))
        if expect.centre is not None:
            assert close((r, g, b), expect.centre), (name, (r, g, b))
        if "grey" in name:
            assert r == g == b, name


def test_bad_files_are_refused_with_their_reason_and_nothing_else_stops(zoo_run):
    root, expected, _before, report, items = zoo_run
    reasons = {r.name: r.reason for r in report.refused}
    bad = {name: e.refused for name, e in expected.items() if e.refused}
    assert set(reasons) == set(bad)
    for name, word in bad.items():
        assert word in reasons[name], (name, reasons[name])
        assert str(Refusal(name, reasons[name])) == f"{name}: {reasons[name]}"
    assert "20000x20000" in reasons["bomb.png"]
    prepared_names = {p.name for p in (root / "prep").iterdir()}
    for name in bad:
        assert f"{Path(name).stem}.png" not in prepared_names


def test_originals_are_byte_for_byte_unchanged(zoo_run):
    root, _expected, before, _report, _items = zoo_run
    assert tree_hashes(root / "orig") == before


def test_exif_orientation_6_makes_a_portrait_with_the_left_edge_on_top(zoo_run):
    item = by_source(zoo_run[4])["rotated.jpg"]
    picture = open_prepared(item)
    w, h = picture.size
    assert h > w
    assert close(picture.getpixel((w // 2, 3)), GREEN)
    assert close(picture.getpixel((w // 2, h - 4)), ORANGE)


def test_transparency_is_flattened_onto_the_background_colour(tmp_path, zoo_run):
    items = by_source(zoo_run[4])
    for name in ("transparent.png", "palette_alpha.png"):  # their left halves were transparent
        picture = open_prepared(items[name])
        assert picture.getpixel((3, picture.height // 2)) == (255, 255, 255), name
    transparent = open_prepared(items["transparent.png"])
    assert close(transparent.getpixel((transparent.width - 4, 4)), GREEN)  # the opaque half is kept
    assert open_prepared(items["grey_alpha.png"]).getpixel((3, 3)) != (255, 255, 255)  # opaque grey stays
    # Another background colour works too.
    (tmp_path / "orig").mkdir()
    shutil.copy(zoo_run[0] / "orig" / "transparent.png", tmp_path / "orig" / "t.png")
    prepare(tmp_path, PrepareOptions(background_color="#ff0000"))
    (item,) = load_items(tmp_path / "prep")
    assert open_prepared(item).getpixel((3, 3)) == (255, 0, 0)


def test_sixteen_bit_grey_is_scaled_not_clipped_and_gif_uses_its_first_frame(zoo_run):
    items = by_source(zoo_run[4])
    grey = open_prepared(items["grey16.png"]).getpixel((10, 10))
    assert close(grey, (128, 128, 128), 2)  # Pillow's own conversion would give 255
    assert close(open_prepared(items["animated.gif"]).getpixel((10, 10)), ORANGE)


def test_unicode_file_name_is_prepared_and_keeps_its_caption(tmp_path):
    orig = tmp_path / "orig"
    orig.mkdir()
    name = "日本語の猫 🐱"
    noisy_rgb((128, 128)).save(orig / f"{name}.png")
    (orig / f"{name}.txt").write_text("猫, 🐱 emoji", encoding="utf-8")
    report = prepare(tmp_path)
    assert report.prepared == 1 and not report.refused
    (item,) = load_items(tmp_path / "prep")
    assert item.image.name == f"{name}.png" and item.caption == "猫, 🐱 emoji" and item.source == f"{name}.png"


def test_decompression_bomb_is_refused_from_its_header_and_the_global_limit_is_kept(tmp_path, monkeypatch):
    orig = tmp_path / "orig"
    orig.mkdir()
    (orig / "bomb.png").write_bytes(bomb_png())
    noisy_rgb((300, 300)).save(orig / "ok.png")
    decoded_sizes = []
    real_load = ImageFile.ImageFile.load

    def spy_load(self):
        decoded_sizes.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy_load)
    limit_before = Image.MAX_IMAGE_PIXELS
    report = prepare(tmp_path)
    assert limit_before == Image.MAX_IMAGE_PIXELS
    assert [r.name for r in report.refused] == ["bomb.png"] and "decompression bomb" in report.refused[0].reason
    assert (20000, 20000) not in decoded_sizes and (300, 300) in decoded_sizes
    # The limit is the option's: a lower one refuses the ordinary picture too.
    report = prepare(tmp_path, PrepareOptions(max_pixels=50_000))
    assert {r.name for r in report.refused} == {"bomb.png", "ok.png"}
    assert limit_before == Image.MAX_IMAGE_PIXELS


def test_exact_duplicates_are_reported_and_prepared_once(tmp_path):
    orig = tmp_path / "orig"
    orig.mkdir()
    picture = noisy_rgb((200, 160), seed=3)
    picture.save(orig / "a.png")
    shutil.copy(orig / "a.png", orig / "b_copy.png")  # same bytes
    picture.save(orig / "c_same_pixels.bmp")  # same pixels, another format
    noisy_rgb((200, 160), seed=4).save(orig / "d.png")
    report = prepare(tmp_path)
    assert sorted(report.duplicates) == [("b_copy.png", "a.png"), ("c_same_pixels.bmp", "a.png")]
    assert sorted(i.source for i in load_items(tmp_path / "prep")) == ["a.png", "d.png"]
    assert prepare(tmp_path).duplicates == report.duplicates  # still reported when nothing is redone


def test_one_failing_picture_does_not_stop_the_batch(tmp_path, monkeypatch):
    orig = tmp_path / "orig"
    orig.mkdir()
    for i in range(3):
        noisy_rgb((128, 128), seed=i).save(orig / f"p{i}.png")
    real = prepare_folder.fit_to_bucket
    calls = []

    def flaky(image, bucket):
        calls.append(bucket)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(image, bucket)

    monkeypatch.setattr(prepare_folder, "fit_to_bucket", flaky)
    progress = []
    report = prepare(tmp_path, progress=lambda done, total: progress.append((done, total)))
    assert report.prepared == 2 and [r.name for r in report.refused] == ["p1.png"]
    assert "boom" in report.refused[0].reason
    assert progress == [(1, 3), (2, 3), (3, 3)]


def test_same_stem_in_two_formats_gives_two_items(tmp_path):
    orig = tmp_path / "orig"
    orig.mkdir()
    noisy_rgb((128, 128), seed=1).save(orig / "a.png")
    noisy_rgb((128, 128), seed=2).save(orig / "a.jpg")
    (orig / "a.txt").write_text("shared caption")
    report = prepare(tmp_path)
    items = load_items(tmp_path / "prep")
    assert report.prepared == 2 and len({i.image for i in items}) == 2
    assert all(i.caption == "shared caption" for i in items)


# ---------------------------------------------------------------------- buckets


@pytest.mark.parametrize(
    "options",
    [
        PrepareOptions(),
        PrepareOptions(bucket_no_upscale=False),
        PrepareOptions(resolution=768, min_bucket_reso=256, max_bucket_reso=1024),
    ],
)
def test_buckets_keep_the_budget_the_step_and_the_aspect_ratio(options):
    rng = random.Random(0)
    budget = options.resolution**2
    for _ in range(400):
        w = rng.randint(64, 3000)
        h = max(64, min(3000, round(w * rng.uniform(1 / 2.3, 2.3))))
        bw, bh = buckets.choose_bucket(w, h, options)
        assert bw % 64 == 0 and bh % 64 == 0 and bw >= 64 and bh >= 64
        assert bw * bh <= budget, (w, h, bw, bh)
        scale = max(bw / w, bh / h)
        removed = (w * scale - bw) + (h * scale - bh)
        assert removed < 64 + 1e-6, (w, h, bw, bh)  # the crop takes off less than one step
        small = options.bucket_no_upscale and (w * h < budget or min(w, h) < options.min_bucket_reso)
        if options.bucket_no_upscale:
            assert bw <= w and bh <= h, (w, h, bw, bh)  # never enlarged
        if not small:
            assert options.min_bucket_reso <= min(bw, bh) and max(bw, bh) <= options.max_bucket_reso
            assert bw * bh >= 0.75 * budget, (w, h, bw, bh)  # the budget is used, not wasted


def test_upscaling_only_without_no_upscale_and_fixed_square_without_buckets(tmp_path):
    orig = tmp_path / "orig"
    orig.mkdir()
    noisy_rgb((300, 200)).save(orig / "small.png")
    noisy_rgb((1200, 800), seed=2).save(orig / "big.jpg", quality=90)
    prepare(tmp_path)
    sizes = {i.source: i.size for i in load_items(tmp_path / "prep")}
    assert sizes["small.png"][0] <= 300 and sizes["small.png"][1] <= 200
    assert sizes["big.jpg"] == (640, 384)  # a large JPEG (decoded at reduced scale) fills a full bucket
    prepare(tmp_path, PrepareOptions(bucket_no_upscale=False))
    sizes = {i.source: i.size for i in load_items(tmp_path / "prep")}
    assert sizes["small.png"] == (640, 384)
    prepare(tmp_path, PrepareOptions(enable_bucket=False, resolution=256))
    assert {i.size for i in load_items(tmp_path / "prep")} == {(256, 256)}


def test_fit_to_bucket_crops_the_centre_only(tmp_path):
    # Columns coloured by x: after fitting 300x200 into 256x192 (crop < one step), the middle stays the middle.
    arr = np.zeros((200, 300, 3), dtype=np.uint8)
    arr[:, :, 0] = np.linspace(0, 255, 300, dtype=np.uint8)[None, :]
    out = buckets.fit_to_bucket(Image.fromarray(arr), (256, 192))
    assert out.size == (256, 192)
    row = np.asarray(out)[96, :, 0].astype(int)
    assert abs(row[128] - 128) <= 4 and row[0] < 20 and row[-1] > 235


# ---------------------------------------------------------------------- captions


@pytest.fixture
def captioned(tmp_path):
    orig = tmp_path / "orig"
    orig.mkdir()
    noisy_rgb((128, 128), seed=1).save(orig / "a.png")
    noisy_rgb((128, 128), seed=2).save(orig / "b.png")
    noisy_rgb((128, 128), seed=3).save(orig / "c.png")
    (orig / "a.txt").write_text("\ufeffred ball,\nblue sky\n", encoding="utf-8")  # BOM, two lines
    (orig / "a.auto.txt").write_text("auto a", encoding="utf-8")
    (orig / "c.txt").write_text("tt, already first", encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize(
    "mode, a, b",
    [
        ("use", "red ball, blue sky", "machine b"),
        ("ignore", "auto a", "machine b"),
        ("prepend", "red ball, blue sky, auto a", "machine b"),
        ("append", "auto a, red ball, blue sky", "machine b"),
    ],
)
def test_uploaded_captions_reach_the_items_in_every_mode(captioned, mode, a, b):
    seen = []

    def machine(image: Image.Image) -> str:
        seen.append(image.size)
        return "machine " + ("b" if len(seen) == 1 else "c")

    prepare_dataset(captioned / "orig", captioned / "prep", PrepareOptions(caption_mode=mode), auto_caption=machine)
    caps = {i.source: i.caption for i in load_items(captioned / "prep")}
    assert caps["a.png"] == a and caps["b.png"] == b
    assert all(size == (128, 128) for size in seen)  # the captioner sees the prepared picture


def test_without_a_captioner_the_automatic_caption_is_empty(captioned):
    prepare_dataset(captioned / "orig", captioned / "prep", PrepareOptions(caption_mode="ignore"))
    caps = {i.source: i.caption for i in load_items(captioned / "prep")}
    assert caps == {"a.png": "auto a", "b.png": "", "c.png": ""}


def test_trigger_word_comes_first_once(captioned):
    options = PrepareOptions(trigger_word="tt")
    report = prepare_dataset(captioned / "orig", captioned / "prep", options)
    caps = {i.source: i.caption for i in load_items(captioned / "prep")}
    assert caps == {"a.png": "tt, red ball, blue sky", "b.png": "tt", "c.png": "tt, already first"}
    assert report.encoded == 3
    assert compose_caption("a, tt, b", "", "use", "tt") == "tt, a, b"
    assert compose_caption("tt dog on grass", "", "use", "tt") == "tt dog on grass"
    assert compose_caption("ttx dog", "", "use", "tt") == "tt, ttx dog"
    # A caption option change rewrites the captions only: no picture is encoded again.
    report = prepare_dataset(captioned / "orig", captioned / "prep", dataclasses.replace(options, trigger_word="zz"))
    assert report.encoded == 0 and report.captions_written == 3
    assert {i.caption for i in load_items(captioned / "prep")} >= {"zz, red ball, blue sky", "zz"}


def test_the_automatic_captioner_runs_once_per_picture(captioned):
    calls = []

    def machine(image: Image.Image) -> str:
        calls.append(1)
        return "m"

    for _ in range(2):
        prepare_dataset(
            captioned / "orig", captioned / "prep", PrepareOptions(caption_mode="append"), auto_caption=machine
        )
    assert len(calls) == 2  # b and c; a has an .auto.txt; the second call reuses the manifest


# ---------------------------------------------------------------------- incremental preparing


def test_prepare_again_redoes_only_what_changed(tmp_path):
    orig = tmp_path / "orig"
    orig.mkdir()
    for i in range(4):
        noisy_rgb((160 + 16 * i, 128), seed=i).save(orig / f"p{i}.png")
        (orig / f"p{i}.txt").write_text(f"caption {i}")
    first = prepare(tmp_path)
    assert first.encoded == 4 and first.prepared == 4
    prep = tmp_path / "prep"
    past = time.time() - 1000
    for p in prep.iterdir():
        os.utime(p, (past, past))
    mtimes = {p.name: p.stat().st_mtime for p in prep.iterdir() if not p.name.startswith(".")}

    second = prepare(tmp_path)
    assert second.encoded == 0 and second.captions_written == 0 and second.prepared == 4
    assert {p.name: p.stat().st_mtime for p in prep.iterdir() if not p.name.startswith(".")} == mtimes

    (orig / "p1.txt").write_text("new words")
    noisy_rgb((160, 128), seed=99).save(orig / "p2.png")
    (orig / "p3.png").unlink()
    third = prepare(tmp_path)
    assert third.encoded == 1 and third.removed == 1 and third.prepared == 3
    assert not (prep / "p3.png").exists() and not (prep / "p3.txt").exists()
    assert (prep / "p0.png").stat().st_mtime == mtimes["p0.png"]
    assert (prep / "p1.png").stat().st_mtime == mtimes["p1.png"]
    assert {i.source: i.caption for i in load_items(prep)}["p1.png"] == "new words"

    # An image option changes every picture.
    assert prepare(tmp_path, PrepareOptions(resolution=256)).encoded == 3
    # A prepared file deleted by hand comes back.
    (prep / "p0.png").unlink()
    assert prepare(tmp_path, PrepareOptions(resolution=256)).encoded == 1


def test_prepared_folder_has_no_leftovers_and_survives_a_damaged_manifest(tmp_path):
    orig = tmp_path / "orig"
    orig.mkdir()
    noisy_rgb((128, 128)).save(orig / "a.png")
    prep = tmp_path / "prep"
    prep.mkdir()
    (prep / "stale.png").write_bytes(b"old")
    (prep / ".a.png.123.tmp").write_bytes(b"half written")
    (prep / MANIFEST_NAME).write_text("{not json")
    report = prepare(tmp_path)
    assert report.prepared == 1
    assert sorted(p.name for p in prep.iterdir()) == sorted([MANIFEST_NAME, "a.png", "a.txt"])


def test_user_errors_for_bad_options(tmp_path):
    with pytest.raises(UserError, match="colour"):
        prepare(tmp_path, PrepareOptions(background_color="not a colour"))
    with pytest.raises(UserError, match="Caption mode"):
        prepare(tmp_path, PrepareOptions(caption_mode="sometimes"))


# ---------------------------------------------------------------------- loading, tensors, metadata


def test_load_items_flip_tensor_and_metadata(tmp_path):
    orig = tmp_path / "orig"
    orig.mkdir()
    arr = np.zeros((128, 192, 3), dtype=np.uint8)
    arr[:, :96] = (255, 0, 0)
    Image.fromarray(arr).save(orig / "half.png")
    noisy_rgb((128, 128), seed=5).save(orig / "sq.png")
    (orig / "half.txt").write_text("red, left")
    (orig / "sq.txt").write_text("red, noise")
    prepare(tmp_path)
    items = load_items(tmp_path / "prep")
    assert [i.name for i in items] == ["half", "sq"]
    flipped = load_items(tmp_path / "prep", flip=True)
    assert [(i.name, i.flipped) for i in flipped] == [("half", False), ("half", True), ("sq", False), ("sq", True)]
    normal, mirror = open_prepared(flipped[0]), open_prepared(flipped[1])
    assert normal.getpixel((2, 2)) == (255, 0, 0) and mirror.getpixel((mirror.width - 3, 2)) == (255, 0, 0)
    tensor = image_to_tensor(normal)
    assert tensor.shape == (3, normal.height, normal.width) and tensor.dtype == torch.float32
    assert tensor.min() == -1.0 and tensor.max() == 1.0 and tensor[0, 0, 0] == 1.0 and tensor[1, 0, 0] == -1.0
    assert tag_frequency(flipped) == {"red": 2, "left": 1, "noise": 1}
    info = buckets.bucket_info(items)
    assert sorted((b["resolution"], b["count"]) for b in info["buckets"].values()) == [([128, 128], 1), ([192, 128], 1)]
    assert set(info["buckets"]) == {"0", "1"} and info["mean_img_ar_error"] == pytest.approx(0.0)


def test_load_items_of_an_empty_or_missing_folder(tmp_path):
    assert load_items(tmp_path / "nothing") == []
    (tmp_path / "reg").mkdir()
    assert load_items(tmp_path / "reg") == []


def test_auto_repeats():
    assert auto_repeats(1) == 512 and auto_repeats(10) == 51 and auto_repeats(128) == 4
    assert auto_repeats(1000) == 4 and auto_repeats(0) == 4


def test_options_from_config_follow_every_shared_field():
    assert dataclasses.asdict(PrepareOptions.from_config(TrainConfig())) == dataclasses.asdict(PrepareOptions())
    config = TrainConfig(
        resolution=768,
        enable_bucket=False,
        min_bucket_reso=256,
        max_bucket_reso=1024,
        flip_aug=True,
        caption_mode="append",
        trigger_word="",
        background_color="#000000",
        min_image_size=32,
        bucket_no_upscale=False,
    )
    options = PrepareOptions.from_config(config, trigger_word_default="project")
    shared = {f.name for f in dataclasses.fields(TrainConfig)} & {f.name for f in dataclasses.fields(options)}
    assert len(shared) >= 10
    for name in shared - {"trigger_word"}:
        assert getattr(options, name) == getattr(config, name), name
    assert options.trigger_word == "project"
    assert PrepareOptions.from_config(TrainConfig(trigger_word="mine"), "project").trigger_word == "mine"


# ---------------------------------------------------------------------- sampler


def sizes_items(sizes: list[tuple[int, int]]) -> list[DatasetItem]:
    return [DatasetItem(image=Path(f"{i}.png"), caption="", size=s) for i, s in enumerate(sizes)]


def test_sampler_batches_one_bucket_and_each_item_repeats_times():
    items = sizes_items([(512, 512)] * 5 + [(640, 384)] * 3 + [(384, 640)])
    sampler = BucketBatchSampler(items, 2, seed=7, repeats=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 8 + 5 + 2
    for batch in batches:
        assert 1 <= len(batch) <= 2 and len({items[i].size for i in batch}) == 1
    counts = np.bincount([i for b in batches for i in b], minlength=len(items))
    assert counts.tolist() == [3] * len(items)


def test_sampler_is_deterministic_per_seed_and_epoch():
    items = sizes_items([(512, 512)] * 12 + [(576, 448)] * 6)

    def run(seed: int, epoch: int) -> list[list[int]]:
        sampler = BucketBatchSampler(items, 3, seed=seed, repeats=2)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert run(1, 0) == run(1, 0) and run(1, 4) == run(1, 4)
    assert run(1, 0) != run(1, 1) and run(1, 0) != run(2, 0)
    ordered = list(BucketBatchSampler(items, 4, seed=0, repeats=1, shuffle=False))
    assert ordered[0] == [0, 1, 2, 3]
    with pytest.raises(UserError):
        BucketBatchSampler(items, 0, seed=0, repeats=1)


# ---------------------------------------------------------------------- adding originals, demo pictures


def test_add_originals_copies_renames_skips_and_refuses(tmp_path):
    src = tmp_path / "src"
    (src / "folder" / "sub").mkdir(parents=True)
    noisy_rgb((96, 96), seed=1).save(src / "a.png")
    (src / "a.txt").write_text("caption a")
    noisy_rgb((96, 96), seed=2).save(src / "folder" / "b.jpg")
    noisy_rgb((96, 96), seed=3).save(src / "folder" / "sub" / "c.webp")
    (src / "folder" / ".DS_Store").write_bytes(b"junk")
    (src / "notes.pdf").write_bytes(b"%PDF")
    originals = tmp_path / "orig"
    report = add_originals(
        [src / "a.png", src / "a.txt", src / "folder", src / "notes.pdf", src / "missing.png"], originals
    )
    assert sorted(p.name for p in report.added) == ["a.png", "a.txt", "b.jpg", "c.webp"]
    assert sorted(r.name for r in report.refused) == ["missing.png", "notes.pdf"]
    assert (originals / "a.png").read_bytes() == (src / "a.png").read_bytes()
    assert "Added 3 pictures and 1 captions" in report.summary() and "2 refused" in report.summary()

    # A different picture with a taken name is renamed and its caption follows; exact copies are skipped.
    other = tmp_path / "other"
    other.mkdir()
    noisy_rgb((96, 96), seed=9).save(other / "a.png")
    (other / "a.txt").write_text("caption of the other a")
    shutil.copy(src / "folder" / "b.jpg", other / "b_again.jpg")
    report = add_originals([other], originals)
    assert sorted(p.name for p in report.added) == ["a-1.png", "a-1.txt"]
    assert report.skipped == ["b_again.jpg"] and report.renamed == [("a.png", "a-1.png")]
    assert (originals / "a.txt").read_text() == "caption a"
    assert (originals / "a-1.txt").read_text() == "caption of the other a"

    # A lone caption never replaces a different one.
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "a.txt").write_text("changed")
    (lone / "b.txt").write_text("caption b")
    report = add_originals([lone / "a.txt", lone / "b.txt"], originals)
    assert [p.name for p in report.added] == ["b.txt"] and report.refused[0].name == "a.txt"
    assert (originals / "a.txt").read_text() == "caption a"


def test_demo_dataset_prepares_without_refusals(tmp_path):
    originals = tmp_path / "orig"
    pictures = make_demo_dataset(originals, n=12, seed=0)
    assert len(pictures) == 12 and all(p.with_suffix(".txt").is_file() for p in pictures)
    shapes = []
    for p in pictures:
        with Image.open(p) as im:
            assert min(im.size) >= 256 and max(im.size) <= 640
            shapes.append("wide" if im.width > im.height else "tall" if im.height > im.width else "square")
            # Each shows what its caption says: the demo's new shape, in the shapes world's colours.
            verdict = judge(im.convert("RGB").resize((64 * im.width // min(im.size), 64 * im.height // min(im.size))))
        caption = p.with_suffix(".txt").read_text(encoding="utf-8").strip()
        assert caption == f"a {verdict.colour} {DEMO_CONCEPT} on a {verdict.background} background"
        assert verdict.shape == DEMO_CONCEPT
    assert shapes.count("wide") == 3 and shapes.count("tall") == 3 and shapes.count("square") == 6
    report = prepare(tmp_path)
    assert report.prepared == 12 and not report.refused and not report.duplicates
    assert all(item.caption for item in load_items(tmp_path / "prep"))
    assert make_demo_dataset(originals, n=12, seed=0) == []  # the same pictures are not added twice
