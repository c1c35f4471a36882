"""Pictures in, training set out: the user's uploads, aspect-ratio buckets, captions and the captioners, the
prepared set, the batch samplers, the latent cache and the demo pictures.

May import the package's core (``errors``, ``fileio``, ``names``, ``config``, ``store``, ``progress``,
``devicelock``); never ``models``, ``networks``, ``training``, ``previews``, ``ui`` or ``hosts``.
"""
