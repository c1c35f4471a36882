"""What a person sees: the tab (its logic, its layout and HTML, what differs between Gradio 3, 4 and 5-6), the
background job that runs a training or previews, and the standalone app around the tab.

The top of the package: may import everything below it (core, ``data``, ``models``, ``networks``,
``training``, ``previews``, ``hosts``). Nothing imports ``ui`` but the command line (for the app) and the WebUI
glue in ``scripts/``. Importing this package imports no Gradio; its modules do.
"""
