"""Benchmarks that print figures: training speed, memory and overhead (``python -m train_tools.bench``), and
preparing and tagging pictures (``python -m train_tools.bench.dataset``). Figures go to BENCHMARKS.md.

May import anything of the package; nothing imports ``bench``.
"""
