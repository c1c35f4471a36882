"""Shared test set-up: offline, deterministic, small."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# Code that only works with network access is a bug for WebUI users too.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The device locks live in one folder per machine (train_tools/devicelock.py): the tests must never see the
# user's real runs, nor a parallel test run's. This process's own folder, for anything outside a test...
_SESSION_LOCKS = tempfile.mkdtemp(prefix="train_tools-test-locks-")
os.environ["TRAIN_TOOLS_LOCK_DIR"] = _SESSION_LOCKS
atexit.register(shutil.rmtree, _SESSION_LOCKS, True)


@pytest.fixture(autouse=True)
def _own_lock_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """...and each test its own, so a job a test leaves running cannot make the next one busy. Subprocesses
    a test starts inherit it (os.environ), so the processes of one test share it."""
    folder = tmp_path_factory.mktemp("locks")
    monkeypatch.setenv("TRAIN_TOOLS_LOCK_DIR", str(folder))
    return folder
