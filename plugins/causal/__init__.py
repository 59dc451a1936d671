"""The ``causal`` plugin: interventions that test whether the analyses' findings matter (methods.md E)."""
from tuneshift.plugins.causal.plugin import CausalOptions, CausalPlugin

__all__ = ["CausalOptions", "CausalPlugin"]
