"""Training on from a LoRA file (issue 18, item 6): the run takes the file's type and dims, starts from its
weights on every layer, resumes bit for bit, and a file of another model is refused with a sentence."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests import fixtures_training
from tests.fixtures_training import StopsAtStep
from tests.test_precision import exact_trainer, new_version, tensors_of
from tests.webui_formula import a1111_update
from train_tools.config import TrainConfig
from train_tools.errors import UserError
from train_tools.networks.lokr import peft_scales_lokr
from train_tools.networks.lora_format import kohya_state_dict, model_prefixes, network_modules
from train_tools.networks.start_from import read_start
from train_tools.progress import StopFlag
from train_tools.training.trainer import Trainer

demo_ckpt = fixtures_training.demo_ckpt
pictures = fixtures_training.pictures
one_thread = fixtures_training.one_thread

# What the file was made with, and what the version's settings say: the file's win.
MADE: dict[str, dict[str, object]] = {
    "lora": {"network_type": "lora", "network_dim": 8, "network_alpha": 2.0},
    "locon": {"network_type": "locon", "network_dim": 8, "network_alpha": 4.0, "conv_dim": 4, "conv_alpha": 1.0},
    "loha": {"network_type": "loha", "network_dim": 4, "network_alpha": 2.0, "conv_dim": 2, "conv_alpha": 1.0},
    "dora": {"network_type": "dora", "network_dim": 4, "network_alpha": 4.0},
    # factor 4 on the tiny model: some layers' w2 low-rank at rank 4, others full (the hosts' scale differs)
    "lokr": {
        "network_type": "lokr",
        "network_dim": 4,
        "network_alpha": 2.0,
        "conv_dim": 2,
        "conv_alpha": 1.0,
        "lokr_factor": 4,
    },
}


def settings(**changes: object) -> TrainConfig:
    base = dict(resolution=64, epochs=2, repeats=2, batch_size=1, save_every_n_epochs=1, preview_at_end=False)
    base.update(optimizer="AdamW", learning_rate=1e-3, lr_scheduler="constant", max_token_length=75)
    base.update(network_type="lora", network_dim=16, network_alpha=16.0, conv_dim=0, mixed_precision="no")
    return TrainConfig().updated({**base, **changes})


def network_file(trainer: Trainer, folder: Path, name: str = "start.safetensors") -> Path:
    """The trainer's network with random weights (so that a start from zero shows), as a file of the
    LoRA folder, without metadata (as a file of another trainer may come)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for param in trainer.trainable:
            param.copy_(torch.randn_like(param) * 0.01)
    m = trainer.model
    state = kohya_state_dict(m.unet, trainer.tes if trainer.train_te else [], m.family)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / name))
    return folder / name


@pytest.mark.parametrize("kind", list(MADE))
def test_a_run_starts_from_the_files_weights_with_its_dims(
    tmp_path: Path, demo_ckpt: Path, pictures: Path, one_thread: None, kind: str
) -> None:
    version = new_version(tmp_path, pictures)
    made = Trainer(version, settings(**MADE[kind]), demo_ckpt, device="cpu")
    made.prepare()
    path = network_file(made, tmp_path / "Lora")
    wanted, _ = tensors_of(path)
    on = Trainer(version, settings(network_weights=path.name), demo_ckpt, device="cpu", lora_dir=path.parent)
    expected = dict(MADE[kind])
    if kind == "lokr" and not peft_scales_lokr():  # Forge's peft 0.13 trained it at scale 1: the file says alpha = dim
        expected.update(network_alpha=float(expected["network_dim"]), conv_alpha=float(expected["conv_dim"]))
    assert {k: getattr(on.config, k) for k in MADE[kind]} == expected
    on.prepare()
    m = on.model
    got = kohya_state_dict(m.unet, on.tes, m.family)
    assert got.keys() == wanted.keys()
    compared = set(wanted)
    if kind == "lokr" and not peft_scales_lokr():  # peft 0.13: a layer with both sides full writes the run's alpha,
        # which no host reads there (it applies no scale); the weights themselves are compared
        compared -= {f"{k.partition('.')[0]}.alpha" for k in wanted if k.endswith(".lokr_w2")}
    assert all(torch.equal(got[k].float(), wanted[k].float()) for k in compared), kind


