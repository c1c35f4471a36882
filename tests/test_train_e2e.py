"""End to end on the tiny demo checkpoint: the command line's whole flow, and the trainer's behaviour."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests import fixtures_training
from tests.fixtures_training import StopsAtStep
from train_tools.cli import main
from train_tools.config import TrainConfig
from train_tools.progress import RecordingReporter, StopFlag
from train_tools.store import Store
from train_tools.training.trainer import Trainer

TINY = [
    "--set",
    "resolution=128",
    "--set",
    "min_bucket_reso=64",
    "--set",
    "max_bucket_reso=256",
    "--set",
    "network_dim=4",
    "--set",
    "network_alpha=2",
    "--set",
    "repeats=1",
    "--set",
    "batch_size=2",
    # The demo model's quick-run settings freeze the text encoder and add LoCon; these runs train a plain LoRA
    # of both (the settings given with --set win).
    "--set",
    "network_type=lora",
    "--set",
    "conv_dim=0",
    "--set",
    "train_text_encoder=true",
]


demo_ckpt = fixtures_training.demo_ckpt  # the shared fixture, found by pytest under this name


@pytest.fixture(scope="module")
def demo_pictures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from train_tools.data.demo_dataset import make_demo_dataset

    folder = tmp_path_factory.mktemp("pictures")
    make_demo_dataset(folder, n=6)
    return folder


def tiny_config(**changes: object) -> TrainConfig:
    base = dict(
        resolution=128,
        min_bucket_reso=64,
        max_bucket_reso=256,
        network_dim=4,
        network_alpha=2.0,
        repeats=1,
        batch_size=2,
        epochs=2,
        save_every_n_epochs=1,
        optimizer="AdamW",
    )
    base.update(changes)
    return TrainConfig(**base)  # type: ignore[arg-type]


def make_version(data_dir: Path, pictures: Path, project: str = "p") -> Store:
    assert main(["--data-dir", str(data_dir), "project", "create", project]) == 0
    assert main(["--data-dir", str(data_dir), "version", "create", project, "v1"]) == 0
    assert main(["--data-dir", str(data_dir), "dataset", "add", project, "v1", str(pictures)]) == 0
    return Store(data_dir)


def test_cli_whole_flow(tmp_path: Path, demo_ckpt: Path, demo_pictures: Path, capsys: pytest.CaptureFixture):
    project = "猫のキャラ 🐱"
    store = make_version(tmp_path, demo_pictures, project)
    originals = {p.name: p.read_bytes() for p in store.version(project, "v1").originals_dir.iterdir()}
    rc = main(
        [
            "--data-dir",
            str(tmp_path),
            "train",
            project,
            "v1",
            "--ckpt",
            str(demo_ckpt),
            *TINY,
            "--set",
            "epochs=2",
            "--set",
            "save_every_n_epochs=1",
            "--set",
            "optimizer=AdamW",
        ]
    )
    assert rc == 0
    version = store.version(project, "v1")
    (run,) = version.runs()
    names = sorted(p.name for p in run.glob("*.safetensors"))
    assert names == [f"{project}-v1-000001.safetensors", f"{project}-v1.safetensors"]
    # No temporary files left, the run's own snapshot is there, the originals are untouched.
    assert not [p for p in run.iterdir() if p.name.startswith(".")]
    assert json.loads((run / "settings.json").read_text())["epochs"] == 2
    assert {p.name: p.read_bytes() for p in version.originals_dir.iterdir()} == originals
    # The settings given with --set are kept for the version.
    assert version.load_settings().network_dim == 4

    final = run / f"{project}-v1.safetensors"
    with safe_open(str(final), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["ss_output_name"] == f"{project}-v1"
    assert meta["ss_num_epochs"] == "2" and meta["ss_epoch"] == "2"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["ss_base_model_version"] == "sd_v1"
    tags = json.loads(meta["ss_tag_frequency"])
    (folder_tags,) = tags.values()
    assert folder_tags and all(t == t.lower() for t in folder_tags)
    assert any(k.startswith("lora_unet_") for k in keys) and any(k.startswith("lora_te_") for k in keys)

    capsys.readouterr()
    assert main(["--data-dir", str(tmp_path), "runs", project, "v1"]) == 0
    assert f"{project}-v1.safetensors" in capsys.readouterr().out


def test_loss_goes_down_on_a_fixed_batch(tmp_path: Path, demo_ckpt: Path, demo_pictures: Path):
    store = make_version(tmp_path, demo_pictures)
    version = store.version("p", "v1")
    config = tiny_config(
        epochs=12,
        learning_rate=2e-3,
        network_dim=8,
        network_alpha=8.0,
        train_text_encoder=False,
        save_every_n_epochs=100,
    )
    trainer = Trainer(version, config, demo_ckpt, device="cpu")
    trainer.prepare()
    before = trainer.fixed_batch_loss()
    result = trainer.run()
    after = trainer.fixed_batch_loss()
    # 6 images x 1 repeat in batches of 2 that never mix buckets: 3 landscape + 3 portrait = 4 batches.
    assert len(trainer.sampler) == 4
    assert result.steps == 12 * 4
    assert after < before * 0.95, (before, after)


def test_interrupt_saves_what_it_has(tmp_path: Path, demo_ckpt: Path, demo_pictures: Path):
    store = make_version(tmp_path, demo_pictures)
    stop = StopFlag()

    reporter = StopsAtStep(stop, 2)
    result = Trainer(
        store.version("p", "v1"), tiny_config(epochs=5), demo_ckpt, reporter=reporter, stop=stop, device="cpu"
    ).run()
    assert result.interrupted and result.steps == 2
    assert len(result.files) == 1 and result.files[0].exists()
    assert "interrupted" in result.files[0].name
    assert [s.step for s in reporter.steps] == [1, 2]
    assert reporter.total_steps == 5 * 4  # 4 batches per epoch, see above
    # The pictures were not prepared before: the trainer prepared them and said how far it was.
    n = len(list(store.version("p", "v1").prepared_dir.glob("*.png")))
    assert n and reporter.tasks == [("Preparing pictures", n, n, "")]


def test_interrupt_while_preparing_stops_before_anything_is_trained(
    tmp_path: Path, demo_ckpt: Path, demo_pictures: Path, caplog: pytest.LogCaptureFixture
):
    from train_tools.commands import _report_result

    version = make_version(tmp_path, demo_pictures).version("p", "v1")
    stop = StopFlag()

    class StopsAtTheFirstPicture(RecordingReporter):
        def task(self, what, done, total, unit=""):  # type: ignore[no-untyped-def]
            super().task(what, done, total, unit)
            stop.request()  # the Interrupt button, pressed while the pictures are being prepared

    reporter = StopsAtTheFirstPicture()
    result = Trainer(version, tiny_config(epochs=1), demo_ckpt, reporter=reporter, stop=stop, device="cpu").run()
    assert result.interrupted and result.run_dir is None and result.steps == 0 and result.files == []
    n = len([p for p in version.originals_dir.iterdir() if p.suffix == ".png"])
    assert n > 1 and reporter.tasks == [("Preparing pictures", 1, n, "")]  # it stopped at the first picture
    assert not reporter.steps and "nothing was trained" in reporter.messages[-1]
    assert not version.trains_dir.is_dir() or not any(version.trains_dir.iterdir())  # no run folder
    with caplog.at_level(logging.WARNING):
        assert _report_result(result, version) is True
    assert "Stopped before training began" in caplog.text
    # The next run prepares the rest and trains.
    again = Trainer(version, tiny_config(epochs=1), demo_ckpt, device="cpu").run()
    assert not again.interrupted and again.final_file is not None and again.final_file.is_file()
    assert len(list(version.prepared_dir.glob("*.png"))) == n


def test_same_seed_same_lora(tmp_path: Path, demo_ckpt: Path, demo_pictures: Path):
    store = make_version(tmp_path, demo_pictures)
    version = store.version("p", "v1")
    outs = []
    for _ in range(2):
        result = Trainer(version, tiny_config(epochs=1, save_precision="fp32"), demo_ckpt, device="cpu").run()
        with safe_open(str(result.final_file), "pt") as f:
            outs.append({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 - safe_open is not iterable
    assert outs[0].keys() == outs[1].keys()
    for k in outs[0]:
        torch.testing.assert_close(outs[0][k], outs[1][k])


def test_fp16_on_a_cpu_that_emulates_it_trains_in_what_it_computes_and_says_so(
    tmp_path: Path, demo_ckpt: Path, demo_pictures: Path, caplog: pytest.LogCaptureFixture
):
    """The tab's default, fp16, on a CPU without fp16 instructions (this one: an AMD EPYC with AVX512-BF16)
    trains in bf16 where the CPU has it, else fp32; the file says which, and which optimizer stepped."""
    from train_tools.training import precision

    if precision.cpu_has_fp16():
        pytest.skip("this CPU computes fp16 natively")
    used = "bf16" if precision.cpu_has_bf16() else "no"
    store = make_version(tmp_path, demo_pictures)
    with caplog.at_level(logging.WARNING):
        result = Trainer(
            store.version("p", "v1"), tiny_config(epochs=1, mixed_precision="fp16"), demo_ckpt, device="cpu"
        ).run()
    assert result.final_file is not None and result.final_file.exists()
    assert "fp16 on this CPU is emulated and slower than fp32" in caplog.text
    assert ("training in bf16" if used == "bf16" else "training in fp32") in caplog.text
    # The file says what the run trained in (kohya's "no" for fp32), not the fp16 that was asked for.
    from safetensors import safe_open

    with safe_open(str(result.final_file), "pt") as fh:
        metadata = fh.metadata()
    assert metadata["ss_mixed_precision"] == used
    assert metadata["ss_optimizer"] == "torch.optim.adamw.AdamW(weight_decay=0.01)"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "epoch=3"], "Did you mean 'epochs'"),
        (["--set", "optimizer=Adam"], "'optimizer'"),
        (["--ckpt", "no-such-model"], "was not found"),
    ],
)
def test_cli_user_errors_are_one_line(
    tmp_path: Path,
    demo_pictures: Path,
    demo_ckpt: Path,
    args: list[str],
    message: str,
    caplog: pytest.LogCaptureFixture,
):
    make_version(tmp_path, demo_pictures)
    if "--ckpt" not in args:
        args = [*args, "--ckpt", str(demo_ckpt)]
    with caplog.at_level(logging.ERROR):
        rc = main(["--data-dir", str(tmp_path), "train", "p", "v1", *args])
    assert rc == 2
    assert message in caplog.text
    assert "Traceback" not in caplog.text
    assert Store(tmp_path).version("p", "v1").runs() == []


def test_not_a_checkpoint_is_refused_and_nothing_is_lost(
    tmp_path: Path, demo_pictures: Path, caplog: pytest.LogCaptureFixture
):
    store = make_version(tmp_path, demo_pictures)
    fake = tmp_path / "model.safetensors"
    fake.write_text("this is not a model")
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "outputs").rglob("*"))
    with caplog.at_level(logging.ERROR):
        rc = main(["--data-dir", str(tmp_path), "train", "p", "v1", "--ckpt", str(fake), *TINY])
    assert rc == 2
    assert "Traceback" not in caplog.text and "model.safetensors" in caplog.text
    after = sorted(p.relative_to(tmp_path) for p in (tmp_path / "outputs").rglob("*"))
    # Only the prepared copies may have been added; nothing the user had is gone.
    assert set(before) <= set(after)
    assert store.version("p", "v1").runs() == []


def test_samples_during_and_preview_grid_after_training(
    tmp_path: Path, demo_ckpt: Path, demo_pictures: Path, monkeypatch: pytest.MonkeyPatch
):
    """sample_every_n_epochs and preview_at_end: pictures of the saved files, made by the run itself."""
    import dataclasses

    from PIL import Image

    from train_tools.previews import samples, settings
    from train_tools.previews.grid_info import latest_grid

    defaults = settings.default_settings
    # Fewer sampling steps and weights than a user's defaults: the same code, a tenth of the CPU time.
    monkeypatch.setattr(
        settings,
        "default_settings",
        lambda *a, **k: dataclasses.replace(defaults(*a, **k), steps=2, weights=(0.5, 1.0)),
    )
    monkeypatch.setattr(samples, "default_settings", settings.default_settings)  # the grid at the end's name
    store = make_version(tmp_path, demo_pictures)
    config = tiny_config(
        epochs=2,
        save_every_n_epochs=1,
        sample_every_n_epochs=2,
        preview_at_end=True,
        resolution=64,
        min_bucket_reso=64,
        max_bucket_reso=128,
    )
    result = Trainer(store.version("p", "v1"), config, demo_ckpt, device="cpu").run()
    samples = sorted(p.name for p in (result.run_dir / "samples").glob("*.png"))
    assert samples == ["epoch-000002-1.png", "epoch-000002-2.png"]  # epoch 2 only, two seeds
    info = latest_grid(result.run_dir)
    assert info is not None and Image.open(info.image).size[0] > 0
    # One row per saved file, the "no LoRA" column plus one per weight.
    assert len(info.rows) == 2 and len(info.columns) == 1 + 2


def test_gradient_checkpointing_learns_the_same_lora(tmp_path: Path, demo_ckpt: Path, demo_pictures: Path):
    """Checkpointing trades memory for recomputation only: with the text encoder trained too, the LoRA after a
    few steps is the same as without it, and the text encoder's LoRA did learn (gradients got through)."""
    store = make_version(tmp_path, demo_pictures)
    version = store.version("p", "v1")
    files = {}
    for checkpointing in (False, True):
        config = tiny_config(
            epochs=1, gradient_checkpointing=checkpointing, train_text_encoder=True, learning_rate=1e-2, clip_skip=1
        )
        result = Trainer(version, config, demo_ckpt, device="cpu", run_name=f"gc-{checkpointing}").run()
        files[checkpointing] = result.files[-1]
    plain, checkpointed = (read_tensors(files[False]), read_tensors(files[True]))
    assert plain.keys() == checkpointed.keys()
    for key in plain:
        assert torch.allclose(plain[key].float(), checkpointed[key].float(), atol=2e-3), key
    te_ups = [t for k, t in checkpointed.items() if k.startswith("lora_te") and k.endswith("lora_up.weight")]
    assert te_ups and max(float(t.abs().max()) for t in te_ups) > 0


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable


