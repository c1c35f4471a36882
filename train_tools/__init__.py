"""Train Tools: turn a handful of pictures into a LoRA that every Stable Diffusion UI loads.

This package never imports the WebUI, and importing it is cheap: the heavy libraries (torch, diffusers,
transformers) are imported by the modules that need them, when they are used.
"""

__version__ = "0.1.0"
