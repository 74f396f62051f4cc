"""Error types that the command line turns into one clear message (no traceback)."""

from __future__ import annotations


class BDError(Exception):
    """Base class: an error a user can act on; its message names the file, row or key at fault."""


class ConfigError(BDError):
    """A configuration or parameter value is unknown, of the wrong type or out of range."""


class SlideError(BDError):
    """A slide file cannot be opened or read; the message names the file and the reason."""


class TableError(BDError):
    """A clinical table, sample sheet or split file is malformed; names the file, row and column."""


class StoreError(BDError):
    """A feature store or other stage output is missing, incomplete or inconsistent."""
