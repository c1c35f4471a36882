"""Preview grids (epochs x LoRA weights) and installing a LoRA into a Lora folder, on the tiny demo model.

The standalone previewer runs the real diffusers pipeline on the demo checkpoint with a LoRA trained here; the
WebUI previewer runs against tests/fake_webui's stand-in for ``modules.processing``.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from tests.fixtures_training import StopsAtStep
from tests.stand_ins import FAKE_WEBUI, purge_fake_webui
from tests.webui_formula import apply_kohya_lora
from train_tools.cli import main
from train_tools.config import TrainConfig
from train_tools.errors import UserError
from train_tools.networks.install import USER_METADATA_KEYS, install_lora
from train_tools.networks.lora_format import file_tensor_hashes, read_lora
from train_tools.previews.diffusers_previewer import DiffusersPreviewer
from train_tools.previews.grid import BASE_LABEL, generate_grid
from train_tools.previews.grid_info import GridInfo, grid_info_for, install_cell, latest_grid
from train_tools.previews.previewer import Previewer, make_previewer
from train_tools.previews.samples import previews_at_end, sample_epoch, should_sample
from train_tools.previews.settings import PreviewSettings, default_settings, parse_weights
from train_tools.progress import RecordingReporter, StopFlag
from train_tools.store import Store
from train_tools.training.trainer import Trainer

SETTINGS = PreviewSettings(
    prompt="p, a red circle",
    negative_prompt="blurry",
    seed=7,
    steps=2,
    cfg_scale=5.0,
    sampler="Euler a",
    width=64,
    height=64,
    weights=(0.5, 1.0),
)


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> types.SimpleNamespace:
    """A version 'p'/'v1' with one tiny run of two epochs (one LoRA file each), and the demo checkpoint."""
    from train_tools.data.demo_dataset import make_demo_dataset
    from train_tools.models.demo_model import build_demo_checkpoint

    root = tmp_path_factory.mktemp("previews")
    ckpt = build_demo_checkpoint(root / "models" / "demo.safetensors")
    store = Store(root / "data")
    store.create_project("p")
    version = store.create_version("p", "v1")
    make_demo_dataset(version.originals_dir, n=6)
    # 64 px (the smallest buckets) keeps training fast; a high learning rate so two epochs move the pictures
    # visibly; alpha != dim so the formula check sees the alpha / rank scale; fp32 files to compare like with like.
    config = TrainConfig(
        resolution=64,
        min_bucket_reso=64,
        max_bucket_reso=128,
        network_dim=4,
        network_alpha=2.0,
        repeats=1,
        batch_size=2,
        epochs=2,
        save_every_n_epochs=1,
        optimizer="AdamW",
        learning_rate=2e-2,
        save_precision="fp32",
        base_model=str(ckpt),
    )
    version.save_settings(config)
    result = Trainer(version, config, ckpt, device="cpu").run()
    assert len(result.files) == 2
    return types.SimpleNamespace(
        root=root, store=store, version=version, ckpt=ckpt, run_dir=result.run_dir, files=result.files, config=config
    )


@pytest.fixture(scope="module")
def previewer(trained: types.SimpleNamespace) -> Iterator[DiffusersPreviewer]:
    p = DiffusersPreviewer.from_checkpoint(trained.ckpt, clip_skip=trained.config.clip_skip, device="cpu")
    yield p
    p.close()


@pytest.fixture(scope="module")
def base_picture(trained: types.SimpleNamespace) -> np.ndarray:
    """The base model's picture for SETTINGS, from a previewer that never saw a LoRA."""
    with DiffusersPreviewer.from_checkpoint(trained.ckpt, clip_skip=trained.config.clip_skip, device="cpu") as p:
        return pixels(p.generate(SETTINGS, None, 0.0))


@pytest.fixture(scope="module")
def grid(trained: types.SimpleNamespace, previewer: DiffusersPreviewer) -> types.SimpleNamespace:
    reporter = RecordingReporter()
    path = generate_grid(trained.run_dir, previewer, SETTINGS, reporter=reporter)
    return types.SimpleNamespace(path=path, info=grid_info_for(path), reporter=reporter)


