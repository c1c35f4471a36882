"""Base models: reading single-file checkpoints (SD1, SD2, SDXL) and telling their family, converting them to
diffusers modules offline, the families' configs and tokenizers, the text conditioning both the trainer and
the previews use, finding a checkpoint by name, and the tiny demo model.

May import the package's core (``errors``, ``fileio``, ``config``); nothing above it (``data``, ``networks``,
``training``, ``previews``, ``ui``, ``hosts``).
"""
