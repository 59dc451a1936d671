"""Built-in plugins. Importing this package registers each one under its ``name`` (see framework/plugin.py).

A user's plugin is one module with a ``Plugin`` subclass, imported here (or by the user before the run),
plus ``conf/plugins/<name>.yaml``.
"""
from tuneshift.plugins import residual_norm  # noqa: F401
from tuneshift.plugins import ffn_concepts  # noqa: F401
from tuneshift.plugins import head_relations  # noqa: F401
from tuneshift.plugins import saliency  # noqa: F401
