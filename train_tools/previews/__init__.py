"""Pictures made with a run's LoRA files: the preview grid (epochs x weights) and its description, the samples
taken during training, through diffusers or the WebUI's own txt2img (the host supplies that one).

May import the package's core, ``models`` and ``networks``; nothing of ``training``, ``ui`` or ``hosts`` (the
trainer calls previews for its samples, not the other way round).
"""
