"""Atomic writes: a failure mid-write leaves the old file and no temporary file behind."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from train_tools import fileio
from train_tools.errors import UserError


def test_write_replaces_whole_file(tmp_path: Path):
    target = tmp_path / "sub" / "a.json"
    fileio.write_json(target, {"a": 1, "名前": "猫"})
    fileio.write_json(target, {"a": 2})
    assert target.read_text() == '{\n  "a": 2\n}\n'
    assert [p.name for p in target.parent.iterdir()] == ["a.json"]


def test_failure_keeps_old_file(tmp_path: Path):
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")

    def broken_writer(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        fileio.write_with(target, broken_writer)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_full_disk_is_a_clear_message(tmp_path: Path):
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")

    def full(tmp: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(UserError, match="disk is full"):
        fileio.write_with(target, full)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_sha256_file(tmp_path: Path):
    import hashlib

    data = bytes(range(256)) * 10000
    (tmp_path / "f").write_bytes(data)
    assert fileio.sha256_file(tmp_path / "f", chunk=1000) == hashlib.sha256(data).hexdigest()
