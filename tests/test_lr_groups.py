"""Learning rates and dims by part (issue 18, item 5): LoRA+ and kohya's block LR weights reach the optimizer's
groups, a block of weight 0 is left out of the network, block dims and alphas give each block its own, and the
file's ``ss_network_args`` records them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests import fixtures_training
from tests.test_precision import new_version
from train_tools.config import TrainConfig
from train_tools.errors import UserError
from train_tools.models.configs import build_unet, spec
from train_tools.networks.blocks import unet_block
from train_tools.networks.targets import unet_target_modules
from train_tools.networks.types import network_metadata
from train_tools.training.trainer import Trainer

demo_ckpt = fixtures_training.demo_ckpt
pictures = fixtures_training.pictures
one_thread = fixtures_training.one_thread

DOWN = "1,0.5,1,2,1,1,1,1,1,1,1,1"  # IN01 at half the rate, IN03 (the first downsampler) at twice


@pytest.mark.parametrize(
    ("path", "block"),
    [
        ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", ("down", 1)),
        ("down_blocks.0.resnets.1.conv1", ("down", 2)),
        ("down_blocks.0.downsamplers.0.conv", ("down", 3)),
        ("down_blocks.2.attentions.1.proj_out", ("down", 8)),
        ("down_blocks.3.resnets.1.conv2", ("down", 11)),
        ("mid_block.attentions.0.proj_in", ("mid", 0)),
        ("up_blocks.0.resnets.2.conv1", ("up", 2)),
        ("up_blocks.0.upsamplers.0.conv", ("up", 2)),
        ("up_blocks.1.attentions.0.proj_in", ("up", 3)),
        ("up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2", ("up", 11)),
        ("conv_in", None),
    ],
)
def test_unet_blocks_are_numbered_as_kohya_numbers_them(path: str, block: tuple[str, int] | None) -> None:
    assert unet_block(path) == block


def test_every_sd15_layer_with_a_network_lies_in_a_block() -> None:
    """On the full-size SD1.5 layout: IN01-IN11 (no IN00), the middle block and OUT00-OUT11, each has layers."""
    with torch.device("meta"):
        unet = build_unet(spec("sd1"))
    blocks = {unet_block(t) for t in unet_target_modules(unet, conv=True)}
    assert blocks == {("down", i) for i in range(1, 12)} | {("mid", 0)} | {("up", i) for i in range(12)}


def settings(**changes: object) -> TrainConfig:
    base = dict(resolution=64, network_dim=8, network_alpha=4.0, epochs=1, repeats=1, batch_size=1)
    base.update(optimizer="AdamW", learning_rate=1e-3, unet_lr=2e-3, preview_at_end=False, max_token_length=75)
    return TrainConfig().updated({**base, **changes})


def expected_lr(name: str, config: TrainConfig, unet: bool) -> float:
    rate = config.effective_unet_lr() if unet else config.effective_text_encoder_lr()
    block = unet_block(name) if unet else None
    if block is not None and block[0] == "down":
        rate *= [float(v) for v in config.down_lr_weight.split(",")][block[1]]
    if block == ("mid", 0):
        rate *= float(config.mid_lr_weight)
    return rate * (config.loraplus_lr_ratio if "lora_B" in name else 1.0)


@pytest.mark.parametrize("network_type", ["lora", "dora"])
def test_loraplus_and_block_weights_reach_the_optimizer(
    tmp_path: Path, demo_ckpt: Path, pictures: Path, one_thread: None, network_type: str
) -> None:
    """Each weight trains at its rate: the optimizer's groups hold, per rate, exactly the weights that rate
    belongs to (the flat layout puts a group's weights end to end: counted in values)."""
    config = settings(network_type=network_type, loraplus_lr_ratio=16.0, down_lr_weight=DOWN, mid_lr_weight="0.25")
    trainer = Trainer(new_version(tmp_path, pictures), config, demo_ckpt, device="cpu")
    trainer.prepare()
    wanted: dict[float, int] = {}
    parts = [(trainer.model.unet, True), *((te, False) for te in trainer.tes)]
    for model, unet in parts:
        for name, param in model.named_parameters():
            if param.requires_grad:
                rate = expected_lr(name, config, unet)
                wanted[rate] = wanted.get(rate, 0) + param.numel()
    got: dict[float, int] = {}
    for group in trainer.optimizer.param_groups:
        got[group["lr"]] = got.get(group["lr"], 0) + sum(p.numel() for p in group["params"])
    assert got == pytest.approx(wanted) and len(got) >= 6  # base, half, twice, mid; each with LoRA+'s up side
    assert trainer.optimizer.param_groups[0]["lr"] != config.effective_unet_lr()  # IN01's, at half the rate
    assert trainer._step_info(1, 1, [1.0], 0.0).lr == pytest.approx(config.effective_unet_lr())  # what is shown
    args = network_metadata(config)[1]
    assert args["loraplus_lr_ratio"] == "16.0" and args["down_lr_weight"] == DOWN and args["mid_lr_weight"] == "0.25"
    assert "up_lr_weight" not in args


def test_a_block_of_weight_zero_has_no_network(tmp_path: Path, demo_ckpt: Path, pictures: Path, one_thread: None):
    zeros = ",".join(["0"] * 12)
    trainer = Trainer(new_version(tmp_path, pictures), settings(down_lr_weight=zeros), demo_ckpt, device="cpu")
    trainer.prepare()
    adapted = {n for n, p in trainer.model.unet.named_parameters() if p.requires_grad}
    assert adapted and not any(n.startswith("down_blocks.") for n in adapted)
    assert any(n.startswith("up_blocks.") for n in adapted)


@pytest.mark.parametrize(
    ("changes", "said"),
    [
        ({"down_lr_weight": "1,1,1"}, "takes 12 numbers"),
        ({"mid_lr_weight": "1,2"}, "takes one number"),
        ({"up_lr_weight": "1,x,1,1,1,1,1,1,1,1,1,1"}, "must be numbers apart by commas"),
        ({"up_lr_weight": ",".join(["-1"] * 12)}, "must lie in 0-100"),
        ({"loraplus_lr_ratio": 16.0, "network_type": "loha"}, "loha has none"),
        ({"loraplus_lr_ratio": 16.0, "optimizer": "Prodigy"}, "Prodigy takes one learning rate"),
    ],
)
def test_bad_lr_settings_are_refused_before_a_run(changes: dict[str, object], said: str) -> None:
    with pytest.raises(UserError, match=said):
        TrainConfig.from_dict(changes)


# A dim and an alpha per block (IN00-IN11, MID, OUT00-OUT11): 2, 3 or 4 by turns, OUT00 (13) left out.
BLOCK_DIMS = [0 if i == 13 else 2 + i % 3 for i in range(25)]
BLOCK_ALPHAS = [float(1 + i % 2) for i in range(25)]


@pytest.mark.parametrize("network_type", ["lora", "locon", "loha", "dora"])
def test_block_dims_give_each_block_its_dim_and_alpha(
    tmp_path: Path, demo_ckpt: Path, pictures: Path, one_thread: None, network_type: str
) -> None:
    """kohya's block_dims / block_alphas (and conv_block_dims for the convolutions): every layer of a block has
    the block's dim and alpha in the file, a block of dim 0 has none, and ss_network_args records them."""
    from train_tools.networks.blocks import block_number
    from train_tools.networks.lora_format import kohya_state_dict

    conv_dims = [3 if i % 2 else 0 for i in range(25)]  # the convolutions in every other block
    changes: dict[str, object] = dict(
        network_type=network_type,
        block_dims=",".join(map(str, BLOCK_DIMS)),
        block_alphas=",".join(map(str, BLOCK_ALPHAS)),
    )
    if network_type == "locon":
        changes.update(conv_dim=5, conv_alpha=1.0, conv_block_dims=",".join(map(str, conv_dims)))
    config = settings(**changes)
    trainer = Trainer(new_version(tmp_path, pictures), config, demo_ckpt, device="cpu")
    trainer.prepare()
    tensors = kohya_state_dict(trainer.model.unet, [], "sd1")
    down = "hada_w1_b" if network_type == "loha" else "lora_down.weight"
    seen_blocks, convs = set(), 0
    for key, weight in tensors.items():
        if not key.endswith(down):
            continue
        layer = key[: -len(down) - 1]
        path = next(p for p, _ in trainer.model.unet.named_modules() if f"lora_unet_{p.replace('.', '_')}" == layer)
        number = block_number(path)
        is_conv = weight.dim() == 4 and weight.shape[-1] == 3
        assert number is not None and (conv_dims if is_conv else BLOCK_DIMS)[number] > 0
        wanted = (conv_dims[number], 1.0) if is_conv else (BLOCK_DIMS[number], BLOCK_ALPHAS[number])
        assert (int(weight.shape[0]), float(tensors[f"{layer}.alpha"])) == wanted, key
        seen_blocks |= set() if is_conv else {number}
        convs += is_conv
    assert 13 not in seen_blocks and len(seen_blocks) >= 3  # the tiny UNet has few blocks
    assert (convs > 0) == (network_type == "locon")
    args = network_metadata(config)[1]
    assert args["block_dims"] == config.block_dims and args["block_alphas"] == config.block_alphas


@pytest.mark.parametrize(
    ("changes", "said"),
    [
        ({"block_dims": "4,4"}, "takes 25 numbers"),
        ({"block_dims": ",".join(["2.5"] * 25)}, "whole numbers"),
        ({"block_alphas": ",".join(["1"] * 25)}, "needs 'block_dims' beside it"),
        ({"conv_block_dims": ",".join(["1"] * 25), "network_type": "lora", "conv_dim": 0}, "needs the convolutions"),
    ],
)
def test_bad_block_dims_are_refused(changes: dict[str, object], said: str) -> None:
    with pytest.raises(UserError, match=said):
        TrainConfig.from_dict(changes)
