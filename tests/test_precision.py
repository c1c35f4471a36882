"""The GPU code paths on the CPU (issue 15): fp32, bf16 and fp16 with loss scaling, each with every optimizer
(8-bit ones included), through the same trainer and accelerate code as on a CUDA GPU.

The matrix trains the tiny demo model with each {precision} x {optimizer} and checks what a user relies on:
the precision and optimizer really used (and recorded in the file), a finite loss that goes down, a file
diffusers loads with no key left over, and a run interrupted and resumed that ends bit for bit like one that
was not. On a GPU, ``tests/test_gpu.py`` runs the same matrix on CUDA.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from tests import fixtures_training
from tests.fixtures_training import StopsAtStep
from tests.helpers_models import diffusers_has_peft_backend, lora_file_layer_count, lora_layer_count
from train_tools.config import TrainConfig
from train_tools.errors import UserError
from train_tools.networks.types import WEIGHT_MARKERS, network_metadata
from train_tools.progress import StopFlag
from train_tools.store import Store, Version
from train_tools.training import optim, precision
from train_tools.training.precision import DTYPES, make_accelerator, resolve_precision
from train_tools.training.state_files import latest_state
from train_tools.training.trainer import Trainer

demo_ckpt = fixtures_training.demo_ckpt
pictures = fixtures_training.pictures
one_thread = fixtures_training.one_thread

PRECISIONS = ("no", "bf16", "fp16")
OPTIMIZERS = ("AdamW", "AdamW8bit", "Lion", "Lion8bit", "Prodigy", "AdaFactor")
# Learning rates that move the tiny model's fixed-batch loss clearly within a few steps; Prodigy finds its
# own step size from a tiny start (d0 = 1e-6) and needs more steps to grow it.
LEARNING_RATE = {"AdamW": 5e-3, "AdamW8bit": 5e-3, "Lion": 2e-3, "Lion8bit": 2e-3, "Prodigy": 1.0, "AdaFactor": 5e-3}
REPEATS = {"Prodigy": 8}
# The class that steps for each name (the file's ss_optimizer starts with it).
STEPPER = {
    "AdamW": "torch.optim.adamw.AdamW",
    "AdamW8bit": "bitsandbytes.optim.adamw.AdamW8bit",
    "Lion": "train_tools.training.optim.ForeachLion",
    "Lion8bit": "bitsandbytes.optim.lion.Lion8bit",
    "Prodigy": "prodigyopt.prodigy.Prodigy",
    "AdaFactor": "transformers.optimization.Adafactor",
}


def matrix_config(mixed_precision: str, optimizer: str, **changes: Any) -> TrainConfig:
    """Two pictures, two epochs, the UNet and text encoder trained. Rank 64: the tiny model's larger LoRA
    weights (64 x 64) reach bitsandbytes' 4096-value threshold, so the 8-bit optimizers keep 8-bit states."""
    base: dict[str, Any] = dict(
        resolution=64,
        min_bucket_reso=64,
        max_bucket_reso=128,
        network_dim=64,
        network_alpha=32.0,
        repeats=REPEATS.get(optimizer, 2),
        batch_size=1,
        epochs=2,
        save_every_n_epochs=1,
        optimizer=optimizer,
        learning_rate=LEARNING_RATE[optimizer],
        lr_scheduler="constant",
        mixed_precision=mixed_precision,
        save_precision="fp32",
        max_token_length=75,
        train_text_encoder=True,
        preview_at_end=False,
    )
    base.update(changes)
    return TrainConfig(**base)


def new_version(folder: Path, pictures: Path) -> Version:
    from train_tools.data.uploads import add_originals

    store = Store(folder)
    store.create_project("p")
    version = store.create_version("p", "v1")
    add_originals([pictures], version.originals_dir)
    return version


def exact_trainer(version: Version, config: TrainConfig, ckpt: Path, device: str = "cpu", **kwargs: Any) -> Trainer:
    """A trainer that trains in exactly the precision asked, also where this CPU emulates it (fp16)."""
    trainer = Trainer(version, config, ckpt, device=device, **kwargs)
    trainer.exact_precision = True
    return trainer


