"""The run's log file (``<run folder>/cli.log``), written when it can be and skipped when it cannot.

Hydra configures job logging before tuneshift's code runs; its stock ``logging.FileHandler`` fails on a
folder that cannot be written (a finished run on a read-only mount: "Unable to configure handler 'file'"),
which would stop the job before tuneshift can say anything useful. :class:`RunLogHandler` opens the file
the same way, and when that fails it logs nowhere (the console handler still shows everything) after one
line on stderr; the run itself then reports the folder problem clearly, or reads what it needs.
``conf/hydra/job_logging/tuneshift.yaml`` uses it.
"""
from __future__ import annotations

import logging
import sys


class RunLogHandler(logging.FileHandler):
    """A ``FileHandler`` that degrades to a no-op when its file cannot be opened."""

    def __init__(self, filename: str, mode: str = "a", encoding: str | None = None, delay: bool = False,
                 errors: str | None = None):
        self.disabled_reason = ""
        try:
            super().__init__(filename, mode, encoding, delay=False, errors=errors)
        except OSError as err:
            logging.Handler.__init__(self)
            self.baseFilename, self.mode, self.encoding, self.errors = filename, mode, encoding, errors
            self.stream = None
            self.disabled_reason = err.strerror or str(err)
            print(f"tuneshift: warning: cannot write the log file {filename} ({self.disabled_reason}); "
                  "logging to the console only", file=sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        if not self.disabled_reason:
            super().emit(record)

    def close(self) -> None:
        if self.disabled_reason:
            logging.Handler.close(self)
        else:
            super().close()


__all__ = ["RunLogHandler"]
