"""Method B, ``head_relations``: word pairs that self-attention heads relate, base vs instruction-tuned.

Modules: :mod:`.mining` (the vectorised core), :mod:`.similarity` (word-vector backends, thresholds tau),
:mod:`.corpus` (the offline corpus of the ``ppmi`` backend), :mod:`.verbs` (instruction vs general verbs),
:mod:`.views` (HTML and plots), :mod:`.plugin` (the glue to the runner).
"""
from tuneshift.plugins.head_relations.plugin import HeadRelationsOptions, HeadRelationsPlugin

__all__ = ["HeadRelationsOptions", "HeadRelationsPlugin"]
