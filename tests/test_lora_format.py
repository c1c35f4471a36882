"""The LoRA network and the kohya LoRA file: names, counts, scale, metadata, hashes, atomic save.

The file is checked against three independent readings of it: diffusers' strict ``load_lora_weights``, a
reference of A1111's formula (tests/webui_formula.py) and the peft model that was trained.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from tests.helpers_models import diffusers_has_peft_backend, lora_file_layer_count, lora_layer_count
from tests.webui_formula import apply_kohya_lora
from train_tools import fileio
from train_tools.config import TrainConfig
from train_tools.networks.lora import attach_lora
from train_tools.networks.lora_format import (
    JSON_METADATA_KEYS,
    REQUIRED_METADATA_KEYS,
    build_metadata,
    file_tensor_hashes,
    kohya_state_dict,
    read_lora,
    save_lora,
)
from train_tools.networks.targets import text_encoder_target_modules, unet_target_modules
from train_tools.networks.types import network_parameters

RANK = 4
ALPHA = 2.0
VOCAB = 64


# ---------------------------------------------------------------------------------------------- tiny models
def tiny_unet() -> UNet2DConditionModel:
    """SD1-shaped: cross-attention down/up blocks, 1x1-conv proj_in/proj_out, resnets with shortcuts."""
    return UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    ).eval()


def tiny_text_encoder() -> CLIPTextModel:
    config = CLIPTextConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        vocab_size=VOCAB,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(config).eval()


def tiny_tokenizer(folder: Path) -> CLIPTokenizer:
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({c: 2 + i for i, c in enumerate(letters)})
    vocab.update({c + "</w>": 2 + len(letters) + i for i, c in enumerate(letters)})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


def randomise_lora_b(*models: torch.nn.Module, seed: int = 1) -> None:
    """peft starts B at zero (the adapter does nothing); random B makes every layer's update count."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in models:
            for module in model.modules():
                if isinstance(module, LoraLayer):
                    weight = module.lora_B["default"].weight
                    weight.copy_(torch.randn(weight.shape, generator=gen) * 0.2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Base models, their LoRA copies with non-zero B (LoCon included), inputs, outputs and the saved file."""
    torch.manual_seed(0)
    unet, te = tiny_unet(), tiny_text_encoder()
    lora_unet, lora_te = copy.deepcopy(unet), copy.deepcopy(te)
    attach_lora(lora_unet, unet_target_modules(lora_unet, conv=True), RANK, ALPHA, conv_rank=2, conv_alpha=1.0)
    attach_lora(lora_te, text_encoder_target_modules(lora_te), RANK, ALPHA)
    randomise_lora_b(lora_unet, lora_te)
    gen = torch.Generator().manual_seed(2)
    inputs = {
        "sample": torch.randn(1, 4, 8, 8, generator=gen),
        "ehs": torch.randn(1, 5, 32, generator=gen),
        "ids": torch.randint(2, VOCAB, (1, 8), generator=gen),
    }
    path = tmp_path_factory.mktemp("lora") / "tiny.safetensors"
    save_lora(
        path,
        kohya_state_dict(unet=lora_unet, text_encoders=[lora_te], family="sd1"),
        {"ss_output_name": "tiny"},
        dtype=torch.float32,
    )
    data = {"unet": unet, "te": te, "lora_unet": lora_unet, "lora_te": lora_te, "inputs": inputs, "path": path}
    data["base_out"] = run(unet, te, inputs)
    data["lora_out"] = run(lora_unet, lora_te, inputs)
    return data


def run(unet: torch.nn.Module, te: torch.nn.Module, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return (unet(inputs["sample"], 10, inputs["ehs"]).sample, te(inputs["ids"]).last_hidden_state)


def webui_outputs(trained: dict, tensors: dict, multiplier: float) -> tuple[torch.Tensor, torch.Tensor]:
    unet, te = copy.deepcopy(trained["unet"]), copy.deepcopy(trained["te"])
    used = apply_kohya_lora(unet, tensors, "lora_unet", multiplier) | apply_kohya_lora(
        te, tensors, "lora_te", multiplier
    )
    assert used == set(tensors), f"keys A1111 would not use: {sorted(set(tensors) - used)[:3]}"
    return run(unet, te, trained["inputs"])


# ---------------------------------------------------------------------------------------------- the file loads
def test_adapter_changes_outputs(trained: dict) -> None:
    for base, lora in zip(trained["base_out"], trained["lora_out"], strict=False):
        assert (base - lora).abs().max() > 0.05


def test_webui_formula_matches_peft_model(trained: dict) -> None:
    tensors, _ = read_lora(trained["path"])
    for got, want in zip(webui_outputs(trained, tensors, 1.0), trained["lora_out"], strict=False):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for got, want in zip(webui_outputs(trained, tensors, 0.0), trained["base_out"], strict=False):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


# A1111 1.10 pins transformers 4.30.2, too old for diffusers' LoRA loader (it needs >= 4.34): there the check
# cannot run at all, so it is skipped with that reason; the WebUI-formula checks below still run everywhere.
@pytest.mark.skipif(
    not diffusers_has_peft_backend(),
    reason="diffusers' LoRA loader needs transformers>=4.34 (the host pins an older one)",
)
def test_diffusers_loads_every_key_and_agrees(trained: dict, tmp_path: Path) -> None:
    tensors, _ = read_lora(trained["path"])
    vae = AutoencoderKL(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=8,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=copy.deepcopy(trained["te"]),
        tokenizer=tiny_tokenizer(tmp_path),
        unet=copy.deepcopy(trained["unet"]),
        scheduler=DDPMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    # Folder + weight_name: diffusers 0.31 (Forge's) refuses a bare file path when offline.
    pipe.load_lora_weights(str(trained["path"].parent), weight_name=trained["path"].name)  # raises on any
    # key it cannot map

    assert lora_layer_count(pipe.unet) == lora_file_layer_count(tensors, "lora_unet") > 0
    assert lora_layer_count(pipe.text_encoder) == lora_file_layer_count(tensors, "lora_te") > 0
    for got, want in zip(run(pipe.unet, pipe.text_encoder, trained["inputs"]), trained["lora_out"], strict=False):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # Order matters: diffusers cannot undo a fuse at scale 0 (it cannot divide the scale back out).
    for multiplier in (1.0, 0.5, 0.0):
        pipe.fuse_lora(lora_scale=multiplier)
        got = run(pipe.unet, pipe.text_encoder, trained["inputs"])
        pipe.unfuse_lora()
        for a, b in zip(got, webui_outputs(trained, tensors, multiplier), strict=False):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_key_shapes_and_alpha(trained: dict) -> None:
    tensors, _ = read_lora(trained["path"])
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert tensors[f"{name}.lora_down.weight"].shape == (2, 32, 3, 3)
    assert tensors[f"{name}.lora_up.weight"].shape == (32, 2, 1, 1)
    assert tensors[f"{name}.alpha"].item() == 1.0
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    assert tensors[f"{name}.lora_down.weight"].shape == (RANK, 32)
    assert tensors[f"{name}.lora_up.weight"].shape == (32, RANK)
    name = "lora_unet_down_blocks_0_resnets_0_time_emb_proj"  # Linear in a LoCon block: the network rank
    assert tensors[f"{name}.lora_down.weight"].shape[0] == RANK
    names = {k.partition(".")[0] for k in tensors}
    assert not [n for n in names if any(s in n for s in ("conv_in", "conv_out", "time_embedding"))]
    assert "lora_te_text_model_encoder_layers_1_mlp_fc2" in names


# ---------------------------------------------------------------------------------------------- training set-up
def test_attach_lora_trains_fp32_adapter_on_bf16_base() -> None:
    torch.manual_seed(0)
    unet = tiny_unet().to(torch.bfloat16)
    targets = unet_target_modules(unet)
    attach_lora(unet, targets, RANK, ALPHA)
    params = network_parameters(unet)
    assert len(params) == 2 * len(targets)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in params)
    ids = {id(p) for p in params}
    assert not [n for n, p in unet.named_parameters() if p.requires_grad and id(p) not in ids]
    sample = torch.randn(1, 4, 8, 8, dtype=torch.bfloat16)
    ehs = torch.randn(1, 5, 32, dtype=torch.bfloat16)
    before = unet(sample, 10, ehs).sample
    assert before.dtype == torch.bfloat16
    before.float().pow(2).mean().backward()
    b_grads = [m.lora_B["default"].weight.grad for m in unet.modules() if isinstance(m, LoraLayer)]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in b_grads)
    assert any(g.abs().sum() > 0 for g in b_grads)
    torch.optim.SGD(params, lr=1.0).step()
    with torch.no_grad():
        assert (unet(sample, 10, ehs).sample.float() - before.float()).abs().max() > 0


def test_lora_starts_as_identity_and_alpha_is_written_not_rank(tmp_path: Path) -> None:
    torch.manual_seed(0)
    unet = tiny_unet()
    sample, ehs = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 32)
    with torch.no_grad():
        base = unet(sample, 10, ehs).sample
    config = TrainConfig(network_dim=8, network_alpha=3.0)
    attach_lora(unet, unet_target_modules(unet), config.network_dim, config.network_alpha)
    with torch.no_grad():
        torch.testing.assert_close(unet(sample, 10, ehs).sample, base)
    path = tmp_path / "a.safetensors"
    save_lora(path, kohya_state_dict(unet=unet), {}, dtype=torch.float16)
    tensors, _ = read_lora(path)
    alphas = [t for k, t in tensors.items() if k.endswith(".alpha")]
    assert alphas and all(t.dim() == 0 and t.dtype == torch.float32 and t.item() == 3.0 for t in alphas)
    assert all(t.dtype == torch.float16 for k, t in tensors.items() if not k.endswith(".alpha"))
    assert all(t.shape[0] == 8 for k, t in tensors.items() if k.endswith("lora_down.weight"))


def test_untrained_text_encoder_writes_no_te_keys_and_says_so() -> None:
    unet = tiny_unet()
    attach_lora(unet, unet_target_modules(unet), RANK, ALPHA)
    tensors = kohya_state_dict(unet=unet, text_encoders=[], family="sd1")
    assert tensors and all(k.startswith("lora_unet_") for k in tensors)
    with pytest.raises(ValueError):
        kohya_state_dict(unet=None, text_encoders=[tiny_text_encoder()], family="sd1")  # no LoRA in it
    meta = metadata(TrainConfig(train_text_encoder=False, text_encoder_lr=5e-5))
    assert meta["ss_text_encoder_lr"] == "0.0"
    assert meta["ss_network_train_unet_only"] == "True"
    assert metadata(TrainConfig(text_encoder_lr=5e-5))["ss_text_encoder_lr"] == "5e-05"


def test_wrappers_and_checkpointing_do_not_change_names() -> None:
    torch.manual_seed(0)
    te = tiny_text_encoder()
    direct = copy.deepcopy(te)
    attach_lora(direct, text_encoder_target_modules(direct), RANK, ALPHA)
    wrapped = get_peft_model(
        copy.deepcopy(te), LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=text_encoder_target_modules(te))
    )
    assert set(kohya_state_dict(text_encoders=[wrapped])) == set(kohya_state_dict(text_encoders=[direct]))
    unet = tiny_unet()
    attach_lora(unet, unet_target_modules(unet), RANK, ALPHA)
    keys = set(kohya_state_dict(unet=unet))
    unet.enable_gradient_checkpointing()
    assert set(kohya_state_dict(unet=unet)) == keys


# ---------------------------------------------------------------------------------------------- full layouts
def sd15_models() -> tuple[UNet2DConditionModel, CLIPTextModel]:
    with init_empty_weights():
        unet = UNet2DConditionModel(
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            cross_attention_dim=768,
            attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        )
        te = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=768,
                num_hidden_layers=12,
                num_attention_heads=12,
                intermediate_size=3072,
                vocab_size=49408,
                max_position_embeddings=77,
            )
        )
    return unet, te


def layer_names(tensors: dict, prefix: str) -> set[str]:
    return {k.partition(".")[0] for k in tensors if k.startswith(prefix + "_")}


def test_sd15_layout_names_and_counts() -> None:
    unet, te = sd15_models()
    assert len(unet_target_modules(unet)) == 192
    assert len(text_encoder_target_modules(te)) == 72
    attach_lora(unet, unet_target_modules(unet), RANK, ALPHA)
    attach_lora(te, text_encoder_target_modules(te), RANK, ALPHA)
    tensors = kohya_state_dict(unet=unet, text_encoders=[te], family="sd1")
    unet_names, te_names = layer_names(tensors, "lora_unet"), layer_names(tensors, "lora_te")
    assert len(unet_names) == 192 and len(te_names) == 72 and len(tensors) == 3 * (192 + 72)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in unet_names
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj" in unet_names
    assert "lora_unet_up_blocks_3_attentions_2_proj_out" in unet_names
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in te_names
    assert "lora_te_text_model_encoder_layers_11_mlp_fc2" in te_names
    assert tensors["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"].shape == (
        RANK,
        768,
    )


def test_sd15_locon_adds_only_resnet_and_sampler_layers() -> None:
    unet, _ = sd15_models()
    extra = set(unet_target_modules(unet, conv=True)) - set(unet_target_modules(unet))
    # 22 resnets x (conv1, conv2, time_emb_proj) + 14 shortcuts + 3 downsamplers + 3 upsamplers
    assert len(extra) == 86
    assert all(".resnets." in n or "samplers." in n for n in extra)


def test_sdxl_layout_names_and_counts() -> None:
    with init_empty_weights():
        unet = UNet2DConditionModel(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
            layers_per_block=2,
        )
        te1 = CLIPTextModel(
            CLIPTextConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
        )
        te2 = CLIPTextModelWithProjection(
            CLIPTextConfig(
                hidden_size=1280,
                num_hidden_layers=32,
                num_attention_heads=20,
                intermediate_size=5120,
                hidden_act="gelu",
                projection_dim=1280,
            )
        )
    for model, targets in (
        (unet, unet_target_modules(unet)),
        (te1, text_encoder_target_modules(te1)),
        (te2, text_encoder_target_modules(te2)),
    ):
        attach_lora(model, targets, RANK, ALPHA)
    tensors = kohya_state_dict(unet=unet, text_encoders=[te1, te2], family="sdxl")
    assert len(layer_names(tensors, "lora_unet")) == 722
    assert len(layer_names(tensors, "lora_te1")) == 72
    assert len(layer_names(tensors, "lora_te2")) == 192
    assert not layer_names(tensors, "lora_te")
    assert "lora_te2_text_model_encoder_layers_0_mlp_fc1" in layer_names(tensors, "lora_te2")
    assert "lora_te1_text_model_encoder_layers_11_self_attn_out_proj" in layer_names(tensors, "lora_te1")
    with pytest.raises(ValueError):
        kohya_state_dict(text_encoders=[te1, te2], family="sd1")


# ---------------------------------------------------------------------------------------------- metadata, hashes
def metadata(config: TrainConfig, family: str = "sd1", **overrides) -> dict[str, str]:
    kwargs = dict(
        family=family,
        output_name="My LoRA",
        base_model_path=Path("/models/Stable-diffusion/base v1.safetensors"),
        base_model_sha256="ab" * 32,
        num_train_images=40,
        tag_frequency={"10_My LoRA": {"1girl": 10, "solo": 4}},
        dataset_dirs={"10_My LoRA": {"n_repeats": 10, "img_count": 4}},
        epoch=3,
        steps=120,
        training_started_at=1_700_000_000.5,
        training_finished_at=1_700_000_600.0,
        bucket_info={"buckets": {"0": {"resolution": [512, 512], "count": 40}}},
        cover_image_png=b"\x89PNG fake",
    )
    kwargs.update(overrides)
    return build_metadata(config, **kwargs)


@pytest.mark.parametrize(
    "family, version, v2, arch, prediction",
    [
        ("sd1", "sd_v1", "False", "stable-diffusion-v1/lora", "epsilon"),
        ("sd2", "sd_v2", "True", "stable-diffusion-v2-512/lora", "epsilon"),
        ("sd2v", "sd_v2_v", "True", "stable-diffusion-v2-768-v/lora", "v"),
        ("sdxl", "sdxl_base_v1-0", "False", "stable-diffusion-xl-v1-base/lora", "epsilon"),
    ],
)
def test_metadata_per_family(family: str, version: str, v2: str, arch: str, prediction: str) -> None:
    meta = metadata(TrainConfig(resolution=768), family=family)
    assert meta["ss_base_model_version"] == version
    assert meta["ss_v2"] == v2
    assert meta["modelspec.architecture"] == arch
    assert meta["modelspec.prediction_type"] == prediction
    assert meta["modelspec.resolution"] == "768x768"
    assert meta["ss_resolution"] == "(768, 768)"


def test_saved_metadata_is_complete_and_hashes_describe_the_file(tmp_path: Path) -> None:
    config = TrainConfig(network_dim=8, network_alpha=4.0, seed=7)
    meta = metadata(config)
    # More than 1.1 MB of tensor bytes, so the legacy hash covers a full 64 KiB window.
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "lora_unet_x.lora_down.weight": torch.randn(8, 40_000, generator=gen),
        "lora_unet_x.lora_up.weight": torch.randn(40_000, 8, generator=gen),
        "lora_unet_x.alpha": torch.tensor(4.0),
    }
    path = tmp_path / "My LoRA.safetensors"
    save_lora(path, tensors, meta, dtype=torch.float32)

    _, saved = read_lora(path)
    missing = [k for k in REQUIRED_METADATA_KEYS if k not in saved]
    assert not missing
    assert all(isinstance(v, str) for v in saved.values())
    for key in JSON_METADATA_KEYS:
        if key in saved:
            json.loads(saved[key])
    assert saved["ss_output_name"] == saved["modelspec.title"] == "My LoRA"
    assert saved["ss_sd_model_name"] == "base v1.safetensors"
    assert saved["ss_new_sd_model_hash"] == "ab" * 32
    assert saved["ss_network_module"] == "networks.lora"
    assert saved["ss_network_dim"] == "8" and float(saved["ss_network_alpha"]) == 4.0
    assert saved["ss_seed"] == "7" and saved["ss_epoch"] == "3" and saved["ss_steps"] == "120"
    assert float(saved["ss_training_started_at"]) == 1_700_000_000.5
    assert json.loads(saved["ss_tag_frequency"]) == {"10_My LoRA": {"1girl": 10, "solo": 4}}
    assert json.loads(saved["ss_dataset_dirs"])["10_My LoRA"]["n_repeats"] == 10
    assert json.loads(saved["ssmd_cover_images"]) == ["iVBORyBmYWtl"]
    assert saved["modelspec.date"].startswith("2023-11-1")

    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert json.loads(raw[8 : 8 + header_len])["__metadata__"]["sshs_model_hash"] == saved["sshs_model_hash"]
    buffer = raw[8 + header_len :]
    assert len(buffer) > 0x110000
    assert saved["sshs_model_hash"] == hashlib.sha256(buffer).hexdigest()
    assert saved["sshs_legacy_hash"] == hashlib.sha256(buffer[0x100000:0x110000]).hexdigest()[:8]
    assert file_tensor_hashes(path) == (saved["sshs_model_hash"], saved["sshs_legacy_hash"])

    # Other metadata, same tensors: same hash (A1111 relies on it); other tensors: another hash.
    other = tmp_path / "other.safetensors"
    save_lora(other, tensors, {**meta, "ss_output_name": "renamed"}, dtype=torch.float32)
    assert read_lora(other)[1]["sshs_model_hash"] == saved["sshs_model_hash"]
    save_lora(other, tensors, meta, dtype=torch.float16)
    assert read_lora(other)[1]["sshs_model_hash"] != saved["sshs_model_hash"]


def test_save_rejects_non_string_metadata_and_non_finite_weights(tmp_path: Path) -> None:
    tensors = {
        "lora_unet_x.lora_down.weight": torch.ones(2, 3),
        "lora_unet_x.lora_up.weight": torch.ones(3, 2),
        "lora_unet_x.alpha": torch.tensor(1.0),
    }
    with pytest.raises(TypeError):
        save_lora(tmp_path / "a.safetensors", tensors, {"ss_epoch": 3})  # type: ignore[dict-item]
    from train_tools.errors import UserError

    huge = {**tensors, "lora_unet_x.lora_up.weight": torch.full((3, 2), 1e6)}
    with pytest.raises(UserError):
        save_lora(tmp_path / "a.safetensors", huge, {}, dtype=torch.float16)  # overflows fp16
    assert not (tmp_path / "a.safetensors").exists()


def test_failed_save_keeps_the_earlier_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tensors = {
        "lora_unet_x.lora_down.weight": torch.ones(2, 3),
        "lora_unet_x.lora_up.weight": torch.ones(3, 2),
        "lora_unet_x.alpha": torch.tensor(1.0),
    }
    path = tmp_path / "keep.safetensors"
    save_lora(path, tensors, {"ss_output_name": "first"})
    before = path.read_bytes()

    def broken_fsync(fd: int) -> None:
        raise RuntimeError("simulated crash while writing")

    monkeypatch.setattr(fileio.os, "fsync", broken_fsync)
    with pytest.raises(RuntimeError, match="simulated"):
        save_lora(path, {k: v * 2 for k, v in tensors.items()}, {"ss_output_name": "second"})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert read_lora(path)[1]["ss_output_name"] == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.safetensors"]