def pixels(image: Image.Image | Path) -> np.ndarray:
    if isinstance(image, Path):
        with Image.open(image) as img:
            return np.asarray(img.convert("RGB")).copy()
    return np.asarray(image.convert("RGB")).copy()


# ---------------------------------------------------------------------------------------------- settings
def test_settings_are_checked_with_sentences():
    assert parse_weights("0.2, 0.4,0.4 ,1") == (0.2, 0.4, 1.0)
    with pytest.raises(UserError, match="'heavy' is not a number"):
        parse_weights("0.5, heavy")
    with pytest.raises(UserError, match="at least one"):
        parse_weights(" , ")
    with pytest.raises(UserError, match="multiple of 8"):
        dataclasses.replace(SETTINGS, width=100).validated()
    with pytest.raises(UserError, match="steps"):
        dataclasses.replace(SETTINGS, steps=0).validated()
    assert PreviewSettings().weights == (0.2, 0.4, 0.6, 0.8, 1.0, 1.2)
    seeded = dataclasses.replace(SETTINGS, seed=-1).with_fixed_seed()
    assert seeded.seed >= 0


def test_defaults_come_from_the_version_settings():
    config = TrainConfig(resolution=768, trigger_word="")
    assert not config.preview_at_end and config.sample_every_n_epochs == 0 and config.preview_prompt == ""
    settings = default_settings(config, "猫")
    assert settings.prompt == "猫" and (settings.width, settings.height) == (768, 768)
    config = TrainConfig(trigger_word="sks", preview_prompt="sks, smiling", sample_every_n_epochs=2)
    assert default_settings(config, "猫").prompt == "sks, smiling"
    assert [should_sample(config, e) for e in (1, 2, 3, 4)] == [False, True, False, True]
    assert not should_sample(TrainConfig(), 2)


def test_unknown_sampler_is_a_user_error(previewer: DiffusersPreviewer):
    with pytest.raises(UserError, match="Euler a"):
        previewer.generate(dataclasses.replace(SETTINGS, sampler="Restart"), None, 0.0)


# ---------------------------------------------------------------------------------------------- the grid
def test_grid_has_a_labelled_cell_per_epoch_and_weight(trained, grid):
    info: GridInfo = grid.info
    assert grid.path.parent == trained.run_dir / "previews" and grid.path.name.startswith("grid-")
    assert info.columns == [BASE_LABEL, "0.5", "1"]
    assert info.rows == ["epoch 1", "epoch 2"]
    assert len(info.cells) == 2 * 3 and not info.interrupted
    assert [(c.epoch, c.weight) for c in info.cells] == [(1, None), (1, 0.5), (1, 1.0), (2, None), (2, 0.5), (2, 1.0)]
    assert [c.file for c in info.cells if c.file] == [trained.files[0]] * 2 + [trained.files[1]] * 2
    # 2 rows x 2 weights + the base picture, made once for both rows.
    assert len(grid.reporter.steps) == 5 and grid.reporter.steps[-1].total_steps == 5
    assert any("Preview 5/5" in m for m in grid.reporter.messages)

    with Image.open(grid.path) as img:
        picture = np.asarray(img.convert("RGB"))
    assert picture.shape == (info.top + 2 * 64, info.left + 3 * 64, 3)
    for cell in info.cells:
        x, y = info.left + cell.col * 64, info.top + cell.row * 64
        assert np.array_equal(picture[y : y + 64, x : x + 64], pixels(cell.image)), (cell.row, cell.col)
    # Every label is drawn: dark pixels in the header above each column and left of each row.
    for c in range(3):
        header = picture[: info.top, info.left + c * 64 : info.left + (c + 1) * 64]
        assert (header < 128).any(), info.columns[c]
    for r in range(2):
        label = picture[info.top + r * 64 : info.top + (r + 1) * 64, : info.left]
        assert (label < 128).any(), info.rows[r]

    # grid.json as written, and clicks mapped to cells.
    data = json.loads((grid.path.with_suffix("") / "grid.json").read_text(encoding="utf-8"))
    assert {"epoch", "file", "weight", "path"} <= set(data["cells"][1])
    clicked = info.cell_at(info.left + 64 + 10, info.top + 64 + 10)
    assert clicked is not None and (clicked.epoch, clicked.weight) == (2, 0.5)
    assert info.cell_at(2, 2) is None and info.cell_at(info.left + 3 * 64 + 1, info.top + 1) is None
    assert latest_grid(trained.run_dir).json_path == info.json_path