def test_a_learning_rate_list_trains_one_run_per_value(tmp_path: Path, demo_ckpt: Path, demo_pictures: Path):
    store = make_version(tmp_path, demo_pictures)
    rc = main(
        [
            "--data-dir",
            str(tmp_path),
            "train",
            "p",
            "v1",
            "--ckpt",
            str(demo_ckpt),
            *TINY,
            "--set",
            "epochs=1",
            "--set",
            "optimizer=AdamW",
            "--set",
            "learning_rate=1e-3,2e-3",
        ]
    )
    assert rc == 0
    runs = store.version("p", "v1").runs()
    assert len(runs) == 2
    rates = []
    for run in runs:
        with safe_open(str(run / "p-v1.safetensors"), "pt") as f:
            rates.append(float(f.metadata()["ss_learning_rate"]))
    assert sorted(rates) == [1e-3, 2e-3]
    # The version keeps the first value as its setting (a list is not a setting).
    assert store.version("p", "v1").load_settings().learning_rate == 1e-3


def test_conv_dim_trains_a_locon_that_diffusers_loads(tmp_path: Path, demo_ckpt: Path, demo_pictures: Path):
    """``conv_dim`` > 0 adds the UNet's 3x3 convolutions at their own rank and alpha (LoCon): the file has them,
    with kohya's network_args, and diffusers' strict loader maps every key; 0 (the default) leaves them out."""
    from tests.helpers_models import diffusers_has_peft_backend
    from tests.test_precision import diffusers_loads_every_key, tensors_of
    from train_tools.data.uploads import add_originals

    store = Store(tmp_path)
    store.create_project("p")
    version = store.create_version("p", "v1")
    add_originals(sorted(demo_pictures.iterdir()), version.originals_dir)
    config = tiny_config(epochs=1, conv_dim=3, conv_alpha=1.5, save_precision="fp32")
    lora = Trainer(version, config, demo_ckpt, device="cpu").run().final_file
    assert lora is not None
    tensors, meta = tensors_of(lora)
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert tensors[f"{conv}.lora_down.weight"].shape[:2] == (3, 32) and tensors[f"{conv}.lora_down.weight"].ndim == 4
    assert float(tensors[f"{conv}.alpha"]) == 1.5
    assert tensors["lora_unet_down_blocks_0_resnets_0_time_emb_proj.lora_down.weight"].shape[0] == 4  # a Linear
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "3", "conv_alpha": "1.5"}
    assert float(tensors[f"{conv}.lora_up.weight"].abs().max()) > 0  # trained, not left at zero
    if diffusers_has_peft_backend():  # not with A1111's transformers 4.30
        diffusers_loads_every_key(demo_ckpt, lora)
    plain = Trainer(version, tiny_config(epochs=1), demo_ckpt, device="cpu", run_name="plain").run().final_file
    assert plain is not None and not any("resnets" in k for k in tensors_of(plain)[0])


def test_min_snr_weights_are_diffusers_compute_snr():
    """The min-SNR weight's SNR, computed by hand (diffusers.training_utils cannot be imported with A1111's
    transformers), equals diffusers' ``compute_snr`` where that imports."""
    from diffusers import DDPMScheduler

    from train_tools.training.trainer_step import signal_to_noise

    try:
        from diffusers import training_utils
    except (ImportError, AttributeError, RuntimeError) as exc:  # A1111's transformers 4.30: why signal_to_noise
        pytest.skip(f"diffusers.training_utils does not import here: {exc}")
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(signal_to_noise(sched, t), training_utils.compute_snr(sched, t))
