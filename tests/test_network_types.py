"""The network types (LoRA, LoCon, LoHa, LoKr, DoRA): the weight every host computes from the file equals the
weight the trained network used, on every layer and at several multipliers; the files' names and metadata;
full-size layouts; each type trains."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from PIL import Image

from tests.test_lora_format import tiny_text_encoder, tiny_unet
from tests.webui_formula import a1111_update, comfyui_dora_update
from train_tools.config import NETWORK_TYPES, TrainConfig
from train_tools.models import configs
from train_tools.networks.install import install_lora
from train_tools.networks.lokr import peft_scales_lokr
from train_tools.networks.lora_format import _base_path, kohya_state_dict, read_lora, save_lora
from train_tools.networks.targets import text_encoder_target_modules, unet_target_modules
from train_tools.networks.types import attach_network, network_metadata, network_parameters
from train_tools.networks.weights import weight_update

RANK, ALPHA, CONV = 4, 2.0, (3, 1.5)
# The tensor names of one layer of each type (a LoKr's w2 is low-rank or full by the layer's size).
PARTS = {
    "lora": {"lora_down.weight", "lora_up.weight", "alpha"},
    "locon": {"lora_down.weight", "lora_up.weight", "alpha"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
    "lokr": {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"},
    "dora": {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"},
}


def trained_models(network_type: str, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A tiny UNet (with its convolutions) and text encoder with a network whose weights are all moved away
    from their start, as training would."""
    torch.manual_seed(seed)
    unet, te = tiny_unet(), tiny_text_encoder()
    attach_network(unet, unet_target_modules(unet, conv=True), network_type, RANK, ALPHA, CONV, factor=-1)
    attach_network(te, text_encoder_target_modules(te), network_type, RANK, ALPHA, None, factor=-1)
    with torch.no_grad():
        for param in network_parameters(unet) + network_parameters(te):
            param.mul_(1 + 0.2 * torch.randn_like(param)).add_(0.05 * torch.randn_like(param))
    return unet, te


def file_groups(unet: torch.nn.Module, te: torch.nn.Module, tmp_path: Path) -> dict[str, dict[str, torch.Tensor]]:
    path = tmp_path / "net.safetensors"
    save_lora(path, kohya_state_dict(unet=unet, text_encoders=[te], family="sd1"), {}, dtype=torch.float32)
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in read_lora(path)[0].items():
        name, _, part = key.partition(".")
        groups[name][part] = tensor
    return groups


def adapted_layers(model: torch.nn.Module, prefix: str, text_encoder: bool) -> dict[str, torch.nn.Module]:
    return {
        f"{prefix}_{_base_path(path, text_encoder).replace('.', '_')}": module
        for path, module in model.named_modules()
        if isinstance(module, BaseTunerLayer)
    }


def module_named(model: torch.nn.Module, suffix: str) -> torch.nn.Module:
    """A layer by its path without transformers 4's ``text_model.`` (transformers 5 dropped it)."""
    return next(m for n, m in model.named_modules() if n == suffix or n.endswith("." + suffix))