def test_no_lora_and_weight_zero_are_the_base_model(trained, previewer, grid, base_picture):
    for cell in grid.info.cells:
        if cell.weight is None:
            assert np.array_equal(pixels(cell.image), base_picture)
    # After LoRAs were merged and removed again, the weights are back bit for bit.
    assert np.array_equal(pixels(previewer.generate(SETTINGS, trained.files[1], 0.0)), base_picture)
    assert np.array_equal(pixels(previewer.generate(SETTINGS, None, 1.0)), base_picture)


def test_weights_change_the_picture_and_a_seed_repeats_it(trained, previewer, base_picture):
    final = trained.files[-1]
    half = pixels(previewer.generate(SETTINGS, final, 0.5))
    full = pixels(previewer.generate(SETTINGS, final, 1.0))
    assert not np.array_equal(half, full)
    assert not np.array_equal(full, base_picture)
    assert np.array_equal(pixels(previewer.generate(SETTINGS, final, 0.5)), half)
    other_seed = pixels(previewer.generate(dataclasses.replace(SETTINGS, seed=8), final, 0.5))
    assert not np.array_equal(other_seed, half)


def test_merged_weights_follow_the_webui_formula(trained, previewer):
    from train_tools.models.loader import load_model

    weight = 0.7
    previewer.apply_lora(trained.files[0], weight)
    reference = load_model(trained.ckpt)
    tensors, _ = read_lora(trained.files[0])
    used = apply_kohya_lora(reference.unet, tensors, "lora_unet", weight)
    used |= apply_kohya_lora(reference.text_encoders[0], tensors, "lora_te", weight)
    assert used == set(tensors)
    for ours, theirs in (
        (previewer.model.unet, reference.unet),
        (previewer.model.text_encoders[0], reference.text_encoders[0]),
    ):
        theirs_sd = theirs.state_dict()
        changed = 0
        for key, value in ours.state_dict().items():
            torch.testing.assert_close(value, theirs_sd[key], msg=key)
            changed += int(key.endswith("weight"))
        assert changed
    # Removing the LoRA restores the file's weights exactly.
    previewer.apply_lora(None, 0.0)
    base = load_model(trained.ckpt)
    for key, value in previewer.model.unet.state_dict().items():
        assert torch.equal(value, base.unet.state_dict()[key]), key


def test_a_lora_of_another_model_is_refused(trained, previewer, tmp_path):
    wrong = tmp_path / "wrong.safetensors"
    from safetensors.torch import save_file

    save_file(
        {
            "lora_te1_text_model_x.lora_down.weight": torch.zeros(4, 8),
            "lora_te1_text_model_x.lora_up.weight": torch.zeros(8, 4),
        },
        str(wrong),
    )
    with pytest.raises(UserError, match="trained for another kind"):
        previewer.generate(SETTINGS, wrong, 1.0)


def test_stop_keeps_the_pictures_made(trained, previewer):
    stop = StopFlag()

    path = generate_grid(trained.run_dir, previewer, SETTINGS, reporter=StopsAtStep(stop, 2), stop=stop)
    info = grid_info_for(path)
    assert info.interrupted and len(info.cells) == 2
    assert path.is_file() and all(c.image.is_file() for c in info.cells)


def test_training_time_hooks(trained, tmp_path):
    calls = []

    class Stub:
        def generate(self, settings, lora, weight):  # type: ignore[no-untyped-def]
            calls.append((settings.seed, lora, weight))
            return Image.new("RGB", (settings.width, settings.height), (len(calls) * 20, 0, 0))

        def close(self) -> None:
            pass

    stub = Stub()
    assert isinstance(stub, Previewer)
    paths = sample_epoch(tmp_path, trained.files[0], 2, stub, SETTINGS)
    assert [p.name for p in paths] == ["epoch-000002-1.png", "epoch-000002-2.png"]
    assert [c[0] for c in calls] == [7, 8] and all(c[2] == 1.0 for c in calls)
    off = dataclasses.replace(trained.config, preview_at_end=False)
    assert previews_at_end(trained.run_dir, off, "p", stub) is None
    on = dataclasses.replace(trained.config, preview_at_end=True, preview_prompt="sks")
    calls.clear()
    grid_path = previews_at_end(trained.run_dir, on, "p", stub)
    assert grid_path is not None and len(calls) == 2 * 6 + 1
    assert {c[0] for c in calls} == {42}


