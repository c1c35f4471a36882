"""Automatic captioners: the WD14 tagger on a tiny ONNX model built here (same input and output contract as the
real ones), BLIP on a tiny random model, finding and downloading models, and captions reaching training."""

from __future__ import annotations

import csv
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from train_tools.config import TrainConfig
from train_tools.data import blip, wd14
from train_tools.data import captioners as cap
from train_tools.data.items import load_items, tag_frequency
from train_tools.data.prepare_folder import prepare_dataset
from train_tools.data.prepare_options import PrepareOptions
from train_tools.errors import UserError

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

# The tiny tagger's features, in the order of the weight rows: the mean of each model input channel (the model
# sees BGR, so channel 0 is blue and channel 2 red), and the mean of the top pixel row (white padding -> 1).
FEATURES = ("blue", "green", "red", "top_row")
# (name, category, weights per feature, bias): score = sigmoid(weights . features + bias).
TAGS = [
    ("general", wd14.RATING, (0, 0, 0, 0), math.log(0.7 / 0.3)),  # always 0.7
    ("sensitive", wd14.RATING, (0, 0, 10, 0), -5),  # 0.993 on pure red, else 0.007
    ("blue_sky", wd14.GENERAL, (10, 0, 0, 0), -5),
    ("red_theme", wd14.GENERAL, (0, 0, 10, 0), -5),
    ("green_hair", wd14.GENERAL, (0, 10, 0, 0), -5),  # 0.993 on pure green
    ("^_^", wd14.GENERAL, (0, 8, 0, 0), -5),  # 0.953 on pure green
    ("hatsune_miku", wd14.CHARACTER, (0, 7.2, 0, 0), -5),  # 0.900 on pure green
    ("white_border", wd14.GENERAL, (0, 0, 0, 10), -5),  # fires when the top row is white
    ("medium_score", wd14.GENERAL, (0, 0, 0, 0), 0),  # always 0.5
]
RED, GREEN_, BLUE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (0, 0, 0)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def build_tagger_files(folder: Path, side: int = 64, batch: int | str = 1, tags=TAGS) -> tuple[Path, Path]:
    """A WD14-shaped model (input [batch, side, side, 3] float32 0-255, output [batch, n] sigmoid scores)."""
    folder.mkdir(parents=True, exist_ok=True)
    n = len(tags)
    weights = np.array([t[2] for t in tags], dtype=np.float32).T  # [4, n]
    bias = np.array([t[3] for t in tags], dtype=np.float32)
    nodes = [
        helper.make_node("Div", ["x", "c255"], ["xn"]),
        helper.make_node("ReduceMean", ["xn"], ["means"], axes=[1, 2], keepdims=0),  # [b, 3]
        helper.make_node("Slice", ["xn", "s0", "s1", "ax1"], ["top"]),  # [b, 1, side, 3]
        helper.make_node("ReduceMean", ["top"], ["topm"], axes=[2, 3], keepdims=0),  # [b, 1]
        helper.make_node("Concat", ["means", "topm"], ["feat"], axis=1),  # [b, 4]
        helper.make_node("MatMul", ["feat", "w"], ["logits0"]),
        helper.make_node("Add", ["logits0", "b"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["scores"]),
    ]
    inits = [
        helper.make_tensor("c255", TensorProto.FLOAT, [], [255.0]),
        helper.make_tensor("s0", TensorProto.INT64, [1], [0]),
        helper.make_tensor("s1", TensorProto.INT64, [1], [1]),
        helper.make_tensor("ax1", TensorProto.INT64, [1], [1]),
        helper.make_tensor("w", TensorProto.FLOAT, list(weights.shape), weights.flatten().tolist()),
        helper.make_tensor("b", TensorProto.FLOAT, [n], bias.tolist()),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_tagger",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, side, side, 3])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [batch, n])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # readable by every onnxruntime the three test environments have
    onnx.checker.check_model(model)
    model_path = folder / wd14.WD14_MODEL_FILE
    model_path.write_bytes(model.SerializeToString())
    tags_path = folder / wd14.WD14_TAGS_FILE
    with open(tags_path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["tag_id", "name", "category", "count"])
        for i, (name, category, _w, _b) in enumerate(tags):
            writer.writerow([1000 + i, name, category, 100 - i])
    return model_path, tags_path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path]:
    return build_tagger_files(tmp_path_factory.mktemp("tagger"))


def solid(colour, size=(64, 64), mode="RGB") -> Image.Image:
    return Image.new(mode, size, colour)


def expected_score(name: str, image_feats: dict[str, float]) -> float:
    _n, _c, w, b = next(t for t in TAGS if t[0] == name)
    return sigmoid(sum(wi * image_feats[f] for wi, f in zip(w, FEATURES, strict=False)) + b)


# ---------------------------------------------------------------------- the tagger itself


def test_colours_fire_their_tags_in_bgr_order_sorted_by_confidence(files):
    tagger = wd14.WD14Tagger(*files)
    # A pure red RGB picture reaches the model as channel 2 (BGR), so it is "red theme", not "blue sky".
    assert tagger(solid(RED)) == "red theme, medium score"
    assert tagger(solid(BLUE)) == "blue sky, medium score"
    # Green: several tags, most confident first; the kaomoji keeps its underscore; the character is kept at
    # 0.900 >= 0.85.
    assert tagger(solid(GREEN_)) == "green hair, ^_^, hatsune miku, medium score"
    scores = dict(zip([t[0] for t in TAGS], tagger.scores([solid(GREEN_)])[0], strict=False))
    feats = {"blue": 0.0, "green": 1.0, "red": 0.0, "top_row": 1 / 3}
    for name, value in scores.items():
        assert value == pytest.approx(expected_score(name, feats), abs=1e-5), name


def test_thresholds_decide_general_and_character_tags_separately(files):
    strict = wd14.WD14Tagger(*files, general_threshold=0.6)
    assert "medium score" not in strict(solid(GREEN_)).split(", ")
    assert "hatsune miku" in strict(solid(GREEN_)).split(", ")
    no_char = wd14.WD14Tagger(*files, character_threshold=0.95)
    tags = no_char(solid(GREEN_)).split(", ")
    assert "hatsune miku" not in tags and "^_^" in tags  # 0.953 general stays: it is not a character
    loose = wd14.WD14Tagger(*files, general_threshold=0.0)
    # At 0 every general tag passes, still sorted by score (the red feature fires red_theme first).
    tags = loose(solid(RED)).split(", ")
    assert tags[0] == "red theme" and set(tags) == {
        "red theme",
        "blue sky",
        "green hair",
        "^_^",
        "white border",
        "medium score",
    }


def test_rating_is_off_by_default_and_first_when_on(files):
    assert not {"general", "sensitive"} & set(wd14.WD14Tagger(*files)(solid(RED)).split(", "))
    rated = wd14.WD14Tagger(*files, include_rating=True)
    assert rated(solid(RED)).split(", ")[0] == "sensitive"  # 0.993 beats general's 0.7
    assert rated(solid(BLUE)).split(", ")[0] == "general"  # only the best rating is written
    assert "sensitive" not in rated(solid(BLUE))


def test_exclusion_and_underscores(files):
    # Excluded tags may be written either way (spaces or underscores, any case); a string list works too.
    tagger = wd14.WD14Tagger(*files, exclude="Green_Hair, medium score")
    assert tagger(solid(GREEN_)) == "^_^, hatsune miku"
    keep = wd14.WD14Tagger(*files, underscores_to_spaces=False, exclude=["^_^"])
    assert keep(solid(GREEN_)) == "green_hair, hatsune_miku, medium_score"


def test_non_square_pictures_are_padded_white_and_resized_to_the_model_input(files):
    tagger = wd14.WD14Tagger(*files)
    assert tagger.input_size == 64
    wide = solid(BLACK, (200, 100))
    row = tagger.preprocess(wide)
    assert row.shape == (64, 64, 3) and row.dtype == np.float32
    assert row[:15].min() == 255 and row[-15:].min() == 255  # white bands above and below
    assert row[24:40].max() == 0  # the picture itself in the middle
    tall = tagger.preprocess(solid(BLACK, (50, 100)))
    assert tall[:, :15].min() == 255 and tall[:, -15:].min() == 255 and tall[:, 24:40].max() == 0
    # The model sees the padding: its top-row output fires on the padded black picture, not on a square one.
    assert "white border" in tagger(wide).split(", ")
    assert "white border" not in tagger(solid(BLACK, (100, 100))).split(", ")
    # Transparency is flattened onto white before padding.
    clear = tagger.preprocess(solid((0, 0, 0, 0), (64, 64), "RGBA"))
    assert clear.min() == 255


def test_input_size_comes_from_the_model(tmp_path):
    tagger = wd14.WD14Tagger(*build_tagger_files(tmp_path / "t48", side=48))
    assert tagger.input_size == 48
    assert tagger.preprocess(solid(RED, (300, 120))).shape == (48, 48, 3)
    assert tagger(solid(RED)) == "red theme, medium score"


def test_batches_match_single_calls_with_fixed_and_dynamic_batch_models(files, tmp_path):
    pictures = [solid(RED), solid(GREEN_, (90, 64)), solid(BLUE, (64, 120))]
    single = [wd14.WD14Tagger(*files)(p) for p in pictures]
    assert wd14.WD14Tagger(*files).tag_many(pictures) == single  # fixed batch of 1: one run each
    dynamic = wd14.WD14Tagger(*build_tagger_files(tmp_path / "dyn", batch="N"), batch_size=2)
    assert dynamic.tag_many(pictures) == single
    assert dynamic.tag_many([]) == []


def test_bad_model_files_are_user_errors(files, tmp_path):
    with pytest.raises(UserError, match="missing"):
        wd14.WD14Tagger(tmp_path / "none.onnx", files[1])
    short = tmp_path / "short.csv"
    short.write_text("tag_id,name,category,count\n1,a,0,1\n", encoding="utf-8")
    with pytest.raises(UserError, match="different models"):
        wd14.WD14Tagger(files[0], short)(solid(RED))
    bad = tmp_path / "bad.csv"
    bad.write_text("id,label\n1,a\n", encoding="utf-8")
    with pytest.raises(UserError, match="columns"):
        wd14.WD14Tagger(files[0], bad)


def test_repr_is_stable_and_names_the_settings(files):
    # prepare_dataset caches captions under it: same settings -> same text, any change -> different text.
    a, b = wd14.WD14Tagger(*files), wd14.WD14Tagger(*files)
    assert repr(a) == repr(b) and "0x" not in repr(a)
    assert repr(wd14.WD14Tagger(*files, general_threshold=0.5)) != repr(a)
    assert repr(wd14.WD14Tagger(*files, exclude="x")) != repr(a)


# ---------------------------------------------------------------------- finding and downloading the model

REPO = "someone/wd-tiny-tagger"


def test_model_found_in_train_tools_and_webui_layouts(tmp_path, files):
    models = tmp_path / "models"
    assert wd14.find_wd14(models, REPO) is None
    ours = build_tagger_files(wd14.wd14_folder(models, REPO))
    assert wd14.find_wd14(models, REPO) == ours
    webui = tmp_path / "webui_models"
    plain = build_tagger_files(webui / "interrogators" / "wd-tiny-tagger")
    assert wd14.find_wd14(webui, REPO) == plain
    cache = tmp_path / "cache_models"
    snap = build_tagger_files(cache / "interrogators" / "models--someone--wd-tiny-tagger" / "snapshots" / "abc")
    assert wd14.find_wd14(cache, REPO) == snap
    tagger = cap.make_captioner("wd14", models_dir=cache, repo=REPO, general_threshold=0.6, device="cpu")
    assert isinstance(tagger, wd14.WD14Tagger) and tagger(solid(RED)) == "red theme"
    assert tagger.session.get_providers() == ["CPUExecutionProvider"]


def test_offline_without_model_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as err:
        cap.make_captioner("wd14", models_dir=tmp_path / "models")
    assert str(wd14.wd14_folder(tmp_path / "models")) in str(err.value)
    assert wd14.WD14_MODEL_FILE in str(err.value)


def test_download_once_into_the_models_folder_with_progress(tmp_path, monkeypatch):
    import huggingface_hub

    source = tmp_path / "hub"
    build_tagger_files(source)
    calls: list[tuple[str, str]] = []

    def fake_download(repo_id, filename, *, local_dir=None, tqdm_class=None, **kwargs):
        calls.append((repo_id, filename))
        data = (source / filename).read_bytes()
        if tqdm_class is not None:
            with tqdm_class(total=len(data), disable=True) as bar:
                bar.update(len(data) // 2)
                bar.update(len(data) - len(data) // 2)
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return str(target)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    seen: list[tuple[int, int]] = []
    models = tmp_path / "models"
    tagger = cap.make_captioner(
        "wd14",
        models_dir=models,
        repo=REPO,
        allow_download=True,
        progress=lambda done, total: seen.append((done, total)),
    )
    assert sorted(calls) == [(REPO, wd14.WD14_MODEL_FILE), (REPO, wd14.WD14_TAGS_FILE)]
    assert tagger.model_path.parent == wd14.wd14_folder(models, REPO) and tagger(solid(RED))
    assert seen and all(done <= total for done, total in seen) and seen[-1][0] == seen[-1][1] > 0
    cap.make_captioner("wd14", models_dir=models, repo=REPO, allow_download=True)
    assert len(calls) == 2  # found on disk the second time

    def failing(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", failing)
    with pytest.raises(UserError, match="no network"):
        cap.make_captioner("wd14", models_dir=tmp_path / "other", allow_download=True)


def test_a_stop_during_the_download_is_not_a_download_failure(tmp_path, monkeypatch):
    """Interrupt while the model downloads: the stop goes through (it is no "download failed" message)."""
    import huggingface_hub

    from train_tools.progress import Stopped

    def fake_download(repo_id, filename, *, local_dir=None, tqdm_class=None, **kwargs):
        with tqdm_class(total=100, disable=True) as bar:
            bar.update(10)
        raise AssertionError("the download went on after the stop")

    def stop_asked(done: int, total: int) -> None:
        raise Stopped

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    with pytest.raises(Stopped):
        cap.make_captioner("wd14", models_dir=tmp_path / "models", repo=REPO, allow_download=True, progress=stop_asked)


def test_make_captioner_kinds_and_host_hook(tmp_path):
    assert cap.make_captioner("none", models_dir=tmp_path) is None
    with pytest.raises(UserError, match="must be one of"):
        cap.make_captioner("clip", models_dir=tmp_path)

    class FakeHost:
        def captioner(self, kind):
            return (lambda image: f"host {kind} {image.size[0]}") if kind in ("blip", "deepbooru") else None

    assert cap.make_captioner("deepbooru", models_dir=tmp_path, host=FakeHost())(solid(RED)) == "host deepbooru 64"
    assert cap.make_captioner("blip", models_dir=tmp_path, host=FakeHost())(solid(RED)) == "host blip 64"
    from train_tools.hosts.base import StandaloneHost

    assert StandaloneHost(tmp_path).captioner("blip") is None


def test_settings_are_in_the_config_and_reach_the_tagger(tmp_path):
    config = TrainConfig()
    assert config.captioner == "none" and config.tagger_general_threshold == 0.35
    assert cap.captioner_from_config(config, models_dir=tmp_path) is None
    build_tagger_files(wd14.wd14_folder(tmp_path, wd14.DEFAULT_WD14_REPO))
    config = config.updated(
        {
            "captioner": "wd14",
            "tagger_general_threshold": "0.6",
            "tagger_include_rating": "yes",
            "tagger_exclude": "sensitive",
        }
    )
    tagger = cap.captioner_from_config(config, models_dir=tmp_path)
    assert tagger(solid(RED)) == "red theme"
    with pytest.raises(UserError, match="captioner"):
        config.updated({"captioner": "clip"})
    with pytest.raises(UserError, match="tagger_general_threshold"):
        config.updated({"tagger_general_threshold": 1.5})


# ---------------------------------------------------------------------- captions reaching training


def test_tagger_captions_reach_load_items_with_uploaded_captions(tmp_path, files):
    orig, prep = tmp_path / "orig", tmp_path / "prep"
    orig.mkdir()
    solid(RED, (96, 96)).save(orig / "red.png")
    (orig / "red.txt").write_text("my words\n", encoding="utf-8")
    solid(BLUE, (96, 96)).save(orig / "blue.png")
    tagger = wd14.WD14Tagger(*files)
    runs: list[int] = []
    real = tagger.tag_many
    tagger.tag_many = lambda images: runs.append(len(images)) or real(images)  # count model runs

    def captions(mode: str, auto=tagger) -> dict[str, str]:
        prepare_dataset(orig, prep, PrepareOptions(caption_mode=mode, trigger_word="trig"), auto_caption=auto)
        return {item.source: item.caption for item in load_items(prep)}

    red_tags, blue_tags = tagger(solid(RED)), tagger(solid(BLUE))
    assert red_tags == "red theme, medium score" and blue_tags == "blue sky, medium score"
    runs.clear()
    assert captions("prepend") == {"red.png": f"trig, my words, {red_tags}", "blue.png": f"trig, {blue_tags}"}
    assert len(runs) == 2
    assert captions("append") == {"red.png": f"trig, {red_tags}, my words", "blue.png": f"trig, {blue_tags}"}
    assert captions("use") == {"red.png": "trig, my words", "blue.png": f"trig, {blue_tags}"}
    assert len(runs) == 2  # the tags were cached in the manifest: no re-run for a caption-mode change
    assert captions("ignore")["red.png"] == f"trig, {red_tags}"
    # Other settings make other tags: the cache knows, and re-tags.
    stricter = wd14.WD14Tagger(*files, general_threshold=0.6)
    assert captions("append", stricter) == {"red.png": "trig, red theme, my words", "blue.png": "trig, blue sky"}
    frequency = tag_frequency(load_items(prep))
    assert frequency == {"trig": 2, "red theme": 1, "my words": 1, "blue sky": 1}


# ---------------------------------------------------------------------- BLIP


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory) -> Path:
    """A BLIP of random weights and a 64-word vocabulary, saved like a downloaded one."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    folder = tmp_path_factory.mktemp("blip")
    vocab = folder / "vocab.txt"
    vocab.write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(59)]) + "\n",
        encoding="utf-8",
    )
    tokenizer = BertTokenizer(str(vocab))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = BlipConfig(
        text_config={
            **small,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 64,
            "bos_token_id": tokenizer.bos_token_id,
            "pad_token_id": 0,
            "sep_token_id": 3,
            "eos_token_id": 3,
        },
        vision_config={**small, "image_size": 32, "patch_size": 16},
        projection_dim=32,
    )
    torch.manual_seed(0)
    model_dir = folder / "model"
    BlipForConditionalGeneration(config).save_pretrained(str(model_dir))
    processor.save_pretrained(str(model_dir))
    return model_dir


def test_blip_captioner_runs_a_local_model(tiny_blip, tmp_path):
    captioner = blip.BlipCaptioner(tiny_blip, device="cpu", max_new_tokens=6)
    text = captioner(solid(RED, (80, 50)))
    assert isinstance(text, str) and text == " ".join(text.split())  # random weights: only the form is known
    assert captioner.caption_many([solid(BLUE), solid((0, 0, 0, 0), mode="RGBA")]).__len__() == 2
    assert "0x" not in repr(captioner)
    made = cap.make_captioner("blip", models_dir=tmp_path, model=str(tiny_blip), device="cpu", max_new_tokens=4)
    assert isinstance(made, blip.BlipCaptioner) and isinstance(made(solid(GREEN_)), str)


def test_blip_found_in_the_models_folder_and_offline_error(tmp_path, tiny_blip, monkeypatch):
    import shutil

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as err:
        cap.make_captioner("blip", models_dir=tmp_path / "models")
    assert str(blip.blip_folder(tmp_path / "models")) in str(err.value)
    shutil.copytree(tiny_blip, blip.blip_folder(tmp_path / "models"))
    found = cap.make_captioner("blip", models_dir=tmp_path / "models", device="cpu", max_new_tokens=3)
    assert found.folder == blip.blip_folder(tmp_path / "models")
    with pytest.raises(UserError, match="neither"):
        blip.BlipCaptioner(tmp_path / "no_such_folder")


def test_benchmark_prints_its_table(capsys, tmp_path):
    from train_tools.bench import dataset as bench_dataset

    build_tagger_files(wd14.wd14_folder(tmp_path, REPO))
    assert bench_dataset.main(["-n", "3", "--models-dir", str(tmp_path), "--repo", REPO]) == 0
    out = capsys.readouterr().out
    assert "3 pictures" in out and f"{os.cpu_count()} CPUs" in out
    for row in ("prepare_dataset, first run", "rerun", "stand-in tagger", f"WD14 {REPO}, batches"):
        line = next(line for line in out.splitlines() if row in line)
        assert float(re.search(r"([0-9.]+) images/s", line).group(1)) > 0, line
