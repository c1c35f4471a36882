"""The programs the tab runs in: the host interface and the standalone app's host (``base``), and the WebUI's
(``webui``: its folders, GPU queue, progress bar, captioners and txt2img, reached only through ``modules``).

May import the package's core, ``models``, ``previews`` and ``training``; never ``ui``. Imported by the WebUI at
start, so nothing heavy at import time.
"""
