"""The one exception type the CLI turns into a one-line message (no traceback unless ``--debug``)."""

from __future__ import annotations


class PotpourriError(RuntimeError):
    """A user-facing error: the message names the bad value and the fix."""
