"""Token distribution shift (AlignTDS), KL on the same tokens, and differential attribution (methods.md D)."""
from tuneshift.plugins.token_shift.plugin import TokenShiftOptions, TokenShiftPlugin

__all__ = ["TokenShiftOptions", "TokenShiftPlugin"]
