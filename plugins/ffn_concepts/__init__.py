"""Method C: principal directions of the FFN value vectors, their words and concepts, base vs tuned.

See :mod:`tuneshift.plugins.ffn_concepts.plugin` for the outputs and ``docs/plugins/ffn_concepts.md`` for usage.
"""
from tuneshift.plugins.ffn_concepts import chat_annotators  # noqa: F401  (registers endpoint and llm_judge)
from tuneshift.plugins.ffn_concepts.plugin import FFNConceptsOptions, FFNConceptsPlugin

__all__ = ["FFNConceptsOptions", "FFNConceptsPlugin"]
