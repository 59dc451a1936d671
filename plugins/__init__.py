"""Built-in plugins, one subpackage (or module) each. They are found like anyone's: through the entry-point
group ``tuneshift.plugins`` (``setup.cfg``), never imported by the core.

- ``saliency``        method A: gradient x input, importance density, Tables 1-2
- ``head_relations``  method B: word pairs of each attention head, instruction verbs
- ``ffn_concepts``    method C: FFN principal directions, words, concepts, rotation
- ``residual_norm``   the example plugin: mean residual-stream norm per layer
"""
