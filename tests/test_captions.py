"""Caption editing of a prepared dataset: tag counts, one caption, removing and renaming tags; edits survive
Update Dataset and reach training (load_items) and the LoRA's ss_tag_frequency (tag_frequency)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from train_tools.data import captions
from train_tools.data.items import load_items, tag_frequency
from train_tools.data.layout import EDITS_NAME
from train_tools.data.prepare_folder import prepare_dataset
from train_tools.data.prepare_options import PrepareOptions
from train_tools.data.reports import PrepareReport
from train_tools.errors import UserError

COLOURS = {"a": (200, 30, 30), "b": (30, 200, 30), "c": (30, 30, 200)}
UPLOADED = {"a": "cat, solo, red", "b": "dog, solo", "c": "solo, red, red"}


@pytest.fixture()
def version(tmp_path: Path) -> tuple[Path, Path]:
    orig, prep = tmp_path / "orig", tmp_path / "prep"
    orig.mkdir()
    for stem, colour in COLOURS.items():
        Image.new("RGB", (80, 80), colour).save(orig / f"{stem}.png")
        (orig / f"{stem}.txt").write_text(UPLOADED[stem] + "\n", encoding="utf-8")
    prepare(orig, prep)
    return orig, prep


def prepare(orig: Path, prep: Path, trigger: str = "trig", mode: str = "use") -> PrepareReport:
    return prepare_dataset(orig, prep, PrepareOptions(trigger_word=trigger, caption_mode=mode))


def captions_of(prep: Path) -> dict[str, str]:
    return {item.name: item.caption for item in load_items(prep)}


def txt_of(prep: Path) -> dict[str, str]:
    return {p.stem: p.read_text(encoding="utf-8").strip() for p in sorted(prep.glob("*.txt"))}


def test_tag_counts_most_frequent_first(version):
    _orig, prep = version
    counts = captions.tag_counts(prep)
    # Ties by name; "red" is there 3 times as c's caption holds it twice (occurrences are counted).
    assert counts[:3] == [("red", 3), ("solo", 3), ("trig", 3)]
    assert dict(counts) == tag_frequency(load_items(prep))
    assert [c for _t, c in counts] == sorted((c for _t, c in counts), reverse=True)
    assert dict(counts)["dog"] == 1


def test_write_caption_reaches_training_and_survives_re_prepare(version):
    orig, prep = version
    saved = captions.write_caption(prep, "b.png", "  trig,  brown   dog\nsitting ")
    assert saved == "trig, brown dog, sitting"
    assert captions_of(prep)["b"] == saved and txt_of(prep)["b"] == saved
    assert tag_frequency(load_items(prep))["brown dog"] == 1
    # Update Dataset with nothing changed, with a new trigger word, and with a new uploaded caption: every
    # one of these rewrites composed captions, none touches the edit.
    prepare(orig, prep)
    assert captions_of(prep)["b"] == saved
    prepare(orig, prep, trigger="other")
    assert captions_of(prep) == {"a": "other, cat, solo, red", "b": saved, "c": "other, solo, red, red"}
    (orig / "b.txt").write_text("something else\n", encoding="utf-8")
    prepare(orig, prep, trigger="other")
    assert captions_of(prep)["b"] == saved and txt_of(prep)["b"] == saved
    # The edit belongs to that picture: a different picture under the same name gets its own caption.
    Image.new("RGB", (90, 90), (5, 5, 5)).save(orig / "b.png")
    prepare(orig, prep, trigger="other")
    assert captions_of(prep)["b"] == "other, something else"


def test_read_caption_sees_an_edit_made_after_loading(version):
    _orig, prep = version
    item = next(i for i in load_items(prep) if i.name == "a")
    assert captions.read_caption(item) == "trig, cat, solo, red"
    captions.write_caption(prep, "a", "new words")
    assert item.caption == "trig, cat, solo, red" and captions.read_caption(item) == "new words"
    # The edits file wins over the prepared .txt (which an Update Dataset running at the same time may write).
    (prep / "a.txt").write_text("stale\n", encoding="utf-8")
    assert captions_of(prep)["a"] == "new words" and captions.read_caption(item) == "new words"


def test_remove_tag_everywhere_and_for_pictures_added_later(version):
    orig, prep = version
    captions.write_caption(prep, "a.png", "cat, solo, sitting")
    assert captions.remove_tag(prep, "solo") == 3
    assert captions_of(prep) == {"a": "cat, sitting", "b": "trig, dog", "c": "trig, red, red"}
    assert captions.remove_tag(prep, "solo") == 0
    assert "solo" not in dict(captions.tag_counts(prep))
    prepare(orig, prep)
    assert captions_of(prep) == {"a": "cat, sitting", "b": "trig, dog", "c": "trig, red, red"}
    # A picture added later loses the tag too; a caption edited after the removal keeps what was typed.
    Image.new("RGB", (70, 70), (90, 90, 0)).save(orig / "d.png")
    (orig / "d.txt").write_text("solo, bird\n", encoding="utf-8")
    prepare(orig, prep)
    assert captions_of(prep)["d"] == "trig, bird"
    captions.write_caption(prep, "b", "dog, solo")
    prepare(orig, prep, trigger="t2")
    assert captions_of(prep)["b"] == "dog, solo"
    assert captions_of(prep)["c"] == "t2, red, red"
    with pytest.raises(UserError):
        captions.remove_tag(prep, " , ")


def test_rename_tag_merges_duplicates_and_survives(version):
    orig, prep = version
    assert captions.rename_tag(prep, "red", "crimson") == 2
    # In c the two "red" became one "crimson", kept at its first place.
    assert captions_of(prep) == {"a": "trig, cat, solo, crimson", "b": "trig, dog, solo", "c": "trig, solo, crimson"}
    assert captions.rename_tag(prep, "cat", "solo") == 1
    assert captions_of(prep)["a"] == "trig, solo, crimson"
    prepare(orig, prep, trigger="trig", mode="use")
    assert captions_of(prep)["a"] == "trig, solo, crimson"
    frequency = tag_frequency(load_items(prep))
    assert frequency["crimson"] == 2 and "red" not in frequency and frequency["solo"] == 3
    assert captions.rename_tag(prep, "dog", "dog") == 0
    with pytest.raises(UserError, match="comma"):
        captions.rename_tag(prep, "dog", "a, b")


def test_errors_and_an_unreadable_edits_file(version):
    orig, prep = version
    with pytest.raises(UserError, match="Update Dataset"):
        captions.write_caption(prep, "zzz.png", "x")
    captions.write_caption(prep, "a", "edited")
    # The edits file is ours and separate from the manifest; a damaged one is ignored, not fatal.
    assert json.loads((prep / EDITS_NAME).read_text(encoding="utf-8"))["captions"]["a"]["text"] == "edited"
    (prep / EDITS_NAME).write_text("{not json", encoding="utf-8")
    prepare(orig, prep)
    assert captions_of(prep)["a"] == "edited"  # still in the .txt, which nothing had a reason to rewrite
    prepare(orig, prep, trigger="t2")
    assert captions_of(prep)["a"] == "t2, cat, solo, red"
    prepare(orig, prep)
    # Removing a picture's original does not delete the edits file with the other pictures' files.
    (orig / "c.png").unlink()
    captions.write_caption(prep, "b", "kept")
    prepare(orig, prep)
    assert (prep / EDITS_NAME).is_file() and captions_of(prep) == {"a": "trig, cat, solo, red", "b": "kept"}
