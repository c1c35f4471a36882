"""The adapters trained on a base model and their files: which layers get one, attaching it (plain LoRA
today; LoCon, LoHa, LoKr and DoRA go beside it, one file each), the kohya-layout ``.safetensors`` file every
WebUI loads, and installing a file into a Lora folder with its card.

May import the package's core and ``models``; nothing above it (``training``, ``previews``, ``ui``, ``hosts``).
"""
