"""The shapes world (issue 16, item 2): deterministic pictures whose captions say what they show, a checker that
judges them, and the pretrain command of the demo model (bit-identical from one seed, read by the real loader)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from safetensors.torch import load_file

from train_tools.data.shapes_checker import judge, score
from train_tools.data.shapes_world import NEW_SHAPES, PALETTE, SHAPES, Scene, all_prompts, render, world_pictures

# Few enough pictures for seconds; every shape and most colour pairs appear in them.
N = 150


def test_world_is_deterministic_from_its_seed():
    a, b, c = world_pictures(7, 12), world_pictures(7, 12), world_pictures(8, 12)
    assert [p.caption for p in a] == [p.caption for p in b]
    assert all(x.image.tobytes() == y.image.tobytes() for x, y in zip(a, b, strict=True))
    assert [p.caption for p in a] != [p.caption for p in c]
    assert a[0].image.size == (64, 64)
    assert a[0].caption == f"a {a[0].scene.colour} {a[0].scene.shape} on a {a[0].scene.background} background"


def test_world_covers_every_shape_and_colour_and_keeps_them_apart():
    pictures = world_pictures(0, N)
    assert {p.scene.shape for p in pictures} == set(SHAPES)
    assert {p.scene.colour for p in pictures} == set(PALETTE)
    assert all(p.scene.colour != p.scene.background for p in pictures)
    assert len(all_prompts()) == len(SHAPES) * len(PALETTE) * (len(PALETTE) - 1)
    colours = np.array(list(PALETTE.values()), dtype=float)
    gaps = np.linalg.norm(colours[:, None] - colours[None], axis=2) + np.eye(len(colours)) * 1e9
    assert gaps.min() > 120  # clearly distinguishable, even blurred


@pytest.mark.parametrize("shapes", [SHAPES, NEW_SHAPES], ids=["world", "new"])
def test_checker_reads_the_captions_of_rendered_pictures(shapes):
    pictures = world_pictures(1, N, shapes=shapes)
    assert {p.scene.shape for p in pictures} == set(shapes)
    verdicts = [judge(p.image) for p in pictures]
    assert score(verdicts, [p.scene for p in pictures]) == {"shape": 1.0, "colour": 1.0, "background": 1.0, "all": 1.0}


def _noisy(image: Image.Image, sigma: float, seed: int) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float32) + np.random.default_rng(seed).normal(0.0, sigma, (64, 64, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.mark.parametrize(
    "damage",
    [
        lambda im, i: im.filter(ImageFilter.GaussianBlur(1.5)),
        lambda im, i: _noisy(im, 25.0, i),
        # What an 8x-downsampling VAE does at worst: detail below 4 pixels gone.
        lambda im, i: im.resize((16, 16), Image.Resampling.BOX).resize((64, 64), Image.Resampling.BICUBIC),
    ],
    ids=["blur", "noise", "downsampled"],
)
def test_checker_survives_blur_and_noise(damage):
    pictures = world_pictures(2, 80) + world_pictures(2, 20, shapes=NEW_SHAPES)
    verdicts = [judge(damage(p.image, i)) for i, p in enumerate(pictures)]
    assert score(verdicts, [p.scene for p in pictures])["all"] >= 0.95


def test_checker_tells_shapes_and_colours_apart_and_says_no_when_it_should():
    for shape in SHAPES + NEW_SHAPES:
        scene = Scene(shape, "red", "blue", 0.5, 0.5, 0.3)
        verdict = judge(render(scene))
        assert (verdict.shape, verdict.colour, verdict.background) == (shape, "red", "blue")
        for other in SHAPES + NEW_SHAPES:
            if other != shape:
                wrong = dataclasses.replace(scene, shape=other)
                assert verdict.matches(wrong) == {"shape": False, "colour": True, "background": True, "all": False}
    verdict = judge(render(Scene("star", "yellow", "black", 0.4, 0.6, 0.25)))
    assert not verdict.matches(Scene("star", "white", "black", 0.5, 0.5, 0.3))["colour"]
    assert not verdict.matches(Scene("star", "yellow", "purple", 0.5, 0.5, 0.3))["background"]
    # Nothing on the background, or pure noise: no shape, no colour, nothing matches.
    blank = judge(Image.new("RGB", (64, 64), PALETTE["green"]))
    assert (blank.shape, blank.colour, blank.background) == (None, None, "green")
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    assert score([judge(noise)] * 5, [Scene(s, "red", "blue", 0.5, 0.5, 0.3) for s in SHAPES])["all"] == 0.0


# ------------------------------------------------------------------------------------------ the pretrain
def _few_steps(seed: int = 3):
    from train_tools.training.demo_pretrain import PretrainSettings

    return PretrainSettings(seed=seed, pictures=24, vae_steps=3, vae_batch=4, unet_steps=3, unet_batch=6)


def test_pretrain_twice_from_one_seed_gives_the_same_weights(tmp_path: Path):
    from train_tools.models.loader import load_model
    from train_tools.progress import RecordingReporter
    from train_tools.training.demo_pretrain import pretrain

    reporter = RecordingReporter()
    first = pretrain(tmp_path / "a.safetensors", _few_steps(), reporter=reporter)
    second = pretrain(tmp_path / "b.safetensors", _few_steps())
    other = pretrain(tmp_path / "c.safetensors", _few_steps(seed=4))
    assert first is not None and second is not None and other is not None
    a, b, c = load_file(first), load_file(second), load_file(other)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert [s.step for s in reporter.steps] == list(range(1, 7)) and reporter.total_steps == 6
    assert all(np.isfinite(s.loss) for s in reporter.steps)
    # The real loading path reads it as a tiny SD1 model whose tokenizer knows the world's words.
    model = load_model(first)
    assert model.family == "sd1" and model.spec.tiny and model.prediction_type == "epsilon"
    tokens = model.tokenizers[0]("a purple triangle on a yellow background")["input_ids"]
    assert len(tokens) == 2 + 7  # one token per word between the start and end tokens


def test_random_caption_prefixes_never_use_the_world_or_the_new_shapes():
    """The stand-in trigger words of the pretrain: the world's words and the shapes kept for LoRAs stay out."""
    from train_tools.models.tokenizers import tiny_tokenizer
    from train_tools.training.demo_pretrain import _prefix_pool

    tok = tiny_tokenizer()
    captions = [p.caption for p in world_pictures(0, 400)]
    pool = set(_prefix_pool(tok, [tok(c, add_special_tokens=False)["input_ids"] for c in captions]))
    for word in ("red", "circle", "background", "on", "a", *NEW_SHAPES, ","):
        assert not pool & set(tok(word, add_special_tokens=False)["input_ids"]), word
    assert not pool & set(tok.all_special_ids)
    assert set(tok("demo", add_special_tokens=False)["input_ids"]) <= pool  # a project name's pieces are in it
    assert len(pool) > 500


