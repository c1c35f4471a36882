"""Training a network: the trainer (set-up, one step, saving, resuming), optimizers, the flat parameter layout,
the resume state (its type, files and checks), and out-of-memory handling.

May import the package's core, ``data``, ``models``, ``networks`` and ``previews`` (the samples made during
training); never ``ui`` or ``hosts``.
"""