# ---------------------------------------------------------------------------------------------- install
def _cover(meta: dict[str, str]) -> tuple[bytes, bytes]:
    thumbnail = meta["modelspec.thumbnail"]
    assert thumbnail.startswith("data:image/png;base64,")
    covers = json.loads(meta["ssmd_cover_images"])
    assert isinstance(covers, list) and len(covers) == 1
    return base64.b64decode(thumbnail.split(",", 1)[1]), base64.b64decode(covers[0])


def test_install_writes_the_three_files_as_the_webui_reads_them(trained, grid, tmp_path):
    cell = grid.info.cell(1, 2)  # epoch 2, weight 1.0
    lora_dir = tmp_path / "Lora"
    target = install_cell(cell, lora_dir, activation_text="p, red circle")
    assert target == lora_dir / f"{trained.files[1].stem}.safetensors"
    assert sorted(p.name for p in lora_dir.iterdir()) == sorted(
        [target.name, f"{target.stem}.preview.png", f"{target.stem}.json"]
    )

    user = json.loads((lora_dir / f"{target.stem}.json").read_text(encoding="utf-8"))
    assert set(user) == set(USER_METADATA_KEYS)
    assert user["activation text"] == "p, red circle"
    assert user["preferred weight"] == 1.0 and user["sd version"] == "SD1"
    assert np.array_equal(pixels(lora_dir / f"{target.stem}.preview.png"), pixels(cell.image))

    src_tensors, src_meta = read_lora(trained.files[1])
    tensors, meta = read_lora(target)
    assert tensors.keys() == src_tensors.keys()
    assert all(torch.equal(tensors[k], src_tensors[k]) for k in tensors)
    for png in _cover(meta):
        assert np.array_equal(pixels(Image.open(io.BytesIO(png))), pixels(cell.image))
    assert meta["ss_output_name"] == target.stem  # the alias the card inserts is the installed name
    for key in ("ss_epoch", "ss_network_dim", "ss_base_model_version", "ss_tag_frequency"):
        assert meta[key] == src_meta[key]
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == file_tensor_hashes(target)
    assert not [p for p in lora_dir.iterdir() if p.name.startswith(".")]


def test_second_install_keeps_both_unless_overwrite(trained, tmp_path):
    lora_dir = tmp_path / "Lora"
    picture = tmp_path / "pic.png"
    Image.new("RGB", (700, 500), (10, 200, 30)).save(picture)
    first = install_lora(trained.files[0], lora_dir, weight=0.6, activation_text="p", preview=picture, name="cat")
    first_bytes = first.read_bytes()
    second = install_lora(trained.files[1], lora_dir, weight=0.8, activation_text="p", preview=None, name="cat")
    assert (first.name, second.name) == ("cat.safetensors", "cat-2.safetensors")
    assert first.read_bytes() == first_bytes
    assert json.loads((lora_dir / "cat.json").read_text())["preferred weight"] == 0.6
    assert json.loads((lora_dir / "cat-2.json").read_text())["preferred weight"] == 0.8
    assert not (lora_dir / "cat-2.preview.png").exists()
    # The embedded cover is a thumbnail of a big picture; the picture beside the file is whole.
    with safe_open(str(first), "pt") as fh:
        cover, _ = _cover(fh.metadata())
    assert max(Image.open(io.BytesIO(cover)).size) == 512
    assert Image.open(lora_dir / "cat.preview.png").size == (700, 500)

    again = install_lora(
        trained.files[1], lora_dir, weight=1.1, activation_text="q", preview=None, name="cat", overwrite=True
    )
    assert again == first
    assert json.loads((lora_dir / "cat.json").read_text())["preferred weight"] == 1.1
    assert not (lora_dir / "cat.preview.png").exists()  # no stale picture of the replaced file
    assert not (lora_dir / "cat-3.safetensors").exists()
    with safe_open(str(again), "pt") as fh:
        assert fh.metadata()["ss_epoch"] == "2"