def test_a_run_from_a_file_trains_and_resumes_bit_for_bit(
    tmp_path: Path, demo_ckpt: Path, pictures: Path, one_thread: None
) -> None:
    version = new_version(tmp_path, pictures)
    made = Trainer(version, settings(**MADE["locon"]), demo_ckpt, device="cpu")
    made.prepare()
    path = network_file(made, tmp_path / "Lora")
    config, lora_dir = settings(network_weights=path.name), path.parent
    straight = exact_trainer(version, config, demo_ckpt, run_name="straight", lora_dir=lora_dir).run()
    assert straight.final_file is not None
    trained, meta = tensors_of(straight.final_file)
    start, _ = tensors_of(path)
    assert trained.keys() == start.keys() and meta["ss_network_dim"] == "8"
    assert any(not torch.equal(trained[k], start[k]) for k in start)  # it trained on
    stop = StopFlag()
    first = exact_trainer(
        version, config, demo_ckpt, run_name="stopped", stop=stop, reporter=StopsAtStep(stop, 3), lora_dir=lora_dir
    ).run()
    assert first.interrupted and first.run_dir is not None
    path.unlink()  # the resumed run has what it needs in its own state
    resumed = exact_trainer(version, config, demo_ckpt, resume_from=first.run_dir, lora_dir=lora_dir).run()
    assert resumed.final_file is not None and resumed.losses == straight.losses
    again, _ = tensors_of(resumed.final_file)
    assert all(torch.equal(again[k], trained[k]) for k in trained)


def test_a_file_of_another_model_is_refused(tmp_path: Path, demo_ckpt: Path, pictures: Path, one_thread: None):
    version = new_version(tmp_path, pictures)
    made = Trainer(version, settings(), demo_ckpt, device="cpu")
    made.prepare()
    path = network_file(made, tmp_path / "Lora")
    tensors = {k: v.clone() for k, v in tensors_of(path)[0].items()}  # copies: the file is written over below

    def refused(changed: dict[str, torch.Tensor], said: str, **config: object) -> None:
        save_file(changed, str(path))
        trainer = Trainer(version, settings(network_weights=path.name, **config), demo_ckpt, lora_dir=path.parent)
        with pytest.raises(UserError, match=said):
            trainer.prepare()

    key = next(k for k in tensors if k.startswith("lora_unet_") and k.endswith(".lora_down.weight"))
    other = {
        k.replace("lora_unet_", "lora_unet_input_blocks_4_1_", 1) if k.startswith(key.split(".")[0]) else k: v
        for k, v in tensors.items()
    }
    refused(other, "does not fit this base model: 1 of its")
    wider = dict(tensors)
    wider[key] = torch.zeros(wider[key].shape[0], wider[key].shape[1] * 2)
    refused(wider, r"does not fit this base model: .*lora_down.weight is")
    refused(tensors, "turn on 'Train text encoder'", train_text_encoder=False)


@pytest.mark.parametrize(
    ("name", "said"),
    [("../start.safetensors", "could point outside"), ("sub/start.safetensors", "cannot be used in a file")],
)
def test_the_setting_is_a_name_in_the_lora_folder(name: str, said: str) -> None:
    with pytest.raises(UserError, match=said):
        TrainConfig.from_dict({"network_weights": name})


def test_a_missing_or_untrainable_lokr_file_gets_a_sentence(tmp_path: Path, demo_ckpt: Path, pictures: Path) -> None:
    version = new_version(tmp_path, pictures)
    folder = tmp_path / "Lora"
    folder.mkdir()
    with pytest.raises(UserError, match="There is no LoRA file 'gone.safetensors'"):
        Trainer(version, settings(network_weights="gone.safetensors"), demo_ckpt, lora_dir=folder)

    def refused(tensors: dict[str, torch.Tensor], said: str) -> None:
        save_file(tensors, str(folder / "k.safetensors"))
        with pytest.raises(UserError, match=said):
            Trainer(version, settings(network_weights="k.safetensors"), demo_ckpt, lora_dir=folder)

    w1_ab = {"lora_unet_x.lokr_w1_a": torch.zeros(4, 1), "lora_unet_x.lokr_w1_b": torch.zeros(1, 4)}
    refused({**w1_ab, "lora_unet_x.lokr_w2": torch.zeros(8, 8)}, "decomposed w1 or the Tucker form")
    damaged = {"lora_unet_x.lokr_w1": torch.zeros(2, 2), "lora_unet_x.lokr_w2_b": torch.zeros(2, 4)}  # no w2_a
    refused(damaged, "not a LoKr of LyCORIS' form")
    refused({"lora_unet_x.lokr_w1": torch.zeros(2, 2), "lora_unet_x.lokr_w2": torch.zeros(4)}, "LyCORIS' form")
    # out 6 = 3 x 2 (factor 3), in 4 = 1 x 4, which neither factor 3 (2 x 2) nor -1 gives
    refused({"lora_unet_x.lokr_w1": torch.zeros(3, 1), "lora_unet_x.lokr_w2": torch.zeros(2, 4)}, "no single factor")


