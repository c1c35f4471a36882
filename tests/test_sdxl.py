"""SDXL base checkpoints end to end on the tiny SDXL-shaped demo model: training (CLI and Trainer), the text
conditioning recipe, the saved LoRA (keys, metadata, diffusers and the WebUI formula agree), and the family
detection and defaults the tab uses."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers_models import diffusers_has_peft_backend, lora_file_layer_count, lora_layer_count
from tests.webui_formula import apply_kohya_lora
from train_tools.cli import main
from train_tools.config import TrainConfig
from train_tools.data.items import DatasetItem
from train_tools.errors import UserError
from train_tools.models import checkpoint as checkpoint_mod
from train_tools.models.checkpoint import read_state_dict
from train_tools.models.configs import FAMILIES, family_defaults, spec
from train_tools.models.demo_model import build_demo_checkpoint
from train_tools.models.detect import detect_checkpoint_family
from train_tools.models.loader import load_model
from train_tools.networks.lora_format import read_lora
from train_tools.networks.targets import text_encoder_target_modules, unet_target_modules
from train_tools.store import Store, Version
from train_tools.training.trainer import Trainer
from train_tools.training.trainer_step import sdxl_time_ids

TINY = [
    "--set",
    "resolution=128",
    "--set",
    "min_bucket_reso=64",
    "--set",
    "max_bucket_reso=256",
    "--set",
    "network_dim=4",
    "--set",
    "network_alpha=4",
    "--set",
    "repeats=1",
    "--set",
    "batch_size=2",
    # The demo model's quick-run settings freeze the text encoder and add LoCon; these runs train a plain LoRA
    # of both (the settings given with --set win).
    "--set",
    "network_type=lora",
    "--set",
    "conv_dim=0",
    "--set",
    "train_text_encoder=true",
]


@pytest.fixture(scope="module")
def xl_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_checkpoint(tmp_path_factory.mktemp("models") / "tiny-xl.safetensors", family="sdxl")


@pytest.fixture(scope="module")
def version(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Version]:
    from train_tools.data.demo_dataset import make_demo_dataset

    data_dir = tmp_path_factory.mktemp("data")
    pictures = tmp_path_factory.mktemp("pictures")
    make_demo_dataset(pictures, n=4)
    for args in (
        ["project", "create", "xl"],
        ["version", "create", "xl", "v1"],
        ["dataset", "add", "xl", "v1", str(pictures)],
    ):
        assert main(["--data-dir", str(data_dir), *args]) == 0
    return data_dir, Store(data_dir).version("xl", "v1")


@pytest.fixture(scope="module")
def cli_lora(xl_ckpt: Path, version: tuple[Path, Version]) -> Path:
    """Two epochs through the command line, both text encoders trained, with gradient checkpointing; a high
    learning rate so the LoRA changes the model clearly (the comparisons below need a visible update)."""
    data_dir, _ = version
    rc = main(
        [
            "--data-dir",
            str(data_dir),
            "train",
            "xl",
            "v1",
            "--ckpt",
            str(xl_ckpt),
            *TINY,
            "--set",
            "epochs=2",
            "--set",
            "save_every_n_epochs=1",
            "--set",
            "optimizer=AdamW",
            "--set",
            "learning_rate=2e-2",
            "--set",
            "gradient_checkpointing=true",
            "--set",
            "train_text_encoder=true",
            "--set",
            "save_precision=fp32",
        ]
    )
    assert rc == 0
    (run,) = [r for r in Store(data_dir).version("xl", "v1").runs() if r.name != "fixed"]
    assert sorted(p.name for p in run.glob("*.safetensors")) == ["xl-v1-000001.safetensors", "xl-v1.safetensors"]
    return run / "xl-v1.safetensors"


def tiny_config(**changes: object) -> TrainConfig:
    base = dict(
        resolution=128,
        min_bucket_reso=64,
        max_bucket_reso=256,
        network_dim=4,
        network_alpha=4.0,
        repeats=1,
        batch_size=2,
        epochs=2,
        save_every_n_epochs=100,
        optimizer="AdamW",
    )
    base.update(changes)
    return TrainConfig(**base)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- the file
def test_cli_trains_sdxl_with_both_text_encoders(cli_lora: Path, xl_ckpt: Path) -> None:
    tensors, meta = read_lora(cli_lora)
    prefixes = {k.partition(".")[0].split("_")[1] for k in tensors}
    assert prefixes == {"unet", "te1", "te2"}  # never SD1's lora_te_
    model_spec = spec("sdxl", tiny=True)
    m = load_model(xl_ckpt)
    te1, te2 = m.text_encoders

    def layers(prefix: str) -> int:
        return sum(k.startswith(prefix + "_") and k.endswith(".alpha") for k in tensors)

    assert layers("lora_unet") == len(unet_target_modules(m.unet))
    assert layers("lora_te1") == len(text_encoder_target_modules(te1)) == 6 * te1.config.num_hidden_layers
    assert layers("lora_te2") == len(text_encoder_target_modules(te2)) == 6 * te2.config.num_hidden_layers
    assert "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight" in tensors
    assert tensors["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"].shape == (
        4,
        model_spec.context_dim,
    )
    # Both encoders learned something (their B started at zero).
    for prefix in ("lora_te1", "lora_te2", "lora_unet"):
        ups = [t for k, t in tensors.items() if k.startswith(prefix) and k.endswith("lora_up.weight")]
        assert max(float(t.abs().max()) for t in ups) > 0, prefix
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["ss_clip_skip"] == "1"  # not used by SDXL, as in the WebUI: the file says what was used
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["ss_v2"] == "False" and meta["modelspec.prediction_type"] == "epsilon"
    assert meta["ss_network_train_unet_only"] == "False"
    assert meta["ss_epoch"] == "2" and meta["ss_gradient_checkpointing"] == "True"


def _run_models(
    unet: torch.nn.Module, te1: torch.nn.Module, te2: torch.nn.Module, inputs: dict
) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        out2 = te2(inputs["ids"])
        sample = unet(
            inputs["sample"],
            10,
            inputs["ehs"],
            added_cond_kwargs={"text_embeds": inputs["pooled"], "time_ids": inputs["time_ids"]},
        ).sample
        return sample, te1(inputs["ids"]).last_hidden_state, out2.last_hidden_state, out2.text_embeds


def _webui_outputs(
    base: list[torch.nn.Module], tensors: dict, inputs: dict, multiplier: float
) -> tuple[torch.Tensor, ...]:
    unet, te1, te2 = (copy.deepcopy(model) for model in base)
    used = (
        apply_kohya_lora(unet, tensors, "lora_unet", multiplier)
        | apply_kohya_lora(te1, tensors, "lora_te1", multiplier)
        | apply_kohya_lora(te2, tensors, "lora_te2", multiplier)
    )
    assert used == set(tensors), f"keys A1111 would not use: {sorted(set(tensors) - used)[:3]}"
    return _run_models(unet, te1, te2, inputs)


@pytest.mark.skipif(
    not diffusers_has_peft_backend(),
    reason="diffusers' LoRA loader needs transformers>=4.34 (the host pins an older one)",
)
def test_diffusers_sdxl_pipeline_loads_every_key_and_agrees_with_the_webui(cli_lora: Path, xl_ckpt: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    tensors, _ = read_lora(cli_lora)
    m = load_model(xl_ckpt)
    base = [copy.deepcopy(m.unet), *(copy.deepcopy(te) for te in m.text_encoders)]
    pipe = StableDiffusionXLPipeline(
        vae=m.vae,
        text_encoder=m.text_encoders[0],
        text_encoder_2=m.text_encoders[1],
        tokenizer=m.tokenizers[0],
        tokenizer_2=m.tokenizers[1],
        unet=m.unet,
        scheduler=m.noise_scheduler,
        add_watermarker=False,
    )
    # Folder + weight_name: diffusers 0.31 (Forge's) refuses a bare file path when offline. It raises on any
    # key it cannot map.
    pipe.load_lora_weights(str(cli_lora.parent), weight_name=cli_lora.name)

    assert lora_layer_count(pipe.unet) == lora_file_layer_count(tensors, "lora_unet") > 0
    assert lora_layer_count(pipe.text_encoder) == lora_file_layer_count(tensors, "lora_te1") > 0
    assert lora_layer_count(pipe.text_encoder_2) == lora_file_layer_count(tensors, "lora_te2") > 0

    gen = torch.Generator().manual_seed(3)
    ids = pipe.tokenizer("a red circle on a blue field", return_tensors="pt").input_ids
    inputs = {
        "sample": torch.randn(1, 4, 8, 8, generator=gen),
        "ehs": torch.randn(1, 7, 64, generator=gen),
        "pooled": torch.randn(1, 32, generator=gen),
        "ids": ids,
        "time_ids": torch.tensor([[384.0, 640.0, 26.0, 0.0, 64.0, 192.0]]),
    }
    base_out = _run_models(*base, inputs)
    full = _webui_outputs(base, tensors, inputs, 1.0)
    for a, b in zip(full, base_out, strict=False):
        assert (a - b).abs().max() > 1e-3  # the LoRA visibly changes every model
    models = (pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    for got, want in zip(_run_models(*models, inputs), full, strict=False):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # Order matters: diffusers cannot undo a fuse at scale 0 (it cannot divide the scale back out).
    for multiplier in (1.0, 0.5, 0.0):
        pipe.fuse_lora(lora_scale=multiplier)
        got = _run_models(*models, inputs)
        pipe.unfuse_lora()
        for a, b in zip(got, _webui_outputs(base, tensors, inputs, multiplier), strict=False):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    for a, b in zip(_webui_outputs(base, tensors, inputs, 0.0), base_out, strict=False):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_webui_formula_applies_every_key_of_the_sdxl_file(cli_lora: Path, xl_ckpt: Path) -> None:
    """Where diffusers' loader cannot run (A1111's old transformers), the WebUI formula still checks the names."""
    tensors, _ = read_lora(cli_lora)
    m = load_model(xl_ckpt)
    base = [m.unet, *m.text_encoders]
    inputs = {
        "sample": torch.randn(1, 4, 8, 8),
        "ehs": torch.randn(1, 7, 64),
        "pooled": torch.randn(1, 32),
        "ids": torch.tensor([[m.tokenizers[0].bos_token_id, 5, 6, m.tokenizers[0].eos_token_id]]),
        "time_ids": torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]]),
    }
    half = _webui_outputs(base, tensors, inputs, 0.5)
    for a, b in zip(_webui_outputs(base, tensors, inputs, 0.0), _run_models(*base, inputs), strict=False):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(half, _run_models(*base, inputs), strict=False))


# ---------------------------------------------------------------------------------------------- the trainer
def test_loss_goes_down_on_a_fixed_batch(xl_ckpt: Path, version: tuple[Path, Version]) -> None:
    _, v = version
    # A random-weight model predicts noise at about 1.1 where predicting zero would give 1.0: a high rate is
    # needed to move a clear part of that within a few steps.
    config = tiny_config(epochs=6, learning_rate=5e-2, network_dim=8, network_alpha=8.0, train_text_encoder=False)
    trainer = Trainer(v, config, xl_ckpt, device="cpu", run_name="fixed")
    trainer.prepare()
    assert trainer.cached_text is not None  # frozen encoders: their outputs are cached
    before = trainer.fixed_batch_loss()
    result = trainer.run()
    after = trainer.fixed_batch_loss()
    assert result.steps == 6 * len(trainer.sampler)
    assert after < before * 0.97, (before, after)
    tensors, _ = read_lora(result.final_file)
    assert tensors and all(k.startswith("lora_unet_") for k in tensors)


def test_text_conditioning_is_the_sdxl_recipe(xl_ckpt: Path, version: tuple[Path, Version]) -> None:
    """Both encoders' penultimate layers side by side and the second's pooled projection, as diffusers'
    StableDiffusionXLPipeline encodes a prompt; clip skip does not change it; long captions in 77-token chunks."""
    from diffusers import StableDiffusionXLPipeline

    _, v = version
    trainer = Trainer(
        v, tiny_config(clip_skip=2, max_token_length=150, train_text_encoder=False), xl_ckpt, device="cpu"
    )
    trainer.prepare()
    m = trainer.model
    caption = "a red circle on a blue field"
    cond = trainer.encode_text([caption])
    assert cond.hidden.shape == (1, 2 * 77, 32 + 32) and cond.pooled is not None and cond.pooled.shape == (1, 32)
    ids1, ids2 = (trainer.tokenize([caption], tok) for tok in trainer.tokenizers)
    assert ids1[0, 76] == m.tokenizers[0].eos_token_id  # CLIP-L pads with the end token
    assert ids2[0, 76] == m.tokenizers[1].pad_token_id == 0  # bigG pads with "!"
    pipe = StableDiffusionXLPipeline(
        vae=m.vae,
        text_encoder=m.text_encoders[0],
        text_encoder_2=m.text_encoders[1],
        tokenizer=m.tokenizers[0],
        tokenizer_2=m.tokenizers[1],
        unet=m.unet,
        scheduler=m.noise_scheduler,
        add_watermarker=False,
    )
    with torch.no_grad():
        want, _, want_pooled, _ = pipe.encode_prompt(
            caption, device=torch.device("cpu"), num_images_per_prompt=1, do_classifier_free_guidance=False
        )
    torch.testing.assert_close(cond.hidden[:, :77], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cond.pooled, want_pooled, atol=1e-5, rtol=1e-5)
    # The second chunk is an empty caption's encoding (start, end, padding), the pooled one the first chunk's.
    with torch.no_grad():
        empty, _, _, _ = pipe.encode_prompt(
            "", device=torch.device("cpu"), num_images_per_prompt=1, do_classifier_free_guidance=False
        )
    torch.testing.assert_close(cond.hidden[:, 77:], empty, atol=1e-5, rtol=1e-5)
    # The cached conditioning of an item carries the same text and its size numbers for the UNet.
    index = next(i for i, item in enumerate(trainer.items) if item.caption)
    batch = trainer.text_for([index], random.Random(0))
    torch.testing.assert_close(batch.hidden, trainer.encode_text([trainer.items[index].caption]).hidden)
    assert batch.time_ids is not None
    assert batch.time_ids.tolist() == [sdxl_time_ids(trainer.items[index])]


def test_size_conditioning_follows_the_centre_crop() -> None:
    # 600x300 resized by 0.32 to cover a 192x64 bucket is 192x96: 32 rows cropped, 16 from the top.
    item = DatasetItem(image=Path("a.png"), caption="", size=(192, 64), source_size=(600, 300))
    assert sdxl_time_ids(item) == [300.0, 600.0, 16.0, 0.0, 64.0, 192.0]
    tall = DatasetItem(image=Path("b.png"), caption="", size=(64, 128), source_size=(100, 150))
    # scale max(0.64, 0.853) = 0.853: 85.3 x 128, 21.3 columns cropped, 11 from the left.
    assert sdxl_time_ids(tall) == [150.0, 100.0, 0.0, 11.0, 128.0, 64.0]
    unknown = DatasetItem(image=Path("c.png"), caption="", size=(128, 128))
    assert sdxl_time_ids(unknown) == [128.0, 128.0, 0.0, 0.0, 128.0, 128.0]


# ---------------------------------------------------------------------------------------------- the tab's helpers
@pytest.fixture(scope="module")
def family_files(tmp_path_factory: pytest.TempPathFactory, xl_ckpt: Path) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("families")
    files = {
        family: build_demo_checkpoint(folder / f"{family}-model.safetensors", family=family)
        for family in ("sd1", "sd2", "sd2v")
    }
    files["sdxl"] = xl_ckpt
    return files


def test_detect_checkpoint_family_reads_only_the_header(
    family_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_weights(*args: object, **kwargs: object) -> None:
        raise AssertionError("detection read the weights")

    monkeypatch.setattr(checkpoint_mod, "safe_open", no_weights)
    monkeypatch.setattr(checkpoint_mod, "_read_safetensors", no_weights)
    for family, path in family_files.items():
        assert detect_checkpoint_family(path) == family, path.name


def test_detect_checkpoint_family_for_sd2_without_a_config(family_files: dict[str, Path], tmp_path: Path) -> None:
    sd = read_state_dict(family_files["sd2"])
    plain = tmp_path / "sd21-finetune.safetensors"
    save_file(sd, str(plain))
    assert detect_checkpoint_family(plain) == "sd2"
    named = tmp_path / "v2-1_768-ema-pruned.safetensors"
    save_file(sd, str(named))
    assert detect_checkpoint_family(named) == "sd2v"
    tagged = tmp_path / "finetune-v.safetensors"
    save_file(sd, str(tagged), metadata={"modelspec.prediction_type": "v"})
    assert detect_checkpoint_family(tagged) == "sd2v"
    # A sidecar config wins over the name, as in the WebUI.
    named.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "eps"\n')
    assert detect_checkpoint_family(named) == "sd2"


def test_detect_checkpoint_family_of_a_ckpt_and_of_non_checkpoints(
    family_files: dict[str, Path], tmp_path: Path
) -> None:
    ckpt = tmp_path / "xl.ckpt"
    torch.save({"state_dict": read_state_dict(family_files["sdxl"])}, ckpt)
    assert detect_checkpoint_family(ckpt) == "sdxl"
    lora = tmp_path / "my_lora.safetensors"
    save_file({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 32)}, str(lora))
    with pytest.raises(UserError, match="is a LoRA"):
        detect_checkpoint_family(lora)
    page = tmp_path / "model.safetensors"
    page.write_text("<html>404</html>")
    with pytest.raises(UserError, match="not a valid .safetensors"):
        detect_checkpoint_family(page)
    with pytest.raises(UserError, match="was not found"):
        detect_checkpoint_family(tmp_path / "missing.safetensors")
    notes = tmp_path / "notes.txt"
    notes.write_text("model.diffusion_model.input_blocks.0.0.weight")
    with pytest.raises(UserError, match="not a checkpoint file"):
        detect_checkpoint_family(notes)


def test_family_defaults() -> None:
    defaults = {family: family_defaults(family) for family in FAMILIES}
    assert defaults["sdxl"]["resolution"] == 1024 and defaults["sd2v"]["resolution"] == 768
    assert defaults["sd1"]["resolution"] == defaults["sd2"]["resolution"] == 512
    assert defaults["sdxl"]["gradient_checkpointing"] is True
    # SD1's values are the settings' own defaults; every family sets the same keys, so switching back works.
    assert defaults["sd1"] == {key: getattr(TrainConfig(), key) for key in defaults["sd1"]}
    assert all(d.keys() == defaults["sd1"].keys() for d in defaults.values())
    for family, values in defaults.items():
        config = TrainConfig().updated(values)  # valid settings
        assert config.min_bucket_reso <= config.resolution <= config.max_bucket_reso, family
        assert config.resolution == spec(family).resolution
    defaults["sdxl"]["resolution"] = 1  # a copy: the table itself is unchanged
    assert family_defaults("sdxl")["resolution"] == 1024
    with pytest.raises(ValueError):
        family_defaults("sd3")


@pytest.mark.parametrize("network_type", ("loha", "dora"))
def test_other_network_types_write_every_sdxl_layer_under_the_hosts_names(
    xl_ckpt: Path, version: tuple[Path, Version], network_type: str
) -> None:
    """LoHa and DoRA on SDXL (both text encoders trained, the convolutions too): every key of the file names a
    layer of the UNet, CLIP-L (``lora_te1``) or OpenCLIP-bigG (``lora_te2``), and A1111's formula merges each one
    into a weight of that layer's shape."""
    from tests.webui_formula import a1111_update, layer_names

    _, v = version
    config = tiny_config(epochs=1, network_type=network_type, conv_dim=2, train_text_encoder=True)
    result = Trainer(v, config, xl_ckpt, device="cpu", run_name=network_type).run()
    assert result.final_file is not None
    tensors, meta = read_lora(result.final_file)
    assert meta["ss_network_module"] == "lycoris.kohya" and meta["ss_base_model_version"] == "sdxl_base_v1-0"
    m = load_model(xl_ckpt)
    layers = {
        **layer_names(m.unet, "lora_unet"),
        **layer_names(m.text_encoders[0], "lora_te1"),
        **layer_names(m.text_encoders[1], "lora_te2"),
    }
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, _, part = key.partition(".")
        groups.setdefault(name, {})[part] = tensor
    assert {n.split("_")[1] for n in groups} == {"unet", "te1", "te2"}
    assert any("resnets" in n for n in groups)
    for name, parts in groups.items():
        weight = layers[name].weight  # KeyError: a name no host maps
        assert a1111_update(parts, weight, 1.0).shape == weight.shape