def test_install_refuses_what_it_cannot_do(trained, grid, tmp_path):
    base_cell = grid.info.cell(0, 0)
    with pytest.raises(UserError, match="without a LoRA"):
        install_cell(base_cell, tmp_path / "Lora", activation_text="p")
    with pytest.raises(UserError, match="does not exist"):
        install_lora(tmp_path / "missing.safetensors", tmp_path / "Lora", weight=1, activation_text="", preview=None)
    with pytest.raises(UserError, match=":"):
        install_lora(trained.files[0], tmp_path / "Lora", weight=1, activation_text="", preview=None, name="a:b")


# ---------------------------------------------------------------------------------------------- command line
def test_cli_preview_then_install(trained, tmp_path, capsys: pytest.CaptureFixture):
    data = str(trained.root / "data")
    capsys.readouterr()
    rc = main(
        [
            "--data-dir",
            data,
            "preview",
            "p",
            "v1",
            "--weights",
            "0.5",
            "--steps",
            "2",
            "--width",
            "64",
            "--height",
            "64",
            "--seed",
            "7",
            "--prompt",
            "p, a red circle",
            "--negative",
            "blurry",
            "--no-base",
        ]
    )
    assert rc == 0
    grid_path = Path(capsys.readouterr().out.strip().splitlines()[-1])
    info = grid_info_for(grid_path)
    assert info.columns == ["0.5"] and len(info.cells) == 2
    assert info.settings.prompt == "p, a red circle"

    lora_dir = tmp_path / "Lora"
    rc = main(["--data-dir", data, "install", "p", "v1", trained.files[1].name, "--lora-dir", str(lora_dir)])
    assert rc == 0
    installed = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert installed == lora_dir / trained.files[1].name
    user = json.loads(installed.with_suffix(".json").read_text(encoding="utf-8"))
    # No --weight: the picture of the newest grid's closest cell, and that cell's weight.
    assert user["preferred weight"] == 0.5 and user["activation text"] == "p"
    assert np.array_equal(pixels(installed.with_name(f"{installed.stem}.preview.png")), pixels(info.cell(1, 0).image))

    rc = main(["--data-dir", data, "install", "p", "v1", "nope.safetensors", "--lora-dir", str(lora_dir)])
    assert rc == 2


# ---------------------------------------------------------------------------------------------- WebUI


