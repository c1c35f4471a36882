"""Shared test set-up: offline, deterministic, small."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Code that only works with network access is a bug for WebUI users too.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