def test_a_lycoris_lokr_file_starts_as_the_hosts_apply_it(
    tmp_path: Path, demo_ckpt: Path, pictures: Path, one_thread: None
) -> None:
    """A LoKr of another trainer, with an alpha of its own: every layer of the fresh network applies the update
    A1111 computes from the file (alpha / rank on a low-rank w2, 1 on a full one)."""
    version = new_version(tmp_path, pictures)
    made = Trainer(version, settings(**MADE["lokr"]), demo_ckpt, device="cpu")
    made.prepare()
    path = network_file(made, tmp_path / "Lora")
    foreign = {k: (torch.tensor(3.0) if k.endswith(".alpha") else v) for k, v in tensors_of(path)[0].items()}
    save_file(foreign, str(path))
    on = Trainer(version, settings(network_weights=path.name), demo_ckpt, device="cpu", lora_dir=path.parent)
    assert on.config.network_alpha == 3.0 and on.config.lokr_factor == 4
    on.prepare()
    layers = {}
    for model, prefix, text_encoder in model_prefixes(on.model.unet, on.tes, on.model.family):
        layers.update(network_modules(model, prefix, text_encoder=text_encoder))
    checked = 0
    for layer, (module, _) in layers.items():
        parts = {k.partition(".")[2]: v for k, v in foreign.items() if k.partition(".")[0] == layer}
        base = module.get_base_layer().weight
        want = a1111_update(parts, base, 1.0)
        got = module.get_delta_weight("default")
        torch.testing.assert_close(got.float(), want, rtol=1e-5, atol=1e-7)
        checked += 1
    assert checked == len({k.partition(".")[0] for k in foreign})


# The original (SGM) UNet's names of a resnet's layers, as kohya's SDXL files carry them.
SGM_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1"}
SGM_RESNET["conv_shortcut"] = "skip_connection"


def as_sgm(key: str, per: int, attends: list[bool]) -> str:
    """A diffusers-layout kohya key in the original UNet's layout (the test's own account of that layout)."""
    import re

    layer, _, part = key.partition(".")
    found = re.match(
        r"lora_unet_(down_blocks|up_blocks|mid_block)_(?:(\d+)_)?(resnets|attentions|downsamplers|upsamplers)_(\d+)_(.+)",
        layer,
    )
    if found is None:
        return key
    where, b, kind, j, inner = found.groups()
    if kind == "resnets":
        inner = SGM_RESNET.get(inner, inner)
    if where == "mid_block":
        n = {"resnets0": 0, "attentions0": 1, "resnets1": 2}[f"{kind}{j}"]
        return f"lora_unet_middle_block_{n}_{inner}.{part}"
    b_i, j_i = int(b), int(j)
    if where == "down_blocks":
        if kind == "downsamplers":
            return f"lora_unet_input_blocks_{1 + b_i * (per + 1) + per}_0_op.{part}"
        return f"lora_unet_input_blocks_{1 + b_i * (per + 1) + j_i}_{0 if kind == 'resnets' else 1}_{inner}.{part}"
    n = b_i * (per + 1) + (per if kind == "upsamplers" else j_i)
    k = 0 if kind == "resnets" else 1 if kind == "attentions" else (2 if attends[b_i] else 1)
    return f"lora_unet_output_blocks_{n}_{k}_{inner}.{part}"


