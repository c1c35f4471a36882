"""Train Tools: turn a handful of pictures into a LoRA that every Stable Diffusion UI loads.

This package never imports the WebUI, and importing it is cheap: the heavy libraries (torch, diffusers,
transformers) are imported by the modules that need them, when they are used.
"""

__version__ = "0.1.0"

import logging as _logging


class _QuietOptionalKernelNotice(_logging.Filter):
    """bitsandbytes warns at import, on CPUs with AVX512-BF16, that an optional 4-bit kernel package is missing.
    Train Tools never uses 4-bit layers (peft imports bitsandbytes on its own), so the line only confuses users.

    Only that one line is dropped, and only where this package is imported before bitsandbytes (the app, the
    CLI). A WebUI imports bitsandbytes before any extension, which is why install.py does not add it there."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return "gemm_4bit_forward" not in str(record.msg)


_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_QuietOptionalKernelNotice())
