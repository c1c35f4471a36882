"""Loading single-file checkpoints: detection, bad files, pickles that want to run code, the demo model,
the offline tokenizers."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from tests.helpers_models import assert_same_weights, expanded, save_safetensors
from tests.stand_ins import MakesAFile
from train_tools.errors import UserError
from train_tools.models import tokenizers as toks
from train_tools.models.checkpoint import read_state_dict
from train_tools.models.demo_model import build_demo_checkpoint
from train_tools.models.detect import detect_family, detect_structure, unet_predicts_v
from train_tools.models.loader import file_sha256, load_model

UNET = "model.diffusion_model."
MID_K = UNET + "middle_block.1.transformer_blocks.0.attn2.to_k.weight"
CONV_IN = UNET + "input_blocks.0.0.weight"


@pytest.fixture(scope="module")
def demo_sd1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_checkpoint(tmp_path_factory.mktemp("models") / "demo.safetensors")


# ---------------------------------------------------------------------------------------------- detection
def synthetic(context: int, text_keys: list[str], in_channels: int = 4, extra: dict | None = None) -> dict:
    """The few keys/shapes detection looks at, as zero-memory tensors."""
    sd = {CONV_IN: expanded((320, in_channels, 3, 3)), MID_K: expanded((1280, context))}
    sd.update({k: expanded((8,)) for k in text_keys})
    sd.update(extra or {})
    return sd


SD1_TEXT = ["cond_stage_model.transformer.text_model.final_layer_norm.weight"]
SD2_TEXT = ["cond_stage_model.model.ln_final.weight"]
SDXL_TEXT = [
    "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
    "conditioner.embedders.1.model.ln_final.weight",
]


def test_detects_sd1_sd2_sdxl_from_keys_and_shapes(tmp_path: Path):
    assert detect_structure(synthetic(768, SD1_TEXT)) == ("sd1", False)
    assert detect_structure(synthetic(32, SD1_TEXT)) == ("sd1", True)
    assert detect_structure(synthetic(1024, SD2_TEXT)) == ("sd2", False)
    xl = synthetic(2048, SDXL_TEXT, extra={UNET + "label_emb.0.0.weight": expanded((1280, 2816))})
    assert detect_structure(xl) == ("sdxl", False)
    assert detect_family(xl) == "sdxl"
    assert detect_family(synthetic(768, SD1_TEXT)) == "sd1"


def test_sdxl_tiny_shape_and_refiner(tmp_path: Path):
    label = {UNET + "label_emb.0.0.weight": expanded((64, 80))}
    assert detect_structure(synthetic(64, SDXL_TEXT, extra=label)) == ("sdxl", True)
    # The refiner has the size embedding but only the bigG encoder, stored as embedders.0: not trainable here.
    refiner = synthetic(
        1280,
        ["conditioner.embedders.0.model.ln_final.weight"],
        extra={UNET + "label_emb.0.0.weight": expanded((1536, 2560))},
    )
    with pytest.raises(UserError, match="SDXL refiner"):
        detect_structure(refiner)


def test_sd2_768_v_via_the_sidecar_yaml(tmp_path: Path):
    sd = synthetic(1024, SD2_TEXT)
    ckpt = tmp_path / "v2-1_768-ema-pruned.safetensors"
    (tmp_path / "v2-1_768-ema-pruned.yaml").write_text(
        'model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params:\n    parameterization: "v"\n'
    )
    assert detect_family(sd, ckpt) == "sd2v"
    other = tmp_path / "v2-1_512-ema-pruned.safetensors"
    (tmp_path / "v2-1_512-ema-pruned.yaml").write_text("model:\n  params:\n    linear_start: 0.00085\n")
    assert detect_family(sd, other) == "sd2"
    # An explicit config path wins over the sidecar.
    assert detect_family(sd, other, yaml_path=tmp_path / "v2-1_768-ema-pruned.yaml") == "sd2v"
    (tmp_path / "broken.yaml").write_text("model: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        detect_family(sd, tmp_path / "broken.safetensors")


def test_v_prediction_probe_follows_the_webui_rule():
    """At t=999 an epsilon model returns about its input; a v model far below it."""

    class Fake(torch.nn.Module):
        def __init__(self, shift: float) -> None:
            super().__init__()
            self.shift = shift
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.config = types.SimpleNamespace(cross_attention_dim=16)
            self.seen: list[tuple] = []

        def forward(self, x, t, context):  # type: ignore[no-untyped-def]
            self.seen.append((tuple(x.shape), int(t[0]), tuple(context.shape)))
            return types.SimpleNamespace(sample=x + self.shift + self.w)

    eps, v = Fake(0.1), Fake(-2.0)
    assert unet_predicts_v(eps) is False
    assert unet_predicts_v(v) is True
    assert eps.seen == [((1, 4, 8, 8), 999, (1, 2, 16))]


def test_sd2_without_yaml_is_probed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = build_demo_checkpoint(tmp_path / "sd2.safetensors", family="sd2")
    path.with_suffix(".yaml").unlink()
    calls = []
    import train_tools.models.loader as loader_mod

    def fake_probe(unet: torch.nn.Module) -> bool:
        calls.append(type(unet).__name__)
        return True

    monkeypatch.setattr(loader_mod, "unet_predicts_v", fake_probe)
    loaded = load_model(path)
    assert calls == ["UNet2DConditionModel"]
    assert loaded.family == "sd2v" and loaded.prediction_type == "v_prediction"
    assert loaded.noise_scheduler.config.prediction_type == "v_prediction"
    assert loaded.tokenizers[0].pad_token == "!" and loaded.tokenizers[0].pad_token_id == 0


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 32)}, "is a LoRA"),
        ({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": (4, 32)}, "is a LoRA"),
        ({"encoder.conv_in.weight": (8, 3, 3, 3), "decoder.conv_out.weight": (3, 8, 3, 3)}, "is a VAE only"),
        ({"first_stage_model.decoder.conv_out.weight": (3, 8, 3, 3)}, "is a VAE only"),
        ({"emb_params": (2, 768)}, "textual inversion"),
        ({"something.else": (3,)}, "not a Stable Diffusion checkpoint"),
    ],
)
def test_non_checkpoints_are_refused(keys: dict, message: str):
    with pytest.raises(UserError, match=message):
        detect_family({k: expanded(v) for k, v in keys.items()})


def test_inpainting_and_unknown_shapes_are_refused():
    with pytest.raises(UserError, match="inpainting"):
        detect_structure(synthetic(768, SD1_TEXT, in_channels=9))
    with pytest.raises(UserError, match="unsupported SD1"):
        detect_structure(synthetic(512, SD1_TEXT))
    with pytest.raises(UserError, match="no text encoder"):
        detect_structure(synthetic(768, []))


# ---------------------------------------------------------------------------------------------- bad files
def test_missing_file(tmp_path: Path):
    with pytest.raises(UserError, match="was not found"):
        load_model(tmp_path / "nope.safetensors")


def test_truncated_safetensors(tmp_path: Path, demo_sd1: Path):
    cut = tmp_path / "cut.safetensors"
    data = demo_sd1.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="cut.safetensors is incomplete"):
        load_model(cut)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(data[:5])
    with pytest.raises(UserError, match="empty or cut off"):
        read_state_dict(tiny)


def test_text_file_named_safetensors(tmp_path: Path):
    fake = tmp_path / "model.safetensors"
    fake.write_text("<html>404 not found</html>")
    with pytest.raises(UserError, match="model.safetensors is not a valid .safetensors file"):
        load_model(fake)


def test_lora_file_passed_as_checkpoint(tmp_path: Path):
    lora = tmp_path / "my_lora.safetensors"
    save_file(
        {
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4),
            "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0),
        },
        str(lora),
    )
    with pytest.raises(UserError, match="my_lora.safetensors is a LoRA, not a checkpoint"):
        load_model(lora)


def test_vae_file_passed_as_checkpoint(tmp_path: Path, demo_sd1: Path):
    sd = read_state_dict(demo_sd1)
    vae = {k[len("first_stage_model.") :]: v for k, v in sd.items() if k.startswith("first_stage_model.")}
    path = save_safetensors(tmp_path / "vae-ft-mse.safetensors", vae)
    with pytest.raises(UserError, match="is a VAE only"):
        load_model(path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("container", ["torch.save", "plain pickle"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path, demo_sd1: Path, container: str):
    marker = tmp_path / "pwned.txt"
    payload = {"state_dict": {"model.diffusion_model.x": torch.zeros(2)}, "evil": MakesAFile(marker)}
    ckpt = tmp_path / "evil.ckpt"
    if container == "torch.save":
        torch.save(payload, ckpt)
    else:
        ckpt.write_bytes(pickle.dumps(payload))
    with pytest.raises(UserError) as info:
        load_model(ckpt)
    assert not marker.exists()
    assert "evil.ckpt" in str(info.value)
    if container == "torch.save":
        assert "run code" in str(info.value) and ".safetensors" in str(info.value)


def test_plain_ckpt_loads_like_the_safetensors(tmp_path: Path, demo_sd1: Path):
    sd = read_state_dict(demo_sd1)
    ckpt = tmp_path / "demo.ckpt"
    torch.save({"state_dict": sd, "global_step": 470000}, ckpt)
    from_ckpt = load_model(ckpt)
    from_st = load_model(demo_sd1)
    assert from_ckpt.family == "sd1"
    assert_same_weights(from_st.unet, from_ckpt.unet)
    assert_same_weights(from_st.text_encoders[0], from_ckpt.text_encoders[0])


def test_ckpt_with_training_leftovers_loads_without_running_them(
    tmp_path: Path, demo_sd1: Path, monkeypatch: pytest.MonkeyPatch
):
    """Old .ckpt files carry a lightning callback object: it is read as inert data, its code never runs."""
    ran: list[str] = []
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __init__(self) -> None:
            self.best = 1.0

        def __setstate__(self, state: dict) -> None:
            ran.append("setstate")

    ModelCheckpoint.__module__ = module.__name__
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint  # type: ignore[attr-defined]
    for parent in ("pytorch_lightning", "pytorch_lightning.callbacks"):
        monkeypatch.setitem(sys.modules, parent, types.ModuleType(parent))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    sd = read_state_dict(demo_sd1)
    ckpt = tmp_path / "old.ckpt"
    torch.save({"state_dict": sd, "callbacks": {"ModelCheckpoint": ModelCheckpoint()}}, ckpt)
    monkeypatch.delitem(sys.modules, module.__name__)  # as on a machine without lightning
    loaded = read_state_dict(ckpt)
    assert ran == []
    assert loaded.keys() == sd.keys()
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)


# ---------------------------------------------------------------------------------------------- demo model
def test_demo_checkpoint_loads_and_its_text_encoder_runs(tmp_path: Path, demo_sd1: Path):
    assert 1_000_000 < demo_sd1.stat().st_size < 10_000_000
    first = read_state_dict(demo_sd1)
    again = read_state_dict(build_demo_checkpoint(tmp_path / "again.safetensors"))
    assert again.keys() == first.keys()
    assert all(torch.equal(again[k], first[k]) for k in first)  # same seed, same weights
    other = read_state_dict(build_demo_checkpoint(tmp_path / "other.safetensors", seed=1))
    assert not torch.equal(other[CONV_IN], first[CONV_IN])

    m = load_model(demo_sd1, dtype=torch.float32)
    assert m.family == "sd1" and m.prediction_type == "epsilon" and m.spec.tiny
    assert m.noise_scheduler.config.beta_schedule == "scaled_linear"
    assert m.noise_scheduler.config.num_train_timesteps == 1000
    assert m.vae.config.scaling_factor == pytest.approx(0.18215)
    (tok,) = m.tokenizers
    ids = tok("a photo of a cat")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == [
        "<|startoftext|>",
        "a</w>",
        "photo</w>",
        "of</w>",
        "a</w>",
        "cat</w>",
        "<|endoftext|>",
    ]
    assert toks.tiny_tokenizer(cache_dir=tmp_path / "tok")("a photo of a cat")["input_ids"] == ids
    assert tok.pad_token_id == tok.eos_token_id  # SD1 pads with <|endoftext|>
    batch = tok(
        ["a photo of a cat", "a dog"],
        padding="max_length",
        max_length=tok.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    assert batch.input_ids.shape == (2, 77)
    (te,) = m.text_encoders
    assert isinstance(te, CLIPTextModel)
    with torch.no_grad():
        hidden = te(batch.input_ids)[0]
    assert hidden.shape == (2, 77, 32) and torch.isfinite(hidden).all()
    assert not torch.allclose(hidden[0], hidden[1])
    # The UNet and VAE run at the demo resolution (latents are 1/8 of the image).
    with torch.no_grad():
        latents = m.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
        assert latents.shape == (1, 4, 8, 8)
        out = m.unet(latents, torch.tensor([10]), hidden[:1]).sample
    assert out.shape == latents.shape
    assert m.sha256 == hashlib.sha256(demo_sd1.read_bytes()).hexdigest() == file_sha256(demo_sd1)


def test_demo_sdxl_loads_with_two_text_encoders(tmp_path: Path):
    path = build_demo_checkpoint(tmp_path / "xl.safetensors", family="sdxl")
    m = load_model(path, dtype=torch.float16)
    assert m.family == "sdxl"
    assert [type(te) for te in m.text_encoders] == [CLIPTextModel, CLIPTextModelWithProjection]
    assert all(p.dtype == torch.float16 for te in m.text_encoders for p in te.parameters())
    assert m.unet.dtype == torch.float16
    assert m.unet.config.addition_embed_type == "text_time"
    assert m.vae.config.scaling_factor == pytest.approx(0.13025)
    assert [t.pad_token for t in m.tokenizers] == ["<|endoftext|>", "!"]
    assert m.tokenizers[1].pad_token_id == 0


# ---------------------------------------------------------------------------------------------- tokenizers
def _fake_bpe(path: Path, merges: list[str]) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write('"bpe_simple_vocab_16e6.txt#version: 0.2\n' + "\n".join(merges) + "\n")


def test_real_vocab_is_built_from_the_open_clip_merges_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The CLIP rule: 256 byte chars, their </w> forms, the merges, then the two specials; open_clip is found
    without being imported."""
    package = tmp_path / "site" / "open_clip"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('open_clip must not be imported')\n")
    _fake_bpe(package / toks.OPEN_CLIP_BPE, ["c a", "ca t</w>", "t h", "th e</w>"])
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(toks, "_cached_hub_tokenizer", lambda kind, pad: None)
    assert toks.find_open_clip_bpe() == package / toks.OPEN_CLIP_BPE
    tok = toks.real_clip_tokenizer("openclip-bigg", pad_token="!")
    assert "open_clip" not in sys.modules
    assert len(tok) == 512 + 4 + 2
    assert tok.convert_ids_to_tokens(tok("the cat")["input_ids"]) == [
        "<|startoftext|>",
        "the</w>",
        "cat</w>",
        "<|endoftext|>",
    ]
    assert tok.bos_token_id == 516 and tok.eos_token_id == 517  # the specials come last
    assert tok.convert_ids_to_tokens([0, 256])[0] == "!" and tok.pad_token_id == 0
    # The real file holds more merges than CLIP uses: only the first 48894 count.
    many = tmp_path / "many.txt.gz"
    _fake_bpe(many, [f"{a} {b}" for a in "abcdefghij" for b in "klmnopqrst"])
    assert len(toks.read_bpe_merges(many, count=7)) == 7


