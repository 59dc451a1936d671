"""Renderers and collectors of the README's result blocks, one module per job (see ``tools/readme.py``)."""
