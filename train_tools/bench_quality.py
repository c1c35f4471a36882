"""``python -m train_tools.bench_quality``: how fast each recipe teaches the demo's concept (``bench/quality.py``)."""

from .bench.quality import main

if __name__ == "__main__":
    raise SystemExit(main())
