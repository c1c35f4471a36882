"""Key conversion between the original single-file layout and diffusers/transformers, both directions."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from tests.helpers_models import assert_same_weights, save_safetensors, tiny_models
from train_tools.errors import UserError
from train_tools.models.configs import build_text_encoders, build_unet, build_vae, spec
from train_tools.models.convert import (
    ComponentStateDicts,
    components_from_models,
    diffusers_to_original,
    key_map,
    original_to_diffusers,
)
from train_tools.models.loader import load_model


@pytest.mark.parametrize("family", ["sd1", "sdxl", "sd2"])
def test_tiny_round_trip_through_a_single_file(tmp_path: Path, family: str):
    model_spec, unet, vae, tes = tiny_models(family, seed=3)
    original = diffusers_to_original(components_from_models(unet, vae, tes), model_spec)
    assert all(
        k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner."))
        for k in original
    )
    path = save_safetensors(tmp_path / f"{family}.safetensors", original)
    # SD2 512 vs 768-v: say it with a sidecar config, as WebUI users do.
    if family == "sd2":
        (tmp_path / "sd2.yaml").write_text("model:\n  params:\n    linear_start: 0.00085\n")
    loaded = load_model(path)
    assert loaded.family == family
    assert loaded.spec.tiny
    compared = assert_same_weights(unet, loaded.unet) + assert_same_weights(vae, loaded.vae)
    assert len(loaded.text_encoders) == len(tes)
    for want, got in zip(tes, loaded.text_encoders, strict=False):
        assert type(got) is type(want)
        compared += assert_same_weights(want, got)
    # Every tensor of the file went somewhere (fused q/k/v count three times on the diffusers side).
    assert compared >= len(original)


def test_openclip_text_encoder_layout_sd2():
    """SD2's OpenCLIP: fused in_proj q/k/v, resblocks, positional_embedding, ln_final; the extra last layer
    of the original file (and EMA/schedule leftovers) is ignored on load and never written."""
    model_spec, unet, vae, tes = tiny_models("sd2", seed=1)
    (te,) = tes
    original = diffusers_to_original(components_from_models(unet, vae, tes), model_spec)
    prefix = "cond_stage_model.model."
    te_sd = {k: v for k, v in te.state_dict().items()}
    layer0 = {k.split("layers.0.")[1]: v for k, v in te_sd.items() if "layers.0." in k}
    fused_w = original[prefix + "transformer.resblocks.0.attn.in_proj_weight"]
    fused_b = original[prefix + "transformer.resblocks.0.attn.in_proj_bias"]
    hidden = model_spec.text_encoders[0].config["hidden_size"]
    assert fused_w.shape == (3 * hidden, hidden)
    assert torch.equal(
        fused_w,
        torch.cat(
            [layer0["self_attn.q_proj.weight"], layer0["self_attn.k_proj.weight"], layer0["self_attn.v_proj.weight"]]
        ),
    )
    assert torch.equal(fused_b[hidden : 2 * hidden], layer0["self_attn.k_proj.bias"])
    assert torch.equal(original[prefix + "transformer.resblocks.0.mlp.c_fc.weight"], layer0["mlp.fc1.weight"])
    positions = next(v for k, v in te_sd.items() if k.endswith("position_embedding.weight"))
    assert torch.equal(original[prefix + "positional_embedding"], positions)
    assert torch.equal(original[prefix + "token_embedding.weight"], te.get_input_embeddings().weight)
    layers = model_spec.text_encoders[0].config["num_hidden_layers"]
    assert not any(k.startswith(f"{prefix}transformer.resblocks.{layers}.") for k in original)
    assert not any(".self_attn." in k or "q_proj" in k for k in original)

    # A real SD2 file has one more resblock, the CLIP logit scale, projection, EMA and schedule buffers.
    extra = dict(original)
    for name, tensor in list(original.items()):
        if name.startswith(prefix + "transformer.resblocks.0."):
            extra[name.replace("resblocks.0.", f"resblocks.{layers}.")] = torch.randn_like(tensor)
    extra[prefix + "logit_scale"] = torch.tensor(4.6)
    extra[prefix + "text_projection"] = torch.randn(hidden, 16)
    extra["model_ema.decay"] = torch.tensor(0.999)
    extra["alphas_cumprod"] = torch.rand(1000)
    back = original_to_diffusers(extra, model_spec)
    (te_back,) = back.text_encoders
    for key, tensor in te_sd.items():
        if key.endswith("position_ids"):
            continue
        canonical = key if key.startswith("text_model.") else "text_model." + key
        assert torch.equal(te_back[canonical], tensor), key
    assert len(te_back) == len([k for k in te_sd if not k.endswith("position_ids")])


def test_sdxl_second_encoder_projection_is_transposed():
    model_spec, unet, vae, tes = tiny_models("sdxl", seed=2)
    original = diffusers_to_original(components_from_models(unet, vae, tes), model_spec)
    proj = tes[1].text_projection.weight  # (projection_dim, hidden) in transformers
    stored = original["conditioner.embedders.1.model.text_projection"]
    assert stored.shape == (proj.shape[1], proj.shape[0])
    assert torch.equal(stored, proj.t())
    # The first encoder keeps the transformers names under the embedder's prefix.
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in original
    assert "model.diffusion_model.label_emb.0.0.weight" in original
    # Applied as x @ P in the original, as a Linear in transformers: the same numbers come out.
    x = torch.randn(2, proj.shape[1])
    torch.testing.assert_close(x @ stored, tes[1].text_projection(x))


def test_vae_attention_is_a_1x1_conv_in_the_original():
    model_spec, unet, vae, tes = tiny_models("sd1", seed=4)
    original = diffusers_to_original(components_from_models(unet, vae, tes), model_spec)
    to_q = vae.encoder.mid_block.attentions[0].to_q.weight
    q = original["first_stage_model.encoder.mid.attn_1.q.weight"]
    assert q.shape == (*to_q.shape, 1, 1)
    assert torch.equal(q[:, :, 0, 0], to_q)
    out = original["first_stage_model.decoder.mid.attn_1.proj_out.weight"]
    assert torch.equal(out[:, :, 0, 0], vae.decoder.mid_block.attentions[0].to_out[0].weight)
    # Re-saved checkpoints sometimes hold them as (out, in) already: accepted too.
    flat = dict(original)
    for name in [k for k in original if ".mid.attn_1." in k and k.endswith(("q.weight", "k.weight", "v.weight"))]:
        flat[name] = original[name][:, :, 0, 0]
    back = original_to_diffusers(flat, model_spec)
    assert torch.equal(back.vae["encoder.mid_block.attentions.0.to_q.weight"], to_q)
    # The decoder's levels are numbered the other way round in the original.
    levels = len(model_spec.vae["block_out_channels"])
    assert torch.equal(
        original[f"first_stage_model.decoder.up.{levels - 1}.upsample.conv.weight"],
        vae.decoder.up_blocks[0].upsamplers[0].conv.weight,
    )


def test_sd1_text_encoder_saved_without_text_model_level():
    """Old SD1 files have cond_stage_model.transformer.encoder... (no text_model.); the WebUI accepts them."""
    model_spec, unet, vae, tes = tiny_models("sd1", seed=5)
    original = diffusers_to_original(components_from_models(unet, vae, tes), model_spec)
    old_style = {
        k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
        for k, v in original.items()
    }
    assert "cond_stage_model.transformer.encoder.layers.0.mlp.fc1.weight" in old_style
    back = original_to_diffusers(old_style, model_spec)
    reference = original_to_diffusers(original, model_spec)
    assert back.text_encoders[0].keys() == reference.text_encoders[0].keys()
    assert all(torch.equal(back.text_encoders[0][k], v) for k, v in reference.text_encoders[0].items())


def test_missing_weights_are_a_user_error():
    model_spec, unet, vae, tes = tiny_models("sd1")
    original = diffusers_to_original(components_from_models(unet, vae, tes), model_spec)
    del original["first_stage_model.decoder.conv_out.weight"]
    with pytest.raises(UserError, match="lacks 1 VAE weights"):
        original_to_diffusers(original, model_spec)


# Original SD1.5 names and shapes (as in v1-5-pruned-emaonly), a fixed reference for the layout.
SD15_REFERENCE = {
    "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "model.diffusion_model.time_embed.0.weight": (1280, 320),
    "model.diffusion_model.time_embed.2.weight": (1280, 1280),
    "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (320, 320),
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
    "model.diffusion_model.input_blocks.4.0.in_layers.2.weight": (640, 320, 3, 3),
    "model.diffusion_model.input_blocks.4.0.emb_layers.1.weight": (640, 1280),
    "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
    "model.diffusion_model.input_blocks.11.0.out_layers.3.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.middle_block.1.transformer_blocks.0.ff.net.0.proj.weight": (10240, 1280),
    "model.diffusion_model.middle_block.2.in_layers.0.weight": (1280,),
    "model.diffusion_model.output_blocks.0.0.skip_connection.weight": (1280, 2560, 1, 1),
    "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.8.2.conv.weight": (640, 640, 3, 3),
    "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn1.to_out.0.weight": (320, 320),
    "model.diffusion_model.out.0.weight": (320,),
    "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
    "first_stage_model.encoder.down.0.block.0.conv1.weight": (128, 128, 3, 3),
    "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    "first_stage_model.encoder.down.1.downsample.conv.weight": (256, 256, 3, 3),
    "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "first_stage_model.encoder.norm_out.weight": (512,),
    "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
    "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
    "first_stage_model.decoder.mid.block_2.conv2.weight": (512, 512, 3, 3),
    "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
    "first_stage_model.post_quant_conv.weight": (4, 4, 1, 1),
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
    "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
    "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": (768, 768),
    "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
    "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,),
}
SD15_ABSENT = [
    "model.diffusion_model.output_blocks.11.2.conv.weight",  # the top level has no upsampler
    "model.diffusion_model.input_blocks.12.0.op.weight",  # nor the lowest a downsampler
    "first_stage_model.decoder.up.0.upsample.conv.weight",
    "first_stage_model.encoder.down.3.downsample.conv.weight",
]


def test_published_configs_have_the_published_sizes():
    """Parameter counts of the published models, counted on meta-device modules (no memory)."""

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    sd15 = spec("sd1")
    assert count(build_unet(sd15, empty=True)) == 859_520_964
    assert count(build_vae(sd15, empty=True)) == 83_653_863
    assert count(build_text_encoders(sd15, empty=True)[0]) == 123_060_480
    assert count(build_unet(spec("sdxl"), empty=True)) == 2_567_463_684
    # Key counts of the original single files (SD1.5: 686 UNet, 248 VAE, 196 text encoder weights).
    assert [len(m.entries) for m in key_map(sd15)] == [686, 248, 196]
    sdxl = key_map(spec("sdxl"))
    assert [m.component for m in sdxl] == ["unet", "vae", "te0", "te1"]
    assert len(sdxl[0].entries) == 1680


def test_full_size_sd15_layout_round_trip():
    """Full-size SD1.5 shapes with random weights: original key names/shapes, and back with equal tensors.

    The weights are random one-byte values in the shapes of the meta-device modules: about 1 GB instead of
    the 4.3 GB of an fp32 model. The conversion only moves, reshapes, splits and joins tensors, so the dtype
    does not matter to it, and random values catch any swapped or transposed tensor.
    """
    model_spec = spec("sd1")
    gen = torch.Generator().manual_seed(0)

    def random_like(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {
            k: torch.randint(-128, 128, v.shape, generator=gen, dtype=torch.int8)
            for k, v in module.state_dict().items()
            if not k.endswith("position_ids")
        }

    components = ComponentStateDicts(
        unet=random_like(build_unet(model_spec, empty=True)),
        vae=random_like(build_vae(model_spec, empty=True)),
        text_encoders=[random_like(build_text_encoders(model_spec, empty=True)[0])],
    )
    original = diffusers_to_original(components, model_spec)
    assert len(original) == 686 + 248 + 196
    for name, shape in SD15_REFERENCE.items():
        assert name in original, name
        assert tuple(original[name].shape) == shape, name
    for name in SD15_ABSENT:
        assert name not in original
    assert torch.equal(
        original["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"],
        components.unet["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"],
    )
    assert torch.equal(
        original["model.diffusion_model.output_blocks.8.2.conv.weight"],
        components.unet["up_blocks.2.upsamplers.0.conv.weight"],
    )

    back = original_to_diffusers(original, model_spec)
    del original
    for want, got in [(components.unet, back.unet), (components.vae, back.vae)]:
        assert want.keys() == got.keys()
        for key in want:
            assert torch.equal(want[key], got[key]), key
    (te_back,) = back.text_encoders
    (te_want,) = components.text_encoders
    assert len(te_back) == len(te_want) == 196
    for key, tensor in te_want.items():
        canonical = key if key.startswith("text_model.") else "text_model." + key
        assert torch.equal(te_back[canonical], tensor), key
    del components, back
    gc.collect()


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_full_size_layout_agrees_with_diffusers_own_single_file_reader(family: str):
    """An independent reference: diffusers' (private, test-only here) original -> diffusers helpers must
    read our original-layout dict back to exactly our diffusers names and shapes. Each tensor is one
    distinct number broadcast to its full shape, so SDXL at full size costs no memory."""
    sfu = pytest.importorskip("diffusers.loaders.single_file_utils")
    from train_tools.models.convert import normalize_text_encoder_keys

    model_spec = spec(family)
    counter = iter(range(1, 1_000_000))

    def labelled(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {
            k: torch.tensor([float(next(counter))]).expand(v.shape)
            for k, v in module.state_dict().items()
            if not k.endswith("position_ids")
        }

    unet, vae = build_unet(model_spec, empty=True), build_vae(model_spec, empty=True)
    tes = build_text_encoders(model_spec, empty=True)
    ours = ComponentStateDicts(labelled(unet), labelled(vae), [labelled(te) for te in tes])
    original = diffusers_to_original(ours, model_spec)

    def same(mine: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
        assert mine.keys() == reference.keys()
        for key, tensor in mine.items():
            assert reference[key].shape == tensor.shape, key
            assert float(reference[key].flatten()[0]) == float(tensor.flatten()[0]), key

    same(ours.unet, sfu.convert_ldm_unet_checkpoint(dict(original), dict(unet.config)))
    same(ours.vae, sfu.convert_ldm_vae_checkpoint(dict(original), dict(vae.config)))
    for te_spec, te_sd, te in zip(model_spec.text_encoders, ours.text_encoders, tes, strict=False):
        if te_spec.layout == "openclip":
            reference = sfu.convert_open_clip_checkpoint(te, dict(original), prefix=te_spec.prefix)
        else:
            reference = sfu.convert_ldm_clip_checkpoint(dict(original), remove_prefix=te_spec.prefix)
        same(normalize_text_encoder_keys(te_sd), normalize_text_encoder_keys(reference))
