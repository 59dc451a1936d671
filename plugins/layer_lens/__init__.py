"""Logit lens per layer, commitment depth, residual differences and the activation-difference lens (D.2-D.3)."""
from tuneshift.plugins.layer_lens.plugin import LayerLensOptions, LayerLensPlugin

__all__ = ["LayerLensOptions", "LayerLensPlugin"]
