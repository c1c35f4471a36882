"""What only a CUDA GPU can show (issues 2, 6, 7, 15): the precision x optimizer matrix of
``test_precision.py`` on CUDA, mixed-precision training with the flat LoRA layout and fp16's gradient scaler,
the optimizers' CUDA paths, a real out-of-memory stop, and resuming with a scaler.

Skipped without a GPU (CI has none). On a GPU machine, one command runs these and the GPU benchmarks and
keeps their output: ``bash .ci/gpu [folder]`` (see BENCHMARKS.md).
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests import fixtures_training
from tests.fixtures_training import StopsAtStep
from tests.test_precision import OPTIMIZERS, PRECISIONS, check_combination, new_version, relative_difference
from train_tools.config import TrainConfig
from train_tools.progress import StopFlag
from train_tools.training import flat_params
from train_tools.training.optim import ForeachLion, make_optimizer
from train_tools.training.state_files import latest_state
from train_tools.training.trainer import Trainer

DEVICE = "cuda"
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

demo_ckpt = fixtures_training.demo_ckpt
pictures = fixtures_training.pictures


def gpu_config(**changes: Any) -> TrainConfig:
    base: dict[str, Any] = dict(
        resolution=64,
        min_bucket_reso=64,
        max_bucket_reso=128,
        network_dim=4,
        network_alpha=2.0,
        repeats=2,
        batch_size=1,
        epochs=2,
        save_every_n_epochs=1,
        optimizer="AdamW",
        learning_rate=1e-3,
        save_precision="fp32",
        max_token_length=75,
        train_text_encoder=True,
        mixed_precision="fp16",
        gradient_checkpointing=True,
        preview_at_end=False,
    )
    base.update(changes)
    return TrainConfig(**base)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("mixed_precision", PRECISIONS)
def test_the_precision_matrix_on_cuda(
    tmp_path: Path, demo_ckpt: Path, pictures: Path, mixed_precision: str, optimizer: str
):
    check_combination(tmp_path, demo_ckpt, pictures, mixed_precision, optimizer, device=DEVICE)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_trains_the_same_lora_flat_or_separate(
    tmp_path: Path, demo_ckpt: Path, pictures: Path, precision: str
):
    """UNet and text encoder, gradient checkpointing, clipping; fp16 through accelerate's gradient scaler."""
    config = gpu_config(mixed_precision=precision)
    flat = Trainer(new_version(tmp_path / "flat", pictures), config, demo_ckpt, device=DEVICE)
    flat_result = flat.run()
    assert flat.flat and len(flat.optimized) == 2
    assert (getattr(flat.accelerator, "scaler", None) is not None) == (precision == "fp16")
    separate = Trainer(new_version(tmp_path / "separate", pictures), config, demo_ckpt, device=DEVICE)
    separate.flat_layout = False
    separate_result = separate.run()
    assert not separate.flat
    a, b = load_file(str(flat_result.final_file)), load_file(str(separate_result.final_file))
    assert all(torch.isfinite(t).all() for t in a.values())
    assert any(float(t.abs().max()) > 0 for k, t in a.items() if "lora_up" in k)  # B moved off zero
    # GPU kernels are not bit-reproducible from run to run (atomics in the backward), and AdamW's first steps
    # amplify that where a gradient is near zero, so: close, not equal.
    assert relative_difference(a, b) < 0.1
    assert flat_result.losses == pytest.approx(separate_result.losses, rel=1e-2, abs=1e-3)