def test_pretrain_stopped_writes_nothing(tmp_path: Path):
    from train_tools.progress import StopFlag
    from train_tools.training.demo_pretrain import pretrain

    stop = StopFlag()
    stop.request()
    assert pretrain(tmp_path / "x.safetensors", _few_steps(), stop=stop) is None
    assert not (tmp_path / "x.safetensors").exists()


def test_latent_normalisation_keeps_the_decoder_exact():
    from train_tools.models.configs import build_vae, spec
    from train_tools.training.demo_pretrain import encode_all, normalise_latents

    torch.manual_seed(0)
    vae = build_vae(spec("sd1", tiny=True)).eval()
    images = torch.rand(6, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        mean, _ = encode_all(vae, images)
        before = vae.decode(mean).sample
        normalise_latents(vae, mean)
        new_mean, _ = encode_all(vae, images)
        after = vae.decode(new_mean).sample
    scaled = new_mean * vae.config.scaling_factor
    assert scaled.mean(dim=(0, 2, 3)).abs().max() < 1e-4 and abs(float(scaled.std()) - 1.0) < 1e-3
    assert torch.allclose(before, after, atol=1e-4)


def test_pretrain_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from train_tools.cli import main

    out = tmp_path / "demo.safetensors"
    args = [
        "demo-model",
        "pretrain",
        "--out",
        str(out),
        "--seed",
        "5",
        "--pictures",
        "70",
        "--vae-steps",
        "1",
        "--unet-steps",
        "1",
    ]
    assert main(args) == 0
    assert out.is_file() and f"wrote {out}" in capsys.readouterr().out