def tensors_of(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as fh:
        return {key: fh.get_tensor(key) for key in fh.keys()}, fh.metadata()  # noqa: SIM118 - not iterable


def eight_bit_missing(optimizer: str, device: str = "cpu") -> str | None:
    """The sentence a run with ``optimizer`` gets here when bitsandbytes cannot run it on ``device``, else
    None."""
    if optimizer not in optim.EIGHT_BIT:
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return "needs bitsandbytes, which is not installed here"
    if device == "cpu" and optim._bnb_failure(optimizer, "cpu") is not None:
        return "needs a CUDA GPU with this bitsandbytes version"
    return None


def diffusers_loads_every_key(ckpt: Path, lora: Path) -> None:
    from diffusers import StableDiffusionPipeline

    from train_tools.models.loader import load_model

    tensors, _ = tensors_of(lora)
    m = load_model(ckpt)
    pipe = StableDiffusionPipeline(
        vae=m.vae,
        text_encoder=copy.deepcopy(m.text_encoders[0]),
        tokenizer=m.tokenizers[0],
        unet=m.unet,
        scheduler=m.noise_scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    # Folder + weight_name: diffusers 0.31 (Forge's) refuses a bare file path when offline. It raises on any
    # key it cannot map.
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    assert lora_layer_count(pipe.unet) == lora_file_layer_count(tensors, "lora_unet") > 0
    assert lora_layer_count(pipe.text_encoder) == lora_file_layer_count(tensors, "lora_te") > 0


def check_combination(
    folder: Path,
    ckpt: Path,
    pictures: Path,
    mixed_precision: str,
    optimizer: str,
    device: str = "cpu",
    **changes: Any,
) -> dict[str, str]:
    """One cell of the matrix on ``device``: what ran, the loss, the file, diffusers loading it, and resuming;
    the file's metadata.
    On a CPU the resumed run ends bit for bit like the straight one; GPU kernels are not bit-reproducible
    from run to run (atomics in the backward), so there it ends within 10% of the trained weights."""
    version = new_version(folder, pictures)
    config = matrix_config(mixed_precision, optimizer, **changes)
    missing = eight_bit_missing(optimizer, device)
    if missing is not None:  # where bitsandbytes cannot run it here, a sentence says why, before any step
        with pytest.raises(UserError, match=missing):
            exact_trainer(version, config, ckpt, device=device).run()
        return {}
    straight = exact_trainer(version, config, ckpt, device=device, run_name="straight")
    straight.prepare()
    before = straight.fixed_batch_loss()
    result = straight.run()
    after = straight.fixed_batch_loss()

    # What ran: the asked precision, frozen weights in it, LoRA weights (and their optimizer) in fp32, a
    # gradient scaler for fp16 only.
    assert straight.mixed_precision_used == mixed_precision
    frozen = [p for n, p in straight.model.unet.named_parameters() if not any(m in n for m in WEIGHT_MARKERS)]
    assert frozen and all(p.dtype == DTYPES[mixed_precision] for p in frozen)
    assert all(p.dtype == torch.float32 and p.device.type == device for p in straight.trainable)
    assert (getattr(straight.accelerator, "scaler", None) is not None) == (mixed_precision == "fp16")
    if optimizer in optim.EIGHT_BIT:  # bitsandbytes' 8-bit states, not its 32-bit fallback for small tensors
        states = [t for s in straight.optimizer.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        packed = [t for s in straight.optimizer.optimizer.state.values() for t in _packed(s)]
        assert any(t.dtype == torch.uint8 for t in states + packed)
    assert all(math.isfinite(loss) for loss in result.losses) and len(result.losses) == straight.total_steps
    assert after < 0.97 * before, (before, after)

    assert result.final_file is not None
    tensors, metadata = tensors_of(result.final_file)
    assert all(torch.isfinite(t).all() for t in tensors.values())
    assert metadata["ss_mixed_precision"] == mixed_precision
    assert metadata["ss_optimizer"].startswith(STEPPER[optimizer])
    # A1111 pins transformers 4.30.2, too old for diffusers' LoRA loader (4.34+); diffusers reads LoRA/LoCon only.
    if diffusers_has_peft_backend() and config.network_type in ("lora", "locon"):
        diffusers_loads_every_key(ckpt, result.final_file)

    stop = StopFlag()
    first = exact_trainer(
        version, config, ckpt, device=device, run_name="stopped", stop=stop, reporter=StopsAtStep(stop, 3)
    ).run()
    assert first.interrupted and first.steps == 3 and first.run_dir is not None
    resumed = exact_trainer(version, config, ckpt, device=device, resume_from=first.run_dir).run()
    assert resumed.final_file is not None and resumed.steps == result.steps
    again, _ = tensors_of(resumed.final_file)
    assert again.keys() == tensors.keys()
    if device == "cpu":
        assert resumed.losses == result.losses
        assert all(torch.equal(again[k], tensors[k]) for k in tensors)
    else:
        assert resumed.losses[:3] == first.losses
        assert relative_difference(again, tensors) < 0.1
    return metadata


def _packed(state: dict[str, Any]) -> list[torch.Tensor]:
    table = state.get("__bnb_optimizer_quant_state__", {})  # bitsandbytes 0.48+ packs its 8-bit states
    return [t for t in table.values() if torch.is_tensor(t)] if isinstance(table, dict) else []


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """How far the LoRA "up" weights (B, which start at zero) of ``a`` are from ``b``'s, relative to ``b``'s."""
    assert a.keys() == b.keys() and a
    keys = [k for k in b if "lora_up" in k]
    num = sum(float((a[k].float() - b[k].float()).norm() ** 2) for k in keys)
    den = sum(float(b[k].float().norm() ** 2) for k in keys)
    assert keys and den > 0
    return (num / den) ** 0.5


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("mixed_precision", PRECISIONS)
def test_matrix_trains_loads_and_resumes_bit_for_bit(
    tmp_path: Path, demo_ckpt: Path, pictures: Path, mixed_precision: str, optimizer: str
):
    check_combination(tmp_path, demo_ckpt, pictures, mixed_precision, optimizer)


# Each network type in a half precision (LoHa and LoKr run their float32 weights under autocast), with a flat
# parameter group (AdamW), the foreach Lion and an 8-bit optimizer (LoKr's small matrices stay below its threshold).
NETWORK_CELLS = {
    "locon": ("bf16", "Lion"),
    "loha": ("bf16", "AdamW8bit"),
    "lokr": ("fp16", "AdamW"),
    "dora": ("bf16", "AdamW"),
}


@pytest.mark.parametrize("network_type", tuple(NETWORK_CELLS))
def test_every_network_type_trains_loads_and_resumes_bit_for_bit(
    tmp_path: Path, demo_ckpt: Path, pictures: Path, network_type: str
):
    mixed_precision, optimizer = NETWORK_CELLS[network_type]
    # LoKr's update starts from a zero w1 and moves slowly at LoRA's rates (LyCORIS suggests a larger one).
    lr = {"learning_rate": 2e-2} if network_type == "lokr" else {}
    meta = check_combination(tmp_path, demo_ckpt, pictures, mixed_precision, optimizer, network_type=network_type, **lr)
    module, args = network_metadata(TrainConfig(network_type=network_type, network_dim=64, network_alpha=32.0))
    if meta:  # the file says what trained it, as kohya and LyCORIS write it
        assert meta["ss_network_module"] == module and json.loads(meta["ss_network_args"]) == args


def test_fp16_scaler_skips_an_overflowing_step_and_resumes_its_scale(
    tmp_path: Path, demo_ckpt: Path, pictures: Path, monkeypatch: pytest.MonkeyPatch
):
    """An inf in the gradients of step 2: the scaler leaves the weights as they were, halves its scale, and
    the run goes on; interrupted after it, the resumed run starts from the halved scale and ends the same."""
    version = new_version(tmp_path, pictures)
    config = matrix_config("fp16", "AdamW")
    real_clip, real_step = Trainer.clip_gradients, Trainer.optimizer_step
    seen: dict[str, list[Any]] = {}

    def clip_gradients(self: Trainer, max_norm: float) -> None:
        steps = seen.setdefault(self.run_name or "resumed", [])
        if len(steps) + getattr(self, "_first_step", 0) == 1:  # the run's second step (0-based 1)
            grad = self.optimized[0].grad
            assert grad is not None
            grad.view(-1)[0] = float("inf")
        real_clip(self, max_norm)

    def optimizer_step(self: Trainer) -> None:
        weights = [p.detach().clone() for p in self.optimized]
        scale = self.accelerator.scaler.get_scale()
        real_step(self)
        moved = any(not torch.equal(w, p) for w, p in zip(weights, self.optimized, strict=True))
        seen.setdefault(self.run_name or "resumed", []).append((moved, scale, self.accelerator.scaler.get_scale()))

    monkeypatch.setattr(Trainer, "clip_gradients", clip_gradients)
    monkeypatch.setattr(Trainer, "optimizer_step", optimizer_step)
    straight = exact_trainer(version, config, demo_ckpt, run_name="straight").run()
    steps = seen["straight"]
    assert steps[0] == (True, 65536.0, 65536.0)
    assert steps[1] == (False, 65536.0, 32768.0)  # skipped: weights unchanged, scale halved
    assert all(moved and scale == 32768.0 for moved, scale, _ in steps[2:])
    assert all(math.isfinite(loss) for loss in straight.losses)

    stop = StopFlag()
    first = exact_trainer(
        version, config, demo_ckpt, run_name="stopped", stop=stop, reporter=StopsAtStep(stop, 3)
    ).run()
    assert first.run_dir is not None
    state = latest_state(first.run_dir)
    assert state is not None and state.scaler is not None and state.scaler["scale"] == 32768.0
    resumed = exact_trainer(version, config, demo_ckpt, resume_from=first.run_dir).run()
    assert seen["resumed"][0][1] == 32768.0  # the scale it stopped with, not a fresh 65536
    assert resumed.final_file is not None and straight.final_file is not None
    a, _ = tensors_of(resumed.final_file)
    b, _ = tensors_of(straight.final_file)
    assert all(torch.equal(a[k], b[k]) for k in b)


# ---------------------------------------------------------------------- which precision a run trains in


@pytest.mark.parametrize(
    "requested, bf16, fp16, exact, expected, message",
    [
        ("fp16", True, False, False, "bf16", "training in bf16, which it computes natively"),
        ("fp16", False, False, False, "no", "it has no bf16 instructions; training in fp32"),
        ("fp16", False, True, False, "fp16", None),
        ("fp16", False, False, True, "fp16", None),
        ("bf16", True, False, False, "bf16", None),
        ("bf16", False, False, False, "no", "no bf16 instructions (AVX512-BF16 or AMX)"),
        ("bf16", False, False, True, "bf16", None),
        ("no", True, True, False, "no", None),
    ],
)
def test_a_cpu_trains_in_what_it_computes_natively(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    requested: str,
    bf16: bool,
    fp16: bool,
    exact: bool,
    expected: str,
    message: str | None,
):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: bf16)
    monkeypatch.setattr(precision, "cpu_has_fp16", lambda: fp16)
    with caplog.at_level(logging.WARNING, logger="train_tools.training.precision"):
        assert resolve_precision(requested, torch.device("cpu"), exact=exact) == expected
    if message is None:
        assert not caplog.records
    else:
        assert message in caplog.text


def test_a_torch_without_cpu_fp16_says_so(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    monkeypatch.setattr(precision, "cpu_fp16_failure", lambda: "torch 2.1.2 does not autocast to fp16 on a CPU")
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="train_tools.training.precision"):
        assert resolve_precision("fp16", torch.device("cpu"), exact=True) == "no"
    assert "fp16 on this CPU is not possible: torch 2.1.2 does not autocast" in caplog.text


def test_this_torch_trains_fp16_on_a_cpu():
    """torch 2.4+ (every environment CI installs) autocasts fp16 on a CPU and scales losses there."""
    assert precision.cpu_fp16_failure() is None


def test_a_gpu_without_bf16_trains_in_fp16(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with caplog.at_level(logging.WARNING):
        assert resolve_precision("bf16", torch.device("cuda")) == "fp16"
        assert resolve_precision("fp16", torch.device("cuda")) == "fp16"
    assert "This GPU cannot do bf16" in caplog.text
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("bf16", torch.device("cuda")) == "bf16"


def test_runs_in_one_process_may_change_precision():
    """accelerate refuses a second precision in one process; the app trains run after run in one."""
    for wanted in ("bf16", "no", "fp16", "bf16"):
        acc = make_accelerator(wanted, torch.device("cpu"))
        assert acc.mixed_precision == wanted
        assert (acc.scaler is not None) == (wanted == "fp16")
        with acc.autocast():
            out = torch.ones(2, 2) @ torch.ones(2, 2)
        assert out.dtype == DTYPES[wanted]


def test_a_cuda_device_without_cuda_is_a_sentence(tmp_path: Path, demo_ckpt: Path, pictures: Path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    version = new_version(tmp_path, pictures)
    with pytest.raises(UserError, match="Training on cuda needs a CUDA GPU, and the installed torch is a CPU-only"):
        Trainer(version, matrix_config("fp16", "AdamW"), demo_ckpt, device="cuda").run()


def test_a_damaged_8bit_state_is_refused_and_a_sound_one_passes():
    """bitsandbytes packs a weight's 8-bit states in one table: its tensors are checked like any other."""
    if eight_bit_missing("AdamW8bit") is not None:
        pytest.skip("bitsandbytes does not run AdamW8bit on this CPU")
    from train_tools.training.state_checks import _optimizer_problem

    weight = torch.nn.Parameter(torch.zeros(64, 64))
    weight.grad = torch.ones_like(weight)
    opt = optim.make_optimizer("AdamW8bit", [{"params": [weight]}], 1e-3, device=torch.device("cpu"))
    opt.step()
    saved = opt.state_dict()
    fresh = optim.make_optimizer("AdamW8bit", [{"params": [weight]}], 1e-3, device=torch.device("cpu"))
    assert _optimizer_problem(saved, fresh) is None
    table = saved["state"][0]["__bnb_optimizer_quant_state__"]
    table["state1"] = torch.zeros(3, dtype=torch.uint8)
    problem = _optimizer_problem(saved, fresh)
    assert problem == "the optimizer's 'state1' of weight 0 is a tensor of shape (3,) of torch.uint8"
    saved["state"][0]["__bnb_optimizer_quant_state__"] = {"state1": "rm -rf"}
    assert "'state1' of weight 0 is" in str(_optimizer_problem(saved, fresh))


# ---------------------------------------------------------------------- the VAE stays fp32 (fp16 overflows it)


def test_fp16_training_caches_the_latents_of_an_fp32_vae(tmp_path: Path, demo_ckpt: Path, pictures: Path):
    """SD's VAE overflows in fp16: the frozen UNet and text encoder are fp16, the VAE encodes in fp32, so the
    cached latents are those of an fp32 run, bit for bit."""
    version = new_version(tmp_path, pictures)
    latents = {}
    for mixed_precision in ("no", "fp16"):
        config = matrix_config(mixed_precision, "AdamW", cache_latents=False)
        trainer = exact_trainer(version, config, demo_ckpt, run_name=f"vae-{mixed_precision}")
        trainer.prepare()
        assert trainer.model.vae.dtype == torch.float32
        latents[mixed_precision] = trainer.latent_cache
        trainer.release_memory()
    assert trainer.latent_encodes == len(latents["no"]) > 0  # encoded by this run, not read from a cache
    for ours, theirs in zip(latents["fp16"], latents["no"], strict=True):
        for (mean, std), (mean32, std32) in zip(ours, theirs, strict=True):
            assert mean.dtype == torch.float32 and torch.equal(mean, mean32) and torch.equal(std, std32)


def test_an_fp16_previewer_decodes_with_an_fp32_vae(demo_ckpt: Path):
    """The previewer's GPU set-up (fp16 model, fp32 VAE), on the CPU: the picture matches the fp32 one."""
    import numpy as np

    from train_tools.previews.diffusers_previewer import DiffusersPreviewer
    from train_tools.previews.settings import PreviewSettings

    settings = PreviewSettings(prompt="a red circle", negative_prompt="", seed=3, steps=4, width=64, height=64)
    pictures = []
    for dtype in (torch.float16, torch.float32):
        previewer = DiffusersPreviewer.from_checkpoint(demo_ckpt, device="cpu", dtype=dtype)
        assert previewer.model.vae.dtype == torch.float32
        assert next(previewer.model.unet.parameters()).dtype == dtype
        pictures.append(np.asarray(previewer.generate(settings, None, 0.0), dtype=np.float32))
        previewer.close()
    assert pictures[0].shape == (64, 64, 3) and np.isfinite(pictures[0]).all()
    assert float(np.abs(pictures[0] - pictures[1]).mean()) < 2.0  # of 255: fp16 rounding, not a broken picture
