"""Training a network: the trainer (set-up, loop, saving), text conditioning, optimizers, the flat parameter
layout, and resume state.

May import the package's core, ``data``, ``models`` and ``networks``; never ``previews`` at import time (the
samples made during training import it inside the call), nor ``ui`` or ``hosts``.
"""
