"""Repository tools (not part of the installed package): ``python -m tools.readme`` keeps the README's result
blocks equal to the committed results."""
