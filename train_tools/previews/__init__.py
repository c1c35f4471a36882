"""Pictures made with a run's LoRA files: the preview grid (epochs x weights) and its description, the samples
taken during training, through diffusers or the WebUI's own txt2img (the host supplies that one).

May import the package's core, ``models``, ``networks`` and ``training.text_encoding``; nothing of ``ui`` or
``hosts``.
"""
