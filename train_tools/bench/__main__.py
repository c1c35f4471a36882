"""``python -m train_tools.bench``: the training benchmark (``speed.py``)."""

from .speed import main

raise SystemExit(main())