def test_kohyas_sdxl_file_in_the_original_unets_names_starts_the_run(
    tmp_path: Path, pictures: Path, one_thread: None, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """kohya's SDXL LoRAs name the layers as the original UNet does (``lora_unet_input_blocks_4_1_...``): read in
    this trainer's layout, block by block as diffusers' own loader places them, the run starts from its weights."""
    from train_tools.models.demo_model import build_demo_checkpoint

    xl = build_demo_checkpoint(tmp_path_factory.mktemp("models") / "tiny-xl.safetensors", family="sdxl")
    version = new_version(tmp_path, pictures)
    locon = {"network_type": "locon", "network_dim": 4, "network_alpha": 2.0, "conv_dim": 4, "conv_alpha": 1.0}
    made = Trainer(version, settings(**locon, resolution=64), xl, device="cpu")
    made.prepare()
    config = made.model.unet.config
    per, attends = int(config.layers_per_block), ["CrossAttn" in t for t in config.up_block_types]
    path = network_file(made, tmp_path / "Lora", "ours.safetensors")
    ours = {k: v.clone() for k, v in tensors_of(path)[0].items()}
    sgm = {as_sgm(k, per, attends): v for k, v in ours.items()}
    assert any("input_blocks" in k for k in sgm) and any("output_blocks" in k for k in sgm)
    assert any("in_layers_2" in k for k in sgm) and any("middle_block" in k for k in sgm)
    lora_conversion = pytest.importorskip("diffusers.loaders.lora_conversion_utils")
    placed = lora_conversion._maybe_map_sgm_blocks_to_diffusers(dict(sgm), config)  # diffusers' block placing
    from train_tools.networks.start_from import sgm_names

    mine = sgm_names(sgm, config)
    inner = {v: k for k, v in SGM_RESNET.items()}
    words = {"_input_blocks_": "_down_blocks_", "_output_blocks_": "_up_blocks_", "_middle_block_": "_mid_block_"}
    for theirs in placed:  # the same block for every key; diffusers renames the rest later, in its loader
        named = theirs
        for old, new in [*words.items(), *((f"_{o}.", f"_{n}.") for o, n in inner.items())]:
            named = named.replace(old, new)
        named = named.replace("_downsamplers_0_op.", "_downsamplers_0_conv.")
        assert named in mine, theirs
    assert mine.keys() == ours.keys()
    save_file(sgm, str(tmp_path / "Lora" / "kohya-xl.safetensors"))
    on = Trainer(
        version,
        settings(network_weights="kohya-xl.safetensors", resolution=64),
        xl,
        device="cpu",
        lora_dir=tmp_path / "Lora",
    )
    assert (on.config.network_type, on.config.conv_dim) == ("locon", 4)
    on.prepare()
    got = kohya_state_dict(on.model.unet, on.tes, on.model.family)
    assert got.keys() == ours.keys() and all(torch.equal(got[k].float(), ours[k].float()) for k in ours)


def test_a_file_with_dims_by_block_starts_the_run_with_them(
    tmp_path: Path, demo_ckpt: Path, pictures: Path, one_thread: None
) -> None:
    """A file trained with block dims (ours, or kohya's with block_dims): the run takes each block's dim and
    alpha, and its convolutions', from the file, and starts from its weights."""
    dims = ",".join(str(2 + i % 3) for i in range(25))
    conv = ",".join(str(0 if i % 2 else 3) for i in range(25))
    made_with = dict(MADE["locon"], block_dims=dims, conv_block_dims=conv)
    version = new_version(tmp_path, pictures)
    made = Trainer(version, settings(**made_with), demo_ckpt, device="cpu")
    made.prepare()
    path = network_file(made, tmp_path / "Lora")
    wanted, _ = tensors_of(path)
    config = settings(network_weights=path.name, block_dims=",".join(["9"] * 25))  # the file's win
    on = Trainer(version, config, demo_ckpt, device="cpu", lora_dir=path.parent)
    assert on.config.network_type == "locon" and on.config.block_dims != config.block_dims
    on.prepare()
    got = kohya_state_dict(on.model.unet, on.tes, on.model.family)
    assert got.keys() == wanted.keys()
    assert all(torch.equal(got[k].float(), wanted[k].float()) for k in wanted)
    ranks = {int(v.shape[0]) for k, v in wanted.items() if k.endswith("lora_down.weight")}
    assert len(ranks) >= 3  # dims 2, 3, 4 and the convolutions' 3 and the text encoder's 8


def test_a_lokr_on_1x1_convolutions_is_not_a_locon(tmp_path: Path) -> None:
    """SD1's proj_in / proj_out are 1x1 convolutions: a LoKr's full w2 there is 4-D but not a 3x3 layer, so the
    file has no conv dim, and its sides still give the factor."""
    layer = "lora_unet_down_blocks_0_attentions_0_proj_in"
    path = tmp_path / "k.safetensors"
    save_file(
        {
            f"{layer}.lokr_w1": torch.ones(4, 4),
            f"{layer}.lokr_w2": torch.ones(16, 16, 1, 1),  # 64 = 4 x 16: factor 4, not -1 (8 x 8)
            f"{layer}.alpha": torch.tensor(2.0),
        },
        str(path),
    )
    _, found = read_start(path)
    assert found["network_type"] == "lokr" and found["conv_dim"] == 0 and found["lokr_factor"] == 4
