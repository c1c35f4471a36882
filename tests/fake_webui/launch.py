"""Stand-in for the WebUI's launch.py: re-exports the install helpers, as A1111's does."""

from modules.launch_utils import is_installed, run_pip  # noqa: F401
