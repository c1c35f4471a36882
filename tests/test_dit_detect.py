"""The newer transformer families (issue 19, first part): a FLUX.1, FLUX.2, Chroma, SD3 / SD3.5, Z-Image or
Qwen-Image file is told apart by its keys, as the public loaders tell them, and named in the tab and in the
sentence that refuses to train it (this version trains SD1, SD2 and SDXL), instead of "not a checkpoint"."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from train_tools.config import TrainConfig
from train_tools.errors import UserError
from train_tools.hosts.base import StandaloneHost
from train_tools.models.detect import detect_checkpoint_family, detect_dit_family
from train_tools.models.dit_detect import dit_family
from train_tools.models.loader import load_model
from train_tools.ui import logic as ui_logic
from train_tools.ui.jobs import JobManager

FLUX = {
    "img_in.weight": (8, 4),
    "double_blocks.0.img_attn.norm.key_norm.scale": (16,),
    "double_blocks.0.img_attn.qkv.weight": (24, 8),
    "single_blocks.0.linear1.weight": (40, 8),
}
SD3 = {"joint_blocks.0.context_block.attn.qkv.weight": (24, 8), "x_embedder.proj.weight": (128, 16, 2, 2)}
FAMILIES = [
    ({**FLUX, "guidance_in.in_layer.weight": (8, 256)}, "flux1-dev", "FLUX.1-dev"),
    (FLUX, "flux1-schnell", "FLUX.1-schnell"),
    ({**FLUX, "double_stream_modulation_img.lin.weight": (48, 8)}, "flux2", "FLUX.2"),
    ({**FLUX, "distilled_guidance_layer.in_proj.weight": (8, 64)}, "chroma", "Chroma"),
    (SD3, "sd3", "SD3 Medium"),
    ({**SD3, "joint_blocks.0.x_block.attn.ln_q.weight": (8,)}, "sd35-large", "SD3.5 Large"),
    ({**SD3, "joint_blocks.0.x_block.attn2.qkv.weight": (24, 8)}, "sd35-medium", "SD3.5 Medium"),
    ({"cap_embedder.1.weight": (3840, 8), "layers.0.attention.qkv.weight": (24, 8)}, "zimage", "Z-Image"),
    ({"txt_norm.weight": (8,), "transformer_blocks.0.attn.to_q.weight": (8, 8)}, "qwen-image", "Qwen-Image"),
]


def shaped(keys: dict[str, tuple[int, ...]], prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: torch.zeros(shape) for k, shape in keys.items()}


@pytest.mark.parametrize(("keys", "name", "title"), FAMILIES)
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_each_family_is_told_by_its_keys(keys: dict, name: str, title: str, prefix: str) -> None:
    found = dit_family(shaped(keys, prefix))
    assert found is not None and (found.name, found.title) == (name, title)


@pytest.mark.parametrize(
    "keys",
    [
        {"cap_embedder.1.weight": (2304, 8)},  # Lumina 2, not Z-Image: another width
        {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)},  # an SD UNet
        {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": (4, 8)},  # a FLUX LoRA
        {"something.else": (3,)},
    ],
)
def test_other_files_are_no_newer_family(keys: dict) -> None:
    assert dit_family(shaped(keys)) is None


def test_a_flux_file_is_named_in_the_tab_and_refused_with_a_sentence(tmp_path: Path) -> None:
    host = StandaloneHost(tmp_path / "data")
    folder = host.ckpt_dirs[0]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "flux1-schnell.safetensors"
    save_file(shaped(FLUX, "model.diffusion_model."), str(path))
    assert detect_dit_family(path) is not None and detect_dit_family(path).title == "FLUX.1-schnell"
    for read in (detect_checkpoint_family, load_model):
        with pytest.raises(UserError, match=r"is a FLUX.1-schnell model \(schnell is distilled.*SD1, SD2 or SDXL"):
            read(path)
    logic = ui_logic.TabLogic(host, JobManager())
    line = logic.model_line("flux1-schnell.safetensors", False, TrainConfig(), None)
    assert line.startswith("Detected: **FLUX.1-schnell**, which this version cannot train yet")
