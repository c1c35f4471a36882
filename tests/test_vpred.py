"""v-prediction and zero terminal SNR (issue 18, item 1): detected from an SDXL checkpoint's marker keys, or set
by hand; the trainer's target and schedule follow, and the file says what it trained with."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from tests import fixtures_training
from tests.test_precision import new_version
from train_tools.config import TrainConfig
from train_tools.models.demo_model import build_demo_checkpoint
from train_tools.models.detect import detect_checkpoint_family
from train_tools.models.loader import load_model
from train_tools.networks.lora_format import read_lora
from train_tools.progress import RecordingReporter
from train_tools.training.trainer import Trainer
from train_tools.training.trainer_step import signal_to_noise

demo_ckpt = fixtures_training.demo_ckpt
pictures = fixtures_training.pictures
one_thread = fixtures_training.one_thread


@pytest.fixture(scope="module")
def vpred_xl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SDXL single file with the marker keys NoobAI-XL v-pred files carry (empty ``v_pred`` and
    ``ztsnr`` tensors)."""
    folder = tmp_path_factory.mktemp("models")
    plain = build_demo_checkpoint(folder / "plain-xl.safetensors", family="sdxl")
    with safe_open(str(plain), "pt") as fh:
        tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118 - not iterable
        metadata = fh.metadata()
    tensors.update(v_pred=torch.tensor([]), ztsnr=torch.tensor([]))
    path = folder / "vpred-xl.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path


def small(**changes: object) -> TrainConfig:
    base = dict(resolution=64, min_bucket_reso=64, max_bucket_reso=128, network_dim=4, network_alpha=2.0, repeats=1)
    base.update(epochs=1, batch_size=1, optimizer="AdamW", train_text_encoder=False, mixed_precision="no")
    return TrainConfig(**{**base, **changes})  # type: ignore[arg-type]


def test_marked_sdxl_is_detected_and_loads_as_v_prediction_with_zero_terminal_snr(vpred_xl: Path) -> None:
    from train_tools.ui.html import family_line

    assert detect_checkpoint_family(vpred_xl) == "sdxlv"
    assert detect_checkpoint_family(vpred_xl.with_name("plain-xl.safetensors")) == "sdxl"
    assert "SDXL (v-prediction)" in family_line("sdxlv")
    m = load_model(vpred_xl)
    assert m.family == "sdxlv" and m.prediction_type == "v_prediction"
    assert m.noise_scheduler.config.prediction_type == "v_prediction"
    assert float(m.noise_scheduler.alphas_cumprod[-1]) == 0.0  # the last step is pure noise
    plain = load_model(vpred_xl.with_name("plain-xl.safetensors"))
    assert plain.prediction_type == "epsilon" and float(plain.noise_scheduler.alphas_cumprod[-1]) > 0


def test_a_marked_checkpoint_trains_v_and_the_file_says_so(tmp_path: Path, vpred_xl: Path, pictures: Path) -> None:
    reporter = RecordingReporter()
    result = Trainer(new_version(tmp_path, pictures), small(), vpred_xl, device="cpu", reporter=reporter).run()
    assert result.final_file is not None and all(torch.isfinite(torch.tensor(result.losses)))
    _, meta = read_lora(result.final_file)
    assert meta["modelspec.prediction_type"] == "v" and meta["ss_v_parameterization"] == "True"
    assert meta["ss_zero_terminal_snr"] == "True" and meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert any("v-prediction with a zero-terminal-SNR schedule" in m for m in reporter.messages)


@pytest.mark.parametrize("v", (False, True))
def test_the_loss_uses_the_target_the_settings_and_the_checkpoint_ask_for(
    tmp_path: Path, demo_ckpt: Path, pictures: Path, v: bool
) -> None:
    """The trainer's loss is the MSE against the noise (epsilon) or against diffusers' velocity (v-prediction set
    by hand on an SD1 checkpoint), and ``scale_v_pred_loss_like_noise_pred`` weights it by SNR / (SNR + 1)."""
    config = small(v_parameterization=v, zero_terminal_snr=v)
    trainer = Trainer(new_version(tmp_path, pictures), config, demo_ckpt, device="cpu")
    trainer.prepare()
    sched = trainer.noise_scheduler
    assert (trainer.model.prediction_type == "v_prediction") == v
    assert bool(sched.config.rescale_betas_zero_snr) == v
    torch.manual_seed(0)
    latents = torch.randn(2, 4, 8, 8)
    noise = torch.randn_like(latents)
    timesteps = torch.tensor([999, 300])
    text = trainer.text_for([0, 0], random.Random(0))
    with torch.no_grad():
        loss = float(trainer.loss(latents, text, noise, timesteps))
        pred = trainer.model.unet(sched.add_noise(latents, noise, timesteps), timesteps, text.hidden).sample
        target = sched.get_velocity(latents, noise, timesteps) if v else noise
        per_item = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
        assert loss == pytest.approx(float(per_item.mean()), rel=1e-5)
        if v:
            trainer.config.scale_v_pred_loss_like_noise_pred = True
            snr = signal_to_noise(sched, timesteps)
            scaled = float(trainer.loss(latents, text, noise, timesteps))
            assert float(snr[0]) == 0.0  # zero terminal SNR at t=999
            assert scaled == pytest.approx(float((per_item * snr / (snr + 1)).mean()), rel=1e-5)
            trainer.config.min_snr_gamma = 5.0  # min-SNR stays finite where the SNR is zero
            assert torch.isfinite(trainer.loss(latents, text, noise, timesteps))
