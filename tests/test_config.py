"""The settings schema: defaults of the original tab, one source for JSON, CLI and file metadata."""

from __future__ import annotations

import dataclasses
import json

import pytest

from train_tools.config import TrainConfig
from train_tools.config_values import parse_assignments
from train_tools.errors import UserError


def test_defaults_are_the_original_tabs():
    c = TrainConfig()
    assert (c.epochs, c.save_every_n_epochs, c.batch_size, c.learning_rate) == (20, 2, 1, 1e-4)
    assert (c.network_dim, c.network_alpha, c.optimizer, c.mixed_precision) == (128, 64.0, "Lion", "fp16")
    assert (c.resolution, c.min_bucket_reso, c.max_bucket_reso, c.enable_bucket) == (512, 320, 960, True)
    assert c.repeats == 0  # auto


def test_required_keys_exist():
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    for key in (
        "base_model",
        "epochs",
        "save_every_n_epochs",
        "batch_size",
        "repeats",
        "learning_rate",
        "network_dim",
        "network_alpha",
        "optimizer",
        "mixed_precision",
        "clip_skip",
        "resolution",
        "seed",
        "train_text_encoder",
        "unet_lr",
        "text_encoder_lr",
        "lr_scheduler",
        "lr_warmup_steps",
        "noise_offset",
        "min_snr_gamma",
        "gradient_checkpointing",
        "cache_latents",
        "max_grad_norm",
    ):
        assert key in names


def test_json_round_trip_and_string_values():
    c = TrainConfig.from_dict({"epochs": "3", "learning_rate": "5e-5", "flip_aug": "true", "optimizer": "AdamW"})
    assert (c.epochs, c.learning_rate, c.flip_aug, c.optimizer) == (3, 5e-5, True, "AdamW")
    again = TrainConfig.from_dict(json.loads(c.to_json()))
    assert again == c


@pytest.mark.parametrize(
    "data, key",
    [
        ({"epoch": 3}, "epoch"),
        ({"epochs": "many"}, "epochs"),
        ({"epochs": 0}, "epochs"),
        ({"optimizer": "Adam"}, "optimizer"),
        ({"learning_rate": "nan"}, "learning_rate"),
        ({"train_text_encoder": "maybe"}, "train_text_encoder"),
        ({"batch_size": 1.5}, "batch_size"),
    ],
)
def test_bad_values_name_the_key(data, key):
    with pytest.raises(UserError, match=f"'{key}'"):
        TrainConfig.from_dict(data)


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(UserError, match="Did you mean 'epochs'"):
        TrainConfig.from_dict({"epoch": 3})


def test_ss_metadata_comes_from_the_fields():
    c = TrainConfig(learning_rate=3e-4, network_dim=16, resolution=768)
    meta = c.ss_metadata()
    assert meta["ss_learning_rate"] == "0.0003"
    assert meta["ss_unet_lr"] == "0.0003"  # 0 means "same as learning_rate"
    assert meta["ss_network_dim"] == "16"
    assert meta["ss_resolution"] == "(768, 768)"
    assert all(isinstance(v, str) for v in meta.values())


def test_parse_assignments():
    assert parse_assignments(["epochs=3", "output_name=a=b"]) == {"epochs": "3", "output_name": "a=b"}
    with pytest.raises(UserError):
        parse_assignments(["epochs"])