@pytest.fixture()
def webui(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[types.SimpleNamespace]:
    purge_fake_webui()
    monkeypatch.syspath_prepend(str(FAKE_WEBUI))
    from modules import paths_internal, processing, sd_models, shared

    data = tmp_path / "webui"
    monkeypatch.setattr(paths_internal, "data_path", str(data))
    monkeypatch.setattr(paths_internal, "models_path", str(data / "models"))
    sd_dir = data / "models" / "Stable-diffusion"
    sd_dir.mkdir(parents=True)
    (sd_dir / "base.safetensors").write_bytes(b"x")
    sd_models.list_models()
    shared.opts.CLIP_stop_at_last_layers = 1
    yield types.SimpleNamespace(data=data, sd_dir=sd_dir, processing=processing, shared=shared, sd_models=sd_models)
    purge_fake_webui()


def test_webui_previews_use_its_txt2img_with_the_lora_in_its_folder(trained, webui):
    from train_tools.hosts.webui import PREVIEW_SUBDIR, WebuiHost

    host = WebuiHost()
    checkpoint = webui.sd_dir / "base.safetensors"
    previewer = make_previewer(host, checkpoint, clip_skip=2)
    settings = dataclasses.replace(SETTINGS, weights=(0.5, 1.0))
    try:
        path = generate_grid(trained.run_dir, previewer, settings)
        calls = list(webui.processing.calls)
        folder = host.lora_dir / PREVIEW_SUBDIR
        copies = sorted(folder.glob("*.safetensors"))
        assert len(copies) == 2  # one per run file, where the WebUI looks
    finally:
        previewer.close()
    assert not folder.exists()  # the copies are gone afterwards

    assert len(calls) == 5
    title = next(iter(webui.sd_models.checkpoints_list))
    assert all(c["checkpoint"] == title and c["clip_skip"] == 2 for c in calls)
    assert all(c["size"] == (64, 64) and c["seed"] == 7 and c["sampler_name"] == "Euler a" for c in calls)
    assert all(c["negative_prompt"] == "blurry" and not c["saves"] for c in calls)
    assert calls[0]["networks"] == [] and "<lora:" not in calls[0]["prompt"]
    by_file = {}
    for call, (epoch_file, weight) in zip(calls[1:], [(f, w) for f in trained.files for w in (0.5, 1.0)], strict=True):
        (net,) = call["networks"]
        assert f"<lora:{net['name']}:{weight:g}>" in call["prompt"] and call["prompt"].startswith(SETTINGS.prompt)
        assert net["weight"] == weight
        assert net["path"] is not None and net["path"].parent == folder  # found where the host looks
        assert net["sha256"] == hashlib.sha256(epoch_file.read_bytes()).hexdigest()
        by_file.setdefault(epoch_file, set()).add(net["name"])
    assert all(len(names) == 1 for names in by_file.values()) and len(by_file) == 2
    assert webui.shared.opts.CLIP_stop_at_last_layers == 1  # the override was for the previews only

    info = grid_info_for(path)
    assert len(info.cells) == 6
    images = {(c.row, c.col): pixels(c.image) for c in info.cells}
    assert not np.array_equal(images[(0, 1)], images[(0, 2)])  # weights differ
    assert not np.array_equal(images[(0, 1)], images[(1, 1)])  # epochs differ
    assert np.array_equal(images[(0, 0)], images[(1, 0)])  # one base picture


def test_webui_previewer_says_when_the_webui_made_nothing(trained, webui):
    from train_tools.hosts.webui import WebuiHost

    previewer = WebuiHost().make_previewer(None)
    webui.shared.state.interrupted = True
    try:
        with pytest.raises(UserError, match="no preview picture"):
            previewer.generate(SETTINGS, trained.files[0], 1.0)
    finally:
        webui.shared.state.interrupted = False
        previewer.close()


@pytest.mark.parametrize("network_type", ("loha", "lokr", "dora"))
def test_the_previewer_merges_every_network_type_as_a1111_does(trained, previewer, tmp_path, network_type):
    """A LoHa, LoKr or DoRA file (with convolutions) on the previewer's model: every layer it names gets A1111's
    weight at the chosen LoRA weight, and no LoRA gives the base model back."""
    from tests.webui_formula import a1111_update, layer_names
    from train_tools.models.loader import load_model
    from train_tools.networks.lora_format import kohya_state_dict, save_lora
    from train_tools.networks.targets import text_encoder_target_modules, unet_target_modules
    from train_tools.networks.types import attach_network, network_parameters

    torch.manual_seed(0)
    net = load_model(trained.ckpt)
    attach_network(net.unet, unet_target_modules(net.unet, conv=True), network_type, 4, 2.0, (2, 1.0))
    attach_network(net.text_encoders[0], text_encoder_target_modules(net.text_encoders[0]), network_type, 4, 2.0)
    with torch.no_grad():
        for p in network_parameters(net.unet) + network_parameters(net.text_encoders[0]):
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path / f"{network_type}.safetensors"
    tensors = kohya_state_dict(unet=net.unet, text_encoders=[net.text_encoders[0]], family="sd1")
    save_lora(path, tensors, {"ss_base_model_version": "sd_v1"}, dtype=torch.float32)
    base = load_model(trained.ckpt)
    layers = {**layer_names(base.unet, "lora_unet"), **layer_names(base.text_encoders[0], "lora_te")}
    merged = {
        **layer_names(previewer.model.unet, "lora_unet"),
        **layer_names(previewer.model.text_encoders[0], "lora_te"),
    }
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in read_lora(path)[0].items():
        name, _, part = key.partition(".")
        groups.setdefault(name, {})[part] = tensor
    previewer.apply_lora(path, 0.6)
    try:
        for name, parts in groups.items():
            original = layers[name].weight.float()
            expected = original + a1111_update(parts, original, 0.6)
            torch.testing.assert_close(merged[name].weight.float(), expected, rtol=1e-5, atol=1e-6, msg=name)
    finally:
        previewer.apply_lora(None, 0.0)
    assert all(torch.equal(merged[n].weight, layers[n].weight) for n in groups)
