"""Flat LoRA weights (issue 6): the weights and gradients of a group laid end to end in one tensor train to
what the separate tensors train to (up to rounding), with every optimizer that uses the layout, in the trainer
too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from tests import fixtures_training
from train_tools.config import TrainConfig
from train_tools.store import Store
from train_tools.training import optim
from train_tools.training.flat_params import ELEMENTWISE_OPTIMIZERS, flatten_group, flatten_groups, views_intact
from train_tools.training.optim import make_optimizer
from train_tools.training.trainer import Trainer

one_thread = fixtures_training.one_thread
demo_ckpt = fixtures_training.demo_ckpt
pictures = fixtures_training.pictures


def small_model(seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.Flatten(),
        torch.nn.Linear(64, 5),
        torch.nn.Linear(5, 2, bias=False),
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(2, 3, 4, 4, generator=gen), torch.randn(2, 2, generator=gen)


def backward(model: torch.nn.Module, step: int) -> None:
    x, y = batch(step)
    torch.nn.functional.mse_loss(model(x), y).backward()


def test_flattening_keeps_values_and_shares_weights_and_gradients() -> None:
    model = small_model()
    before = [p.detach().clone() for p in model.parameters()]
    params = list(model.parameters())
    flat = flatten_group(params)
    assert flat.numel() == sum(p.numel() for p in params) and flat.dim() == 1
    assert views_intact(flat)
    for p, value in zip(params, before, strict=False):
        torch.testing.assert_close(p.detach(), value, rtol=0, atol=0)
    # Writing the flat tensor writes the model's weights, and backward writes the flat gradient.
    with torch.no_grad():
        flat.add_(1.0)
    torch.testing.assert_close(params[0].detach(), before[0] + 1.0, rtol=0, atol=0)
    reference = small_model()
    with torch.no_grad():
        for p, q in zip(reference.parameters(), params, strict=False):
            p.copy_(q)
    backward(model, 0)
    backward(reference, 0)
    torch.testing.assert_close(
        flat.grad, torch.cat([p.grad.reshape(-1) for p in reference.parameters()]), rtol=0, atol=0
    )


def test_views_intact_sees_a_weight_or_gradient_that_left() -> None:
    model = small_model()
    flat = flatten_group(list(model.parameters()))
    weight = model[2].weight
    weight.data = weight.data.clone()  # what Module.to() does when it has to copy
    assert not views_intact(flat)
    model = small_model()
    flat = flatten_group(list(model.parameters()))
    model[3].weight.grad = None
    assert not views_intact(flat)
    flat = flatten_group([torch.nn.Parameter(torch.ones(3))])
    flat.grad = None  # zero_grad(set_to_none=True) on the flat tensor
    assert not views_intact(flat)


def test_flattening_refuses_what_it_cannot_hold() -> None:
    with pytest.raises(ValueError, match="device and dtype"):
        flatten_group([torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2, dtype=torch.float64))])
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    with pytest.raises(ValueError, match="trainable"):
        flatten_group([frozen])
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="twice"):
        flatten_group([p, p])


def test_groups_keep_their_settings_and_leave_frozen_weights_out() -> None:
    model = small_model()
    model[3].weight.requires_grad_(False)
    groups = [
        {"params": list(model[0].parameters()), "lr": 1e-3},
        {"params": [*model[2].parameters(), model[3].weight], "lr": 5e-4, "weight_decay": 0.0},
    ]
    flat = flatten_groups(groups)
    assert [g["lr"] for g in flat] == [1e-3, 5e-4] and flat[1]["weight_decay"] == 0.0
    assert [len(g["params"]) for g in flat] == [1, 1]
    assert flat[1]["params"][0].views == list(model[2].parameters())
    assert model[3].weight.grad is None  # frozen: not in the flat tensor, never given a gradient


@pytest.mark.parametrize("split_above", [None, 7])
@pytest.mark.parametrize("name", ELEMENTWISE_OPTIMIZERS)
def test_a_flat_group_trains_as_separate_tensors(
    name: str, split_above: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if split_above is not None:  # Lion updates a large flat tensor piece by piece: the same numbers
        monkeypatch.setitem(optim.SPLIT_ABOVE, "cpu", split_above)
    separate, flat_model = small_model(), small_model()

    def groups(model: torch.nn.Module) -> list[dict[str, Any]]:
        return [
            {"params": list(model[0].parameters()), "lr": 3e-2},
            {"params": [*model[2].parameters(), *model[3].parameters()], "lr": 1e-2},
        ]

    opt_separate = make_optimizer(name, groups(separate), 1e-2, device=torch.device("cpu"))
    flat_groups = flatten_groups(groups(flat_model))
    opt_flat = make_optimizer(name, flat_groups, 1e-2, device=torch.device("cpu"))
    flats = [p for g in flat_groups for p in g["params"]]
    for step in range(6):
        backward(separate, step)
        backward(flat_model, step)
        opt_separate.step()
        opt_flat.step()
        opt_separate.zero_grad(set_to_none=True)
        opt_flat.zero_grad(set_to_none=False)
        assert all(views_intact(f) for f in flats)
        assert all(float(f.grad.abs().sum()) == 0.0 for f in flats)
    moved = False
    for p, q, start in zip(separate.parameters(), flat_model.parameters(), small_model().parameters(), strict=False):
        # The same update, up to rounding: torch's fused kernels take a vectorised path over a long tensor
        # and a scalar one at the tail of each tensor, whose last bits can differ.
        torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-5, atol=1e-7)
        moved |= not torch.equal(p.detach(), start.detach())
    assert moved


def test_clipping_a_flat_group_is_clipping_its_tensors() -> None:
    separate, flat_model = small_model(), small_model()
    flat = flatten_group(list(flat_model.parameters()))
    backward(separate, 0)
    backward(flat_model, 0)
    norm_separate = torch.nn.utils.clip_grad_norm_(list(separate.parameters()), 0.01)
    norm_flat = torch.nn.utils.clip_grad_norm_([flat], 0.01)
    assert float(norm_separate) > 0.01  # the clipping did something
    torch.testing.assert_close(norm_flat, norm_separate)
    for p, q in zip(separate.parameters(), flat_model.parameters(), strict=False):
        torch.testing.assert_close(q.grad, p.grad)


# ------------------------------------------------------------------------------------------- the trainer
def lora_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as fh:
        return {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118 - safe_open is not iterable


def train_once(
    data_dir: Path, pictures: Path, ckpt: Path, config: TrainConfig, *, flat_layout: bool = True
) -> tuple[Path, Trainer]:
    from train_tools.data.uploads import add_originals

    store = Store(data_dir)
    store.create_project("p")
    version = store.create_version("p", "v1")
    add_originals([pictures], version.originals_dir)
    trainer = Trainer(version, config, ckpt, device="cpu")
    trainer.flat_layout = flat_layout
    result = trainer.run()
    assert result.final_file is not None
    return result.final_file, trainer


@pytest.mark.parametrize("optimizer, max_grad_norm", [("AdamW", 1e-3), ("Lion", 0.0)])
def test_the_trainer_trains_the_same_lora_flat_or_not(
    tmp_path: Path, demo_ckpt: Path, pictures: Path, optimizer: str, max_grad_norm: float
) -> None:
    # UNet and text encoder (two groups), clip skip 2 (the last text layer's LoRA gets no gradient).
    config = TrainConfig(
        resolution=64,
        min_bucket_reso=64,
        max_bucket_reso=128,
        network_dim=2,
        network_alpha=1.0,
        repeats=2,
        batch_size=1,
        epochs=2,
        optimizer=optimizer,
        save_precision="fp32",
        max_token_length=75,
        train_text_encoder=True,
        clip_skip=2,
        mixed_precision="no",
        max_grad_norm=max_grad_norm,
        learning_rate=1e-3,
        text_encoder_lr=5e-4,
    )
    flat_file, flat_trainer = train_once(tmp_path / "flat", pictures, demo_ckpt, config)
    assert flat_trainer.flat and len(flat_trainer.optimized) == 2  # one flat tensor per group
    separate_file, separate_trainer = train_once(tmp_path / "separate", pictures, demo_ckpt, config, flat_layout=False)
    assert not separate_trainer.flat and len(separate_trainer.optimized) > 2
    flat, separate = lora_tensors(flat_file), lora_tensors(separate_file)
    assert flat.keys() == separate.keys() and any(".lora_te_" in k or k.startswith("lora_te") for k in flat)
    for key in flat:
        torch.testing.assert_close(flat[key], separate[key], msg=lambda m, k=key: f"{k}: {m}")
    assert any(float(separate[k].abs().sum()) > 0 for k in separate if "lora_up" in k)  # B moved off zero
