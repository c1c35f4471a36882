"""Standalone previews for every model family: SD2 (epsilon), SD2-v (v-prediction) and SDXL (two text
encoders, pooled text and size conditioning), each with a tiny LoRA trained here by the Trainer.

SD1 is covered in depth by test_previews.py; here each family gets the grid's promises (a cell per weight, the
"no LoRA" column is weight 0, weights differ, a seed repeats its picture) and SDXL its own recipe: the same text
conditioning and size numbers as the trainer, and every te1/te2/unet key merged by the WebUI's formula.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.webui_formula import apply_kohya_lora
from train_tools.config import TrainConfig
from train_tools.data.items import DatasetItem
from train_tools.errors import UserError
from train_tools.networks.lora_format import read_lora
from train_tools.previews.diffusers_previewer import DiffusersPreviewer
from train_tools.previews.grid import BASE_LABEL, generate_grid
from train_tools.previews.grid_info import grid_info_for
from train_tools.previews.samplers import SAMPLERS
from train_tools.previews.settings import PreviewSettings
from train_tools.store import Store
from train_tools.training.trainer import Trainer
from train_tools.training.trainer_step import sdxl_time_ids

FAMILIES = ("sd2", "sd2v", "sdxl")
PROMPT = "p, a red circle"
SETTINGS = PreviewSettings(
    prompt=PROMPT,
    negative_prompt="blurry",
    seed=11,
    steps=2,
    cfg_scale=5.0,
    sampler="Euler a",
    width=64,
    height=64,
    weights=(0.5, 1.0),
)


def pixels(image: Image.Image | Path) -> np.ndarray:
    if isinstance(image, Path):
        with Image.open(image) as img:
            return np.asarray(img.convert("RGB")).copy()
    return np.asarray(image.convert("RGB")).copy()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    return Store(tmp_path_factory.mktemp("data"))


def _train(family: str, store: Store, root: Path) -> types.SimpleNamespace:
    """One epoch at 64 px with both parts trained (so every key prefix of the family is in the file) and a
    high learning rate, so the LoRA visibly moves the pictures. The trainer's own text conditioning of the
    preview prompts is taken before training, while its LoRA (B = 0) still leaves the encoders as they are."""
    from train_tools.data.demo_dataset import make_demo_dataset
    from train_tools.models.demo_model import build_demo_checkpoint

    ckpt = build_demo_checkpoint(root / f"{family}.safetensors", family=family)
    store.create_project(family)
    version = store.create_version(family, "v1")
    make_demo_dataset(version.originals_dir, n=4)
    config = TrainConfig(
        resolution=64,
        min_bucket_reso=64,
        max_bucket_reso=128,
        network_dim=4,
        network_alpha=2.0,
        repeats=1,
        batch_size=2,
        epochs=1,
        optimizer="AdamW",
        learning_rate=2e-2,
        train_text_encoder=True,
        save_precision="fp32",
        mixed_precision="no",  # as the previewer computes on a CPU: the recipes are compared, not precisions
        base_model=str(ckpt),
    )
    version.save_settings(config)
    trainer = Trainer(version, config, ckpt, device="cpu")
    trainer.prepare()
    with torch.no_grad():
        trained_on = trainer.encode_text([PROMPT, SETTINGS.negative_prompt])
    result = trainer.run()
    assert len(result.files) == 1
    return types.SimpleNamespace(
        family=family, ckpt=ckpt, run_dir=result.run_dir, file=result.files[0], trained_on=trained_on
    )


@pytest.fixture(scope="module")
def runs(store: Store, tmp_path_factory: pytest.TempPathFactory) -> dict[str, types.SimpleNamespace]:
    root = tmp_path_factory.mktemp("models")
    return {family: _train(family, store, root) for family in FAMILIES}


@pytest.fixture(scope="module")
def previewers(runs: dict[str, types.SimpleNamespace]) -> Iterator[dict[str, DiffusersPreviewer]]:
    made = {family: DiffusersPreviewer.from_checkpoint(run.ckpt, device="cpu") for family, run in runs.items()}
    yield made
    for previewer in made.values():
        previewer.close()


# ---------------------------------------------------------------------------------------------- every family
@pytest.mark.parametrize("family", FAMILIES)
def test_grid_of_each_family(family: str, runs, previewers) -> None:
    run, previewer = runs[family], previewers[family]
    assert previewer.model.family == family
    path = generate_grid(run.run_dir, previewer, SETTINGS)
    info = grid_info_for(path)
    assert info.columns == [BASE_LABEL, "0.5", "1"] and info.rows == ["epoch 1"]
    assert len(info.cells) == 3 and not info.interrupted
    with Image.open(path) as grid:
        assert grid.size == (info.left + 3 * 64, info.top + 64)
    base, half, full = (pixels(c.image) for c in sorted(info.cells, key=lambda c: c.col))
    assert base.shape == (64, 64, 3)
    # "no LoRA" is the LoRA at weight 0, bit for bit, also after other weights were merged.
    assert np.array_equal(pixels(previewer.generate(SETTINGS, run.file, 0.0)), base)
    assert not np.array_equal(half, full)
    assert not np.array_equal(full, base)
    # The same seed repeats a picture; another seed does not.
    assert np.array_equal(pixels(previewer.generate(SETTINGS, run.file, 0.5)), half)
    assert not np.array_equal(pixels(previewer.generate(dataclasses.replace(SETTINGS, seed=12), run.file, 0.5)), half)


def test_sd2v_previews_predict_v_with_every_sampler(runs, previewers) -> None:
    assert previewers["sd2v"].model.prediction_type == "v_prediction"
    assert previewers["sd2"].pipe.scheduler.config.prediction_type == "epsilon"
    previewer = previewers["sd2v"]
    for sampler in SAMPLERS:
        image = previewer.generate(dataclasses.replace(SETTINGS, sampler=sampler, steps=1), runs["sd2v"].file, 1.0)
        assert image.size == (64, 64)
        config = previewer.pipe.scheduler.config
        assert config.prediction_type == "v_prediction", sampler
        # The WebUI's step spacing: k-diffusion's even spread, its DDIM the "leading" steps offset by one.
        assert (config.timestep_spacing, config.steps_offset) == ("leading" if sampler == "DDIM" else "linspace", 1), (
            sampler
        )


# ---------------------------------------------------------------------------------------------- SDXL
def test_sdxl_text_conditioning_is_the_trainers(runs, previewers) -> None:
    previewer = previewers["sdxl"]
    previewer.apply_lora(None, 0.0)
    cond = previewer.encode([PROMPT, SETTINGS.negative_prompt])
    want = runs["sdxl"].trained_on
    assert cond.pooled is not None and want.pooled is not None
    assert cond.hidden.shape == want.hidden.shape
    assert cond.hidden.shape[-1] == previewer.model.unet.config.cross_attention_dim  # 32 + 32 side by side
    torch.testing.assert_close(cond.hidden, want.hidden, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cond.pooled, want.pooled, atol=1e-5, rtol=1e-5)


def test_sdxl_unet_gets_the_size_numbers_and_pooled_text(runs, previewers) -> None:
    """A 96x64 picture: the UNet is told an uncropped 96x64 original, as the trainer tells it for such a
    picture; the pooled text is the prompt's, and an empty negative prompt is zeros (the WebUI's rule)."""
    previewer = previewers["sdxl"]
    seen: list[dict[str, torch.Tensor]] = []

    def record(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append({k: v.detach().clone() for k, v in kwargs["added_cond_kwargs"].items()})

    settings = dataclasses.replace(SETTINGS, width=96, height=64, steps=1, negative_prompt="")
    handle = previewer.model.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        image = previewer.generate(settings, runs["sdxl"].file, 1.0)
    finally:
        handle.remove()
    assert image.size == (96, 64)
    assert len(seen) == 1  # one step, positive and negative in one batch
    item = DatasetItem(image=Path("x.png"), caption="", size=(96, 64))
    expected = torch.tensor([sdxl_time_ids(item)] * 2)
    torch.testing.assert_close(seen[0]["time_ids"].float(), expected)
    cond = previewer.encode([PROMPT, ""])
    assert cond.pooled is not None and cond.pooled[1].abs().max() > 0  # "" encodes to something, but ...
    # ... the pipeline batches the negative first: zeros, then the prompt's pooled embedding.
    want = torch.cat([torch.zeros_like(cond.pooled[:1]), cond.pooled[:1]])
    torch.testing.assert_close(seen[0]["text_embeds"].float(), want)


def test_sdxl_merge_follows_the_webui_formula_for_every_key(runs, previewers) -> None:
    from train_tools.models.loader import load_model

    run, previewer = runs["sdxl"], previewers["sdxl"]
    tensors, _ = read_lora(run.file)
    assert {k.partition(".")[0].split("_")[1] for k in tensors} == {"unet", "te1", "te2"}
    previewer.apply_lora(run.file, 0.7)
    reference = load_model(run.ckpt)
    te1, te2 = reference.text_encoders
    used = (
        apply_kohya_lora(reference.unet, tensors, "lora_unet", 0.7)
        | apply_kohya_lora(te1, tensors, "lora_te1", 0.7)
        | apply_kohya_lora(te2, tensors, "lora_te2", 0.7)
    )
    assert used == set(tensors)
    ours = (previewer.model.unet, *previewer.model.text_encoders)
    for mine, theirs in zip(ours, (reference.unet, te1, te2), strict=True):
        theirs_sd = theirs.state_dict()
        for key, value in mine.state_dict().items():
            torch.testing.assert_close(value, theirs_sd[key], msg=key)
    previewer.apply_lora(None, 0.0)
    base = load_model(run.ckpt)
    for mine, theirs in zip(ours, (base.unet, *base.text_encoders), strict=True):
        theirs_sd = theirs.state_dict()
        assert all(torch.equal(v, theirs_sd[k]) for k, v in mine.state_dict().items())


def test_a_lora_of_the_other_kind_is_refused(runs, previewers) -> None:
    with pytest.raises(UserError, match="another kind"):
        previewers["sdxl"].generate(SETTINGS, runs["sd2"].file, 1.0)
    with pytest.raises(UserError, match="another kind"):
        previewers["sd2"].generate(SETTINGS, runs["sdxl"].file, 1.0)
    # SD2 and SD2-v share the architecture: their LoRAs cross over, as in the WebUI.
    assert previewers["sd2"].generate(SETTINGS, runs["sd2v"].file, 1.0).size == (64, 64)


def test_half_precision_model_decodes_with_a_float32_vae(runs) -> None:
    """The GPU loads the model in half precision; the VAE is kept in float32 (SDXL's overflows in fp16)."""
    from train_tools.models.loader import load_model

    model = load_model(runs["sdxl"].ckpt, dtype=torch.bfloat16)
    with DiffusersPreviewer(model, device="cpu") as previewer:
        assert model.vae.dtype == torch.float32 and model.unet.dtype == torch.bfloat16
        image = previewer.generate(dataclasses.replace(SETTINGS, steps=1), runs["sdxl"].file, 1.0)
    assert image.size == (64, 64) and pixels(image).std() > 0