def outputs(layer: torch.nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """What a plain layer with ``weight`` (and the layer's bias, stride, padding) computes from ``x``."""
    base = layer.get_base_layer()
    if isinstance(base, torch.nn.Conv2d):
        return F.conv2d(x, weight, base.bias, base.stride, base.padding, base.dilation, base.groups)
    return F.linear(x, weight, base.bias)


@pytest.mark.parametrize("network_type", NETWORK_TYPES)
def test_the_hosts_weight_is_the_trained_networks_on_every_layer(network_type: str, tmp_path: Path) -> None:
    """For every layer: the layer as A1111 merges it from the file, at multipliers 0, 0.5 and 1, computes what
    the trained network computes (its output at 1, the base layer's plus that share of the change at 0.5 and
    0); ComfyUI's and Forge's DoRA gives the same; the previewer's merge is the same formula."""
    unet, te = trained_models(network_type)
    groups = file_groups(unet, te, tmp_path)
    layers = {**adapted_layers(unet, "lora_unet", False), **adapted_layers(te, "lora_te", True)}
    assert set(groups) == set(layers)  # every layer written, no key left without a layer
    conv_layers = 0
    for name, layer in layers.items():
        parts = groups[name]
        assert set(parts) <= PARTS[network_type], name
        base = layer.get_base_layer()
        conv_layers += isinstance(base, torch.nn.Conv2d) and base.kernel_size != (1, 1)
        shape = (2, base.in_channels, 8, 8) if isinstance(base, torch.nn.Conv2d) else (3, base.in_features)
        x = torch.randn(shape)
        with torch.no_grad():
            trained, plain = layer(x), base(x)
            weight = base.weight.float()
            for multiplier in (0.0, 0.5, 1.0):
                update = a1111_update(parts, weight, multiplier)
                expected = plain + multiplier * (trained - plain)
                torch.testing.assert_close(outputs(layer, x, weight + update), expected, rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(weight_update(parts, weight, multiplier), update, rtol=1e-5, atol=1e-6)
                if "dora_scale" in parts:
                    comfy = comfyui_dora_update(parts, weight, multiplier)
                    torch.testing.assert_close(comfy, update, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(trained, plain)  # the network changes every layer
    assert conv_layers > 0  # the 3x3 convolutions are part of it, for every type


def test_dora_writes_the_input_axis_that_every_host_reads(tmp_path: Path) -> None:
    """Our ``dora_scale`` has A1111's shape (1, in[, 1, 1]); a scale of the output axis (what peft and LyCORIS
    3.2+ write) is silently misread by A1111's formula, which is why the trainer uses the input axis."""
    unet, te = trained_models("dora")
    groups = file_groups(unet, te, tmp_path)
    linear = groups["lora_te_text_model_encoder_layers_0_mlp_fc1"]
    conv = groups["lora_unet_down_blocks_0_resnets_0_conv1"]
    assert linear["dora_scale"].shape == (1, 32) and conv["dora_scale"].shape == (1, 32, 1, 1)
    layer = module_named(te, "encoder.layers.0.mlp.fc1")
    weight = layer.get_base_layer().weight.float()
    out_axis = dict(linear, dora_scale=torch.rand(weight.shape[0], 1) + 0.5)
    a1111, comfy = a1111_update(out_axis, weight, 1.0), comfyui_dora_update(out_axis, weight, 1.0)
    assert a1111.shape == weight.shape and not torch.allclose(a1111, comfy, rtol=1e-2)


def test_lokr_with_both_sides_full_carries_its_scale(tmp_path: Path) -> None:
    """A large rank makes both LoKr sides full; the hosts then scale by 1, so the file's w2 carries the scale
    the layer trained with (the first test checks the numbers; here that the case really occurs)."""
    torch.manual_seed(0)
    te = tiny_text_encoder()
    attach_network(te, text_encoder_target_modules(te), "lokr", 64, 8.0, None)
    with torch.no_grad():
        for param in network_parameters(te):
            param.add_(0.1 * torch.randn_like(param))
    groups = file_groups(tiny_unet_with("lokr"), te, tmp_path)
    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    layer = module_named(te, "encoder.layers.0.self_attn.q_proj")
    assert {"lokr_w1", "lokr_w2"} <= set(groups[name])
    scale = 8.0 / 64 if peft_scales_lokr() else 1.0  # peft 0.13 (Forge's) trains LoKr without alpha / rank
    torch.testing.assert_close(groups[name]["lokr_w2"], layer.lokr_w2["default"].detach() * scale)


def tiny_unet_with(network_type: str) -> torch.nn.Module:
    unet = tiny_unet()
    attach_network(unet, unet_target_modules(unet), network_type, RANK, ALPHA)
    return unet


# Full-size layers per family (kohya's LierLa counts: UNet, then each text encoder).
FULL_COUNTS = {"sd1": (192, (72,)), "sd2": (192, (138,)), "sdxl": (722, (72, 192))}
TE_PREFIXES = {"sd1": ("lora_te",), "sd2": ("lora_te",), "sdxl": ("lora_te1", "lora_te2")}


def locon_layers(unet: torch.nn.Module) -> set[str]:
    """The layers LoCon adds, counted from the model's blocks (not from targets.py): per ResNet block conv1,
    conv2, time_emb_proj and a conv_shortcut where it has one; per down/up-sampler its conv."""
    found = set()
    for name, module in unet.named_modules():
        cls = type(module).__name__
        if cls == "ResnetBlock2D":
            children = ["conv1", "conv2", "time_emb_proj"] + (["conv_shortcut"] if module.conv_shortcut else [])
        elif cls in ("Downsample2D", "Upsample2D"):
            children = ["conv"]
        else:
            continue
        found.update(f"lora_unet_{name}.{child}".replace(".", "_") for child in children)
    return found


@pytest.mark.parametrize("network_type", NETWORK_TYPES)
@pytest.mark.parametrize("family", ("sd1", "sd2", "sdxl"))
def test_full_size_layouts_per_family_and_type(family: str, network_type: str) -> None:
    """SD1.5, SD2 and SDXL at full size (their published configs, meta device): every type adapts kohya's
    layers under the hosts' names (LoCon adds exactly the ResNet and sampler layers), each with its type's
    tensor names and no others."""
    model_spec = configs.spec(family)
    unet = configs.build_unet(model_spec, empty=True)
    tes = configs.build_text_encoders(model_spec, empty=True)
    conv = (8, 4.0) if network_type == "locon" else None
    attach_network(unet, unet_target_modules(unet, conv=conv is not None), network_type, RANK, ALPHA, conv)
    for te in tes:
        attach_network(te, text_encoder_target_modules(te), network_type, RANK, ALPHA, None)
    tensors = kohya_state_dict(unet=unet, text_encoders=tes, family=family)
    unet_count, te_counts = FULL_COUNTS[family]
    unet_names = layer_names_of(tensors, "lora_unet")
    extra = {n for n in unet_names if "_resnets_" in n or "samplers_" in n}
    assert len(unet_names - extra) == unet_count
    assert extra == (locon_layers(unet) if conv else set())
    for prefix, count in zip(TE_PREFIXES[family], te_counts, strict=True):
        assert len(layer_names_of(tensors, prefix)) == count
    assert {k.partition(".")[0] for k in tensors} == unet_names | {
        n for prefix in TE_PREFIXES[family] for n in layer_names_of(tensors, prefix)
    }
    by_layer: dict[str, set[str]] = defaultdict(set)
    for key in tensors:
        name, _, part = key.partition(".")
        by_layer[name].add(part)
    assert all(parts <= PARTS[network_type] and "alpha" in parts for parts in by_layer.values())
    if network_type == "dora":
        assert all("dora_scale" in parts for parts in by_layer.values())
    if conv and family == "sd1":  # kohya's LoCon on SD1.5: 278 layers, named as kohya does, at the conv dim
        assert len(unet_names) == 278
        assert "lora_unet_down_blocks_2_downsamplers_0_conv" in unet_names
        assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (8, 320, 3, 3)


def layer_names_of(tensors: dict, prefix: str) -> set[str]:
    return {k.partition(".")[0] for k in tensors if k.startswith(prefix + "_")}


@pytest.mark.parametrize("network_type", NETWORK_TYPES)
def test_each_type_learns(network_type: str) -> None:
    """A few optimizer steps on one fixed batch lower the tiny UNet's loss by a tenth, and every weight of the
    network moves (none is left out of the graph; the zero-started half of each pair gets its gradient first)."""
    torch.manual_seed(0)
    unet = tiny_unet()
    attach_network(unet, unet_target_modules(unet, conv=True), network_type, RANK, ALPHA, CONV)
    params = network_parameters(unet)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    latents, context = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 32)
    target, timesteps = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    start = [p.detach().clone() for p in params]
    losses = []
    for _ in range(15):
        loss = F.mse_loss(unet(latents, timesteps, context).sample, target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.9 * losses[0]
    assert all(not torch.equal(p, p0) for p, p0 in zip(params, start, strict=True))


def test_metadata_per_type() -> None:
    """``ss_network_module`` / ``ss_network_args`` as kohya (LoRA, LoCon) and LyCORIS (others) write them."""
    config = TrainConfig(network_dim=8, network_alpha=4.0)
    assert network_metadata(config) == ("networks.lora", {})
    assert network_metadata(config.updated({"network_type": "locon"})) == (
        "networks.lora",
        {"conv_dim": "8", "conv_alpha": "4.0"},
    )
    assert network_metadata(config.updated({"network_type": "loha", "conv_dim": 4, "conv_alpha": 2})) == (
        "lycoris.kohya",
        {"algo": "loha", "conv_dim": "4", "conv_alpha": "2.0"},
    )
    assert network_metadata(config.updated({"network_type": "lokr", "lokr_factor": 8})) == (
        "lycoris.kohya",
        {"algo": "lokr", "factor": "8"},
    )
    module, args = network_metadata(config.updated({"network_type": "dora"}))
    assert module == "lycoris.kohya" and args == {"algo": "locon", "dora_wd": "True", "wd_on_output": "False"}
    with pytest.raises(Exception, match="lokr_factor"):
        config.updated({"lokr_factor": 1})
    assert json.dumps(args)  # JSON, as the file stores it


@pytest.mark.parametrize("network_type", NETWORK_TYPES)
def test_install_keeps_every_types_tensors_and_gives_it_a_card(network_type: str, tmp_path: Path) -> None:
    """Installed into the Lora folder, a file of each type keeps its tensors bit for bit and its
    ``ss_network_module`` / ``ss_network_args``, with the cover picture and the card's user metadata."""
    unet, te = trained_models(network_type)
    module, args = network_metadata(TrainConfig(network_type=network_type))
    meta = {"ss_network_module": module, "ss_network_args": json.dumps(args), "ss_base_model_version": "sd_v1"}
    source = tmp_path / "trained.safetensors"
    save_lora(source, kohya_state_dict(unet=unet, text_encoders=[te], family="sd1"), meta, dtype=torch.float32)
    cover = tmp_path / "cover.png"
    Image.new("RGB", (32, 24), (200, 30, 30)).save(cover)
    installed = install_lora(source, tmp_path / "Lora", weight=0.8, activation_text="sks", preview=cover)
    tensors, metadata = read_lora(installed)
    original, _ = read_lora(source)
    assert tensors.keys() == original.keys() and all(torch.equal(tensors[k], original[k]) for k in original)
    assert metadata["ss_network_module"] == module and json.loads(metadata["ss_network_args"]) == args
    assert json.loads(metadata["ssmd_cover_images"])
    assert installed.with_suffix(".preview.png").is_file()
    card = json.loads(installed.with_suffix(".json").read_text())
    assert card["sd version"] == "SD1" and card["activation text"] == "sks" and card["preferred weight"] == 0.8
