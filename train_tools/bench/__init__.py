"""Benchmarks that print figures: training speed, memory and overhead (``python -m train_tools.bench``), and
preparing and tagging pictures (``python -m train_tools.bench.dataset``), how well the demo model draws its
world (``shapes_score``) and how fast a recipe teaches it the demo's concept (``quality``, run as
``python -m train_tools.bench_quality``). Figures go to BENCHMARKS.md.

May import anything of the package; nothing imports ``bench``.
"""
