"""The adapters trained on a base model and their files: which layers get one, attaching it (LoRA/LoCon, LoHa,
LoKr and DoRA, one file each, listed in ``types.py``), what a host computes from a file (``weights.py``), the
kohya-layout ``.safetensors`` file every WebUI loads, and installing a file into a Lora folder with its card.

May import the package's core and ``models``; nothing above it (``training``, ``previews``, ``ui``, ``hosts``).
"""
