"""Caption and tag dropout (issue 18, item 3): the rates over many draws, the every-n-epochs rule, the frozen
text encoder's cache, and a run with every new training option resuming bit for bit."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from tests import fixtures_training
from tests.test_precision import check_combination, new_version
from tests.test_vpred import small
from train_tools.training.trainer import Trainer
from train_tools.training.trainer_step import shuffle_caption

demo_ckpt = fixtures_training.demo_ckpt
pictures = fixtures_training.pictures
one_thread = fixtures_training.one_thread


def test_tag_dropout_leaves_out_each_tag_at_its_rate_and_keeps_the_first_tokens() -> None:
    rng = random.Random(0)
    caption = "trigger, red, ball, grass, sky, sun"
    draws = [shuffle_caption(caption, 1, rng, shuffle=False, tag_dropout=0.25).split(", ") for _ in range(4000)]
    assert all(d[0] == "trigger" for d in draws)
    for tag in ("red", "ball", "grass", "sky", "sun"):
        kept = sum(tag in d for d in draws) / len(draws)
        assert abs(kept - 0.75) < 0.03, (tag, kept)  # 4000 draws: 5 standard deviations is 0.034
    assert all(d == ["trigger", "red", "ball", "grass", "sky", "sun"] for d in draws if len(d) == 6)  # order kept


def test_caption_dropout_rate_every_n_epochs_and_fixed_batches(tmp_path: Path, demo_ckpt: Path, pictures: Path):
    config = small(caption_dropout_rate=0.3, caption_dropout_every_n_epochs=3, train_text_encoder=True)
    trainer = Trainer(new_version(tmp_path, pictures), config, demo_ckpt, device="cpu")
    trainer.prepare()
    assert trainer.cached_text is None  # the text encoder trains: nothing cached
    rng = random.Random(0)
    captions = [c for _ in range(2000) for c in trainer.captions_for([0], rng, epoch=1)]
    assert abs(captions.count("") / len(captions) - 0.3) < 0.05
    assert set(trainer.captions_for([0, 0, 0], rng, epoch=3)) == {""}  # every 3rd epoch: all empty
    assert "" not in trainer.captions_for([0] * 50, rng, epoch=None)  # fixed batches never drop


def test_a_frozen_encoder_caches_the_empty_caption_for_dropout(tmp_path: Path, demo_ckpt: Path, pictures: Path):
    config = small(caption_dropout_rate=1.0)
    trainer = Trainer(new_version(tmp_path, pictures), config, demo_ckpt, device="cpu")
    trainer.prepare()
    assert trainer.cached_text is not None and len(trainer.cached_text) == len(trainer.all_items) + 1
    with torch.no_grad():
        empty = trainer.encode_text([""]).hidden
    dropped = trainer.text_for([0], random.Random(0), epoch=1).hidden
    torch.testing.assert_close(dropped.cpu(), empty.cpu())
    kept = trainer.text_for([0], random.Random(0), epoch=None).hidden
    assert not torch.allclose(kept.cpu(), empty.cpu())
    tagged = Trainer(new_version(tmp_path / "t", pictures), small(caption_tag_dropout_rate=0.5), demo_ckpt)
    tagged.prepare()
    assert tagged.cached_text is None  # captions that change every step are encoded every step
    full = tagged.all_items[0].caption
    rng = random.Random(0)
    seen = [tagged.captions_for([0], rng, epoch=1)[0] for _ in range(200)]
    assert len(set(seen)) > 1 and all(len(c) < len(full) for c in seen if c != full)  # tags are left out
    assert tagged.captions_for([0], rng, epoch=None) == [full]  # fixed batches keep every tag


# Two runs between them switch every new option on: the noise offset with its adaptive part excludes pyramid
# noise (as in kohya), so each run has one of them; debiased estimation and the v-loss scale each shrink the
# loss of the noisy steps many times over, together too much for the few steps here to lower it clearly.
OPTION_RUNS = {
    "frozen text encoder": dict(
        train_text_encoder=False,
        noise_offset=0.05,
        adaptive_noise_scale=0.1,
        loss_type="huber",
        huber_schedule="snr",
        debiased_estimation_loss=True,
        optimizer_args="weight_decay=0.05 betas=0.85,0.98",
        loraplus_lr_ratio=2.0,
        up_lr_weight="1,1,1,0.5,0.5,0.5,1,1,1,2,2,2",
        block_dims=",".join(str(4 + i % 2 * 4) for i in range(25)),  # dims 4 and 8 by turns
    ),
    "text encoder trained": dict(
        train_text_encoder=True,
        scale_v_pred_loss_like_noise_pred=True,
        multires_noise_iterations=4,
        multires_noise_discount=0.3,
        ip_noise_gamma=0.1,
        min_timestep=100,
        max_timestep=900,
        loss_type="smooth_l1",
        huber_schedule="exponential",
        validation_split=0.5,
    ),
}


@pytest.mark.parametrize("run", tuple(OPTION_RUNS))
def test_every_new_option_on_resumes_bit_for_bit(tmp_path: Path, demo_ckpt: Path, pictures: Path, run: str) -> None:
    """Caption, tag and every-n-epochs dropout, v-prediction with zero terminal SNR and the v-loss scale, DoRA,
    the loss and noise options, optimizer arguments, LoRA+, block LR weights and dims, a validation split: the run
    interrupted and resumed ends bit for bit like the straight one (and its loss on a fixed batch goes down)."""
    meta = check_combination(
        tmp_path,
        demo_ckpt,
        pictures,
        "no",
        "AdamW",
        caption_dropout_rate=0.2,
        caption_dropout_every_n_epochs=2,
        caption_tag_dropout_rate=0.3,
        shuffle_caption=True,
        v_parameterization=True,
        zero_terminal_snr=True,
        network_type="dora",
        **OPTION_RUNS[run],
    )
    assert meta["ss_caption_tag_dropout_rate"] == "0.3" and meta["ss_loss_type"] == OPTION_RUNS[run]["loss_type"]
    wanted = "(weight_decay=0.05,betas=(0.85, 0.98))" if "optimizer_args" in OPTION_RUNS[run] else "(weight_decay=0.01)"
    assert meta["ss_optimizer"] == "torch.optim.adamw.AdamW" + wanted