def test_optimizers_on_the_gpu_step_as_their_references() -> None:
    from lion_pytorch import Lion

    gen = torch.Generator().manual_seed(0)
    shapes = [(64, 4), (4, 320), (7,), (3, 3, 3, 3)]
    start = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(5)]

    def run(make: Any, flat: bool = False) -> list[torch.Tensor]:
        params = [torch.nn.Parameter(t.to(DEVICE, copy=True)) for t in start]
        groups: list[dict[str, Any]] = [{"params": params}]
        flats = flat_params.flatten_groups(groups) if flat else groups
        opt = make(flats)
        for step_grads in grads:
            for p, g in zip(params, step_grads, strict=False):
                if flat:
                    p.grad.copy_(g)
                else:
                    p.grad = g.to(DEVICE)
            opt.step()
        return [p.detach().cpu() for p in params]

    reference = run(lambda g: Lion(g, lr=1e-2, weight_decay=0.1))
    for result in (
        run(lambda g: ForeachLion(g, lr=1e-2, weight_decay=0.1)),
        run(lambda g: ForeachLion(g, lr=1e-2, weight_decay=0.1), flat=True),
    ):
        for x, y in zip(result, reference, strict=False):
            torch.testing.assert_close(x, y)
    adamw = make_optimizer(
        "AdamW", [{"params": [torch.nn.Parameter(torch.ones(3, device=DEVICE))]}], 1e-3, device=torch.device(DEVICE)
    )
    assert adamw.defaults.get("fused") is True  # torch's fused CUDA kernel
    separate = run(lambda g: make_optimizer("AdamW", g, 1e-2, device=torch.device(DEVICE)))
    flat = run(lambda g: make_optimizer("AdamW", g, 1e-2, device=torch.device(DEVICE)), flat=True)
    for x, y in zip(flat, separate, strict=False):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["AdamW8bit", "Lion8bit"])
def test_eight_bit_optimizers_train_on_the_gpu(name: str) -> None:
    pytest.importorskip("bitsandbytes")
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 8)).to(DEVICE)
    opt = make_optimizer(name, [{"params": list(model.parameters())}], 1e-3, device=torch.device(DEVICE))
    x, y = torch.randn(16, 64, device=DEVICE), torch.randn(16, 8, device=DEVICE)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(model(x), y)
        losses.append(float(loss.detach()))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < losses[0]


def test_a_real_out_of_memory_stops_with_advice_and_frees_the_gpu(
    tmp_path: Path, demo_ckpt: Path, pictures: Path, monkeypatch: pytest.MonkeyPatch
):
    from train_tools.ui.jobs import FAILED, FINISHED, JobManager, training_work

    version = new_version(tmp_path, pictures)
    config = gpu_config(epochs=1)
    real_loss = Trainer.loss
    asked: list[bool] = []

    def loss(self: Trainer, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not asked:
            asked.append(True)
            torch.empty(1 << 46, dtype=torch.uint8, device=DEVICE)  # 64 TiB: a real CUDA out-of-memory error
        return real_loss(self, *args, **kwargs)

    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    monkeypatch.setattr(Trainer, "loss", loss)
    jobs = JobManager()
    jobs.start(training_work(version, [config], demo_ckpt, DEVICE))
    status = jobs.wait(300)
    assert status.state == FAILED and "Out of memory" in status.message
    gc.collect()
    assert torch.cuda.memory_allocated() - before < 64 << 20  # the model and optimizer were let go
    jobs.start(training_work(version, [config], demo_ckpt, DEVICE))
    assert jobs.wait(300).state == FINISHED


def test_resume_with_the_fp16_gradient_scaler(tmp_path: Path, demo_ckpt: Path, pictures: Path):
    config = gpu_config(epochs=2)
    version = new_version(tmp_path, pictures)
    straight = Trainer(version, config, demo_ckpt, device=DEVICE, run_name="straight").run()
    stop = StopFlag()

    first = Trainer(
        version, config, demo_ckpt, device=DEVICE, run_name="stopped", stop=stop, reporter=StopsAtStep(stop, 3)
    ).run()
    assert first.interrupted and first.steps == 3
    stopped_state = latest_state(first.run_dir)
    assert stopped_state is not None and stopped_state.scaler and stopped_state.scaler["scale"] > 0
    resumed = Trainer(version, config, demo_ckpt, device=DEVICE, resume_from=first.run_dir).run()
    assert resumed.steps == straight.steps and not resumed.interrupted
    assert resumed.losses[:3] == first.losses
    assert relative_difference(load_file(str(resumed.final_file)), load_file(str(straight.final_file))) < 0.1
