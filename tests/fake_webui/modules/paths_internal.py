"""Stand-in paths; tests point ``data_path``/``models_path`` at a temporary folder."""

from __future__ import annotations

import os

data_path = os.environ.get("FAKE_WEBUI_DATA", os.path.abspath("fake_webui_data"))
models_path = os.path.join(data_path, "models")
default_output_dir = os.path.join(data_path, "outputs")
script_path = data_path
