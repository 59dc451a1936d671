"""The one exception family the command line shows as a message instead of a traceback.

A :class:`TuneshiftError` is a *user* error: a bad config value, a missing file, an unknown name, a model
that cannot be loaded. Its message says what is wrong and how to fix it, so ``tuneshift`` prints it alone and
exits with status 2 (set ``HYDRA_FULL_ERROR=1`` for the traceback). Anything else is a bug in tuneshift or a
plugin and keeps its traceback. Subclasses also derive from ``ValueError`` where callers expect one.
"""
from __future__ import annotations


class TuneshiftError(Exception):
    """A user error whose message names the problem and the fix."""


class ConfigError(TuneshiftError, ValueError):
    """A config value is wrong (type, range, a combination that cannot work)."""


class RunFolderError(TuneshiftError):
    """A run folder holds results of other settings, or cannot be written."""


__all__ = ["ConfigError", "RunFolderError", "TuneshiftError"]