def test_an_empty_hub_cache_gives_no_tokenizer(tmp_path: Path):
    # transformers 5 would hand back a 3-token stand-in here; it must not be taken for CLIP's vocabulary.
    assert toks._cached_hub_tokenizer("clip-l", toks.EOS, hub_cache=tmp_path) is None


def test_no_tokenizer_available_says_what_to_install(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(toks, "_cached_hub_tokenizer", lambda kind, pad: None)
    monkeypatch.setattr(toks, "find_open_clip_bpe", lambda: None)
    with pytest.raises(UserError, match="pip install --no-deps open-clip-torch"):
        toks.tokenizer_for(49408)
    with pytest.raises(UserError, match="fits no CLIP tokenizer"):
        toks.tokenizer_for(1234)


def test_tokenizer_folder_given_by_the_caller(tmp_path: Path):
    tiny = toks.tiny_tokenizer(cache_dir=tmp_path / "cache")
    folder = tmp_path / "saved"
    tiny.save_pretrained(str(folder))
    tok = toks.real_clip_tokenizer(pad_token="!", tokenizer_dir=folder)
    assert tok("a photo of a cat")["input_ids"] == tiny("a photo of a cat")["input_ids"]
    assert tok.pad_token == "!" and tok.model_max_length == 77
    with pytest.raises(UserError, match="holds no vocab.json"):
        toks.real_clip_tokenizer(tokenizer_dir=tmp_path / "missing")
    # A folder with the wrong vocabulary for a full-size text encoder is refused, not silently used.
    with pytest.raises(UserError, match=f"has {toks.TINY_VOCAB_SIZE} tokens"):
        toks.tokenizer_for(toks.REAL_VOCAB_SIZE, tokenizer_dir=folder)
