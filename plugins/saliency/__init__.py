"""Method A of the paper: which prompt tokens each response token depends on, and how tuning shifts it.

Modules, one job each:

- :mod:`.attribution`  exact gradient x input ``I[n, m]`` (batched VJPs or JVPs, chosen per prompt)
- :mod:`.density`      normalisation to 0..10, importance density, the prompt's instruction score
- :mod:`.stats`        Tables 1 and 2 (Welch, one-sided), the density profile over prompt position
- :mod:`.paper`        the authors' released attributions: restricted unpickler, ``tuneshift-paper-tables``
- :mod:`.views`        self-contained HTML views and matplotlib plots
- :mod:`.plugin`       :class:`SaliencyPlugin`, the runner glue
"""
from tuneshift.plugins.saliency.plugin import SaliencyOptions, SaliencyPlugin

__all__ = ["SaliencyOptions", "SaliencyPlugin"]
