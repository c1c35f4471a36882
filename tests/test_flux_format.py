"""FLUX.1 LoRA files in kohya's layout (issue 19, a first part): from a LoRA on diffusers' FLUX.1 transformer,
every double and single block layer kohya targets, with q/k/v (and a single block's MLP input) written as one
fused layer; diffusers' own reader of kohya FLUX files takes every key and gives back each layer's update, and the
hosts' formula on the fused layer gives each part's. Training FLUX.1 is not in this version yet."""

from __future__ import annotations

import pytest
import torch

try:
    from diffusers import FluxTransformer2DModel  # noqa: F401 - the host's diffusers may predate FLUX.1 (0.30)
except (ImportError, RuntimeError) as exc:
    pytest.skip(f"this diffusers has no FLUX.1 transformer: {exc}", allow_module_level=True)

from train_tools.models.flux import FLUX1_DEV, build_flux_transformer
from train_tools.networks.flux_format import bfl_name, flux_kohya_state_dict, flux_target_modules
from train_tools.networks.lora import attach_lora


def adapted(rank: int = 4, alpha: float = 2.0, full_width: bool = False) -> torch.nn.Module:
    """The tiny FLUX.1 transformer with a LoRA, or one of the full model's width (one double and one single
    block, its weights left unset: only the LoRA's count), as diffusers' reader knows FLUX.1's sizes only."""
    torch.manual_seed(0)
    if full_width:
        from diffusers import FluxTransformer2DModel

        config = {**FLUX1_DEV, "num_layers": 1, "num_single_layers": 1, "joint_attention_dim": 32}
        with torch.device("meta"):
            transformer = FluxTransformer2DModel(**{**config, "pooled_projection_dim": 32, "in_channels": 4})
        transformer = transformer.to_empty(device="cpu")
    else:
        transformer = build_flux_transformer(tiny=True)
    attach_lora(transformer, flux_target_modules(transformer), rank, alpha)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.1)  # a trained-looking update everywhere
    return transformer


def deltas(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Each adapted layer's update ``scale * B @ A``, by its diffusers path."""
    out = {}
    for path, module in transformer.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            out[path] = (b @ a * module.scaling["default"]).detach()
    return out


def test_kohyas_targets_and_names_on_the_full_size_layout() -> None:
    with torch.device("meta"):
        transformer = build_flux_transformer()
    targets = flux_target_modules(transformer)
    assert len(targets) == 19 * 14 + 38 * 6  # every Linear of the 19 double and 38 single blocks
    names = {bfl_name(t)[0] for t in targets}
    assert len(names) == 19 * 10 + 38 * 3
    assert "lora_unet_double_blocks_18_img_attn_qkv" in names and "lora_unet_single_blocks_37_linear1" in names
    assert bfl_name("single_transformer_blocks.3.proj_mlp") == ("lora_unet_single_blocks_3_linear1", 3)


def test_the_file_is_read_by_diffusers_without_a_key_left_and_means_the_same() -> None:
    lora_conversion = pytest.importorskip("diffusers.loaders.lora_conversion_utils")
    convert = getattr(lora_conversion, "_convert_kohya_flux_lora_to_diffusers", None)
    if convert is None:
        pytest.skip("this diffusers has no reader of kohya FLUX.1 files")
    transformer = adapted(rank=2, alpha=1.0, full_width=True)
    ours = deltas(transformer)
    state = flux_kohya_state_dict(transformer)
    assert all(k.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_")) for k in state)
    read = convert(dict(state))
    modules = dict(transformer.named_modules())
    got = {}
    for key, down in read.items():
        if key.endswith(".lora_A.weight"):
            path = key[len("transformer.") : -len(".lora_A.weight")]
            assert path in modules, key  # a layer of the model
            got[path] = read[f"transformer.{path}.lora_B.weight"] @ down
    assert set(got) == set(ours)  # every layer, no key left over
    for path, delta in ours.items():
        assert torch.allclose(got[path], delta, atol=1e-5), path


def test_the_hosts_formula_on_a_fused_layer_gives_each_part_its_update() -> None:
    """ComfyUI, Forge: ``W += up @ down * alpha / rank`` on BFL's fused weight; its rows are the parts'."""
    transformer = adapted(rank=4, alpha=2.0)
    ours = deltas(transformer)
    state = flux_kohya_state_dict(transformer)
    name = "lora_unet_single_blocks_0_linear1"
    up, down, alpha = state[f"{name}.lora_up.weight"], state[f"{name}.lora_down.weight"], state[f"{name}.alpha"]
    assert down.shape[0] == 16 and float(alpha) == 8.0  # four parts of rank 4 and alpha 2
    fused = up @ down * (float(alpha) / down.shape[0])
    parts = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]
    wanted = torch.cat([ours[f"single_transformer_blocks.0.{p}"] for p in parts], dim=0)
    assert torch.allclose(fused, wanted, atol=1e-6)
    plain = "lora_unet_double_blocks_0_img_mod_lin"
    delta = state[f"{plain}.lora_up.weight"] @ state[f"{plain}.lora_down.weight"] * float(state[f"{plain}.alpha"]) / 4
    assert torch.allclose(delta, ours["transformer_blocks.0.norm1.linear"], atol=1e-6)
